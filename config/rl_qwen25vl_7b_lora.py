# VidEmo-7B stage 2 with LoRA on ONE 80 GB GPU, from a stage-1 checkpoint (merged LoRA or full). The reference is the
# base with the adapters off: no second copy of the weights (docs/scale.md).
#   python train_rl.py config/rl_qwen25vl_7b_lora.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "rl_qwen25vl_7b.py")).read())
out_dir = "out/rl_qwen25vl_7b_lora"
init_from = "out/sft_qwen25vl_7b_lora/ckpt"
fsdp = False
lora_rank = 16
lora_alpha = 32.0
lr = 1e-5
min_lr = 1e-6
prompts_per_step = 16
grad_accum = 16  # 1 prompt (8 completions) per micro-batch
max_completion_length = 512
max_steps = 8000
