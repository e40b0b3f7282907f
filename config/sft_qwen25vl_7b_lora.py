# VidEmo-7B stage 1 with LoRA on ONE 80 GB GPU: rank-16 adapters on every decoder projection, the base frozen in bf16
# (docs/scale.md). Saves a merged HF directory (lora_save = "merged"), which vLLM / transformers load unchanged.
#   python train_sft.py config/sft_qwen25vl_7b_lora.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "sft_qwen25vl_7b.py")).read())
out_dir = "out/sft_qwen25vl_7b_lora"
fsdp = False
lora_rank = 16
lora_alpha = 32.0
lr = 2e-4  # adapters start at zero and need a larger step than full fine-tuning
min_lr = 2e-5
weight_decay = 0.0
batch_size = 4
grad_accum = 128  # global batch 512
