"""Stage 1 of VidEmo: curriculum emotion learning (SFT), attribute -> expression -> emotion tuning.

    python train_sft.py                                   # the EmoSynth default, tiny model from scratch, CPU ok
    torchrun --standalone --nproc_per_node=8 train_sft.py config/sft_qwen25vl_7b.py
    python train_sft.py config/sft_emosynth.py --batch_size=8 --lr=3e-4 --resume=True

Reads the whole loop top to bottom in `main()`: config, data + curriculum sampler, model (scratch or any HF Qwen2.5-VL
dir), DDP / FSDP2, AdamW with warmup + cosine, gradient accumulation, periodic validation, atomic checkpoints with
exact resume, and a final evaluation on the test split that writes eval.json.
"""
import collections
import contextlib
import functools
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import common
import evaluation
import lora
import trainer
from data import (REASONING_TASKS, CurriculumSampler, EmoDataset, collate, curriculum_level, intensity_id,
                  load_records_as, load_tokenizer, special_ids, swap_trees, token_weights)
from model import VidEmo, scratch_config
from reward import LEVELS

# ----------------------------------------------------------------------------------------------------------------------
# defaults (every key can be overridden by a config file or --key=value; `--help` lists them)
out_dir = "out/sft_emosynth"
init_from = "scratch"  # "scratch" or a Hugging Face Qwen2.5-VL directory (or hub id when online)
resume = False  # continue from out_dir/ckpt (model, optimizer, scheduler, sampler position, RNG)
# data
data_dir = "data/emosynth/build"  # built by data/emosynth/prepare.py when missing
train_file = ""  # default: data_dir/train.jsonl; a file or a folder of Emo-CFG JSON/JSONL
val_file = ""  # default: data_dir/val.jsonl ("none" to skip)
test_file = ""  # default: data_dir/test.jsonl ("none" to skip the final evaluation)
video_root = ""  # default: the folder of each data file
tokenizer_dir = ""  # default: init_from when it holds one, else data_dir/tokenizer
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
max_seq_len = 512
# direct: every task answered as its record writes it | reasoning: the records of reasoning_tasks are answered as
# "<think>affective tree</think><answer>answer</answer>" (data.apply_answer_format; EmoSynth's trees come from the
# meta.jsonl beside each records file), train, val and test alike; reasoning_tasks chosen on val (docs/method.md)
answer_format = "reasoning"
reasoning_tasks = REASONING_TASKS
# counterfactual trees (data.swap_trees), an ablation, off by default: this fraction of the records of tree_swap_tasks
# (() = every reasoning task) answers behind another record's tree, the borrowed tree not trained, so that only
# reading the tree predicts the answer; measured worse on val (docs/method.md, "Does the answer read the tree?")
tree_swap = 0.0
tree_swap_tasks = ()
tree_swap_video = True  # False: a swapped record asks its question without its video
num_workers = 2
video_cache_mb = 1024  # per process (each DataLoader worker): decoded clips kept in RAM, reused when a clip comes round
# curriculum
curriculum = True  # False = one shuffled mix of all levels (the baseline)
stage_epochs = (2.6, 1.3, 4.0)  # epochs over each level's records: attribute, expression, emotion (chosen on val, docs/method.md §3o)
replay = 0.6  # fraction of each later-stage batch replayed from earlier stages
mix_first = 0.0  # fraction of every stage's samples trained first as one shuffled mix (0 = pure curriculum)
# model from scratch (ignored with init_from=DIR)
n_layer = 2
n_embd = 128
n_head = 4
n_kv_head = 2
n_inner = 384
vision_depth = 2
vision_embd = 64
vision_heads = 2
vision_inner = 128
tie_embeddings = True
# optimisation
batch_size = 16  # per rank, per micro-step
grad_accum = 1
max_steps = 0  # 0 = the curriculum schedule's length
lr = 1e-3
min_lr = 1e-4
warmup_steps = 50
lr_schedule = "stage"  # stage: each sampler stage its own warmup + cosine | run: one warmup + cosine over the run
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
loss_norm = "token"  # token: mean over every supervised token | record: mean of each record's token mean
loss_floor = 0  # token only: a record with fewer supervised tokens weighs as one with loss_floor (lifts short answers)
intensity_weight = 1.0  # loss weight of a target token that states an intensity (the token before " intensity")
freeze_vision = False  # the ViT blocks + patch embed
freeze_merger = False
freeze_llm = False
logprobs_backend = "auto"  # kernels.logprobs: auto (triton on CUDA, chunked torch on CPU) | triton | torch | naive
grad_checkpointing = False
fsdp = False  # FSDP2 (fully_shard per block, the vision tower as its own unit) instead of DDP
# LoRA: lora_rank > 0 trains adapters only (lora.py); the frozen base is bf16 on CUDA (docs/scale.md)
lora_rank = 0
lora_alpha = 32.0
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # visual.X: the tower's
lora_save = "merged"  # merged: a plain HF directory with W + BA | adapter: the adapters only (+ adapter_config.json)
dtype = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU (the weights train in fp32 whatever their stored dtype)
save_dtype = "auto"  # dtype of the saved HF weights: auto = as init_from stores them (fp32 from scratch) | float32 | bfloat16
device = "auto"
seed = 0
# logging, validation, checkpoints
log_every = 10
eval_every = 200
val_batches = 8
save_every = 200
stop_at_step = 0  # >0: stop after this step's checkpoint (simulates a killed run; --resume continues)
eval_at_end = True
report = True  # also write out_dir/report.html after the final evaluation (tables, gallery, curves; report.py)
eval_batch_size = 32
eval_max_new_tokens = 96  # at least 160 under answer_format=reasoning (EmoSynth's reasoning targets reach 114 tokens)
video_prune_rate = 0.0  # EVS token compression at evaluation (0 = keep all)
wandb_project = ""
# ----------------------------------------------------------------------------------------------------------------------


def to_device(batch, dev):
    return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch):
    """What the model's forward takes from a collate batch (labels included: the model scores them itself)."""
    keys = ("input_ids", "attention_mask", "labels", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return dict({k: batch.get(k) for k in keys}, logprobs_backend=logprobs_backend)


def load_weights(path):
    try:
        return VidEmo.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise common.InputError(f"could not load the model from {path}: {common.first_line(e)}") from None


def set_trainable(model):
    for name, p in model.named_parameters():
        is_merger = name.startswith("visual.merger.")
        is_vision = name.startswith("visual.") and not is_merger
        frozen = (is_vision and freeze_vision) or (is_merger and freeze_merger) or \
                 (not name.startswith("visual.") and freeze_llm)
        p.requires_grad_(not frozen)


def build_emosynth_if_missing(train_file, master):
    """The embedded default builds itself on first use (rank 0 runs data/emosynth/prepare.py, the others wait)."""
    if train_file != os.path.join(data_dir, "train.jsonl") or os.path.isfile(os.path.join(data_dir, "done.json")):
        return
    if master:
        common.print0(f"EmoSynth not found in {data_dir}: building it")
        prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "emosynth", "prepare.py")
        subprocess.run([sys.executable, prepare, f"--out_dir={data_dir}"], check=True)
    common.barrier()
    if not os.path.isfile(os.path.join(data_dir, "done.json")):  # rank 0 built it on another node's disk
        raise common.InputError(f"rank {common.rank()}: {data_dir} was built by rank 0 but is not visible here; "
                                f"multi-node runs need data_dir and out_dir on a filesystem every node shares (or "
                                f"build the data on each node first: python data/emosynth/prepare.py)")


def save(path, model, optimizer, tokenizer, step, sampler, master, config, weights_dtype, base):
    msd = common.full_state_dict(model, fsdp) if not lora_rank else None  # a collective under FSDP
    osd = common.optimizer_state_dict(model, optimizer, fsdp)
    if master:
        # the sampler's own counter runs ahead by the DataLoader's prefetch: record the batches actually consumed
        consumed = step * grad_accum % len(sampler)
        state = {"step": step, "optimizer": osd, "sampler": sampler.state_dict(step=consumed),
                 "rng": common.rng_state(), "config": config}
        write = lora.checkpoint_writer(model, state, msd, weights_dtype, lora_save, base, lora_targets)
        common.save_checkpoint(path, write, tokenizer, state)
    common.barrier()


@torch.no_grad()
def validate(net, model, loader, dev, autocast, rank, world):
    """Teacher-forced val loss (NLL per supervised token), overall and per curriculum level."""
    model.eval()
    nll, ntok = torch.zeros(len(LEVELS) + 1, dtype=torch.float64), torch.zeros(len(LEVELS) + 1, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i >= val_batches * world:
            break
        if i % world != rank or len(batch["index"]) == 0:
            continue
        batch = to_device(batch, dev)
        with autocast:
            logp = net(**model_inputs(batch))  # [n] over the supervised tokens, row-major
        rows = (batch["labels"][:, 1:] != -100).nonzero()[:, 0].cpu()  # [n] the sample each token belongs to
        per_row = torch.zeros(len(batch["index"]), dtype=torch.float64).index_add_(0, rows, -logp.double().cpu())
        n_row = torch.bincount(rows, minlength=len(batch["index"])).double()
        nll[0] += per_row.sum()
        ntok[0] += n_row.sum()
        for b, lvl in enumerate(batch["level"]):
            if lvl in LEVELS:
                nll[1 + LEVELS.index(lvl)] += per_row[b]
                ntok[1 + LEVELS.index(lvl)] += n_row[b]
    stats = torch.cat([nll, ntok])
    if torch.distributed.is_initialized():
        stats = stats.to(dev)
        torch.distributed.all_reduce(stats)
        stats = stats.cpu()
    model.train()
    nll, ntok = stats[:len(LEVELS) + 1], stats[len(LEVELS) + 1:]
    out = {"val_loss": nll[0].item() / max(1.0, ntok[0].item())}
    for j, lvl in enumerate(LEVELS):
        if ntok[1 + j] > 0:
            out[f"val_loss_{lvl}"] = nll[1 + j].item() / ntok[1 + j].item()
    return out


# settings a resumed run must share with its checkpoint (model shape, data, batch layout, what is trained)
RESUME_BREAKING = ("init_from", "data_dir", "train_file", "video_root", "tokenizer_dir", "fps", "max_frames",
                   "min_pixels", "max_pixels", "max_seq_len", "answer_format", "reasoning_tasks", "tree_swap",
                   "tree_swap_tasks", "tree_swap_video", "curriculum",
                   "stage_epochs", "replay", "mix_first", "n_layer",
                   "n_embd", "n_head", "n_kv_head", "n_inner", "vision_depth", "vision_embd", "vision_heads",
                   "vision_inner", "tie_embeddings", "batch_size", "grad_accum", "freeze_vision", "freeze_merger",
                   "freeze_llm", "fsdp", "seed", "lora_rank", "lora_alpha", "lora_targets")

# what a key meant before it existed, for checkpoints written by older versions (their config lacks it)
BEFORE = {"lr_schedule": "run", "mix_first": 0.0, "answer_format": "direct", "tree_swap": 0.0, "tree_swap_tasks": (),
          "tree_swap_video": True, "loss_norm": "token", "loss_floor": 0, "intensity_weight": 1.0}


def check_config():
    common.check([
        ("batch_size", batch_size, batch_size >= 1, ">= 1"), ("grad_accum", grad_accum, grad_accum >= 1, ">= 1"),
        ("max_steps", max_steps, max_steps >= 0, ">= 0 (0 = the schedule's length)"),
        ("lr", lr, lr > 0, "> 0"), ("min_lr", min_lr, 0 <= min_lr <= lr, "in [0, lr]"),
        ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"), ("grad_clip", grad_clip, grad_clip >= 0, ">= 0"),
        ("replay", replay, 0 <= replay < 1, "in [0, 1)"), ("mix_first", mix_first, 0 <= mix_first <= 1, "in [0, 1]"),
        ("lr_schedule", lr_schedule, lr_schedule in ("run", "stage"), "run or stage"),
        ("loss_norm", loss_norm, loss_norm in ("token", "record"), "token or record"),
        ("loss_floor", loss_floor, loss_floor >= 0 and (loss_floor == 0 or loss_norm == "token"),
         ">= 0, and 0 unless loss_norm=token"),
        ("intensity_weight", intensity_weight, intensity_weight > 0, "> 0 (1 = every token alike)"),
        ("stage_epochs", stage_epochs, len(stage_epochs) == 3 and all(e >= 0 for e in stage_epochs),
         "three epoch counts >= 0 (attribute, expression, emotion)"),
        ("fps", fps, fps > 0, "> 0"), ("max_frames", max_frames, max_frames >= 2, ">= 2"),
        ("answer_format", answer_format, answer_format in ("direct", "reasoning"), "direct or reasoning"),
        ("tree_swap", tree_swap, 0 <= tree_swap < 1, "in [0, 1)"),
        ("tree_swap_tasks", tree_swap_tasks, set(tree_swap_tasks) <= set(reasoning_tasks),
         f"a subset of reasoning_tasks {tuple(reasoning_tasks)} (() = all of them)"),
        ("min_pixels", min_pixels, min_pixels > 0, "> 0"),
        ("max_pixels", max_pixels, max_pixels >= max(min_pixels, 28 * 28), ">= min_pixels and >= 784 (28 x 28)"),
        ("max_seq_len", max_seq_len, max_seq_len >= 0, ">= 0 (0 = no limit)"),
        ("num_workers", num_workers, num_workers >= 0, ">= 0"),
        ("video_cache_mb", video_cache_mb, video_cache_mb >= 0, ">= 0 (0 = decode every time)"),
        ("log_every", log_every, log_every >= 1, ">= 1"),
        ("eval_every", eval_every, eval_every >= 0, ">= 0"), ("save_every", save_every, save_every >= 0, ">= 0"),
        ("val_batches", val_batches, val_batches >= 0, ">= 0"),
        ("eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
        ("dtype", dtype, dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        ("save_dtype", save_dtype, save_dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        ("lora_rank", lora_rank, lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
        ("lora_alpha", lora_alpha, lora_alpha > 0, "> 0"),
        ("lora_save", lora_save, lora_save in ("merged", "adapter"), "merged or adapter"),
        ("fsdp", fsdp, not (fsdp and lora_rank), "False with lora_rank > 0 (LoRA's trainable state is small: DDP)"),
        ("lora_save", lora_save, not (lora_rank and lora_save == "adapter" and init_from == "scratch"),
         "merged with init_from=scratch (adapters alone need their base directory)"),
        ("logprobs_backend", logprobs_backend, logprobs_backend in ("auto", "triton", "torch", "naive"),
         "auto, triton, torch or naive"),
        ("video_prune_rate", video_prune_rate, 0 <= video_prune_rate < 1, "in [0, 1)")])


def video_options():
    return dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)


def load_data(train_path, val_path, tokenizer, pad_id, rank, world):
    """Records, the curriculum sampler and the datasets -> (train records, sampler, train set, val loader or None)."""
    video_kwargs = video_options()
    root = video_root or None  # None: each record's videos resolve against its own file's folder (data.py)
    try:
        train_records = load_records_as(train_path, answer_format, reasoning_tasks)
    except OSError as e:
        raise common.InputError(f"config key 'train_file': {e}") from None
    train_records = swap_trees(train_records, tree_swap, seed, text_only=not tree_swap_video,
                               tasks=tree_swap_tasks or None)  # changes reasoning records only
    levels = [curriculum_level(r) for r in train_records]
    excluded = collections.Counter(repr(r.get("level")) for r, lv in zip(train_records, levels) if lv is None)
    if excluded:
        common.print0(f"curriculum: {sum(excluded.values())} records left out, their level is not one of {LEVELS}: "
                      + ", ".join(f"{k} x{v}" for k, v in excluded.most_common(5)))
    sampler = CurriculumSampler(levels, batch_size, stage_epochs=stage_epochs, replay=replay, mix=not curriculum,
                                seed=seed, rank=rank, world_size=world, mix_first=mix_first)
    if len(sampler) == 0:  # else the loop would wait for a batch that never comes
        raise common.InputError(f"{train_path}: {len(train_records)} records ({len(train_records) - sum(excluded.values())} "
                                f"with a curriculum level) make no full global batch of {batch_size * world} "
                                f"(batch_size x world size) at stage_epochs={stage_epochs}; add data or lower "
                                f"--batch_size")
    train_set = EmoDataset(train_records, tokenizer, root, max_seq_len, video_kwargs, cache_mb=video_cache_mb)
    val_loader = None
    if val_path != "none" and os.path.exists(val_path):
        val_set = EmoDataset(load_records_as(val_path, answer_format, reasoning_tasks), tokenizer, root, max_seq_len,
                             video_kwargs, cache_mb=video_cache_mb)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, shuffle=False,
                                                 collate_fn=functools.partial(collate, pad_token_id=pad_id),
                                                 num_workers=0)
    return train_records, sampler, train_set, val_loader


def tokenizer_for(init_dir):
    """init_from's tokenizer when it holds one, else EmoSynth's (tokenizer_dir overrides both)."""
    has_tok = init_dir is not None and os.path.isfile(os.path.join(init_dir, "tokenizer_config.json"))
    tok_dir = tokenizer_dir or (init_dir if has_tok else os.path.join(data_dir, "tokenizer"))
    try:
        return load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise common.InputError(f"tokenizer {tok_dir}: {common.first_line(e)}") from None


def scratch_model(tokenizer):
    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                           "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    return VidEmo(scratch_config(len(tokenizer), ids, n_layer, n_embd, n_head, n_kv_head, n_inner, vision_depth,
                                 vision_embd, vision_heads, vision_inner, tie_embeddings))


def next_micro(loader, make_loader):
    """grad_accum collate batches -> (batches, the loader: a fresh pass when max_steps runs beyond the schedule)."""
    micro = []
    while len(micro) < grad_accum:
        try:
            micro.append(next(loader))
        except StopIteration:
            loader = iter(make_loader())
    return micro, loader


def count_skips(micro, skipped, first_skip, dev, world):
    """Tally the records the collate dropped -> (first skip, [any empty micro-batch, records used, records skipped]
    summed over ranks): a micro-batch whose records all dropped (missing videos, a wrong video_root) skips the step
    on every rank together (a lone rank skipping would leave the others waiting in a collective)."""
    for b in micro:
        for reason in b.get("skipped", []):  # "file:line: why": counted by why, the first one kept whole
            skipped[evaluation.skip_reason(reason.split(": ", 1)[-1])] += 1
            first_skip = first_skip or reason
    counts = torch.tensor([float(any(len(b["index"]) == 0 for b in micro)),
                           float(sum(len(b["index"]) for b in micro)), float(sum(len(b["skipped"]) for b in micro))])
    if world > 1:
        counts = counts.to(dev)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    return first_skip, counts


def lr_for(step, sampler, total_steps):
    if lr_schedule == "stage":  # the stage's own warmup + cosine; the last stage runs to total_steps
        first, end = sampler.stage_span(step * grad_accum)
        end = total_steps if end >= len(sampler) else min(end // grad_accum, total_steps)
        return common.lr_at(step - first // grad_accum, end - first // grad_accum, lr, min_lr, warmup_steps)
    return common.lr_at(step, total_steps, lr, min_lr, warmup_steps)


def forward_backward(net, model, micro, dev, autocast, world, key_id=None):
    """The summed gradient of the micro-batches' NLL, normalised globally (any world size / accumulation gives the
    same loss) -> (step loss, tokens processed on this rank). Record r with n_r supervised tokens weighs W_r, each of
    its tokens W_r / n_r, and the sum is divided by sum(W_r): loss_norm "token" W_r = max(n_r, loss_floor) (floor 0:
    the NLL summed over every supervised token / their count); "record" W_r = 1 (each record's mean token NLL averaged
    over records: a 2-token answer weighs as much as a 75-token tree). With intensity_weight != 1 (and key_id given)
    the token that states an intensity counts intensity_weight times in its record's sum; the normaliser is unchanged."""
    scored = [b["labels"][:, 1:] != -100 for b in micro]  # [B, L-1] each: the tokens the forward scores, row-major
    per = [m.sum(1) for m in scored]  # [B] each: supervised tokens per record
    weight = [(n > 0).float() if loss_norm == "record" else n.clamp(min=loss_floor).float() * (n > 0) for n in per]
    n_norm = torch.tensor(float(sum(float(w.sum()) for w in weight)), device=dev)
    n_local = sum(int(b["attention_mask"].sum()) for b in micro)  # every token processed, for tokens/s
    if world > 1:
        torch.distributed.all_reduce(n_norm)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    for i, (batch, n, w) in enumerate(zip(micro, per, weight)):
        batch = to_device(batch, dev)
        sync = i == len(micro) - 1
        ctx = net.no_sync() if (world > 1 and not fsdp and not sync) else contextlib.nullcontext()
        with ctx:
            if fsdp and world > 1:
                model.set_requires_gradient_sync(sync)
            with autocast:
                logp = net(**model_inputs(batch))  # [n] log-probs of the supervised tokens
            keyed = intensity_weight != 1 and key_id is not None
            if loss_norm == "record" or loss_floor or keyed:
                tok_w = (w / n.clamp(min=1)).repeat_interleave(n).to(dev)  # [n] W_r / n_r (1 for the plain token mean)
                if keyed:
                    tok_w = tok_w * token_weights(batch["labels"], key_id, intensity_weight)  # on the device
                nll = -(logp.float() * tok_w).sum()
            else:
                nll = -logp.sum()
            loss = nll / n_norm.clamp(min=1) * world  # DDP / FSDP average gradients over ranks
            loss.backward()
        loss_sum += nll.detach().double()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    return (loss_sum / n_norm.clamp(min=1)).item(), n_local


def prepare_model(model, found, state, dev, use_bf16, world):
    """Resumed weights, fp32 masters, what trains (LoRA or the freeze_* keys), DDP / FSDP2, AdamW ->
    (model, the forward to call, trainable params, optimizer)."""
    if state is not None:
        if not lora_rank:  # (LoRA continues from its base, built above, and the adapters in the state)
            model = load_weights(found)
        if "master_weights" in state:  # saved in a lower precision: continue from the exact fp32 weights
            model.float().load_state_dict(state["master_weights"])
    # fp32 master weights whatever the stored dtype: AdamW steps below bf16's resolution must not vanish (bf16 compute
    # comes from autocast on CUDA)
    model.float().to(dev)
    if lora_rank:  # adapters only; the freeze_* keys do not apply
        trainer.attach_lora(model, lora_rank, lora_alpha, lora_targets, use_bf16, state)
    else:
        set_trainable(model)
    model.gradient_checkpointing = grad_checkpointing
    # the model scores its labels itself: the LM head runs inside the wrapped forward (DDP reduces its gradient like
    # every other parameter's, FSDP has it unsharded)
    net = model
    if fsdp:
        common.shard_model(model, use_bf16)
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = trainer.adamw(params, lr, (beta1, beta2), weight_decay, dev)
    if state is not None:
        common.load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
        common.set_rng_state(state["rng"])
    return model, net, params, optimizer


def main():
    config = common.configure(globals())
    check_config()
    train_path = train_file or os.path.join(data_dir, "train.jsonl")
    val_path = val_file or os.path.join(data_dir, "val.jsonl")
    test_path = test_file or os.path.join(data_dir, "test.jsonl")
    rank, world, dev = common.setup_distributed(device)
    master = rank == 0
    trainer.claim_out_dir(out_dir, master)
    use_bf16 = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    ckpt_path = os.path.join(out_dir, "ckpt")

    # ---- model (a given init is loaded first: a bad path fails before any data work), data
    torch.manual_seed(seed)  # identical init on every rank
    init_dir = None if init_from == "scratch" else common.resolve_checkpoint(init_from)
    model = None if init_dir is None else load_weights(init_dir)
    stored = torch.float32 if model is None else model.embed_tokens.weight.dtype  # hub checkpoints store bf16
    weights_dtype = stored if save_dtype == "auto" else getattr(torch, save_dtype)
    build_emosynth_if_missing(train_path, master)
    tokenizer = tokenizer_for(init_dir)
    _, pad_id = special_ids(tokenizer)
    key_id = intensity_id(tokenizer)
    train_records, sampler, train_set, val_loader = load_data(train_path, val_path, tokenizer, pad_id, rank, world)
    total_steps = max_steps or len(sampler) // grad_accum
    model = model if model is not None else scratch_model(tokenizer)
    found, state = trainer.load_resume(ckpt_path, config, RESUME_BREAKING, BEFORE) if resume else (None, None)
    if state is not None:
        sampler.load_state_dict(state["sampler"])
    model, net, params, optimizer = prepare_model(model, found, state, dev, use_bf16, world)
    start_step = 0 if state is None else state["step"]
    common.print0(f"VidEmo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(train_records)} "
                  f"train records | {total_steps} steps x {batch_size * grad_accum * world} samples | world {world}")
    common.print0("stages (first step): " + ", ".join(f"{name} {b // grad_accum}" for name, b in sampler.bounds))

    # ---- train
    log = common.MetricLog(os.path.join(out_dir, "metrics.jsonl"), wandb_project if master else None, config)
    make_loader = functools.partial(torch.utils.data.DataLoader, train_set, batch_sampler=sampler,
                                    collate_fn=functools.partial(collate, pad_token_id=pad_id), num_workers=num_workers,
                                    worker_init_fn=common.StopSignal.worker_init)
    loader = iter(make_loader(persistent_workers=False))
    skipped, first_skip, used, n_skipped, skipped_batches = collections.Counter(), None, 0, 0, 0
    guard = trainer.NonFiniteGuard(ckpt_path, start_step if resume else None)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
               dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    stop = common.StopSignal()  # SIGTERM / SIGUSR1 (preemption): finish the step, checkpoint, exit
    model.train()
    for step in bar:
        done = step + 1
        if stop.should_stop(dev):  # every rank at the same step: `step` steps are done
            if guard.last_saved != step:
                save(ckpt_path, model, optimizer, tokenizer, step, sampler, master, config, weights_dtype,
                     trainer.adapter_base(init_from, init_dir))
            stop.exit(trainer.resume_command())
        # 1. the step's micro-batches, and the records they had to skip
        micro, loader = next_micro(loader, make_loader)
        first_skip, counts = count_skips(micro, skipped, first_skip, dev, world)
        used, n_skipped = used + int(counts[1]), n_skipped + int(counts[2])
        if used == 0 and n_skipped >= min(len(train_records), 64):
            reasons = ", ".join(f"{k} x{v}" for k, v in skipped.most_common(3))
            raise common.InputError(f"{train_path}: the first {n_skipped} records were all skipped (first: "
                                    f"{first_skip}); top reasons: {reasons}. Check --video_root and the records")
        if counts[0] > 0:
            skipped_batches += 1
            common.print0(f"step {done}: a micro-batch had no usable record; step skipped ({skipped_batches} so far)")
        else:
            # 2. forward + backward, 3. the update (never a non-finite one)
            step_lr = lr_for(step, sampler, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = step_lr
            step_loss, n_local = forward_backward(net, model, micro, dev, autocast, world, key_id)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.zeros(())
            if not guard.ok(step, step_loss, grad_norm, optimizer):
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += n_local * world
            # 4. log
            if master and (done % log_every == 0 or done == total_steps):
                row = {"step": done, "loss": step_loss, "lr": step_lr, "grad_norm": float(grad_norm),
                       "stage": sampler.stage_of(step * grad_accum), "tok_per_s": tokens_seen / max(time.time() - t0, 1e-9),
                       "skipped": sum(skipped.values()), "skipped_batches": skipped_batches}
                log.log(**row)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}", tok_s=f"{row['tok_per_s']:.0f}",
                                stage=row["stage"], skipped=row["skipped"])
        # 5. validation, 6. checkpoint
        if val_loader is not None and eval_every > 0 and (done % eval_every == 0 or done == total_steps):
            v = validate(net, model, val_loader, dev, autocast, rank, world)
            if master:
                log.log(step=done, **v)
                bar.write(f"step {done}: " + " ".join(f"{k}={x:.4f}" for k, x in v.items()))
        if (save_every > 0 and done % save_every == 0) or done == total_steps or done == stop_at_step:
            save(ckpt_path, model, optimizer, tokenizer, done, sampler, master, config, weights_dtype,
                 trainer.adapter_base(init_from, init_dir))
            guard.saved(done)
        if done == stop_at_step:
            common.print0(f"stop_at_step={stop_at_step}: stopping; continue with --resume=True")
            common.cleanup_distributed()
            return
    bar.close()
    if stop.should_stop(dev):  # the last step is saved: the evaluation runs on --resume
        stop.exit(trainer.resume_command())
    stop.close()
    if skipped and master:
        print(f"skipped records: {sum(skipped.values())} ({dict(skipped.most_common(5))}); skipped steps: "
              f"{skipped_batches}")

    # ---- final evaluation on the test split (rank 0, from the saved checkpoint)
    if eval_at_end and test_path != "none" and os.path.exists(test_path) and master:
        trainer.final_evaluation(VidEmo.from_pretrained(ckpt_path, device=dev), tokenizer, test_path, out_dir,
                                 answer_format, reasoning_tasks, video_root or None, video_options(), eval_batch_size,
                                 eval_max_new_tokens, dev, video_prune_rate, html=report)
    common.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run(main)
