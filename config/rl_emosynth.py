# The embedded default of stage 2 (what `python train_rl.py` runs with no arguments): GRPO on EmoSynth from the
# stage-1 checkpoint that `python train_sft.py` writes. Listed here to edit and copy:
#   python train_rl.py config/rl_emosynth.py --beta=0.0 --loss_type=dapo --epsilon_high=0.28
out_dir = "out/rl_emosynth"
init_from = "out/sft_emosynth/ckpt"  # policy init and frozen reference
data_dir = "data/emosynth/build"
# the reasoning task (affective tree, TED reward) plus single-label emotion QA, so the answer accuracy is held
tasks = ("fine_grained_caption", "emotion_single")
fps = 4.0
max_frames = 8
max_pixels = 112 * 112
# GRPO as VidEmo's recipe most likely ran it (ms-swift / TRL-0.16 era, reference/paper-notes.md §3):
# G = 8, beta = 0.04, eps = 0.2, per-sequence mean ("grpo"), one update per rollout; tau 0.7 here (see below)
num_generations = 8
temperature = 0.7
max_completion_length = 96  # the longest EmoSynth affective tree is ~75 tokens
prompts_per_step = 8  # x 8 completions = 64 rollouts per step
grad_accum = 2
num_iterations = 1
beta = 0.04
epsilon = 0.2
loss_type = "grpo"
scale_rewards = "group"
# rewards: task metric (accuracy | f1 | caption | tree) + a small format bonus on the tree task
w_accuracy = 1.0
w_f1 = 1.0
w_caption = 1.0
w_tree = 1.0
w_format = 0.1
tree_lambda = 1.0
# a ~1M-parameter model: a far larger step than the 1e-6 used for 7B models. 150 steps at 2e-4 (tau 0.9) drove KL to
# 0.2-0.4 and lowered the test tree reward; 400 steps at 5e-5 (tau 0.7) keep KL ~0.02 (README: RL results).
max_steps = 400
lr = 5e-5
min_lr = 5e-6
warmup_steps = 10
log_every = 1
sample_table_every = 10
save_every = 50
