# The embedded default (what `python train_sft.py` runs with no arguments): a ~1M-param VidEmo from scratch on
# EmoSynth, three-stage curriculum (per-stage learning rate), 2 CPU cores in about 15 minutes. Listed here to edit and copy:
#   python train_sft.py config/sft_emosynth.py --batch_size=8 --lr=3e-4
out_dir = "out/sft_emosynth"
init_from = "scratch"
data_dir = "data/emosynth/build"
fps = 4.0
max_frames = 8
max_pixels = 112 * 112
# the paper's method: emotion answers through the affective tree (<think>tree</think><answer>...</answer>) for the
# val-chosen tasks; --answer_format=direct is the ablation
answer_format = "reasoning"
reasoning_tasks = ("emotion_single", "emotion_fine", "sentiment_single", "sentiment_fine")
curriculum = True
stage_epochs = (2.6, 1.3, 4.0)
replay = 0.6
lr_schedule = "stage"
batch_size = 16
lr = 1e-3
