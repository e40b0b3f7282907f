"""Stage 2 of VidEmo: affective-tree reinforcement learning with a hand-written GRPO loop.

    python train_rl.py                                    # EmoSynth default, from out/sft_emosynth/ckpt, CPU ok
    python train_rl.py config/rl_emosynth.py --num_generations=4 --beta=0.0 --loss_type=dapo
    torchrun --standalone --nproc_per_node=8 train_rl.py --init_from=out/sft_qwen25vl_7b/ckpt --train_file=... --lr=1e-6

The whole algorithm reads top to bottom in `main()`: for each step, every rank takes its prompts (whole groups),
encodes each video once (the policy pass re-encodes it once per group with grad when train_vision is on), samples
G completions per prompt with the KV-cache generator, scores them with reward.score (the very function eval.py
reports), turns rewards into group-relative advantages, and runs the clipped-ratio policy loss with a k3 KL to a
frozen reference model. The formulas and the rollout batch live in grpo.py.
"""
import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data as D
import evaluation
import grpo
import lora
import reward as R
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
# direct | reasoning: records of reasoning_tasks answer as <think>affective tree</think><answer>...</answer> (train,
# val and test; data.apply_answer_format) and their reward is the answer's metric + w_tree * tree + w_format * format
answer_format = "direct"
reasoning_tasks = D.REASONING_TASKS
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
# rollout
num_generations = 8  # G completions per prompt
# sampling temperature; policy / old / reference log-probs use logits / temperature too (README: why 0.5 here)
temperature = 0.5
top_p = 1.0
top_k = 0
max_completion_length = 96  # EmoSynth affective trees are <= 75 tokens
mask_truncated_completions = False  # completions without EOS get no loss (DAPO)
decode = "eager"  # rollout decode step: eager | static (fixed shapes) | graphs (static, CUDA graph replay; CUDA only)
video_prune_rate = 0.0  # > 0: EVS keep-mask per prompt (kernels.token_compress), shared by every pass of the group
# train the vision tower and merger too: the policy pass re-encodes each prompt's video with grad (once per group) so
# the tree reward reaches perception (gender, glasses, neutral faces); False = encode once per rollout, vision frozen
train_vision = True
# GRPO
prompts_per_step = 8  # prompts per optimizer step over all ranks (x G completions); each rank owns whole groups
grad_accum = 2  # micro-batches per rank per step (each prompts_per_step // (world * grad_accum) prompts)
num_iterations = 1  # mu: policy updates per rollout batch (old logps = update pass 0's, detached)
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
logprobs_backend = "auto"  # kernels.logprobs: auto (triton on CUDA, chunked torch on CPU) | triton | torch | naive
grad_checkpointing = False  # activation checkpointing of every decoder block (and vision block) in the policy pass
fsdp = False  # FSDP2: policy and reference sharded per decoder block, the vision tower its own unit (README: memory)
# LoRA: lora_rank > 0 trains adapters only (lora.py); the frozen base is bf16 on CUDA and is also the reference
lora_rank = 0
lora_alpha = 32.0
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # visual.X: the tower's
lora_save = "merged"  # merged: a plain HF directory with W + BA | adapter: the adapters only (+ adapter_config.json)
dtype = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU (the policy trains in fp32 whatever its stored dtype)
save_dtype = "auto"  # dtype of the saved HF weights: auto = as init_from stores them | float32 | bfloat16
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


# settings a resumed run must share with its checkpoint (the prompt stream, the groups, what is trained, the reference)
RESUME_BREAKING = ("init_from", "data_dir", "train_file", "video_root", "tokenizer_dir", "tasks", "answer_format",
                   "reasoning_tasks", "fps", "max_frames", "min_pixels", "max_pixels", "num_generations",
                   "prompts_per_step", "grad_accum", "train_vision", "beta", "seed", "lora_rank", "lora_alpha",
                   "lora_targets")


def resolve_paths():
    """(train_file, test_file, val_file) with the data_dir defaults filled in."""
    if val_file and val_file != "none" and eval_every > 0 and not os.path.exists(val_file):
        raise common.InputError(f"config key 'val_file': {val_file} not found (--val_file=none or --eval_every=0 "
                                f"turns the held-out curve off)")
    return (train_file or os.path.join(data_dir, "train.jsonl"), test_file or os.path.join(data_dir, "test.jsonl"),
            val_file or os.path.join(data_dir, "val.jsonl"))


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def main():
    config = common.configure(globals())
    train_file, test_file, val_file = resolve_paths()
    rank, world, dev = common.setup_distributed(device)
    master = rank == 0
    G = num_generations
    eps_high = epsilon_high or epsilon
    common.check([
        ("grad_accum", grad_accum, grad_accum >= 1, ">= 1"), ("prompts_per_step", prompts_per_step,
                                                                  prompts_per_step >= 1, ">= 1"),
        ("max_steps", max_steps, max_steps >= 1, ">= 1"), ("num_iterations", num_iterations, num_iterations >= 1, ">= 1"),
        ("lr", lr, lr > 0, "> 0"), ("min_lr", min_lr, 0 <= min_lr <= lr, "in [0, lr]"),
        ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"), ("temperature", temperature, temperature > 0, "> 0"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k, top_k >= 0, ">= 0"),
        ("max_completion_length", max_completion_length, max_completion_length >= 1, ">= 1"),
        ("beta", beta, beta >= 0, ">= 0"), ("epsilon", epsilon, 0 < epsilon < 1, "in (0, 1)"),
        ("epsilon_high", epsilon_high, epsilon_high >= 0, ">= 0 (0 = epsilon)"),
        ("video_prune_rate", video_prune_rate, 0 <= video_prune_rate < 1, "in [0, 1)"),
        ("log_every", log_every, log_every >= 1, ">= 1"), ("save_every", save_every, save_every >= 0, ">= 0"),
        ("eval_every", eval_every, eval_every >= 0, ">= 0"),
        ("eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
        ("save_dtype", save_dtype, save_dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        ("lora_rank", lora_rank, lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
        ("lora_alpha", lora_alpha, lora_alpha > 0, "> 0"),
        ("lora_save", lora_save, lora_save in ("merged", "adapter"), "merged or adapter"),
        ("decode", decode, decode != "graphs" or dev.type == "cuda", "eager or static on a CPU device (graphs: CUDA)"),
        ("fsdp", fsdp, not (fsdp and lora_rank), "False with lora_rank > 0 (LoRA's trainable state is small: DDP)"),
        ("logprobs_backend", logprobs_backend, logprobs_backend in ("auto", "triton", "torch", "naive"),
         "auto, triton, torch or naive")])
    for key, value, choices in (("loss_type", loss_type, ("grpo", "bnpo", "dr_grpo", "dapo")),
                                ("scale_rewards", scale_rewards, ("group", "batch", "none")),
                                ("dtype", dtype, ("auto", "float32", "bfloat16")),
                                ("decode", decode, ("eager", "static", "graphs"))):
        if value not in choices:
            raise common.ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
    if G < 2:
        raise common.ConfigError(f"config key 'num_generations': {G}; GRPO needs at least 2 completions per prompt")
    if prompts_per_step % (world * grad_accum):
        raise common.ConfigError(f"config key 'prompts_per_step': {prompts_per_step} must be divisible by world size x "
                                 f"grad_accum = {world} x {grad_accum} (each rank owns whole groups)")
    prompts_per_micro = prompts_per_step // (world * grad_accum)
    use_bf16 = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    ckpt_path = os.path.join(out_dir, "ckpt")

    # ---- data: records of the chosen tasks, one endless shuffled stream per rank
    try:
        init_dir = common.resolve_checkpoint(init_from)
    except common.InputError as e:
        raise common.InputError(f"{e}. Run `python train_sft.py` first (it writes out/sft_emosynth/ckpt), or pass "
                                f"--init_from=DIR with a checkpoint / HF Qwen2.5-VL directory") from None
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(train_file):
        raise common.InputError(f"train_file {train_file} not found (build EmoSynth with `python train_sft.py` or "
                                f"data/emosynth/prepare.py, or pass --train_file)")
    tokenizer = D.load_tokenizer(tokenizer_dir or init_dir)
    eos_id, pad_id = D.special_ids(tokenizer)
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    unknown = [t for t in tasks if t not in R.TASK_METRIC]
    if unknown:
        raise common.ConfigError(f"config key 'tasks': unknown task(s) {unknown}; known: {sorted(R.TASK_METRIC)}")
    if answer_format not in D.ANSWER_FORMATS:
        raise common.ConfigError(f"config key 'answer_format': must be direct or reasoning, got {answer_format!r}")
    records = [r for r in D.load_records_as(train_file, answer_format, reasoning_tasks)
               if r.get("task") in (tasks or R.TASK_METRIC)]
    if not records:
        raise common.InputError(f"no records of tasks {tasks} in {train_file}")
    root = video_root or None  # None: each record's videos resolve against its own file's folder (data.py)
    video_cache = D.VideoCache(256)  # decoded videos, reused when a record comes round again
    weights = {"accuracy": w_accuracy, "f1": w_f1, "caption": w_caption, "tree": w_tree, "format": w_format}

    # ---- models: the policy (resumed or from SFT) and a frozen reference (always the SFT checkpoint)
    state = None
    if resume:
        found = common.find_checkpoint(ckpt_path)
        if found is None:
            raise common.InputError(f"--resume: no complete checkpoint at {ckpt_path} (rank {common.rank()}; "
                                    f"on several nodes, out_dir must be on a filesystem they share)")
        state = common.load_trainer_state(found)
        common.check_resume(state.get("config", {}), config, RESUME_BREAKING)
        if "data_pos" not in state or "world_size" not in state:
            raise common.InputError(f"--resume: {found} was not written by train_rl.py (no prompt-stream position); "
                                    f"start stage 2 from it with --init_from={found} instead")
        if state["world_size"] != world:
            raise common.InputError(f"--resume: checkpoint was written with world size {state['world_size']}, now {world}")
    if state is not None and not lora_rank:
        policy = VidEmo.from_pretrained(found, device=dev)
        stored = policy.embed_tokens.weight.dtype  # what the first run saved in
        if "master_weights" in state:  # saved in a lower precision: continue from the exact fp32 weights
            policy.float().load_state_dict(state["master_weights"])
    else:  # LoRA resumes from its base + the adapters in trainer_state
        policy = VidEmo.from_pretrained(init_dir, device=dev)
        stored = policy.embed_tokens.weight.dtype
    weights_dtype = stored if save_dtype == "auto" else getattr(torch, save_dtype)
    policy.float()  # fp32 master weights: AdamW steps below bf16's resolution must not vanish
    if lora_rank:
        torch.manual_seed(seed)  # the adapters' random init: the same on every rank and in every run of this seed
        try:
            lora.add_adapters(policy, lora_rank, lora_alpha, lora_targets,
                              base_dtype=torch.bfloat16 if use_bf16 else None)
        except ValueError as e:
            raise common.ConfigError(f"config key 'lora_targets': {e}") from None
        if state is not None:
            policy.load_state_dict(state["adapters"], strict=False)
    else:
        # train_vision=False: the video is encoded once per prompt (no grad) and reused by every pass, so the vision
        # tower and merger get no gradient: freeze them (the reference then shares the policy's embeddings)
        for name, p in policy.named_parameters():
            p.requires_grad_(train_vision or not name.startswith("visual."))
    # re-encode the video with grad in the policy pass only when some vision weight trains (a frozen tower's output
    # is the rollout's); the reference re-encodes with its own tower in the same case
    reencode = train_vision and any(p.requires_grad for n, p in policy.named_parameters() if n.startswith("visual."))
    policy.gradient_checkpointing = grad_checkpointing
    ref_model = None
    if beta != 0.0 and not lora_rank:  # with LoRA the reference is the policy with its adapters off
        ref_dtype = torch.bfloat16 if use_bf16 and not fsdp else None  # never trained: no fp32 master copy needed
        ref_model = VidEmo.from_pretrained(init_dir, dtype=ref_dtype, device=dev).eval().requires_grad_(False)
        if fsdp:  # sharded like the policy: 1/N of its weights per rank, gathered block by block in its pass
            common.shard_model(ref_model, use_bf16)
    if fsdp:
        common.shard_model(policy, use_bf16)
    net = grpo.GroupScorer(policy, temperature, reencode=reencode, backend=logprobs_backend)
    if world > 1 and not fsdp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=lr, betas=(beta1, beta2))
    start_step, stream = 0, grpo.PromptStream(len(records), seed, rank, world)
    if state is not None:
        common.load_optimizer_state(policy, optimizer, state["optimizer"], fsdp)
        common.set_rng_state(state["rng"])
        start_step, stream.pos = state["step"], state["data_pos"][rank]

    def reference_logps(mb):
        """The frozen reference's completion log-probs (its own vision tower when the policy's trains)."""
        if lora_rank:
            with lora.disabled(policy):
                return grpo.completion_logps(policy, mb, temperature, reencode=reencode, backend=logprobs_backend)[0]
        return grpo.completion_logps(ref_model, mb, temperature, reencode=reencode, backend=logprobs_backend)[0]

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
                    top = sorted(skipped.items(), key=lambda kv: -kv[1])[:3]
                    raise common.InputError(f"{train_file}: every record was skipped; top reasons: {top}. Check "
                                            f"--video_root and the records")
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
        # FSDP2: the policy is gathered once for the whole rollout, not per block per decoded token
        with (common.unsharded(policy) if fsdp else contextlib.nullcontext()), autocast:
            video_embeds = policy.encode_video(b["pixel_values_videos"].to(dev), grid)  # [n_vid, D], once per prompt
            keep = None
            if video_prune_rate > 0:  # [n_vid] bool, computed once here and shared by every pass of the group
                keep = policy.video_keep_mask(video_embeds, grid, rate=video_prune_rate)
            seqs, gen_logps = policy.generate(
                ids, attention_mask=attn, video_embeds=video_embeds, video_grid_thw=grid, second_per_grid_ts=sec,
                video_keep_mask=keep, max_new_tokens=max_completion_length, temperature=temperature, top_p=top_p,
                top_k=top_k, eos_token_id=[eos_id, *placeholders], pad_token_id=pad_id, num_return_sequences=G,
                return_logprobs=True, generator=gen, decode=decode)  # [B*G, Tc]: sample j of prompt b is row b*G + j
        t_gen = time.time() - t0
        mb = grpo.group_batch(ids, attn, seqs, video_embeds, grid, sec, keep, G, policy.vision_token_counts(grid),
                              eos_id, pad_id, placeholders, mask_truncated_completions,
                              b["pixel_values_videos"].to(dev) if reencode else None)
        # score: decode each completion (up to and including EOS) and apply the rule-based rewards: reward.score is
        # also eval's metric, so GRPO maximises exactly the number the evaluation reports
        t0 = time.time()
        texts = tokenizer.batch_decode([s[:n].tolist() for s, n in zip(seqs.cpu(), mb["lengths"].tolist())],
                                       skip_special_tokens=True)
        scores = [R.score(t, recs[i // G], weights, lam=tree_lambda) for i, t in enumerate(texts)]
        for sc in scores:  # the format term counts (and is logged) only where reward.py adds it to the total
            if not any(k in sc for k in R.FORMAT_METRICS):
                sc.pop("format", None)
        terms = torch.tensor([[sc.get(k, float("nan")) for k in grpo.REWARD_TERMS] for sc in scores],
                             dtype=torch.float32)  # [B*G, K], NaN where a term does not apply to the task
        total = torch.tensor([s["total"] for s in scores], dtype=torch.float32)  # [B*G]
        t_score = time.time() - t0
        mb.update(gen_logps=gen_logps, total=total, terms=terms, texts=texts, records=recs, scores=scores)
        return mb, t_gen, t_score

    def save(msd, osd, done, pos):
        """rank 0: the HF checkpoint (merged LoRA by default) + everything an exact resume needs."""
        state = {"step": done, "optimizer": osd, "rng": common.rng_state(), "data_pos": pos, "world_size": world,
                 "config": config}
        write = lora.checkpoint_writer(policy, state, msd, weights_dtype, lora_save, init_dir, lora_targets)
        common.save_checkpoint(ckpt_path, write, tokenizer, state)

    # ---- held-out curve: greedy scores of the RL tasks on the val split (rank 0 evaluates, the others wait)
    val_records = []
    if eval_every > 0 and val_file != "none" and os.path.exists(val_file):
        by_task = {}
        for r in D.load_records_as(val_file, answer_format, reasoning_tasks):
            if r.get("task") in (tasks or R.TASK_METRIC):
                by_task.setdefault(r["task"], []).append(r)
        val_records = [r for rs in by_task.values() for r in rs[:eval_val_records or None]]

    val_cache = D.VideoCache(256)  # the held-out clips, decoded once for every evaluation

    def heldout():
        scores = {}
        # FSDP2: every rank gathers the weights (a collective), then rank 0 evaluates alone on the whole model
        with common.unsharded(policy) if fsdp else contextlib.nullcontext():
            if master:
                res = evaluation.evaluate(policy, tokenizer, val_records, root, video_kwargs,
                                          batch_size=eval_batch_size, max_new_tokens=eval_max_new_tokens, device=dev,
                                          progress=False, video_prune_rate=video_prune_rate, video_cache=val_cache)
                scores = {f"val/{t}": v["score"] for t, v in res["tasks"].items()}
                print("held-out (val): " + " | ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()), flush=True)
            common.barrier()
        return scores

    # ---- train
    log = common.MetricLog(os.path.join(out_dir, "metrics.jsonl"), wandb_project if master else None, config)
    skipped, bad_steps = {}, 0
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
        total_all = grpo.gather_rows(total_local.to(dev)).cpu()  # [world * n_local], rank-major, groups contiguous
        adv = grpo.grpo_advantages(total_all, G, scale_rewards)[mine]
        group_std = total_all.view(-1, G).std(1)  # [groups]
        zero_std = torch.isclose(group_std, torch.zeros_like(group_std))  # all G rewards equal: advantage ~0 (TRL)
        keep_rows = (~zero_std).repeat_interleave(G)[mine]  # dynamic sampling keeps the other groups
        offset = 0
        for mb in micro:
            n = mb["total"].numel()
            mb["adv"] = adv[offset:offset + n].to(dev)
            mb["rows"] = keep_rows[offset:offset + n].to(dev) if dynamic_sampling else None
            offset += n
        # 3. reference log-probs, once per rollout, same inputs as the policy pass (its own frozen vision tower).
        # No separate old-policy pass for mu > 1: the first update pass runs the rollout's weights (the optimizer
        # steps only after every micro-batch), so its detached log-probs are the old ones (ratio exactly 1 there)
        t0 = time.time()
        with torch.no_grad(), autocast:
            for mb in micro:
                mb["old"] = None
                mb["ref"] = reference_logps(mb) if beta != 0.0 else None
        t_ref = time.time() - t0
        old_logps = [None] * len(micro)  # [n_kept, Tc] per micro-batch, from update pass 0
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
        step_lr = common.lr_at(step, max_steps, lr, min_lr, warmup_steps)
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
                sub = mb if rows is None else grpo.subset(mb, rows)
                last = i == len(micro) - 1
                if fsdp and world > 1:  # reduce-scatter the gradients on the last micro-batch only
                    policy.set_requires_gradient_sync(last)
                with (net.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()), autocast:
                    logps, ent = net(sub, with_entropy=it == 0)  # [n, Tc] through the DDP-wrapped forward
                    if it == 0:  # the old policy's log-probs (mu = 1: ratio 1, the gradient of plain PG)
                        old_logps[i] = logps.detach()
                    loss, st = grpo.grpo_loss(logps, old_logps[i], sub["ref"], sub["adv"], sub["cmask"], beta, epsilon,
                                              eps_high, loss_type, max_completion_length=max_completion_length,
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
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
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
        lengths_all = grpo.gather_rows(torch.cat([mb["lengths"] for mb in micro]).float().to(dev)).cpu()
        trunc_all = grpo.gather_rows(torch.cat([mb["truncated"] for mb in micro]).float().to(dev)).cpu()
        terms_all = grpo.gather_rows(torch.cat([mb["terms"] for mb in micro]).to(dev)).cpu()  # [n, K]
        S = grpo.reduce_sum({"loss": loss_sum, "n_stats": n_stats, "ent": ent_sum, "ent_n": ent_n, "t_generate": t_gen,
                        "t_score": t_score, "t_ref": t_ref, "t_update": t_update, "logp_diff": sum(logp_diff),
                        "n_diff": len(logp_diff), **{k: stats_sum.get(k, 0.0) for k in grpo.LOSS_STATS}}, dev)
        row = {"step": done, "lr": step_lr, "loss": S["loss"] / world / num_iterations, "grad_norm": float(grad_norm),
               "reward": total_all.mean().item(), "reward_std": total_all.std().item(),
               "frac_reward_zero_std": zero_std.float().mean().item()}
        if S["n_stats"]:  # means over the updates of this step (absent when every group was dropped)
            row.update({k: S[k] / S["n_stats"] for k in grpo.LOSS_STATS})
            row["entropy"] = S["ent"] / max(S["ent_n"], 1.0)
        row.update({"completion_len_mean": lengths_all.mean().item(), "completion_len_min": lengths_all.min().item(),
                    "completion_len_max": lengths_all.max().item(), "frac_truncated": trunc_all.mean().item()})
        row.update({k: S[k] / world for k in ("t_generate", "t_score", "t_ref", "t_update")})  # mean over ranks
        row.update({"step_time": time.time() - t_step, "skipped_records": sum(skipped.values()),
                    "rollout_tok_per_s": lengths_all.sum().item() / max(row["t_generate"], 1e-9)})
        if S["n_diff"]:  # |log-prob of the sampler - of the training forward|, same weights: should be ~1e-6
            row["rollout_logp_diff"] = S["logp_diff"] / S["n_diff"]
        for j, k in enumerate(grpo.REWARD_TERMS):
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
                grpo.print_sample_table(done, [{"task": mb["records"][i // G].get("task", "?"),
                                           "total": mb["total"][i].item(), "text": mb["texts"][i],
                                           "terms": {k: v for k, v in mb["scores"][i].items() if k != "total"},
                                           "reference": R.reference_text(mb["records"][i // G], missing="")}
                                          for i in picks])

        # 6. checkpoint (rank 0 writes; every rank's data position is saved)
        if (save_every > 0 and done % save_every == 0) or done == max_steps or done == stop_at_step:
            pos = grpo.gather_rows(torch.tensor([stream.pos], device=dev)).cpu().tolist()
            msd = common.full_state_dict(policy, fsdp) if not lora_rank else None  # a collective under FSDP
            osd = common.optimizer_state_dict(policy, optimizer, fsdp)
            if master:
                save(msd, osd, done, pos)
            common.barrier()
        if done == stop_at_step:
            common.print0(f"stop_at_step={stop_at_step}: stopping; continue with --resume=True")
            common.cleanup_distributed()
            return
    if skipped and master:
        print("skipped records:", skipped)

    # ---- final evaluation on the test split (rank 0; FSDP2: on the gathered weights)
    if eval_at_end and test_file != "none" and os.path.exists(test_file):
        policy.eval()
        with common.unsharded(policy) if fsdp else contextlib.nullcontext():
            if master:
                test_records = D.load_records_as(test_file, answer_format, reasoning_tasks)[:eval_max_records or None]
                evaluation.report(policy, tokenizer, test_records, root, video_kwargs, out_dir,
                                  batch_size=eval_batch_size, max_new_tokens=eval_max_new_tokens, device=dev,
                                  video_prune_rate=video_prune_rate)
            common.barrier()
    common.barrier()
    common.cleanup_distributed()



if __name__ == "__main__":
    common.run(main)
