# VidEmo-7B stage 1 (curriculum emotion learning) on Emo-CFG from Qwen2.5-VL-7B-Instruct, one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 train_sft.py config/sft_qwen25vl_7b.py
# Settings as far as the paper and the official VidEmo repo tell: global batch 512
# (8 GPUs x 4 x 16 accumulation), lr 4e-5, AdamW, cosine; ViT and merger frozen (ms-swift defaults); video at
# 2 fps, <= 16 frames, <= 128*28*28 pixels per frame (the released inference setting).
out_dir = "out/sft_qwen25vl_7b"
init_from = "Qwen/Qwen2.5-VL-7B-Instruct"  # or a local directory holding it
train_file = "data/Emo-CFG/train"  # a folder of Emo-CFG JSON/JSONL files with `level` set per record
val_file = "none"
test_file = "none"  # evaluate with eval.py on the 15 tasks afterwards
video_root = "data/Emo-CFG"
fps = 2.0
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
max_seq_len = 8192
num_workers = 8
curriculum = True
stage_epochs = (1.0, 1.0, 1.0)
replay = 0.1
lr_schedule = "run"  # one cosine over the run; EmoSynth's per-stage default is not measured at this scale
batch_size = 4
grad_accum = 16
lr = 4e-5
min_lr = 0.0
warmup_steps = 50
weight_decay = 0.1
beta2 = 0.95
freeze_vision = True
freeze_merger = True
fsdp = True
grad_checkpointing = True
dtype = "bfloat16"
log_every = 1
eval_every = 0
save_every = 200
