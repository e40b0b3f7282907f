"""Stage 2 of VidEmo: affective-tree reinforcement learning with a hand-written GRPO loop.

    python train_rl.py                                    # EmoSynth default, from out/sft_emosynth/ckpt, CPU ok
    python train_rl.py config/rl_emosynth.py --num_generations=4 --beta=0.0 --loss_type=dapo
    torchrun --standalone --nproc_per_node=8 train_rl.py --init_from=out/sft_qwen25vl_7b/ckpt --train_file=... --lr=1e-6

The whole algorithm reads top to bottom in `train()`: for each step, every rank takes its prompts (whole groups),
encodes each video once (the policy pass re-encodes it once per group with grad when train_vision is on), samples
G completions per prompt with the KV-cache generator, scores them with the rule-based rewards of reward.py, turns
rewards into group-relative advantages, and runs the clipped-ratio policy loss with a k3 KL to a frozen reference
model. Semantics follow TRL's GRPOTrainer (DESIGN §5):

    A_i   = (R_i - mean_G R) / (std_G R + 1e-4)                       std unbiased; scale_rewards: group|batch|none
    r_it  = exp(l_it - l_old_it)                                      l = log pi(o_it | q, o_i<t) from logits / tau
    L_it  = -min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i) + beta * KL_it
    KL_it = exp(l_ref - l) - (l_ref - l) - 1
    loss  = grpo: mean_i (sum_t m L / sum_t m) | bnpo: sum m L / sum m | dr_grpo: sum m L / (N * T_max)
            | dapo: sum m L / (active tokens of the whole rollout batch, all ranks)

`from train_rl import grpo_advantages, grpo_loss` gives the two pure functions without running anything.
"""
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data as D
import reward as R
from kernels.logprobs import token_logprobs
from model import VidEmo

# ----------------------------------------------------------------------------------------------------------------------
# defaults (every key can be overridden by a config file or --key=value; `--help` lists them)
out_dir = "out/rl_emosynth"
init_from = "out/sft_emosynth/ckpt"  # the SFT checkpoint (HF-format dir); also the frozen reference model
resume = False  # continue from out_dir/ckpt (policy, optimizer, step, data position); the reference stays init_from
# data
data_dir = "data/emosynth/build"
train_file = ""  # default: data_dir/train.jsonl
test_file = ""  # default: data_dir/test.jsonl ("none" skips the final evaluation)
val_file = ""  # default: data_dir/val.jsonl ("none": no held-out curve); its records of `tasks` are scored every eval_every
video_root = ""  # default: the folder of each record's data file
tokenizer_dir = ""  # default: init_from
# train on records of these tasks (empty = all that reward.py can score): the affective tree, plus single-label
# emotion so the answer accuracy is held while the tree improves
tasks = ("fine_grained_caption", "emotion_single")
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
# rollout
num_generations = 8  # G completions per prompt
# sampling temperature; policy / old / reference log-probs use logits / temperature too. On the tiny EmoSynth model
# 0.7 spends the group's spread on slips in fields greedy decoding already gets right (pose, hair); 0.4-0.5 keep the
# spread where the model is really unsure (gender, glasses, intensity): +0.05-0.06 vs +0.015 test tree reward (README)
temperature = 0.5
top_p = 1.0
top_k = 0
max_completion_length = 96  # EmoSynth affective trees are <= 75 tokens
mask_truncated_completions = False  # completions without EOS get no loss (DAPO)
video_prune_rate = 0.0  # > 0: EVS keep-mask per prompt (kernels.token_compress), shared by every pass of the group
# train the vision tower and merger too: the policy pass re-encodes each prompt's video with grad (once per group) so
# the tree reward reaches perception (gender, glasses, neutral faces); False = encode once per rollout, vision frozen
train_vision = True
# GRPO
prompts_per_step = 8  # prompts per optimizer step over all ranks (x G completions); each rank owns whole groups
grad_accum = 2  # micro-batches per rank per step (each prompts_per_step // (world * grad_accum) prompts)
num_iterations = 1  # mu: policy updates per rollout batch (1 = on-policy, old logps = logps.detach())
beta = 0.04  # KL coefficient (0 = no reference model at all)
epsilon = 0.2  # eps_low
epsilon_high = 0.0  # eps_high; 0 = same as epsilon (DAPO uses 0.28)
loss_type = "grpo"  # grpo | bnpo | dr_grpo | dapo
scale_rewards = "group"  # group | batch | none
dynamic_sampling = True  # drop groups whose rewards are all equal (advantage 0) before the loss (DAPO)
# rewards: R = sum_k w_k r_k over reward.py's terms
w_accuracy = 1.0
w_f1 = 1.0
w_caption = 1.0
w_tree = 1.0
w_format = 0.1  # enters the total only for the tree (fine-grained caption) task, as in reward.py
tree_lambda = 1.0  # R_tree = exp(-lambda * TED / |T_ref|)
# optimisation
max_steps = 800
lr = 1e-4
min_lr = 1e-5
warmup_steps = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
use_fused_logprobs = True  # log-probs (and entropy) straight from hidden states via kernels.logprobs
grad_checkpointing = False
dtype = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
device = "auto"
seed = 0
# logging, checkpoints, evaluation
log_every = 1
sample_table_every = 10
save_every = 50
stop_at_step = 0  # > 0: stop after this step's checkpoint (simulates a killed run; --resume continues)
eval_every = 100  # > 0: greedy held-out score of each RL task on val_file before step 1 and every N steps ("val/<task>")
eval_val_records = 0  # > 0: at most this many val records per task (0 = all)
eval_at_end = True
eval_batch_size = 32
eval_max_new_tokens = 128
eval_max_records = 0  # > 0: evaluate on the first N test records only (a quick look)
wandb_project = ""
# ----------------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


# ----------------------------------------------------------------------------------------------------------------------
# the two pure functions of GRPO


def grpo_advantages(rewards, group_size, scale_rewards="group"):
    """rewards [B*G] (groups contiguous: prompt b owns rows b*G .. b*G+G-1) -> advantages [B*G].
    A = (R - mean_G R) / (std + 1e-4); std unbiased: per group ("group"), over the whole batch ("batch"), or no
    division ("none"). A group whose rewards are all equal gets A = 0 whatever the scaling."""
    if group_size < 2:
        raise ValueError(f"grpo_advantages: group_size must be >= 2 (got {group_size}); std of one sample is undefined")
    if rewards.numel() % group_size:
        raise ValueError(f"grpo_advantages: {rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)  # [B*G]
    if scale_rewards == "group":
        std = grouped.std(1).repeat_interleave(group_size)  # [B*G]
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale_rewards == "none":
        return centred
    else:
        raise ValueError(f"scale_rewards must be group, batch or none (got {scale_rewards!r})")
    return centred / (std + 1e-4)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta, eps_low, eps_high, loss_type,
              max_completion_length=None, return_stats=False, num_items=None):
    """The GRPO policy loss over completion tokens.

    logps, old_logps, ref_logps, mask: [N, T] (N = sequences, T = completion positions); advantages [N].
    ref_logps may be None when beta == 0. Aggregation (as TRL):
      grpo    per-sequence masked mean, then mean over sequences
      bnpo    sum over all tokens / number of active tokens
      dr_grpo sum / (N * max_completion_length)             (max_completion_length defaults to T)
      dapo    sum / num_items; num_items = active tokens of the whole rollout batch. TRL gathers it over every
              process and divides by world size (DDP then averages); train() passes exactly that. Left None, it is
              the active tokens of this call (then dapo == bnpo).
    Returns the scalar loss, and with return_stats a dict of detached scalars: kl (masked mean),
    clip_low / clip_high / clip_region (fraction of active tokens whose ratio is clipped in the direction that
    matters for the sign of A), ratio (masked mean)."""
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)[:, None]  # [N, 1]
    ratio = torch.exp(logps - old_logps)  # [N, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [N, T]
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: ref_logps is required when beta != 0")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi || pi_ref), >= 0
        per_token = per_token + beta * kl
    masked_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_sum / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        t_max = max_completion_length if max_completion_length is not None else logps.shape[1]
        loss = masked_sum / (logps.shape[0] * t_max)
    elif loss_type == "dapo":
        denom = mask.sum().clamp(min=1.0) if num_items is None else num_items
        loss = masked_sum / denom
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo (got {loss_type!r})")
    if not return_stats:
        return loss
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
        stats = {"kl": ((kl * mask).sum() / n).item() if kl is not None else 0.0,
                 "clip_low": ((low * mask).sum() / n).item(),
                 "clip_high": ((high * mask).sum() / n).item(),
                 "clip_region": (((low + high) * mask).sum() / n).item(),
                 "ratio": ((ratio * mask).sum() / n).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# helpers of the loop

REWARD_TERMS = ("accuracy", "f1", "caption", "tree", "format")  # reward.py's terms; "total" is their weighted sum


class PolicyScorer(nn.Module):
    """The model plus its LM-head scoring, so that scoring runs inside the DDP-wrapped forward (lm_head gradients are
    then reduced like every other parameter). Returns per-token log-probs of the completion under logits / tau."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, with_entropy=False):
        return completion_logps(self.model, batch, with_entropy, reencode=train_vision)


def completion_logps(model, batch, with_entropy=False, reencode=False):
    """batch: a rollout micro-batch (see rollout() in train()). -> logps [N, Tc] of the completion tokens under
    logits / temperature (0 past EOS), entropy [N, Tc] (detached) or None. Only completion positions go through the
    LM head. The video is encoded once per prompt and shared by its G rows: the rollout's encoding, or with
    `reencode` a fresh one by `model` (with grad when grad is on)."""
    ids, valid = batch["ids"], batch["valid"]  # [N, Lp + Tc], [N, Tc] tokens up to and including EOS
    N, Tc = valid.shape
    is_comp = torch.cat([torch.zeros_like(ids[:, :-Tc], dtype=torch.bool), valid], 1)  # [N, L]
    video_embeds = batch["video_embeds"]  # the rollout's encoding (no grad), already expanded to the G rows
    if reencode:  # this model's own vision tower: with grad for the policy, the frozen one for the reference
        per_prompt = model.encode_video(batch["pixels"], batch["prompt_grid"])  # [n_vid_prompts, D]
        video_embeds = expand_groups(per_prompt, batch["row_tokens"][::batch["G"]], batch["G"])  # [n_vid, D]
    hidden = model(ids, attention_mask=batch["attn"], video_embeds=video_embeds,
                   video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
                   video_keep_mask=batch["keep"], return_hidden=True)  # [N, L', D]
    if batch["keep"] is not None:  # pruned video tokens left the sequence: line the targets up with the output
        index, _ = model.keep_index(ids, batch["attn"], batch["keep"])  # [N, L']
        is_comp = is_comp.gather(1, index)
    sel = is_comp[:, 1:]  # [N, L'-1]: position k predicts token k+1, a completion token
    h = hidden[:, :-1][sel]  # [n, D], row-major = completion order
    targets = batch["targets"][valid]  # [n], the same order
    weight = model.lm_head.weight  # [V, D]
    if use_fused_logprobs:  # never builds the [n, V] logits
        out = token_logprobs(h, weight, targets, temperature=temperature, return_entropy=with_entropy)
        logp, ent = out if with_entropy else (out, None)
    else:
        logp_all = torch.log_softmax((h @ weight.T).float() / temperature, -1)  # [n, V]
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    full = torch.zeros(N, Tc, dtype=logp.dtype, device=logp.device).masked_scatter(valid, logp)  # [N, Tc]
    if ent is not None:
        ent = torch.zeros(N, Tc, dtype=ent.dtype, device=ent.device).masked_scatter(valid, ent.detach())
    return full, ent


def group_batch(ids, attn, seqs, video_embeds, grid, sec, keep, G, merge, eos_id, pad_id, placeholder_ids=(),
                mask_truncated=False, pixels=None):
    """Prompts [B, Lp] (left padded) + their completions [B*G, Tc] (pad after EOS) -> the training micro-batch of
    B*G rows: [prompt + completion] ids and attention mask, completion masks and targets, and the group-expanded
    video inputs. A sampled vision placeholder (<|video_pad|>, <|image_pad|>; a random or young policy writes them)
    ends the completion like EOS: it is scored as a target, but never fed back as an input, where the model would
    take it for a video token."""
    stops = torch.isin(seqs, torch.tensor([eos_id, *placeholder_ids], device=seqs.device))
    valid, truncated = completion_mask(stops)  # [B*G, Tc] up to and including the first stop, [B*G]
    inputs = seqs.masked_fill(stops & (seqs != eos_id), pad_id)  # placeholders out of the input (masked anyway)
    counts = (grid.prod(-1) // merge ** 2).tolist()  # merged video tokens per prompt
    return {
        "ids": torch.cat([ids.repeat_interleave(G, 0), inputs], 1),  # [B*G, Lp + Tc]
        "attn": torch.cat([attn.repeat_interleave(G, 0), valid.to(attn.dtype)], 1),  # pads after EOS are masked
        "targets": seqs,  # [B*G, Tc] what was sampled
        "valid": valid,
        "cmask": valid & ~truncated[:, None] if mask_truncated else valid,  # the tokens that get a loss
        "video_embeds": expand_groups(video_embeds, counts, G),  # each group shares its prompt's encoding
        "keep": expand_groups(keep, counts, G) if keep is not None else None,
        "row_tokens": [c for c in counts for _ in range(G)],  # video tokens of each row
        "pixels": pixels, "prompt_grid": grid, "G": G,  # [n_patches, C*2*14*14], [B, 3]: to re-encode the videos
        "video_grid_thw": grid.repeat_interleave(G, 0), "second_per_grid_ts": sec.repeat_interleave(G, 0),
        "lengths": valid.sum(1).cpu(), "truncated": truncated.cpu(),
    }


def completion_mask(stops):
    """stops [N, Tc] bool (where a completion ends) -> (mask [N, Tc] bool over the tokens up to and including the
    first stop, truncated [N] bool: no stop within the budget)."""
    truncated = ~stops.any(1)
    first = torch.where(truncated, stops.shape[1], stops.int().argmax(1))  # [N]
    mask = torch.arange(stops.shape[1], device=stops.device)[None] <= first[:, None]
    return mask, truncated


def expand_groups(x, counts, G):
    """Per-prompt segments of x along dim 0 (lengths `counts`) -> each segment repeated G times in place, so row
    b*G + j of the expanded batch sees prompt b's video tokens: the video is encoded once per group."""
    return torch.cat([seg.repeat((G,) + (1,) * (seg.dim() - 1)) for seg in x.split(counts)])


class PromptStream:
    """Endless, seeded, epoch-shuffled stream of record indices for one rank (strided shards: rank r gets global
    positions r, r + W, r + 2W, ...). `pos` counts what this rank consumed (skipped records included), so saving
    it resumes the very same stream."""

    def __init__(self, n, seed, rank, world, pos=0):
        self.n, self.seed, self.rank, self.world, self.pos = n, seed, rank, world, pos
        self._perm_epoch, self._perm = -1, None

    def next(self):
        epoch, i = divmod(self.pos * self.world + self.rank, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm_epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        self.pos += 1
        return self._perm[i]


def lr_at(step):
    """Linear warmup, then cosine from lr to min_lr over max_steps; a pure function of the step (exact on resume)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def resolve_paths():
    global train_file, test_file, val_file
    if val_file and val_file != "none" and eval_every > 0 and not os.path.exists(val_file):
        raise FileNotFoundError(f"config key 'val_file': {val_file} not found (--val_file=none or --eval_every=0 turns "
                                f"the held-out curve off)")
    train_file = train_file or os.path.join(data_dir, "train.jsonl")
    test_file = test_file or os.path.join(data_dir, "test.jsonl")
    val_file = val_file or os.path.join(data_dir, "val.jsonl")


def data_root(path):
    return video_root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))


def find_init(path):
    """The SFT checkpoint to start from (and to use as the frozen reference)."""
    found = common.find_checkpoint(path)
    if found is None and os.path.isfile(os.path.join(path, "config.json")):
        found = path  # any plain HF Qwen2.5-VL directory
    if found is None:
        raise FileNotFoundError(
            f"init_from={path!r}: no SFT checkpoint there. Run `python train_sft.py` first (it writes "
            f"out/sft_emosynth/ckpt), or pass --init_from=DIR with a checkpoint / HF Qwen2.5-VL directory.")
    return found


def gather_rows(x):
    """[n, ...] on every rank -> [world * n, ...] in rank order (every rank holds the same n)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


LOSS_STATS = ("kl", "clip_low", "clip_high", "clip_region", "ratio")


def reduce_sum(d, dev):
    """Sum a dict of python numbers over ranks (one all-reduce)."""
    if not dist.is_initialized():
        return dict(d)
    t = torch.tensor(list(d.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return dict(zip(d, t.tolist()))


def print_sample_table(step, samples):
    print(f"-- step {step}: sampled completions")
    print(f"{'task':<22} {'reward':>6}  {'terms':<34} completion  ||  reference")
    for s in samples:
        terms = " ".join(f"{k[:4]}={v:.2f}" for k, v in s["terms"].items())
        text = s["text"].replace("\n", " | ")
        text = text if len(text) <= 90 else text[:87] + "..."
        ref = str(s["reference"]).replace("\n", " | ")[:40]
        print(f"{s['task']:<22} {s['total']:6.3f}  {terms:<34} {text}  ||  {ref}")


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(argv=None):
    """GRPO with the defaults above, overridden by argv (config files and --key=value, as on the command line).
    Returns the metric rows this process logged (rank 0; [] elsewhere)."""
    globals().update(DEFAULTS)  # a fresh config on every call (tests run several in one process)
    config = common.configure(globals(), argv)
    resolve_paths()
    rank, world, dev = common.setup_distributed(device)
    master = rank == 0
    G = num_generations
    eps_high = epsilon_high or epsilon
    for key, value, choices in (("loss_type", loss_type, ("grpo", "bnpo", "dr_grpo", "dapo")),
                                ("scale_rewards", scale_rewards, ("group", "batch", "none")),
                                ("dtype", dtype, ("auto", "float32", "bfloat16"))):
        if value not in choices:
            raise ValueError(f"config key '{key}': {value!r} is not one of {choices}")
    if G < 2:
        raise ValueError(f"config key 'num_generations': {G}; GRPO needs at least 2 completions per prompt")
    if prompts_per_step % (world * grad_accum):
        raise ValueError(f"prompts_per_step={prompts_per_step} must be divisible by world size x grad_accum "
                         f"= {world} x {grad_accum} (each rank owns whole groups)")
    prompts_per_micro = prompts_per_step // (world * grad_accum)
    use_bf16 = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    ckpt_path = os.path.join(out_dir, "ckpt")

    # ---- data: records of the chosen tasks, one endless shuffled stream per rank
    init_dir = find_init(init_from)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(train_file):
        raise FileNotFoundError(f"train_file {train_file} not found (build EmoSynth with `python train_sft.py` or "
                                f"data/emosynth/prepare.py, or pass --train_file)")
    tokenizer = D.load_tokenizer(tokenizer_dir or init_dir)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.convert_tokens_to_ids("<|endoftext|>")
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    unknown = [t for t in tasks if t not in R.TASK_METRIC]
    if unknown:
        raise ValueError(f"config key 'tasks': unknown task(s) {unknown}; known: {sorted(R.TASK_METRIC)}")
    records = [r for r in D.load_records(train_file) if r.get("task") in (tasks or R.TASK_METRIC)]
    if not records:
        raise ValueError(f"no records of tasks {tasks} in {train_file}")
    root = video_root or None  # None: each record's videos resolve against its own file's folder (data.py)
    video_cache = D.VideoCache(256)  # decoded videos, reused when a record comes round again
    weights = {"accuracy": w_accuracy, "f1": w_f1, "caption": w_caption, "tree": w_tree, "format": w_format}

    # ---- models: the policy (resumed or from SFT) and a frozen reference (always the SFT checkpoint)
    state = None
    if resume:
        found = common.find_checkpoint(ckpt_path)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint at {ckpt_path}")
        state = common.load_trainer_state(found)
        if state["world_size"] != world:
            raise ValueError(f"--resume: checkpoint was written with world size {state['world_size']}, now {world}")
        policy = VidEmo.from_pretrained(found, device=dev)
    else:
        policy = VidEmo.from_pretrained(init_dir, device=dev)
    # train_vision=False: the video is encoded once per prompt (no grad) and reused by every pass, so the vision tower
    # and merger get no gradient: freeze them (the reference then shares the policy's embeddings, which are its own).
    for name, p in policy.named_parameters():
        p.requires_grad_(train_vision or not name.startswith("visual."))
    policy.gradient_checkpointing = grad_checkpointing
    ref_model = None
    if beta != 0.0:
        ref_dtype = torch.bfloat16 if use_bf16 else None  # never trained: no fp32 master copy needed
        ref_model = VidEmo.from_pretrained(init_dir, dtype=ref_dtype, device=dev).eval().requires_grad_(False)
    net = PolicyScorer(policy)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(beta1, beta2))
    start_step, stream = 0, PromptStream(len(records), seed, rank, world)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])
        start_step, stream.pos = state["step"], state["data_pos"][rank]
    merge = policy.vs["spatial_merge_size"]
    placeholders = (policy.video_token_id, policy.image_token_id)  # a sampled one ends the completion (group_batch)
    common.print0(f"GRPO: {sum(p.numel() for p in params) / 1e6:.2f}M trainable params | {len(records)} records "
                  f"of {len(set(r.get('task') for r in records))} tasks | {prompts_per_step} prompts x G={G} per step "
                  f"| world {world} | beta {beta} | loss {loss_type} | init {init_dir}")

    def next_prompts(n, skipped):
        """n encoded prompts from this rank's stream; unusable records are counted and replaced by the next."""
        out = []
        misses = 0
        while len(out) < n:
            i = stream.next()
            rec = records[i]
            try:
                enc = D.encode_prompt(rec, tokenizer, root, video_kwargs, cache=video_cache)
                if enc.get("video_grid_thw") is None or len(enc["video_grid_thw"]) != 1:
                    raise D.SkipRecord("train_rl needs exactly one video per record")
                enc.update(index=i, task=rec.get("task"), level=rec.get("level"))
            except D.SkipRecord as e:
                skipped[str(e)] = skipped.get(str(e), 0) + 1
                misses += 1
                if misses > len(records):
                    raise RuntimeError(f"every record of {train_file} was skipped: {skipped}")
                continue
            out.append((rec, enc))
        return out

    @torch.no_grad()
    def rollout(prompts, gen):
        """B prompts -> one micro-batch of B*G completions with everything the loss needs (no grad)."""
        recs = [r for r, _ in prompts]
        b = D.collate_prompts([e for _, e in prompts], pad_id)
        ids, attn = b["input_ids"].to(dev), b["attention_mask"].to(dev)  # [B, Lp], left padded
        grid, sec = b["video_grid_thw"].to(dev), b["second_per_grid_ts"].to(dev)  # [B, 3], [B]
        policy.eval()
        t0 = time.time()
        with autocast:
            video_embeds = policy.encode_video(b["pixel_values_videos"].to(dev), grid)  # [n_vid, D], once per prompt
            keep = None
            if video_prune_rate > 0:
                from kernels.token_compress import video_keep_mask
                # [n_vid] bool, computed once here and shared by rollout, policy, old and reference passes
                keep = video_keep_mask(video_embeds, grid, rate=video_prune_rate, merge_size=merge)
            seqs, gen_logps = policy.generate(
                ids, attention_mask=attn, video_embeds=video_embeds, video_grid_thw=grid, second_per_grid_ts=sec,
                video_keep_mask=keep, max_new_tokens=max_completion_length, temperature=temperature, top_p=top_p,
                top_k=top_k, eos_token_id=[eos_id, *placeholders], pad_token_id=pad_id, num_return_sequences=G,
                return_logprobs=True, generator=gen)  # [B*G, Tc]: sample j of prompt b is row b*G + j
        t_gen = time.time() - t0
        mb = group_batch(ids, attn, seqs, video_embeds, grid, sec, keep, G, merge, eos_id, pad_id, placeholders,
                         mask_truncated_completions, b["pixel_values_videos"].to(dev) if train_vision else None)
        # score: decode each completion (up to and including EOS) and apply the rule-based rewards
        t0 = time.time()
        texts = tokenizer.batch_decode([s[:n].tolist() for s, n in zip(seqs.cpu(), mb["lengths"].tolist())],
                                       skip_special_tokens=True)
        scores = [R.score(t, recs[i // G], weights, lam=tree_lambda) for i, t in enumerate(texts)]
        for sc in scores:  # the format term counts (and is logged) only where reward.py adds it to the total
            if not any(k in sc for k in R.FORMAT_METRICS):
                sc.pop("format", None)
        terms = torch.tensor([[sc.get(k, float("nan")) for k in REWARD_TERMS] for sc in scores],
                             dtype=torch.float32)  # [B*G, K], NaN where a term does not apply to the task
        total = torch.tensor([s["total"] for s in scores], dtype=torch.float32)  # [B*G]
        t_score = time.time() - t0
        mb.update(gen_logps=gen_logps, total=total, terms=terms, texts=texts, records=recs, scores=scores)
        return mb, t_gen, t_score

    # ---- held-out curve: greedy scores of the RL tasks on the val split (rank 0 evaluates, the others wait)
    val_records = []
    if eval_every > 0 and val_file != "none" and os.path.exists(val_file):
        by_task = {}
        for r in D.load_records(val_file):
            if r.get("task") in (tasks or R.TASK_METRIC):
                by_task.setdefault(r["task"], []).append(r)
        val_records = [r for rs in by_task.values() for r in rs[:eval_val_records or None]]

    def heldout():
        scores = {}
        if master:
            from eval import evaluate
            res = evaluate(policy, tokenizer, val_records, data_root(val_file), video_kwargs, batch_size=eval_batch_size,
                           max_new_tokens=eval_max_new_tokens, device=dev, progress=False,
                           video_prune_rate=video_prune_rate)
            scores = {f"val/{t}": v["score"] for t, v in res["tasks"].items()}
            print("held-out (val): " + " | ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()), flush=True)
        common.barrier()
        return scores

    # ---- train
    log = common.MetricLog(os.path.join(out_dir, "metrics.jsonl"), wandb_project if master else None, config)
    history, skipped, bad_steps = [], {}, 0
    if val_records and start_step == 0:
        before = heldout()
        if master:
            log.log(step=0, **before)
    gen = torch.Generator(device=dev)
    for step in range(start_step, max_steps):
        t_step = time.time()
        # 1. rollout: per micro-batch, encode videos once, sample G completions per prompt, score them
        micro, t_gen, t_score = [], 0.0, 0.0
        for i in range(grad_accum):
            # sampling depends only on (seed, step, global micro-batch index): exact on resume, and a run on W ranks
            # with grad_accum=a samples what one process with grad_accum=W*a does when each micro-batch is 1 prompt
            gen.manual_seed((seed * 1_000_003 + step) * 10_007 + rank * grad_accum + i)
            mb, tg, ts = rollout(next_prompts(prompts_per_micro, skipped), gen)
            micro.append(mb)
            t_gen, t_score = t_gen + tg, t_score + ts
        # 2. advantages over the gathered rewards (TRL: groups never straddle ranks, but "batch" std is global)
        total_local = torch.cat([mb["total"] for mb in micro])  # [n_local]
        n_local = total_local.numel()
        mine = slice(rank * n_local, (rank + 1) * n_local)
        total_all = gather_rows(total_local.to(dev)).cpu()  # [world * n_local], rank-major, groups contiguous
        adv = grpo_advantages(total_all, G, scale_rewards)[mine]
        group_std = total_all.view(-1, G).std(1)  # [groups]
        zero_std = torch.isclose(group_std, torch.zeros_like(group_std))  # all G rewards equal: advantage ~0 (TRL)
        keep_rows = (~zero_std).repeat_interleave(G)[mine]  # dynamic sampling keeps the other groups
        offset = 0
        for mb in micro:
            n = mb["total"].numel()
            mb["adv"] = adv[offset:offset + n].to(dev)
            mb["rows"] = keep_rows[offset:offset + n].to(dev) if dynamic_sampling else None
            offset += n
        # 3. old (mu > 1) and reference log-probs, once per rollout, same inputs as the policy pass
        t0 = time.time()
        with torch.no_grad(), autocast:
            for mb in micro:
                # old: the rollout's embeddings are the old policy's own; ref: its own (frozen) vision tower
                mb["old"] = completion_logps(policy, mb)[0] if num_iterations > 1 else None
                mb["ref"] = completion_logps(ref_model, mb, reencode=train_vision)[0] if ref_model is not None else None
        t_ref = time.time() - t0
        # dapo normalises by the active tokens of the whole rollout batch over all ranks (DDP then averages ranks)
        counts = torch.zeros(2, device=dev)  # [loss tokens, sequences] that enter the loss
        for mb in micro:
            rows = mb["rows"] if mb["rows"] is not None else slice(None)
            counts += torch.tensor([float(mb["cmask"][rows].sum()), float(mb["cmask"][rows].shape[0])], device=dev)
        if world > 1:
            dist.all_reduce(counts)
        n_tok, kept = counts[0], counts[1]
        num_items = n_tok.clamp(min=1.0) / world
        # 4. policy updates: mu passes over the rollout batch, grad_accum micro-batches per optimizer step
        t0 = time.time()
        policy.train()
        loss_sum, stats_sum, n_stats, ent_sum, ent_n, logp_diff = 0.0, {}, 0, 0.0, 0, []
        grad_norm = torch.zeros(())
        step_lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        skipped_update = kept.item() == 0  # every group had equal rewards everywhere: nothing to learn from
        for it in range(num_iterations if not skipped_update else 0):
            for i, mb in enumerate(micro):
                rows = mb["rows"]  # None, or the rows of the groups dynamic sampling keeps
                dummy = rows is not None and not rows.any()
                if dummy and world == 1:
                    continue
                if dummy:  # under DDP every rank must run a backward each micro-step: one group, zero weight
                    rows = torch.arange(len(rows), device=rows.device) < G
                sub = mb if rows is None else subset(mb, rows)
                last = i == len(micro) - 1
                with (net.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast:
                    logps, ent = net(sub, with_entropy=it == 0)  # [n, Tc] through the DDP-wrapped forward
                    old = sub["old"] if num_iterations > 1 else logps.detach()  # mu = 1: ratio 1, grad of plain PG
                    loss, st = grpo_loss(logps, old, sub["ref"], sub["adv"], sub["cmask"], beta, epsilon, eps_high,
                                         loss_type, max_completion_length=max_completion_length,
                                         return_stats=True, num_items=num_items)
                    if loss_type != "dapo":
                        loss = loss / grad_accum  # dapo's num_items already spans the whole rollout batch
                    (loss * (0.0 if dummy else 1.0)).backward()
                if dummy:
                    continue
                loss_sum += loss.item()
                for k, v in st.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v
                n_stats += 1
                if it == 0:
                    m = sub["valid"]
                    ent_sum += float(ent[m].sum())
                    ent_n += int(m.sum())
                    if sub["gen_logps"] is not None:  # generator vs training forward: the same policy here
                        glp = sub["gen_logps"][:, :m.shape[1]].to(logps.dtype)
                        logp_diff.append(float((glp - logps.detach())[m].abs().mean()))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.zeros(())
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                common.print0(f"step {step}: non-finite grad norm; update skipped")
                if bad_steps >= 3:
                    raise FloatingPointError(f"grad norm NaN/inf for {bad_steps} updates in a row at step {step}; "
                                             f"lower lr or check the rewards")
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t0
        done = step + 1

        # 5. metrics (global over ranks) and a table of samples
        lengths_all = gather_rows(torch.cat([mb["lengths"] for mb in micro]).float().to(dev)).cpu()
        trunc_all = gather_rows(torch.cat([mb["truncated"] for mb in micro]).float().to(dev)).cpu()
        terms_all = gather_rows(torch.cat([mb["terms"] for mb in micro]).to(dev)).cpu()  # [n, K]
        S = reduce_sum({"loss": loss_sum, "n_stats": n_stats, "ent": ent_sum, "ent_n": ent_n, "t_generate": t_gen,
                        "t_score": t_score, "t_ref": t_ref, "t_update": t_update, "logp_diff": sum(logp_diff),
                        "n_diff": len(logp_diff), **{k: stats_sum.get(k, 0.0) for k in LOSS_STATS}}, dev)
        row = {"step": done, "lr": step_lr, "loss": S["loss"] / world / num_iterations, "grad_norm": float(grad_norm),
               "reward": total_all.mean().item(), "reward_std": total_all.std().item(),
               "frac_reward_zero_std": zero_std.float().mean().item()}
        if S["n_stats"]:  # means over the updates of this step (absent when every group was dropped)
            row.update({k: S[k] / S["n_stats"] for k in LOSS_STATS})
            row["entropy"] = S["ent"] / max(S["ent_n"], 1.0)
        row.update({"completion_len_mean": lengths_all.mean().item(), "completion_len_min": lengths_all.min().item(),
                    "completion_len_max": lengths_all.max().item(), "clipped_ratio": trunc_all.mean().item()})
        row.update({k: S[k] / world for k in ("t_generate", "t_score", "t_ref", "t_update")})  # mean over ranks
        row.update({"step_time": time.time() - t_step, "skipped_records": sum(skipped.values()),
                    "rollout_tok_per_s": lengths_all.sum().item() / max(row["t_generate"], 1e-9)})
        if S["n_diff"]:  # |log-prob of the sampler - of the training forward|, same weights: should be ~1e-6
            row["rollout_logp_diff"] = S["logp_diff"] / S["n_diff"]
        for j, k in enumerate(REWARD_TERMS):
            col = terms_all[:, j]
            col = col[~torch.isnan(col)]
            if col.numel():
                row[f"reward/{k}/mean"] = col.mean().item()
                row[f"reward/{k}/std"] = col.std().item() if col.numel() > 1 else 0.0
        if dynamic_sampling:
            row["groups_kept"] = kept.item() / G
        if val_records and (done % eval_every == 0 or done == max_steps):
            row.update(heldout())
        if skipped_update:
            row["skipped_update"] = 1
        if master:
            history.append(row)
            if done % log_every == 0 or done == max_steps:
                log.log(**row)
                print(f"step {done}/{max_steps} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
                      f"loss {row['loss']:+.4f} | kl {row.get('kl', 0):.4f} | ent {row.get('entropy', 0):.3f} | "
                      f"len {row['completion_len_mean']:.1f} | zero-std {row['frac_reward_zero_std']:.2f} | "
                      f"gen {row['t_generate']:.1f}s score {row['t_score']:.1f}s upd {row['t_update']:.1f}s",
                      flush=True)
            if sample_table_every > 0 and (done % sample_table_every == 0 or done == 1):
                mb = micro[0]
                picks = list(range(0, mb["total"].numel(), G))[:4]  # the first completion of a few groups
                print_sample_table(done, [{"task": mb["records"][i // G].get("task", "?"),
                                           "total": mb["total"][i].item(), "text": mb["texts"][i],
                                           "terms": {k: v for k, v in mb["scores"][i].items() if k != "total"},
                                           "reference": reference_answer(mb["records"][i // G])} for i in picks])

        # 6. checkpoint (rank 0 writes; every rank's data position is saved)
        if (save_every > 0 and done % save_every == 0) or done == max_steps or done == stop_at_step:
            pos = gather_rows(torch.tensor([stream.pos], device=dev)).cpu().tolist()
            if master:
                trainer_state = {"step": done, "optimizer": optimizer.state_dict(), "rng": common.rng_state(),
                                 "data_pos": pos, "world_size": world, "config": config}
                common.save_checkpoint(ckpt_path, policy.save_pretrained, tokenizer, trainer_state)
            common.barrier()
        if done == stop_at_step:
            common.print0(f"stop_at_step={stop_at_step}: stopping; continue with --resume=True")
            common.cleanup_distributed()
            return history
    if skipped and master:
        print("skipped records:", skipped)

    # ---- final evaluation on the test split (rank 0)
    if eval_at_end and test_file != "none" and os.path.exists(test_file) and master:
        from eval import evaluate, format_table, write_results
        policy.eval()
        test_records = D.load_records(test_file)[:eval_max_records or None]
        result = evaluate(policy, tokenizer, test_records, data_root(test_file), video_kwargs,
                          batch_size=eval_batch_size, max_new_tokens=eval_max_new_tokens, device=dev,
                          predictions_path=os.path.join(out_dir, "eval_predictions.jsonl"),
                          video_prune_rate=video_prune_rate)
        write_results(result, os.path.join(out_dir, "eval.json"))
        print(format_table(result))
    common.barrier()
    common.cleanup_distributed()
    return history


def subset(mb, rows):
    """The rows (whole groups) of a micro-batch that dynamic sampling keeps; video tokens follow their rows."""
    out = dict(mb)
    for k in ("ids", "attn", "targets", "valid", "cmask", "adv", "old", "ref", "gen_logps", "video_grid_thw",
              "second_per_grid_ts"):
        if mb[k] is not None:
            out[k] = mb[k][rows]
    for k in ("video_embeds", "keep"):
        if mb[k] is not None:
            out[k] = torch.cat([seg for seg, r in zip(mb[k].split(mb["row_tokens"]), rows.tolist()) if r])
    out["row_tokens"] = [c for c, r in zip(mb["row_tokens"], rows.tolist()) if r]
    prompts = rows[::mb["G"]]  # [B] whole groups: a group's first row says whether its prompt stays
    out["prompt_grid"] = mb["prompt_grid"][prompts]
    if mb["pixels"] is not None:
        patches = mb["prompt_grid"].prod(-1).tolist()
        out["pixels"] = torch.cat([seg for seg, r in zip(mb["pixels"].split(patches), prompts.tolist()) if r])
    return out


def reference_answer(rec):
    msgs = rec.get("messages") or []
    return msgs[-1].get("content", "") if msgs and msgs[-1].get("role") == "assistant" else rec.get("labels", "")


if __name__ == "__main__":
    train()
