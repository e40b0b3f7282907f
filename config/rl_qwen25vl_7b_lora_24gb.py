# VidEmo-7B stage 2 with LoRA on ONE 24 GB GPU: G = 4 completions of <= 512 tokens, 8 frames per video (docs/scale.md:
# the memory plan).
#   python train_rl.py config/rl_qwen25vl_7b_lora_24gb.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "rl_qwen25vl_7b_lora.py")).read())
out_dir = "out/rl_qwen25vl_7b_lora_24gb"
init_from = "out/sft_qwen25vl_7b_lora_24gb/ckpt"
max_frames = 8
num_generations = 4
