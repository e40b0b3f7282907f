# VidEmo-3B stage 2 on one node of 8 x 80 GB GPUs: the 7B recipe with the 3B stage-1 checkpoint.
#   torchrun --standalone --nproc_per_node=8 train_rl.py config/rl_qwen25vl_3b.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "rl_qwen25vl_7b.py")).read())
out_dir = "out/rl_qwen25vl_3b"
init_from = "out/sft_qwen25vl_3b/ckpt"
