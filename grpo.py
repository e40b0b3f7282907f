"""GRPO, the library half of train_rl.py: the two pure functions of the algorithm, the rollout micro-batch (prompt +
completions of each group, with the group's shared video encoding) and the log-probs of its completion tokens.

    A_i   = (R_i - mean_G R) / (std_G R + 1e-4)                       std unbiased; scale_rewards: group|batch|none
    r_it  = exp(l_it - l_old_it)                                      l = log pi(o_it | q, o_i<t) from logits / tau
    L_it  = -min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i) + beta * KL_it
    KL_it = exp(l_ref - l) - (l_ref - l) - 1
    loss  = grpo: mean_i (sum_t m L / sum_t m) | bnpo: sum m L / sum m | dr_grpo: sum m L / (N * T_max)
            | dapo: sum m L / (active tokens of the whole rollout batch, all ranks)

The semantics follow TRL's GRPOTrainer; docs/design.md ("GRPO") says where and why.
"""
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn

LOSS_STATS = ("kl", "clip_low", "clip_high", "clip_region", "ratio")


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
    same = flat_groups(rewards, group_size)[:, None]  # [B, 1]: a float32 mean of equal values can be off by 1 ulp
    centred = (grouped - grouped.mean(1, keepdim=True)).masked_fill(same, 0.0).view(-1)  # [B*G]
    if scale_rewards == "group":
        std = grouped.std(1).repeat_interleave(group_size)  # [B*G]
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale_rewards == "none":
        return centred
    else:
        raise ValueError(f"scale_rewards must be group, batch or none (got {scale_rewards!r})")
    return centred / (std + 1e-4)


def flat_groups(rewards, G):
    """rewards [n] -> [n / G] bool: the groups whose G rewards are all equal (exactly: the float32 std of equal
    values can be 1e-7, not 0)."""
    grouped = rewards.view(-1, G)  # [groups, G]
    return (grouped == grouped[:, :1]).all(1)


def token_advantages(adv_think, adv_answer, boundary, T):
    """Two advantages per sequence [N] and where its reasoning ends, boundary [N] (tokens before it belong to the
    <think> block) -> [N, T]: each position takes its segment's advantage."""
    pos = torch.arange(T, device=adv_think.device)[None]  # [1, T]
    return torch.where(pos < boundary.to(adv_think.device)[:, None], adv_think[:, None], adv_answer[:, None])


def think_boundary(tokenizer, seqs, lengths, marker="</think>"):
    """Completions [N, Tc] (token ids) and their lengths [N] -> [N] long: how many leading tokens hold the reasoning,
    up to and including the token that completes `marker`; a completion without it is all reasoning (its length)."""
    out = []
    for row, n in zip(seqs.cpu().tolist(), lengths.tolist()):
        pieces = tokenizer.batch_decode([[t] for t in row[:n]], skip_special_tokens=True)  # one string per token
        at = "".join(pieces).find(marker)
        cut, end, seen = n, at + len(marker), 0
        if at >= 0:
            for i, p in enumerate(pieces):
                seen += len(p)
                if seen >= end:
                    cut = i + 1
                    break
        out.append(cut)
    return torch.tensor(out, dtype=torch.long)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta, eps_low, eps_high, loss_type,
              max_completion_length=None, return_stats=False, num_items=None):
    """The GRPO policy loss over completion tokens.

    logps, old_logps, ref_logps, mask: [N, T] (N = sequences, T = completion positions); advantages [N], or [N, T]
    when tokens of one sequence are credited differently (token_advantages).
    ref_logps may be None when beta == 0. Aggregation (as TRL):
      grpo    per-sequence masked mean, then mean over sequences
      bnpo    sum over all tokens / number of active tokens
      dr_grpo sum / (N * max_completion_length)             (max_completion_length defaults to T)
      dapo    sum / num_items; num_items = active tokens of the whole rollout batch. TRL gathers it over every
              process and divides by world size (DDP then averages); Objective passes exactly that. Left None, it
              is the active tokens of this call (then dapo == bnpo).
    Returns the scalar loss, and with return_stats a dict of detached scalars: kl (masked mean),
    clip_low / clip_high / clip_region (fraction of active tokens whose ratio is clipped in the direction that
    matters for the sign of A), ratio (masked mean)."""
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, T]
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


@dataclass
class Objective:
    """grpo_loss with the whole normalisation of one optimizer step over grad_accum micro-batches and `world` ranks:
    `begin` counts the loss tokens of the rollout batch over every rank (dapo's denominator) and the sequences kept;
    `batch` picks the rows a micro-batch trains on; calling it gives the micro-batch's loss as backward must see it
    (divided by grad_accum except for dapo, whose denominator already spans the batch; DDP / FSDP then average the
    ranks' gradients)."""
    beta: float
    eps_low: float
    eps_high: float
    loss_type: str
    max_completion_length: int
    grad_accum: int
    world: int = 1
    num_items: torch.Tensor = None  # dapo: active tokens of the whole rollout batch / world

    def begin(self, micro, device):
        """micro: this rank's Rollouts of the step -> the number of sequences that enter the loss on all ranks."""
        counts = torch.zeros(2, device=device)  # [loss tokens, sequences]
        for mb in micro:
            rows = mb.use if mb.use is not None else slice(None)
            counts += torch.tensor([float(mb.cmask[rows].sum()), float(mb.cmask[rows].shape[0])], device=device)
        if self.world > 1:
            dist.all_reduce(counts)
        self.num_items = counts[0].clamp(min=1.0) / self.world
        return counts[1].item()

    def batch(self, mb):
        """-> (the rows to train on, weight): the groups dynamic sampling keeps, weight 1. A micro-batch with no
        group kept is skipped (None, 0) in one process; under DDP every rank must run a backward each micro-step,
        so it trains its first group with weight 0."""
        if mb.use is None:
            return mb, 1.0
        if mb.use.any():
            return mb.select(mb.use), 1.0
        if self.world == 1:
            return None, 0.0
        return mb.select(torch.arange(len(mb.use), device=mb.use.device) < mb.G), 0.0

    def __call__(self, logps, old_logps, mb):
        """logps, old_logps [n, Tc] of mb's rows -> (loss for backward, stats)."""
        loss, stats = grpo_loss(logps, old_logps, mb.ref, mb.adv, mb.cmask, self.beta, self.eps_low, self.eps_high,
                                self.loss_type, max_completion_length=self.max_completion_length, return_stats=True,
                                num_items=self.num_items)
        if self.loss_type != "dapo":
            loss = loss / self.grad_accum
        return loss, stats

    def logged(self, loss_sum, num_iterations):
        """The step's loss as logged: the sum over ranks, micro-batches and update passes of the backward losses ->
        their mean over ranks and passes (the loss of one rollout batch)."""
        return loss_sum / self.world / num_iterations


# ----------------------------------------------------------------------------------------------------------------------
# completion log-probs


def completion_logps(model, batch, temperature, with_entropy=False, reencode=False, backend="auto",
                     shared_prefix=True):
    """batch: a Rollout. -> logps [N, Tc] of the completion tokens under logits / temperature (0 past EOS), entropy
    [N, Tc] (detached) or None. The model scores the completion labels itself (only completion positions reach the
    LM head). The video is encoded once per prompt: the rollout's encoding, or with `reencode` a fresh one by `model`
    (with grad when grad is on). shared_prefix: each group's prompt is computed once and its G completions attend to
    it (model.group_logprobs); False: G rows [prompt; completion] per group (the prompt computed G times)."""
    valid = batch.valid  # [N, Tc] tokens up to and including the first stop
    N, Tc = valid.shape
    video_embeds = batch.video_embeds  # [n_vid, D] the rollout's encoding (no grad), once per prompt
    if reencode:  # this model's own vision tower: with grad for the policy, the frozen one for the reference
        video_embeds = model.encode_video(batch.pixels, batch.prompt_grid)  # [n_vid, D]
    if shared_prefix:
        out = model.group_logprobs(batch.prompt_ids, batch.prompt_attn, batch.targets, valid.sum(1), batch.G,
                                   video_embeds=video_embeds, video_grid_thw=batch.prompt_grid,
                                   second_per_grid_ts=batch.prompt_sec, video_keep_mask=batch.keep,
                                   temperature=temperature, return_entropy=with_entropy, logprobs_backend=backend)
    else:
        rows = batch.per_row(video_embeds)
        ids = rows["input_ids"]  # [N, Lp + Tc]
        labels = torch.cat([torch.full_like(ids[:, :-Tc], -100), batch.targets.masked_fill(~valid, -100)], 1)
        out = model(**rows, labels=labels, temperature=temperature, return_entropy=with_entropy,
                    logprobs_backend=backend)  # [n] row-major
    logp, ent = out if with_entropy else (out, None)
    full = torch.zeros(N, Tc, dtype=logp.dtype, device=logp.device).masked_scatter(valid, logp)  # [N, Tc]
    if ent is not None:
        ent = torch.zeros(N, Tc, dtype=ent.dtype, device=ent.device).masked_scatter(valid, ent.detach())
    return full, ent


class GroupScorer(nn.Module):
    """completion_logps as a module, so that DDP wraps it: the per-group re-encoding of the videos then runs inside
    the wrapped forward, and every gradient it produces is reduced like the rest. `sft` (collated records with labels)
    is scored in the same forward, as the SFT loss scores it: one backward then carries both losses."""

    def __init__(self, model, temperature, reencode, backend="auto", shared_prefix=True):
        super().__init__()
        self.model, self.temperature, self.reencode, self.backend = model, temperature, reencode, backend
        self.shared_prefix = shared_prefix

    def forward(self, batch, with_entropy=False, sft=None):
        out = (None, None) if batch is None else completion_logps(self.model, batch, self.temperature, with_entropy,
                                                                   self.reencode, self.backend, self.shared_prefix)
        if sft is None:
            return out
        # collated SFT records with labels (train_rl's replay): log-probs [n] of their labels at temperature 1
        return (*out, self.model(**sft, logprobs_backend=self.backend))


# ----------------------------------------------------------------------------------------------------------------------
# the rollout micro-batch


def per(kind):
    """A Rollout field and how it follows a selection of rows: "row" (dim 0 is the B*G rows, or a list of them),
    "prompt" (dim 0 is the B prompts), "prompt_tokens" (segments of `prompt_tokens` merged video tokens, one per
    prompt), "prompt_video" (segments of patches, one per prompt, sized by `prompt_grid`), "const"."""
    return field(default=None, metadata={"per": kind})


@dataclass
class Rollout:
    """One micro-batch: B prompts x G completions; row b*G + j is completion j of prompt b. Each prompt and its
    video are held once; every field declares how it follows a selection of rows (`per`), so `select` needs no list
    of keys to keep in sync."""
    G: int = per("const")
    prompt_ids: torch.Tensor = per("prompt")  # [B, Lp] left padded, video placeholders in place
    prompt_attn: torch.Tensor = per("prompt")  # [B, Lp]
    prompt_grid: torch.Tensor = per("prompt")  # [B, 3] video_grid_thw
    prompt_sec: torch.Tensor = per("prompt")  # [B] second_per_grid_ts
    prompt_tokens: list = per("prompt")  # merged video tokens of each prompt
    video_embeds: torch.Tensor = per("prompt_tokens")  # [sum prompt_tokens, D] the rollout's encoding
    keep: torch.Tensor = per("prompt_tokens")  # [sum prompt_tokens] EVS keep-mask, or None
    pixels: torch.Tensor = per("prompt_video")  # [n_patches, C*2*14*14] to re-encode the videos, or None
    targets: torch.Tensor = per("row")  # [B*G, Tc] what was sampled
    inputs: torch.Tensor = per("row")  # [B*G, Tc] the same as inputs: a sampled vision placeholder made padding
    valid: torch.Tensor = per("row")  # [B*G, Tc] bool: tokens up to and including the first stop
    cmask: torch.Tensor = per("row")  # [B*G, Tc] bool: the tokens that get a loss
    lengths: torch.Tensor = per("row")  # [B*G] completion tokens (CPU)
    truncated: torch.Tensor = per("row")  # [B*G] bool: no stop within the budget (CPU)
    # filled by the rollout's scoring, the advantages and the reference pass
    records: list = per("prompt")
    texts: list = per("row")
    scores: list = per("row")  # reward.score's dict of each completion
    gen_logps: torch.Tensor = per("row")  # [B*G, Tc] the sampler's log-probs (NaN on a guided row)
    guided: torch.Tensor = per("row")  # [B*G] bool: rows holding the record's reference answer (guide_groups)
    total: torch.Tensor = per("row")  # [B*G] reward
    parts: torch.Tensor = per("row")  # [B*G, 2] (reasoning reward, answer reward) with split_advantage, or None
    boundary: torch.Tensor = per("row")  # [B*G] where each completion's reasoning ends (think_boundary), or None
    adv: torch.Tensor = per("row")  # [B*G] advantages, or [B*G, Tc] per token (split_advantage)
    use: torch.Tensor = per("row")  # [B*G] bool: the rows of the groups dynamic sampling keeps, or None (all)
    ref: torch.Tensor = per("row")  # [B*G, Tc] the reference's log-probs, or None (beta = 0)

    def select(self, rows):
        """The rows (whole groups) kept, rows [B*G] bool: every field sliced by its kind, video tokens and pixels
        with their prompts."""
        keep_rows = rows.tolist()
        prompts = keep_rows[::self.G]  # a group's first row says whether its prompt stays
        sizes = {"prompt_tokens": self.prompt_tokens,
                 "prompt_video": self.prompt_grid.prod(-1).tolist() if self.prompt_grid is not None else None}
        out = {}
        for f in fields(self):
            x, kind = getattr(self, f.name), f.metadata["per"]
            if x is None or kind == "const":
                out[f.name] = x
            elif kind in ("row", "prompt"):
                mask = keep_rows if kind == "row" else prompts
                out[f.name] = x[torch.tensor(mask, device=x.device)] if torch.is_tensor(x) else \
                    [v for v, k in zip(x, mask) if k]
            else:
                out[f.name] = torch.cat([seg for seg, k in zip(x.split(sizes[kind]), prompts) if k])
        return Rollout(**out)

    def per_row(self, video_embeds):
        """The per-row layout (shared_prefix=False): row b*G + j = [prompt b; completion j], the video expanded to
        the G rows -> forward's keyword inputs."""
        G = self.G
        return dict(input_ids=torch.cat([self.prompt_ids.repeat_interleave(G, 0), self.inputs], 1),  # [B*G, Lp + Tc]
                    attention_mask=torch.cat([self.prompt_attn.repeat_interleave(G, 0),
                                              self.valid.to(self.prompt_attn.dtype)], 1),  # pads after EOS masked
                    video_embeds=expand_groups(video_embeds, self.prompt_tokens, G),
                    video_keep_mask=expand_groups(self.keep, self.prompt_tokens, G) if self.keep is not None else None,
                    video_grid_thw=self.prompt_grid.repeat_interleave(G, 0),
                    second_per_grid_ts=self.prompt_sec.repeat_interleave(G, 0))


def group_batch(ids, attn, seqs, video_embeds, grid, sec, keep, G, counts, eos_id, pad_id, placeholder_ids=(),
                mask_truncated=False, pixels=None):
    """Prompts [B, Lp] (left padded) + their completions [B*G, Tc] (pad after EOS) -> the training micro-batch (a
    Rollout): the prompts and their video once (`counts`: each prompt's merged video tokens), the completions'
    masks and targets. A sampled vision placeholder (<|video_pad|>, <|image_pad|>; a random or young policy writes
    them) ends the completion like EOS: it is scored as a target, but never fed back as an input, where the model
    would take it for a video token."""
    stops = torch.isin(seqs, torch.tensor([eos_id, *placeholder_ids], device=seqs.device))
    valid, truncated = completion_mask(stops)  # [B*G, Tc] up to and including the first stop, [B*G]
    return Rollout(
        G=G, prompt_ids=ids, prompt_attn=attn, prompt_grid=grid, prompt_sec=sec, prompt_tokens=[int(c) for c in counts],
        video_embeds=video_embeds, keep=keep, pixels=pixels, targets=seqs,
        inputs=seqs.masked_fill(stops & (seqs != eos_id), pad_id),  # placeholders out of the input (masked anyway)
        valid=valid, cmask=valid & ~truncated[:, None] if mask_truncated else valid, lengths=valid.sum(1).cpu(),
        truncated=truncated.cpu())


def guide_groups(seqs, gen_logps, total, ref_ids, ref_total, G, pad_id):
    """Guidance by the reference (an off-policy completion in the group, as in LUFFY): where none of a group's G
    samples reaches the reward of the record's own reference answer, its last sample (as random as any) is replaced
    by that answer. A group that fails the same way on every sample (all-equal rewards: no advantage, no gradient)
    then learns, and the contrast falls on the tokens where the samples leave the reference (an intensity word).
    seqs [B*G, Tc] sampled ids, gen_logps [B*G, Tc], total [B*G] rewards; ref_ids B lists of token ids (None: no
    guidance for that prompt), ref_total [B] the references' rewards -> (seqs [B*G, Tc'], gen_logps [B*G, Tc'] NaN on
    the guided rows, guided [B*G] bool), Tc' = max(Tc, longest reference placed)."""
    guided = torch.zeros(seqs.shape[0], dtype=torch.bool)
    for b, ids in enumerate(ref_ids):
        if ids is not None and float(total[b * G:(b + 1) * G].max()) < float(ref_total[b]) - 1e-6:
            guided[b * G + G - 1] = True
    if not guided.any():
        return seqs, gen_logps, guided
    width = max([seqs.shape[1]] + [len(ref_ids[i // G]) for i in guided.nonzero().flatten().tolist()])
    out = torch.full((seqs.shape[0], width), pad_id, dtype=seqs.dtype, device=seqs.device)
    out[:, :seqs.shape[1]] = seqs
    lp = None
    if gen_logps is not None:
        lp = gen_logps.new_zeros(seqs.shape[0], width)
        lp[:, :gen_logps.shape[1]] = gen_logps
    for i in guided.nonzero().flatten().tolist():
        ids = torch.tensor(ref_ids[i // G], dtype=seqs.dtype, device=seqs.device)
        out[i] = pad_id
        out[i, :len(ids)] = ids
        if lp is not None:
            lp[i] = float("nan")
    return out, lp, guided


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


def gather_rows(x):
    """[n, ...] on every rank -> [world * n, ...] in rank order (every rank holds the same n)."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


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

