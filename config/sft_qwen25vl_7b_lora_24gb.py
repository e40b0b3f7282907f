# VidEmo-7B stage 1 with LoRA on ONE 24 GB GPU (RTX 3090 / 4090 / A5000): the 80 GB LoRA recipe with one sample per
# micro-batch and 8 frames per video (docs/scale.md).
#   python train_sft.py config/sft_qwen25vl_7b_lora_24gb.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "sft_qwen25vl_7b_lora.py")).read())
out_dir = "out/sft_qwen25vl_7b_lora_24gb"
max_frames = 8
batch_size = 1
grad_accum = 512
num_workers = 4
