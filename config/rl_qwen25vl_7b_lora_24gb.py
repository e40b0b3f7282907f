# VidEmo-7B stage 2 with LoRA on ONE 24 GB GPU: G = 8 completions of <= 512 tokens, 8 frames per video (docs/scale.md:
# the memory plan: 19.7 GiB with the default shared-prefix layout; with --shared_prefix=False add --num_generations=4,
# as G = 8 would plan 22.6 GiB, inside 24 GB only without the 10 % margin).
#   python train_rl.py config/rl_qwen25vl_7b_lora_24gb.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "rl_qwen25vl_7b_lora.py")).read())
out_dir = "out/rl_qwen25vl_7b_lora_24gb"
init_from = "out/sft_qwen25vl_7b_lora_24gb/ckpt"
max_frames = 8
