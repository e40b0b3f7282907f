# The embedded default of stage 2 (what `python train_rl.py` runs with no arguments): GRPO on EmoSynth from the
# stage-1 checkpoint that `python train_sft.py` writes. Listed here to edit and copy:
#   python train_rl.py config/rl_emosynth.py --beta=0.04 --max_steps=1200 --loss_type=dapo --epsilon_high=0.28
out_dir = "out/rl_emosynth"
init_from = "out/sft_emosynth/ckpt"  # policy init (and the frozen reference when beta > 0)
data_dir = "data/emosynth/build"
# the affective tree (TED reward) and every emotion QA task (answer + tree + format under the reasoning format)
tasks = ("fine_grained_caption", "emotion_single", "emotion_multi", "emotion_fine", "sentiment_single", "sentiment_fine",
         "micro_expression", "emotion_transition")
fps = 4.0
max_frames = 8
max_pixels = 112 * 112
answer_format = "auto"  # as init_from was trained (reasoning for the default stage 1)
# GRPO as VidEmo's recipe most likely ran it (the ms-swift / TRL-0.16 defaults of its time: G = 8, eps = 0.2,
# per-sequence mean ("grpo"), one update per rollout) plus DAPO's dynamic sampling, but without the KL term: beta = 0
# (no reference model) and the pass it saves spent on 200 more steps, chosen on val (docs/method.md §3r)
num_generations = 8
temperature = 0.5  # the README's RL table says why 0.5 on this tiny model, not TRL's 0.9
max_completion_length = 96  # the longest EmoSynth affective tree is ~75 tokens
prompts_per_step = 8  # x 8 completions = 64 rollouts per step
grad_accum = 2
num_iterations = 1
beta = 0.0  # VidEmo's recipe: 0.04 (config/rl_qwen25vl_7b.py keeps it)
epsilon = 0.2
loss_type = "grpo"
scale_rewards = "group"
dynamic_sampling = True  # all-correct groups carry no advantage: dropped rather than diluting the update
train_vision = True  # the tree reward reaches the vision tower (gender cues, expression intensity)
# rewards: task metric (accuracy | f1 | caption | tree) + a small format bonus on the tree task
w_accuracy = 1.0
w_f1 = 1.0
w_caption = 1.0
w_tree = 1.0
w_format = 0.1
tree_lambda = 1.0
# a ~1M-parameter model takes a far larger step than the 1e-6 used for 7B models (docs/results.md)
max_steps = 1400  # about the wall time of 1,200 with the KL's reference pass (docs/method.md §3r)
lr = 1e-4
min_lr = 1e-5
warmup_steps = 10
log_every = 1
sample_table_every = 10
save_every = 50
eval_every = 100  # held-out val score of each RL task (the curve in the README)
