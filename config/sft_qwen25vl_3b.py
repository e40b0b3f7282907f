# VidEmo-3B stage 1 (curriculum emotion learning) on Emo-CFG from Qwen2.5-VL-3B-Instruct, one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_sft.py config/sft_qwen25vl_3b.py
# The 7B recipe with the 3B init (same data, schedule and settings).
import os

exec(open(os.path.join(os.path.dirname(__file__), "sft_qwen25vl_7b.py")).read())
out_dir = "out/sft_qwen25vl_3b"
init_from = "Qwen/Qwen2.5-VL-3B-Instruct"  # or a local directory holding it
