# VidEmo-3B stage 2 on ONE 80 GB GPU, full fine-tuning. The plan has no room for a frozen reference beside the fp32
# policy and AdamW, so this recipe drops the KL term (beta = 0, no reference model) and uses DAPO's token-level loss;
# 512-token completions.
#   python train_rl.py config/rl_qwen25vl_3b_1gpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "rl_qwen25vl_3b.py")).read())
out_dir = "out/rl_qwen25vl_3b_1gpu"
init_from = "out/sft_qwen25vl_3b_1gpu/ckpt"
fsdp = False
beta = 0.0
loss_type = "dapo"
prompts_per_step = 16
grad_accum = 16  # 1 prompt (8 completions) per micro-batch
max_completion_length = 512
max_steps = 8000  # the 8-GPU recipe's 128k prompts
