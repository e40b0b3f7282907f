"""Stage 1 of VidEmo: curriculum emotion learning (SFT), attribute -> expression -> emotion tuning.

    python train_sft.py                                   # the EmoSynth default, tiny model from scratch, CPU ok
    torchrun --standalone --nproc_per_node=8 train_sft.py config/sft_qwen25vl_7b.py
    python train_sft.py config/sft_emosynth.py --batch_size=8 --lr=3e-4 --resume=True

Reads the whole loop top to bottom: config, data + curriculum sampler, model (scratch or any HF Qwen2.5-VL dir),
DDP / FSDP2, AdamW with warmup + cosine, gradient accumulation, periodic validation, atomic checkpoints with exact
resume, and a final evaluation on the test split that writes eval.json.
"""
import contextlib
import functools
import math
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import common
from data import CurriculumSampler, EmoDataset, collate, load_records, load_tokenizer
from kernels.logprobs import token_logprobs
from model import VidEmo

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
tokenizer_dir = ""  # default: init_from, else data_dir/tokenizer
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
max_seq_len = 512
num_workers = 2
# curriculum
curriculum = True  # False = one shuffled mix of all levels (the baseline)
stage_epochs = (4.0, 2.0, 2.0)  # epochs over each level's records: attribute, expression, emotion
replay = 0.4  # fraction of each later-stage batch replayed from earlier stages
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
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
freeze_vision = False  # the ViT blocks + patch embed
freeze_merger = False
freeze_llm = False
fused_loss = True  # cross-entropy through kernels.logprobs straight from hidden states (no [N, V] logits)
grad_checkpointing = False
fsdp = False  # FSDP2 (fully_shard per block, the vision tower as its own unit) instead of DDP
dtype = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
device = "auto"
seed = 0
# logging, validation, checkpoints
log_every = 10
eval_every = 200
val_batches = 8
save_every = 200
stop_at_step = 0  # >0: stop after this step's checkpoint (simulates a killed run; --resume continues)
eval_at_end = True
eval_batch_size = 32
eval_max_new_tokens = 96
video_prune_rate = 0.0  # EVS token compression at evaluation (0 = keep all)
wandb_project = ""
# ----------------------------------------------------------------------------------------------------------------------


def scratch_config(tokenizer):
    """A Qwen2.5-VL config dict for a model trained from scratch, sized by the globals above."""
    half = (n_embd // n_head) // 2  # M-RoPE sections (t, h, w) sum to head_dim / 2, Qwen's 2:3:3 split
    hw = (half - half // 4) // 2
    mrope_section = [half - 2 * hw, hw, hw]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": len(tokenizer), "hidden_size": n_embd, "intermediate_size": n_inner,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv_head,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
        "tie_word_embeddings": tie_embeddings, "attention_dropout": 0.0, "use_sliding_window": False,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": vision_depth, "hidden_size": vision_embd, "intermediate_size": vision_inner,
            "num_heads": vision_heads, "out_hidden_size": n_embd, "hidden_act": "silu", "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
            "window_size": 112, "fullatt_block_indexes": list(range(vision_depth)),
        },
    }


class SFTLoss(nn.Module):
    """The model plus its loss, so that the LM-head scoring runs inside the DDP / FSDP-wrapped forward
    (gradients of lm_head are then reduced like every other parameter, and FSDP has it unsharded)."""

    def __init__(self, model, fused):
        super().__init__()
        self.model, self.fused = model, fused

    def forward(self, input_ids, attention_mask, labels, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None):
        hidden = self.model(input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos,
                            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                            return_hidden=True)  # [B, L, D]
        targets = labels[:, 1:]  # [B, L-1]: token t predicts t+1
        sel = targets != -100
        h = hidden[:, :-1][sel]  # [N, D], only the supervised positions
        weight = self.model.lm_head.weight  # [V, D]
        if self.fused:
            logp = token_logprobs(h, weight, targets[sel])  # [N] fp32, never builds [N, V]
        else:
            logp = torch.log_softmax((h @ weight.T).float(), -1).gather(-1, targets[sel][:, None])[:, 0]
        return logp, sel


def to_device(batch, dev):
    return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch):
    return {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values_videos",
                                        "video_grid_thw", "second_per_grid_ts")}


def lr_at(step, total):
    """Linear warmup, then cosine from lr to min_lr; a pure function of the step (exact on resume)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_trainable(model):
    for name, p in model.named_parameters():
        is_merger = name.startswith("visual.merger.")
        is_vision = name.startswith("visual.") and not is_merger
        frozen = (is_vision and freeze_vision) or (is_merger and freeze_merger) or \
                 (not name.startswith("visual.") and freeze_llm)
        p.requires_grad_(not frozen)


def resolve_paths():
    global train_file, val_file, test_file, tokenizer_dir
    train_file = train_file or os.path.join(data_dir, "train.jsonl")
    val_file = val_file or os.path.join(data_dir, "val.jsonl")
    test_file = test_file or os.path.join(data_dir, "test.jsonl")
    if not tokenizer_dir:
        has_tok = init_from != "scratch" and os.path.isfile(os.path.join(init_from, "tokenizer_config.json"))
        tokenizer_dir = init_from if has_tok else os.path.join(data_dir, "tokenizer")


def build_emosynth_if_missing(master):
    """The embedded default builds itself on first use (rank 0 builds, the others wait)."""
    default = os.path.join(data_dir, "train.jsonl")
    if train_file != default or os.path.isfile(os.path.join(data_dir, "done.json")):
        return
    if master:
        import importlib.util
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "emosynth", "prepare.py")
        spec = importlib.util.spec_from_file_location("emosynth_prepare", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        common.print0(f"EmoSynth not found in {data_dir}: building it")
        mod.prepare(data_dir)
    common.barrier()


def data_root(path):
    return video_root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))


def full_state(wrapped, raw):
    """The full (unsharded) model state dict on every rank's CPU (FSDP2 gathers; DDP has it already)."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def optimizer_state(wrapped, optimizer):
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))


def load_optimizer_state(wrapped, optimizer, sd):
    if not fsdp:
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(wrapped, optimizer, sd, options=StateDictOptions(full_state_dict=True))


def save(path, wrapped, raw, optimizer, tokenizer, step, sampler, master, config):
    msd, osd = full_state(wrapped, raw), optimizer_state(wrapped, optimizer)  # collective under FSDP
    if master:
        def write_model(d):
            if msd is None:
                raw.save_pretrained(d)
            else:  # a plain CPU copy of the gathered weights, written in HF format
                cpu = VidEmo(raw.config)
                cpu.load_state_dict(msd)
                cpu.save_pretrained(d)
        # the sampler's own counter runs ahead by the DataLoader's prefetch: record the batches actually consumed
        consumed = step * grad_accum % len(sampler)
        state = {"step": step, "optimizer": osd, "sampler": sampler.state_dict(step=consumed),
                 "rng": common.rng_state(),
                 "config": config}
        common.save_checkpoint(path, write_model, tokenizer, state)
    common.barrier()


@torch.no_grad()
def validate(wrapped, loader, dev, autocast, rank, world):
    """Val loss and teacher-forced answer exact-match per level (every answer token argmax-correct)."""
    wrapped.eval()
    nll, ntok = torch.zeros(1), torch.zeros(1)
    hit, cnt = {}, {}
    for i, batch in enumerate(loader):
        if i >= val_batches * world:
            break
        if i % world != rank or len(batch["index"]) == 0:
            continue
        batch = to_device(batch, dev)
        with autocast:
            logp, sel = wrapped(**model_inputs(batch))
        nll += -logp.double().sum().cpu()
        ntok += sel.sum().cpu()
        raw = wrapped.module.model if hasattr(wrapped, "module") else wrapped.model
        with autocast:
            hidden = raw(batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values_videos=batch.get("pixel_values_videos"), video_grid_thw=batch.get("video_grid_thw"),
                         second_per_grid_ts=batch.get("second_per_grid_ts"), return_hidden=True)
        pred = (hidden[:, :-1] @ raw.lm_head.weight.T).argmax(-1)  # [B, L-1]
        tgt = batch["labels"][:, 1:]
        ok = ((pred == tgt) | (tgt == -100)).all(-1)  # [B]
        for lvl, o in zip(batch["level"], ok.tolist()):
            hit[lvl] = hit.get(lvl, 0) + int(o)
            cnt[lvl] = cnt.get(lvl, 0) + 1
    levels = ("attribute", "expression", "emotion")
    stats = torch.tensor([nll.item(), ntok.item()] + [hit.get(l, 0) for l in levels] + [cnt.get(l, 0) for l in levels],
                         dtype=torch.float64)
    if torch.distributed.is_initialized():
        stats = stats.to(dev)
        torch.distributed.all_reduce(stats)
        stats = stats.cpu()
    wrapped.train()
    out = {"val_loss": stats[0].item() / max(1.0, stats[1].item())}
    for j, l in enumerate(levels):
        if stats[5 + j] > 0:
            out[f"val_acc_{l}"] = stats[2 + j].item() / stats[5 + j].item()
    return out


def main():
    config = common.configure(globals())
    resolve_paths()
    rank, world, dev = common.setup_distributed(device)
    master = rank == 0
    os.makedirs(out_dir, exist_ok=True)
    use_bf16 = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    ckpt_path = os.path.join(out_dir, "ckpt")

    # ---- model (a given init is loaded first: a bad path fails before any data work)
    torch.manual_seed(seed)  # identical init on every rank
    model = None if init_from == "scratch" else VidEmo.from_pretrained(init_from)
    # ---- data
    build_emosynth_if_missing(master)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    train_records = load_records(train_file)
    levels = [r.get("level", "emotion") if isinstance(r, dict) else "emotion" for r in train_records]
    sampler = CurriculumSampler(levels, batch_size, stage_epochs=stage_epochs, replay=replay, mix=not curriculum,
                                seed=seed, rank=rank, world_size=world)
    collate_fn = functools.partial(collate, pad_token_id=pad_id)
    train_set = EmoDataset(train_records, tokenizer, data_root(train_file), max_seq_len, video_kwargs)
    total_steps = max_steps or len(sampler) // grad_accum
    val_loader = None
    if val_file != "none" and os.path.exists(val_file):
        val_set = EmoDataset(load_records(val_file), tokenizer, data_root(val_file), max_seq_len, video_kwargs)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                                                 num_workers=0)

    if model is None:
        torch.manual_seed(seed)
        model = VidEmo(scratch_config(tokenizer))
    start_step, state = 0, None
    if resume:
        found = common.find_checkpoint(ckpt_path)
        if found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint at {ckpt_path}")
        model = VidEmo.from_pretrained(found)
        state = common.load_trainer_state(found)
        start_step = state["step"]
        sampler.load_state_dict(state["sampler"])
    model.to(dev)
    set_trainable(model)
    model.gradient_checkpointing = grad_checkpointing
    wrapped = SFTLoss(model, fused_loss)
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model.visual)  # the vision tower is its own unit
        for block in model.layers:
            fully_shard(block)
        fully_shard(wrapped)
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(beta1, beta2),
                                  fused=dev.type == "cuda")
    if state is not None:
        load_optimizer_state(wrapped, optimizer, state["optimizer"])
        common.set_rng_state(state["rng"])
    common.print0(f"VidEmo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(train_records)} "
                  f"train records | {total_steps} steps x {batch_size * grad_accum * world} samples | world {world}")

    # ---- train
    log = common.MetricLog(os.path.join(out_dir, "metrics.jsonl"), wandb_project if master else None, config)
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                              num_workers=num_workers, persistent_workers=False))
    skipped = {}
    bad_steps = 0
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not master,
               dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    wrapped.train()
    for step in bar:
        micro = []
        while len(micro) < grad_accum:
            try:
                micro.append(next(loader))
            except StopIteration:  # max_steps beyond the schedule: run through it again
                loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                                          num_workers=num_workers))
        for b in micro:
            for reason in b.get("skipped", []):
                skipped[reason] = skipped.get(reason, 0) + 1
        # normalise by the global count of supervised tokens, so any world size / accumulation gives the same loss
        n_tok = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)), device=dev)
        n_local = sum(int(b["attention_mask"].sum()) for b in micro)  # every token processed, for tokens/s
        if world > 1:
            torch.distributed.all_reduce(n_tok)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total_steps)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for i, batch in enumerate(micro):
            batch = to_device(batch, dev)
            sync = i == len(micro) - 1
            ctx = wrapped.no_sync() if (world > 1 and not fsdp and not sync) else contextlib.nullcontext()
            with ctx:
                if fsdp and world > 1:
                    wrapped.set_requires_gradient_sync(sync)
                with autocast:
                    logp, _ = wrapped(**model_inputs(batch))
                nll = -logp.sum()
                loss = nll / n_tok.clamp(min=1) * world  # DDP / FSDP average gradients over ranks
                loss.backward()
            loss_sum += nll.detach().double()
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        step_loss = (loss_sum / n_tok.clamp(min=1)).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.zeros(())
        if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
            # never apply a NaN update: skip it; several in a row save the (still good) weights and stop
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            common.print0(f"step {step}: non-finite loss {step_loss} / grad norm {float(grad_norm)}; update skipped")
            if bad_steps >= 3:
                save(ckpt_path, wrapped, model, optimizer, tokenizer, step, sampler, master, config)
                raise FloatingPointError(f"loss is NaN/inf for {bad_steps} steps in a row at step {step}; "
                                         f"weights before it saved to {ckpt_path}; lower lr or check the data")
            continue
        bad_steps = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += n_local * world
        done = step + 1
        if master and (done % log_every == 0 or done == total_steps):
            dt = time.time() - t0
            row = {"step": done, "loss": step_loss, "lr": lr_at(step, total_steps), "grad_norm": float(grad_norm),
                   "stage": sampler.stage_of(step * grad_accum), "tok_per_s": tokens_seen / max(dt, 1e-9),
                   "skipped": sum(skipped.values())}
            log.log(**row)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_per_s']:.0f}",
                            stage=row["stage"])
        if val_loader is not None and eval_every > 0 and (done % eval_every == 0 or done == total_steps):
            v = validate(wrapped, val_loader, dev, autocast, rank, world)
            if master:
                log.log(step=done, **v)
                bar.write(f"step {done}: " + " ".join(f"{k}={x:.4f}" for k, x in v.items()))
        if (save_every > 0 and done % save_every == 0) or done == total_steps or done == stop_at_step:
            save(ckpt_path, wrapped, model, optimizer, tokenizer, done, sampler, master, config)
        if done == stop_at_step:
            common.print0(f"stop_at_step={stop_at_step}: stopping; continue with --resume=True")
            common.cleanup_distributed()
            return
    bar.close()
    if skipped and master:
        print("skipped records:", skipped)

    # ---- final evaluation on the test split (rank 0, from the saved checkpoint)
    if eval_at_end and test_file != "none" and os.path.exists(test_file) and master:
        from eval import evaluate, format_table, write_results
        best = VidEmo.from_pretrained(ckpt_path, device=dev)
        result = evaluate(best, tokenizer, load_records(test_file), data_root(test_file), video_kwargs,
                          batch_size=eval_batch_size, max_new_tokens=eval_max_new_tokens, device=dev,
                          predictions_path=os.path.join(out_dir, "eval_predictions.jsonl"),
                          video_prune_rate=video_prune_rate)
        write_results(result, os.path.join(out_dir, "eval.json"))
        print(format_table(result))
    common.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
