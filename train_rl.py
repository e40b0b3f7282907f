"""Stage 2 of VidEmo: affective-tree reinforcement learning with a hand-written GRPO loop.

    python train_rl.py                                    # EmoSynth default, from out/sft_emosynth/ckpt, CPU ok
    python train_rl.py config/rl_emosynth.py --num_generations=4 --beta=0.04 --loss_type=dapo
    torchrun --standalone --nproc_per_node=8 train_rl.py --init_from=out/sft_qwen25vl_7b/ckpt --train_file=... --lr=1e-6

One step is the numbered loop at the bottom of `main()`, each part a function of this file: every rank takes its
prompts (whole groups), encodes each video once, samples G completions per prompt with the KV-cache generator, scores
them with reward.score (the very function eval.py reports) -> `rollout`; turns rewards into group-relative advantages
-> `advantages`; scores the completions under the frozen reference -> `reference_pass`; runs the clipped-ratio policy
loss with a k3 KL -> `update`; logs -> `step_metrics`; checkpoints -> `save`. The formulas, the loss normalisation
(grpo.Objective) and the typed rollout batch (grpo.Rollout) live in grpo.py; the reward terms in reward.py.
"""
import collections
import contextlib
import os
import time

import torch
import torch.nn as nn

import common
import data as D
import evaluation
import grpo
import lora
import reward as R
import trainer
from model import VidEmo

# ----------------------------------------------------------------------------------------------------------------------
# defaults (every key can be overridden by a config file or --key=value; `--help` lists them)
out_dir = "out/rl_emosynth"
init_from = "out/sft_emosynth/ckpt"  # the SFT checkpoint (HF-format dir); also the frozen reference when beta > 0
resume = False  # continue from out_dir/ckpt (policy, optimizer, step, data position); the reference stays init_from
# data
data_dir = "data/emosynth/build"
train_file = ""  # default: data_dir/train.jsonl
test_file = ""  # default: data_dir/test.jsonl ("none" skips the final evaluation)
val_file = ""  # default: data_dir/val.jsonl ("none": no held-out curve); its records of `tasks` are scored every eval_every
video_root = ""  # default: the folder of each record's data file
tokenizer_dir = ""  # default: init_from
# train on records of these tasks (empty = all that reward.py can score): the affective tree and every emotion QA
# task, so the answers of the tasks answered directly are rewarded too and not unlearnt (chosen on val, docs/method.md);
# a task named k times is drawn k times as often (prompt_pool)
tasks = ("fine_grained_caption", "emotion_single", "emotion_multi", "emotion_fine", "sentiment_single", "sentiment_fine",
         "micro_expression", "emotion_transition")
# direct | reasoning: records of reasoning_tasks answer as <think>affective tree</think><answer>...</answer> (train,
# val and test; data.apply_answer_format) and their reward is the answer's metric + w_tree * tree + w_format * format.
# auto / (): as init_from was trained (its train_config.json); direct for a checkpoint from elsewhere
answer_format = "auto"
reasoning_tasks = ()
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
# rollout
num_generations = 8  # G completions per prompt
# sampling temperature; policy / old / reference log-probs use logits / temperature too (docs/results.md: why 0.5 here)
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
# the policy, reference and old log-prob passes compute each group's prompt once and its G completions attend to it
# (model.group_logprobs), and the rollout's cache holds each prompt's keys/values once per group (eager decode);
# False = G rows [prompt; completion] per group, the prompt computed (and its keys cached) G times
shared_prefix = True
# GRPO
prompts_per_step = 8  # prompts per optimizer step over all ranks (x G completions); each rank owns whole groups
grad_accum = 2  # micro-batches per rank per step (each prompts_per_step // (world * grad_accum) prompts)
num_iterations = 1  # mu: policy updates per rollout batch (old logps = update pass 0's, detached)
beta = 0.0  # KL coefficient (0 = no reference model at all; VidEmo's recipe 0.04; docs/method.md §3r)
epsilon = 0.2  # eps_low
epsilon_high = 0.0  # eps_high; 0 = same as epsilon (DAPO uses 0.28)
loss_type = "grpo"  # grpo | bnpo | dr_grpo | dapo
scale_rewards = "group"  # group | batch | none
dynamic_sampling = True  # drop groups whose rewards are all equal (advantage 0) before the loss (DAPO)
# rewards: R = sum_k w_k r_k over the terms reward.terms returns for a record (reward.DEFAULT_WEIGHTS: a term without a
# w_<term> key here keeps its default weight)
w_accuracy = 1.0
w_f1 = 1.0
w_caption = 1.0
w_tree = 1.0
w_format = 0.1  # enters the total only for the tree (fine-grained caption) task, as in reward.py
# True: a reasoning answer's <think> tokens get the group-relative advantage of its tree + format reward, its answer
# tokens that of the rest (the task metric, agree); other completions keep one advantage for every token
split_advantage = False
w_agree = 0.0  # > 0: reasoning answers also earn "agree" for being what the data answers behind their own emotion line
tree_lambda = 1.0  # R_tree = exp(-lambda * TED / |T_ref|)
# guidance: in a group of these tasks where no sample reaches the reward of the record's own reference answer, the
# last sample is replaced by that answer (grpo.guide_groups): a group that misreads the same way on all G samples
# (equal rewards, no gradient) still learns, from the tokens where its samples leave the reference (docs/method.md)
guide_tasks = ()
# SFT replay: beside the GRPO loss, the cross-entropy of stage-1 training records of the tasks stage 2 does not
# reward, so that the policy does not unlearn them (docs/method.md)
replay_tasks = ("appearance_recognition", "appearance_caption", "action_recognition", "action_caption", "identity",
                "head_pose", "au_detection", "emotion_caption")
replay_per_micro = 2  # SFT records beside each micro-batch on each rank (0 = no replay; docs/method.md §3p)
replay_coef = 1.0  # loss = GRPO loss + replay_coef * mean NLL over the step's replayed answer tokens
replay_intensity_weight = 1.0  # a replayed token that states an intensity counts this many times in that NLL's sum
# optimisation
max_steps = 1400  # without the reference pass, about the wall time of 1,200 with it (docs/method.md §3r)
lr = 1e-4
min_lr = 1e-5
warmup_steps = 10
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
logprobs_backend = "auto"  # kernels.logprobs: auto (triton on CUDA, chunked torch on CPU) | triton | torch | naive
grad_checkpointing = False  # activation checkpointing of every decoder block (and vision block) in the policy pass
fsdp = False  # FSDP2: policy and reference sharded per decoder block, the vision tower its own unit (docs/scale.md)
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
report = True  # also write out_dir/report.html after the final evaluation (tables, gallery, curves; report.py)
eval_batch_size = 32
eval_max_new_tokens = 128
eval_max_records = 0  # > 0: evaluate on the first N test records only (a quick look)
wandb_project = ""
# ----------------------------------------------------------------------------------------------------------------------


# settings a resumed run must share with its checkpoint (the prompt stream, the groups, what is trained, the reference)
RESUME_BREAKING = ("init_from", "data_dir", "train_file", "video_root", "tokenizer_dir", "tasks", "answer_format",
                   "reasoning_tasks", "fps", "max_frames", "min_pixels", "max_pixels", "num_generations",
                   "prompts_per_step", "grad_accum", "train_vision", "beta", "seed", "lora_rank", "lora_alpha",
                   "lora_targets", "replay_tasks")


def check_config(world, dev):
    """Every key's value, before any work: one line naming the first wrong key."""
    common.check([
        ("grad_accum", grad_accum, grad_accum >= 1, ">= 1"),
        ("prompts_per_step", prompts_per_step, prompts_per_step >= 1, ">= 1"),
        ("max_steps", max_steps, max_steps >= 1, ">= 1"), ("num_iterations", num_iterations, num_iterations >= 1, ">= 1"),
        ("lr", lr, lr > 0, "> 0"), ("min_lr", min_lr, 0 <= min_lr <= lr, "in [0, lr]"),
        ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"), ("temperature", temperature, temperature > 0, "> 0"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"), ("top_k", top_k, top_k >= 0, ">= 0"),
        ("max_completion_length", max_completion_length, max_completion_length >= 1, ">= 1"),
        ("num_generations", num_generations, num_generations >= 2, ">= 2 (GRPO compares completions of a prompt)"),
        ("beta", beta, beta >= 0, ">= 0"), ("epsilon", epsilon, 0 < epsilon < 1, "in (0, 1)"),
        ("epsilon_high", epsilon_high, epsilon_high >= 0, ">= 0 (0 = epsilon)"),
        ("video_prune_rate", video_prune_rate, 0 <= video_prune_rate < 1, "in [0, 1)"),
        ("log_every", log_every, log_every >= 1, ">= 1"), ("save_every", save_every, save_every >= 0, ">= 0"),
        ("eval_every", eval_every, eval_every >= 0, ">= 0"),
        ("eval_batch_size", eval_batch_size, eval_batch_size >= 1, ">= 1"),
        ("loss_type", loss_type, loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"), "grpo, bnpo, dr_grpo or dapo"),
        ("scale_rewards", scale_rewards, scale_rewards in ("group", "batch", "none"), "group, batch or none"),
        ("dtype", dtype, dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        ("decode", decode, decode in ("eager", "static", "graphs"), "eager, static or graphs"),
        ("decode", decode, decode != "graphs" or dev.type == "cuda", "eager or static on a CPU device (graphs: CUDA)"),
        ("save_dtype", save_dtype, save_dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
        ("lora_rank", lora_rank, lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
        ("lora_alpha", lora_alpha, lora_alpha > 0, "> 0"),
        ("lora_save", lora_save, lora_save in ("merged", "adapter"), "merged or adapter"),
        ("fsdp", fsdp, not (fsdp and lora_rank), "False with lora_rank > 0 (LoRA's trainable state is small: DDP)"),
        ("logprobs_backend", logprobs_backend, logprobs_backend in ("auto", "triton", "torch", "naive"),
         "auto, triton, torch or naive"),
        ("answer_format", answer_format, answer_format in ("auto",) + D.ANSWER_FORMATS, "auto, direct or reasoning"),
        ("prompts_per_step", prompts_per_step, grad_accum < 1 or prompts_per_step % (world * grad_accum) == 0,
         f"divisible by world size x grad_accum = {world} x {grad_accum} (each rank owns whole groups)"),
        ("replay_per_micro", replay_per_micro, replay_per_micro >= 0, ">= 0 (0 = no replay)"),
        ("replay_coef", replay_coef, replay_coef >= 0, ">= 0"),
        ("replay_intensity_weight", replay_intensity_weight, replay_intensity_weight > 0, "> 0 (1 = every token alike)")])
    for key, names in (("tasks", tasks), ("replay_tasks", replay_tasks), ("guide_tasks", guide_tasks)):
        unknown = [t for t in names if t not in R.TASK_METRIC]
        if unknown:
            raise common.ConfigError(f"config key '{key}': unknown task(s) {unknown}; known: {sorted(R.TASK_METRIC)}")
    for k in config_weights():
        if k not in R.DEFAULT_WEIGHTS:
            raise common.ConfigError(f"config key 'w_{k}': reward.py has no term {k!r}; its terms: "
                                     f"{list(R.DEFAULT_WEIGHTS)}")


def config_weights():
    """{term: weight} from the w_<term> keys (reward.score fills in the default of any term without one)."""
    return {k[2:]: v for k, v in globals().items() if k.startswith("w_") and isinstance(v, (int, float))}


def resolve_paths():
    """(train_file, test_file, val_file) with the data_dir defaults filled in."""
    if val_file and val_file != "none" and eval_every > 0 and not os.path.exists(val_file):
        raise common.InputError(f"config key 'val_file': {val_file} not found (--val_file=none or --eval_every=0 "
                                f"turns the held-out curve off)")
    return (train_file or os.path.join(data_dir, "train.jsonl"), test_file or os.path.join(data_dir, "test.jsonl"),
            val_file or os.path.join(data_dir, "val.jsonl"))


def resolve_init():
    """The SFT checkpoint directory init_from names."""
    try:
        return common.resolve_checkpoint(init_from)
    except common.InputError as e:
        raise common.InputError(f"{e}. Run `python train_sft.py` first (it writes out/sft_emosynth/ckpt), or pass "
                                f"--init_from=DIR with a checkpoint / HF Qwen2.5-VL directory") from None


def resolve_answer_format(init_dir, config):
    """answer_format="auto" and reasoning_tasks=() become what init_from was trained with (config updated too, so a
    resume compares and the checkpoint records the resolved values)."""
    global answer_format, reasoning_tasks
    answer_format, reasoning_tasks = common.answer_format_of(init_dir, answer_format, reasoning_tasks,
                                                             D.REASONING_TASKS)
    config.update(answer_format=answer_format, reasoning_tasks=reasoning_tasks)
    common.print0(f"answer_format={answer_format}" + (f", reasoning_tasks={list(reasoning_tasks)}"
                                                       if answer_format == "reasoning" else ""))


def load_val_records(path):
    """The held-out curve's records: at most eval_val_records val records per RL task ([] when it is off)."""
    if eval_every == 0 or path == "none" or not os.path.exists(path):
        return []
    by_task = {}
    for r in load_task_records(path):
        by_task.setdefault(r["task"], []).append(r)
    return [r for rs in by_task.values() for r in rs[:eval_val_records or None]]


def load_replay_records(path):
    """The SFT records stage 2 replays: train records of replay_tasks, in the answer format ([] when replay is off,
    or when the file has none of those tasks: a note says so)."""
    if not replay_per_micro:
        return []
    records = [r for r in D.load_records_as(path, answer_format, reasoning_tasks) if r.get("task") in replay_tasks]
    if not records:
        common.print0(f"note: no records of replay_tasks {list(replay_tasks)} in {path}: stage 2 runs without SFT "
                      f"replay")
    return records


def prompt_pool(records):
    """The training prompts: a task named k times in `tasks` has each of its records k times in the pool, so it gets
    k times its share of the prompts (every record once when `tasks` names each task once, or is empty)."""
    times = collections.Counter(tasks)
    return [r for r in records for _ in range(times.get(r.get("task"), 1))]


def load_task_records(path):
    """The records of the RL tasks (all that reward.py scores when `tasks` is empty), in the answer format."""
    return [r for r in D.load_records_as(path, answer_format, reasoning_tasks) if r.get("task") in (tasks or R.TASK_METRIC)]


# ----------------------------------------------------------------------------------------------------------------------
# set-up


def load_resume(ckpt_path, config, world):
    """--resume: (checkpoint dir, trainer state) of this run's last checkpoint, written by train_rl.py at this world
    size (the prompt streams are per rank)."""
    found, state = trainer.load_resume(ckpt_path, config, RESUME_BREAKING, before={"replay_per_micro": 0})
    if "data_pos" not in state or "world_size" not in state:
        raise common.InputError(f"--resume: {found} was not written by train_rl.py (no prompt-stream position); "
                                f"start stage 2 from it with --init_from={found} instead")
    if state["world_size"] != world:
        raise common.InputError(f"--resume: checkpoint was written with world size {state['world_size']}, now {world}")
    return found, state


def load_policy(init_dir, found, state, dev, use_bf16):
    """The policy (resumed or from SFT) in fp32, with what trains marked -> (policy, reencode, weights_dtype)."""
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
        trainer.attach_lora(policy, lora_rank, lora_alpha, lora_targets, use_bf16, state)
    else:
        # train_vision=False: the video is encoded once per prompt (no grad) and reused by every pass, so the vision
        # tower and merger get no gradient: freeze them (the reference then shares the policy's embeddings)
        for name, p in policy.named_parameters():
            p.requires_grad_(train_vision or not name.startswith("visual."))
    # re-encode the video with grad in the policy pass only when some vision weight trains (a frozen tower's output
    # is the rollout's); the reference re-encodes with its own tower in the same case
    reencode = train_vision and any(p.requires_grad for n, p in policy.named_parameters() if n.startswith("visual."))
    policy.gradient_checkpointing = grad_checkpointing
    return policy, reencode, weights_dtype


def load_reference(init_dir, dev, use_bf16):
    """The frozen reference: the SFT checkpoint (None when beta = 0, or with LoRA: the policy with adapters off)."""
    if beta == 0.0 or lora_rank:
        return None
    ref_dtype = torch.bfloat16 if use_bf16 and not fsdp else None  # never trained: no fp32 master copy needed
    ref_model = VidEmo.from_pretrained(init_dir, dtype=ref_dtype, device=dev).eval().requires_grad_(False)
    if fsdp:  # sharded like the policy: 1/N of its weights per rank, gathered block by block in its pass
        common.shard_model(ref_model, use_bf16)
    return ref_model


# ----------------------------------------------------------------------------------------------------------------------
# the parts of a step


def draw(n, stream, records, encode, skipped, path):
    """n encoded records from this rank's stream; unusable ones (encode raises SkipRecord) are counted in `skipped`
    and replaced by the next -> [(record, encoded)]."""
    out, misses = [], 0
    while len(out) < n:
        i = stream.next()
        rec = records[i]
        try:
            enc = encode(rec)
            enc.update(index=i, task=rec.get("task"), level=rec.get("level"))
        except D.SkipRecord as e:
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            misses += 1
            if misses > len(records):
                top = collections.Counter(skipped).most_common(3)
                raise common.InputError(f"{path}: every record was skipped; top reasons: {top}. Check "
                                        f"--video_root and the records") from None
            continue
        out.append((rec, enc))
    return out


def next_prompts(n, stream, records, tokenizer, root, video_kwargs, cache, skipped):
    """n encoded prompts from this rank's stream (unusable records are skipped and counted)."""
    def encode(rec):
        enc = D.encode_prompt(rec, tokenizer, root, video_kwargs, cache=cache)
        if enc.get("video_grid_thw") is None or len(enc["video_grid_thw"]) != 1:
            raise D.SkipRecord("train_rl needs exactly one video per record")
        return enc
    return draw(n, stream, records, encode, skipped, train_file or "train_file")


def next_replay(n, stream, records, tokenizer, root, video_kwargs, cache, skipped, dev):
    """n SFT records from this rank's replay stream, right padded with their labels, on dev (the model's inputs)."""
    items = draw(n, stream, records, lambda rec: D.encode_record(rec, tokenizer, root, video_kwargs=video_kwargs,
                                                                  cache=cache), skipped, train_file or "train_file")
    b = D.collate([e for _, e in items], D.special_ids(tokenizer)[1])
    keys = ("input_ids", "attention_mask", "labels", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: b[k].to(dev) if torch.is_tensor(b[k]) else b[k] for k in keys}


@torch.no_grad()
def rollout(policy, prompts, gen, tokenizer, dev, autocast, reencode, table=None):
    """1. B prompts -> one Rollout of B*G completions with everything the loss needs, scored (no grad)
    -> (rollout, seconds generating, seconds scoring)."""
    eos_id, pad_id = D.special_ids(tokenizer)
    placeholders = (policy.video_token_id, policy.image_token_id)  # a sampled one ends the completion (group_batch)
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
            top_k=top_k, eos_token_id=[eos_id, *placeholders], pad_token_id=pad_id, num_return_sequences=num_generations,
            return_logprobs=True, generator=gen, decode=decode,  # [B*G, Tc]: sample j of prompt b is row b*G + j
            share_prompt_kv=shared_prefix)  # eager decode: each prompt's keys/values once per group
    t_gen = time.time() - t0
    # score: decode each completion (up to and including EOS) and apply the rule-based rewards: reward.score is also
    # eval's metric, so GRPO maximises exactly the number the evaluation reports
    t0 = time.time()
    records = [r for r, _ in prompts]
    stops = torch.isin(seqs, torch.tensor([eos_id, *placeholders], device=seqs.device))
    lengths = grpo.completion_mask(stops)[0].sum(1).tolist()  # [B*G] tokens up to and including the first stop
    texts = tokenizer.batch_decode([s[:n].tolist() for s, n in zip(seqs.cpu(), lengths)], skip_special_tokens=True)
    extra = {"table": table} if table else {}  # only with w_agree > 0: a swapped-in score(c, r, w, lam) still fits
    scores = [R.score(t, records[i // num_generations], config_weights(), lam=tree_lambda, **extra)
              for i, t in enumerate(texts)]
    guided = None
    if guide_tasks:  # a group of guide_tasks that misses its reference's reward gets the reference as a completion
        ref_ids = [D.answer_ids(e["answer"], tokenizer)[:max_completion_length]
                   if r.get("task") in guide_tasks and e.get("answer") else None for r, e in prompts]
        ref_texts = [tokenizer.decode(t, skip_special_tokens=True) if t else None for t in ref_ids]
        ref_scores = [R.score(t, r, config_weights(), lam=tree_lambda, **extra) if t is not None else None
                      for t, r in zip(ref_texts, records)]
        seqs, gen_logps, guided = grpo.guide_groups(
            seqs, gen_logps, torch.tensor([sc["total"] for sc in scores]), ref_ids,
            torch.tensor([sc["total"] if sc else float("-inf") for sc in ref_scores]), num_generations, pad_id)
        for i in guided.nonzero().flatten().tolist():
            texts[i], scores[i] = ref_texts[i // num_generations], ref_scores[i // num_generations]
    mb = grpo.group_batch(ids, attn, seqs, video_embeds, grid, sec, keep, num_generations,
                          policy.vision_token_counts(grid), eos_id, pad_id, placeholders, mask_truncated_completions,
                          b["pixel_values_videos"].to(dev) if reencode else None)
    mb.records, mb.texts, mb.scores, mb.guided = records, texts, scores, guided
    mb.total = torch.tensor([s["total"] for s in mb.scores], dtype=torch.float32)  # [B*G]
    if split_advantage:  # two rewards per completion and where its reasoning ends
        mb.parts = torch.tensor([R.split_total(s, mb.records[i // num_generations], config_weights())
                                 for i, s in enumerate(mb.scores)], dtype=torch.float32)  # [B*G, 2]
        mb.boundary = grpo.think_boundary(tokenizer, seqs, mb.lengths)  # [B*G]
    mb.gen_logps = gen_logps
    return mb, t_gen, time.time() - t0


def advantages(micro, rank, world, dev):
    """2. Group-relative advantages over the rewards gathered from every rank (groups never straddle ranks; "batch"
    std is global): sets each micro-batch's `adv` and, with dynamic sampling, `use` (the groups whose rewards differ).
    A non-finite reward (a user's reward function) is counted, stands in as 0 and drops its group from the loss.
    split_advantage: `adv` is [n, Tc], the reasoning and answer rewards' advantages on either side of `boundary`.
    -> (rewards [world * n_local], zero-std flag per group, non-finite rewards per row)."""
    G = num_generations
    total_local = torch.cat([mb.total for mb in micro])  # [n_local]
    n_local = total_local.numel()
    mine = slice(rank * n_local, (rank + 1) * n_local)
    total_all = grpo.gather_rows(total_local.to(dev)).cpu()  # [world * n_local], rank-major, groups contiguous
    bad = ~torch.isfinite(total_all)  # [world * n_local]
    if bad.any():
        total_all = torch.where(bad, torch.zeros_like(total_all), total_all)
    adv = grpo.grpo_advantages(total_all, G, scale_rewards)[mine]
    zero_std = grpo.flat_groups(total_all, G)  # all G rewards equal: advantage 0
    flat = zero_std
    if split_advantage:  # the reasoning and answer rewards, each group-relative: [n_local] twice
        parts_all = grpo.gather_rows(torch.cat([mb.parts for mb in micro]).to(dev)).cpu()  # [world * n_local, 2]
        parts_all = torch.where(bad[:, None], torch.zeros_like(parts_all), parts_all)
        adv_think = grpo.grpo_advantages(parts_all[:, 0].contiguous(), G, scale_rewards)[mine]
        adv_answer = grpo.grpo_advantages(parts_all[:, 1].contiguous(), G, scale_rewards)[mine]
        # a group learns if either reward differs
        flat = grpo.flat_groups(parts_all[:, 0], G) & grpo.flat_groups(parts_all[:, 1], G)
    bad_group = bad.view(-1, G).any(1)  # [groups]
    if dynamic_sampling:
        use = (~(flat | bad_group)).repeat_interleave(G)[mine]
    else:
        use = (~bad_group).repeat_interleave(G)[mine] if bad.any() else None
    offset = 0
    for mb in micro:
        n = mb.total.numel()
        rows = slice(offset, offset + n)
        mb.adv = adv[rows].to(dev) if not split_advantage else \
            grpo.token_advantages(adv_think[rows], adv_answer[rows], mb.boundary, mb.cmask.shape[1]).to(dev)
        mb.use = use[rows].to(dev) if use is not None else None
        offset += n
    return total_all, zero_std, bad


@torch.no_grad()
def reference_pass(micro, policy, ref_model, reencode, autocast):
    """3. The frozen reference's completion log-probs, once per rollout, same inputs as the policy pass (its own
    frozen vision tower). mu > 1 needs no separate old-policy pass: update pass 0 runs the rollout's weights (the
    optimizer steps only after every micro-batch), so its detached log-probs are the old ones (ratio exactly 1)."""
    with autocast:
        for mb in micro:
            if beta == 0.0:
                mb.ref = None
            elif lora_rank:  # the reference is the policy with its adapters off
                with lora.disabled(policy):
                    mb.ref = grpo.completion_logps(policy, mb, temperature, reencode=reencode,
                                                   backend=logprobs_backend, shared_prefix=shared_prefix)[0]
            else:
                mb.ref = grpo.completion_logps(ref_model, mb, temperature, reencode=reencode,
                                               backend=logprobs_backend, shared_prefix=shared_prefix)[0]


def update(net, policy, params, optimizer, micro, objective, guard, step, passes, autocast, world, dev, replay=None,
           key_id=None):
    """4. `passes` (mu, or 0 when no group has signal) policy updates over the rollout batch, each over the
    grad_accum micro-batches; with `replay` (one next_replay batch per micro-batch) each micro-batch's loss also holds
    replay_coef x its share of the mean NLL over every replayed answer token of the step (all ranks), in the same
    forward and backward; with replay_intensity_weight != 1 (and key_id, data.intensity_id) the token that states an
    intensity counts that many times in the sum, the count is unchanged -> (sums of the logged statistics, grad norm
    of the last update)."""
    s = dict(loss=0.0, n_stats=0, ent=0.0, ent_n=0, logp_diff=0.0, n_diff=0, replay_nll=0.0, replay_passes=0,
             **{k: 0.0 for k in grpo.LOSS_STATS})
    grad_norm = torch.zeros(())
    old_logps = [None] * len(micro)  # [n_kept, Tc] per micro-batch, from update pass 0
    n_tok = 0.0
    tok_w = [None] * len(micro)  # [n_sft] per micro-batch: the replayed tokens' loss weights (None: all 1)
    if replay:  # the forward scores each row's labels after its first token
        n_tok = grpo.reduce_sum({"n": sum(float((b["labels"][:, 1:] != -100).sum()) for b in replay)}, dev)["n"]
        if replay_intensity_weight != 1 and key_id is not None:
            tok_w = [D.token_weights(b["labels"], key_id, replay_intensity_weight) for b in replay]
    policy.train()
    for it in range(passes):
        pass_loss = 0.0
        s["replay_passes"] += 1 if replay else 0
        for i, mb in enumerate(micro):
            sub, weight = objective.batch(mb)  # the kept groups; weight 0: a DDP rank's placeholder group
            sft = replay[i] if replay else None
            if sub is None and sft is None:
                continue
            last = i == len(micro) - 1
            if fsdp and world > 1:  # reduce-scatter the gradients on the last micro-batch only
                policy.set_requires_gradient_sync(last)
            with (net.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()), autocast:
                # [n, Tc] completion log-probs (and [n_sft] replayed-label log-probs) in one DDP-wrapped forward
                logps, ent, *sft_logp = net(sub, with_entropy=it == 0, sft=sft)
                total = 0.0
                if sub is not None:
                    if it == 0:  # the old policy's log-probs (mu = 1: ratio 1, the gradient of plain PG)
                        old_logps[i] = logps.detach()
                    loss, st = objective(logps, old_logps[i], sub)
                    total = loss * weight
                if sft is not None:
                    lp = sft_logp[0].float() if tok_w[i] is None else sft_logp[0].float() * tok_w[i]  # [n_sft]
                    nll = -lp.sum() / max(n_tok, 1.0)  # this micro-batch's share of the mean
                    total = total + replay_coef * nll * world  # DDP / FSDP average gradients over ranks
                total.backward()
            if sft is not None:
                s["replay_nll"] += nll.item()
                pass_loss += replay_coef * nll.item()
            if sub is None or weight == 0.0:
                continue
            s["loss"] += loss.item()
            pass_loss += loss.item()
            s["n_stats"] += 1
            for k, v in st.items():
                s[k] += v
            if it == 0:
                m = sub.valid
                s["ent"] += float(ent[m].sum())
                s["ent_n"] += int(m.sum())
                if sub.gen_logps is not None:  # generator vs training forward: the same policy here
                    glp = sub.gen_logps[:, :m.shape[1]].to(logps.dtype)
                    ok = m & ~glp.isnan()  # a guided row was not sampled
                    if ok.any():
                        s["logp_diff"] += float((glp - logps.detach())[ok].abs().mean())
                        s["n_diff"] += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.zeros(())
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if world > 1:  # every rank must take the same decision
            pass_loss = grpo.reduce_sum({"loss": pass_loss}, dev)["loss"]
        if not guard.ok(step, pass_loss, grad_norm, optimizer):
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return s, grad_norm


def step_metrics(done, step_lr, micro, total_all, zero_std, bad, kept, upd, grad_norm, times, objective, dev):
    """5. The step's metrics row, global over ranks."""
    G = num_generations
    lengths_all = grpo.gather_rows(torch.cat([mb.lengths for mb in micro]).float().to(dev)).cpu()
    trunc_all = grpo.gather_rows(torch.cat([mb.truncated for mb in micro]).float().to(dev)).cpu()
    names = list(R.DEFAULT_WEIGHTS)
    terms_local = torch.tensor([[sc.get(k, float("nan")) for k in names] for mb in micro for sc in mb.scores],
                               dtype=torch.float32)  # [n_local, K], NaN where a term does not apply to the task
    terms_all = grpo.gather_rows(terms_local.to(dev)).cpu()  # [n, K]
    S = grpo.reduce_sum({**upd, **times}, dev)
    world = objective.world
    row = {"step": done, "lr": step_lr, "loss": objective.logged(S["loss"], num_iterations),
           "grad_norm": float(grad_norm), "reward": total_all.mean().item(), "reward_std": total_all.std().item(),
           "frac_reward_zero_std": zero_std.float().mean().item()}
    if S["n_stats"]:  # means over the updates of this step (absent when every group was dropped)
        row.update({k: S[k] / S["n_stats"] for k in grpo.LOSS_STATS})
        row["entropy"] = S["ent"] / max(S["ent_n"], 1.0)
    row.update({"completion_len_mean": lengths_all.mean().item(), "completion_len_min": lengths_all.min().item(),
                "completion_len_max": lengths_all.max().item(), "frac_truncated": trunc_all.mean().item()})
    row.update({k: S[k] / world for k in times})  # mean over ranks
    row["rollout_tok_per_s"] = lengths_all.sum().item() / max(row["t_generate"], 1e-9)
    if S["replay_passes"]:  # the shares of the micro-batches and ranks sum to each pass's mean
        row["replay_nll"] = S["replay_nll"] / (S["replay_passes"] / world)
    if S["n_diff"]:  # |log-prob of the sampler - of the training forward|, same weights: should be ~1e-6
        row["rollout_logp_diff"] = S["logp_diff"] / S["n_diff"]
    for j, k in enumerate(names):
        col = terms_all[:, j]
        col = col[~torch.isnan(col)]
        if col.numel():
            row[f"reward/{k}/mean"] = col.mean().item()
            row[f"reward/{k}/std"] = col.std().item() if col.numel() > 1 else 0.0
    if dynamic_sampling:
        row["groups_kept"] = kept / G
    if guide_tasks:  # the share of groups that got their reference as a completion
        guided = torch.cat([mb.guided.float() for mb in micro]).sum().to(dev)
        row["frac_guided"] = float(grpo.gather_rows(guided[None]).sum()) / (total_all.numel() / G)
    if bad.any():
        row["reward_nonfinite"] = int(bad.sum())
    if kept == 0:  # every group had equal rewards everywhere: no update
        row["skipped_update"] = 1
    return row


def print_step(row, mb):
    """The step's line, and every sample_table_every steps a table of sampled completions."""
    done = row["step"]
    print(f"step {done}/{max_steps} | reward {row['reward']:.3f} +- {row['reward_std']:.3f} | "
          f"loss {row['loss']:+.4f} | kl {row.get('kl', 0):.4f} | ent {row.get('entropy', 0):.3f} | "
          f"len {row['completion_len_mean']:.1f} | zero-std {row['frac_reward_zero_std']:.2f} | "
          f"gen {row['t_generate']:.1f}s score {row['t_score']:.1f}s upd {row['t_update']:.1f}s"
          + (f" | replay nll {row['replay_nll']:.3f}" if "replay_nll" in row else "")
          + (f" | {row['reward_nonfinite']} non-finite rewards" if "reward_nonfinite" in row else ""), flush=True)
    if sample_table_every > 0 and (done % sample_table_every == 0 or done == 1):
        G = num_generations
        picks = list(range(0, mb.total.numel(), G))[:4]  # the first completion of a few groups
        grpo.print_sample_table(done, [{"task": mb.records[i // G].get("task", "?"), "total": mb.total[i].item(),
                                        "text": mb.texts[i],
                                        "terms": {k: v for k, v in mb.scores[i].items() if k != "total"},
                                        "reference": R.reference_text(mb.records[i // G], missing="")} for i in picks])


def save(policy, optimizer, stream, done, world, config, weights_dtype, init_dir, tokenizer, dev,
         replay_stream=None):
    """6. The HF checkpoint (merged LoRA by default) + everything an exact resume needs (rank 0 writes; every rank's
    data positions are saved)."""
    pos = grpo.gather_rows(torch.tensor([stream.pos], device=dev)).cpu().tolist()
    rpos = grpo.gather_rows(torch.tensor([replay_stream.pos if replay_stream else 0], device=dev)).cpu().tolist()
    msd = common.full_state_dict(policy, fsdp) if not lora_rank else None  # a collective under FSDP
    osd = common.optimizer_state_dict(policy, optimizer, fsdp)
    if common.rank() == 0:
        state = {"step": done, "optimizer": osd, "rng": common.rng_state(), "data_pos": pos, "replay_pos": rpos,
                 "world_size": world, "config": config}
        write = lora.checkpoint_writer(policy, state, msd, weights_dtype, lora_save,
                                       trainer.adapter_base(init_from, init_dir), lora_targets)
        common.save_checkpoint(os.path.join(out_dir, "ckpt"), write, tokenizer, state)
    common.barrier()


def heldout(policy, tokenizer, records, root, video_kwargs, cache, dev):
    """Greedy scores of the RL tasks on the val split (rank 0 evaluates, the others wait) -> {"val/<task>": score}."""
    scores = {}
    # FSDP2: every rank gathers the weights (a collective), then rank 0 evaluates alone on the whole model
    with common.unsharded(policy) if fsdp else contextlib.nullcontext():
        if common.rank() == 0:
            res = evaluation.evaluate(policy, tokenizer, records, root, video_kwargs, batch_size=eval_batch_size,
                                      max_new_tokens=eval_max_new_tokens, device=dev, progress=False,
                                      video_prune_rate=video_prune_rate, video_cache=cache)
            scores = {f"val/{t}": v["score"] for t, v in res["tasks"].items()}
            print("held-out (val): " + " | ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()), flush=True)
        common.barrier()
    return scores


def final_eval(policy, tokenizer, test_path, root, video_kwargs, dev):
    """The test-split table, eval.json and report.html (rank 0; FSDP2: on the gathered weights)."""
    with common.unsharded(policy) if fsdp else contextlib.nullcontext():
        if common.rank() == 0:
            trainer.final_evaluation(policy, tokenizer, test_path, out_dir, answer_format, reasoning_tasks, root,
                                     video_kwargs, eval_batch_size, eval_max_new_tokens, dev, video_prune_rate,
                                     eval_max_records, html=report)
        common.barrier()


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def main():
    config = common.configure(globals())
    train_path, test_path, val_path = resolve_paths()
    rank, world, dev = common.setup_distributed(device)
    master = rank == 0
    check_config(world, dev)
    G, prompts_per_micro = num_generations, prompts_per_step // (world * grad_accum)
    use_bf16 = dev.type == "cuda" and dtype in ("auto", "bfloat16")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)
    ckpt_path = os.path.join(out_dir, "ckpt")

    # ---- data: records of the chosen tasks, one endless shuffled stream per rank
    init_dir = resolve_init()
    resolve_answer_format(init_dir, config)
    trainer.claim_out_dir(out_dir, master)
    if not os.path.exists(train_path):
        raise common.InputError(f"train_file {train_path} not found (build EmoSynth with `python train_sft.py` or "
                                f"data/emosynth/prepare.py, or pass --train_file)")
    try:
        tokenizer = D.load_tokenizer(tokenizer_dir or init_dir)
    except (OSError, ValueError) as e:
        raise common.InputError(f"tokenizer {tokenizer_dir or init_dir}: {common.first_line(e)}") from None
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    records = prompt_pool(load_task_records(train_path))
    if not records:
        raise common.InputError(f"no records of tasks {tasks} in {train_path}")
    replay_records = load_replay_records(train_path)  # [] when replay_per_micro = 0
    key_id = D.intensity_id(tokenizer)  # the token after an intensity word (replay_intensity_weight)
    table = R.answer_table(records) if w_agree > 0 else None  # {task: {emotion line: answer}} for the agree term
    root = video_root or None  # None: each record's videos resolve against its own file's folder (data.py)
    video_cache, val_cache = D.VideoCache(256), D.VideoCache(256)  # decoded clips, reused when they come round again

    # ---- models: the policy (resumed or from SFT) and a frozen reference (always the SFT checkpoint)
    found, state = load_resume(ckpt_path, config, world) if resume else (None, None)
    policy, reencode, weights_dtype = load_policy(init_dir, found, state, dev, use_bf16)
    ref_model = load_reference(init_dir, dev, use_bf16)
    if fsdp:
        common.shard_model(policy, use_bf16)
    net = grpo.GroupScorer(policy, temperature, reencode=reencode, backend=logprobs_backend, shared_prefix=shared_prefix)
    if world > 1 and not fsdp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = trainer.adamw(params, lr, (beta1, beta2), weight_decay, dev)
    start_step, stream = 0, grpo.PromptStream(len(records), seed, rank, world)
    replay_stream = grpo.PromptStream(max(len(replay_records), 1), seed + 1, rank, world)  # its own order
    if state is not None:
        common.load_optimizer_state(policy, optimizer, state["optimizer"], fsdp)
        common.set_rng_state(state["rng"])
        start_step, stream.pos = state["step"], state["data_pos"][rank]
        replay_stream.pos = state.get("replay_pos", [0] * world)[rank]
    objective = grpo.Objective(beta, epsilon, epsilon_high or epsilon, loss_type, max_completion_length, grad_accum,
                               world)
    guard = trainer.NonFiniteGuard(ckpt_path, start_step if resume else None, hint="lower lr or check the rewards")
    common.print0(f"GRPO: {sum(p.numel() for p in params) / 1e6:.2f}M trainable params | {len(records)} records "
                  f"of {len(set(r.get('task') for r in records))} tasks | {prompts_per_step} prompts x G={G} per step "
                  f"| world {world} | beta {beta} | loss {loss_type} | init {init_dir}"
                  + (f" | replay {replay_per_micro} of {len(replay_records)} SFT records per micro-batch x "
                     f"{replay_coef}" + (f" (intensity token x {replay_intensity_weight})"
                                         if replay_intensity_weight != 1 else "") if replay_records else ""))
    val_records = load_val_records(val_path)

    # ---- train
    log = common.MetricLog(os.path.join(out_dir, "metrics.jsonl"), wandb_project if master else None, config)
    skipped = {}
    if val_records and start_step == 0:
        before = heldout(policy, tokenizer, val_records, root, video_kwargs, val_cache, dev)
        if master:
            log.log(step=0, **before)
    gen = torch.Generator(device=dev)
    stop = common.StopSignal()  # SIGTERM / SIGUSR1 (preemption): finish the step, checkpoint, exit
    for step in range(start_step, max_steps):
        t_step, done = time.time(), step + 1
        if stop.should_stop(dev):  # every rank at the same step: `step` steps are done
            if guard.last_saved != step:
                save(policy, optimizer, stream, step, world, config, weights_dtype, init_dir, tokenizer, dev,
                     replay_stream)
            stop.exit(trainer.resume_command())
        # 1. rollout, per micro-batch. Sampling depends only on (seed, step, global micro-batch index): exact on
        # resume, and W ranks with grad_accum=a sample what one process with grad_accum=W*a does (1 prompt each)
        micro, t_gen, t_score = [], 0.0, 0.0
        for i in range(grad_accum):
            gen.manual_seed((seed * 1_000_003 + step) * 10_007 + rank * grad_accum + i)
            prompts = next_prompts(prompts_per_micro, stream, records, tokenizer, root, video_kwargs, video_cache,
                                   skipped)
            mb, tg, ts = rollout(policy, prompts, gen, tokenizer, dev, autocast, reencode, table)
            micro.append(mb)
            t_gen, t_score = t_gen + tg, t_score + ts
        # 2. advantages, over every rank's rewards
        total_all, zero_std, bad = advantages(micro, rank, world, dev)
        # 3. reference log-probs
        t0 = time.time()
        reference_pass(micro, policy, ref_model, reencode, autocast)
        t_ref = time.time() - t0
        # 4. policy updates (none when every group had equal rewards everywhere: nothing to learn from), with the
        # replayed SFT records' cross-entropy beside the GRPO loss (one batch of them per micro-batch)
        t0 = time.time()
        replay = [next_replay(replay_per_micro, replay_stream, replay_records, tokenizer, root, video_kwargs,
                              video_cache, skipped, dev) for _ in range(grad_accum)] if replay_records else None
        kept = objective.begin(micro, dev)
        step_lr = common.lr_at(step, max_steps, lr, min_lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        upd, grad_norm = update(net, policy, params, optimizer, micro, objective, guard, step,
                                num_iterations if kept else 0, autocast, world, dev, replay, key_id)
        times = {"t_generate": t_gen, "t_score": t_score, "t_ref": t_ref, "t_update": time.time() - t0}
        # 5. metrics
        row = step_metrics(done, step_lr, micro, total_all, zero_std, bad, kept, upd, grad_norm, times, objective,
                           dev)
        row.update({"step_time": time.time() - t_step, "skipped_records": sum(skipped.values())})
        if val_records and (done % eval_every == 0 or done == max_steps):
            row.update(heldout(policy, tokenizer, val_records, root, video_kwargs, val_cache, dev))
        if master and (done % log_every == 0 or done == max_steps):
            log.log(**row)
            print_step(row, micro[0])
        # 6. checkpoint
        if (save_every > 0 and done % save_every == 0) or done == max_steps or done == stop_at_step:
            save(policy, optimizer, stream, done, world, config, weights_dtype, init_dir, tokenizer, dev, replay_stream)
            guard.saved(done)
        if done == stop_at_step:
            common.print0(f"stop_at_step={stop_at_step}: stopping; continue with --resume=True")
            common.cleanup_distributed()
            return
    if stop.should_stop(dev):  # the last step is saved: the evaluation runs on --resume
        stop.exit(trainer.resume_command())
    stop.close()
    if skipped and master:
        print("skipped records:", skipped)

    # ---- final evaluation on the test split
    if eval_at_end and test_path != "none" and os.path.exists(test_path):
        final_eval(policy, tokenizer, test_path, root, video_kwargs, dev)
    common.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run(main)
