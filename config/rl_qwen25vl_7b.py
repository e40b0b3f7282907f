# VidEmo-7B stage 2 (affective-tree GRPO) from the stage-1 checkpoint, one node of 8 x 80 GB GPUs, full fine-tuning:
#   torchrun --standalone --nproc_per_node=8 train_rl.py config/rl_qwen25vl_7b.py
# FSDP2 (policy and reference sharded, the policy gathered once per rollout) with activation checkpointing; the
# per-GPU memory plan of this recipe is in the README (bench.py --section=memory). Batch 128 prompts x G = 8, 1000
# steps ~ one epoch of a 128k-prompt RL set, as in the paper; vision tower frozen (ms-swift's freeze_vit).
out_dir = "out/rl_qwen25vl_7b"
init_from = "out/sft_qwen25vl_7b/ckpt"
train_file = "data/Emo-CFG/rl"
video_root = "data/Emo-CFG"
val_file = "none"
test_file = "none"  # evaluate with eval.py on the 15 tasks afterwards
eval_every = 0
fps = 2.0
max_frames = 16
min_pixels = 4 * 28 * 28
max_pixels = 128 * 28 * 28
num_generations = 8
temperature = 0.9
max_completion_length = 1024
prompts_per_step = 128
grad_accum = 16  # 128 prompts / (8 GPUs x 16) = 1 prompt (8 completions) per micro-batch
dynamic_sampling = False
beta = 0.04  # the KL of VidEmo's recipe (ms-swift / TRL defaults); the EmoSynth default runs without it
train_vision = False
max_steps = 1000
lr = 1e-6
min_lr = 1e-7
warmup_steps = 10
fsdp = True
grad_checkpointing = True
dtype = "bfloat16"
save_dtype = "bfloat16"
save_every = 50
sample_table_every = 50
