# VidEmo-3B stage 1 on ONE 80 GB GPU, full fine-tuning (fp32 master weights + AdamW fit beside the activations with
# checkpointing; docs/scale.md). The 8-GPU recipe's global batch of 512 by accumulation (slow but the same run).
#   python train_sft.py config/sft_qwen25vl_3b_1gpu.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "sft_qwen25vl_3b.py")).read())
out_dir = "out/sft_qwen25vl_3b_1gpu"
fsdp = False
batch_size = 2
grad_accum = 256
