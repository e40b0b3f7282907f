"""
EVS-style temporal pruning of merged video tokens (training-free; docs/design.md, "Kernels").

A video's merged tokens x [t, s, D] (t temporal slices of s = h/2 * w/2 tokens, raster order) are scored by the
cosine similarity of each token to the token at the same position in the previous slice (fp32 reduction over D).
Slice 0 has no predecessor and is always kept. Of the rest, keep either
    rate:      the round((1 - rate) * (t-1) * s) least similar tokens (ties: lower flat index first), or
    threshold: every token with similarity < threshold.
Survivors keep their original positions (the model keeps their 3-D M-RoPE indices); keep_indices compacts a mask.

    prune_video_tokens(x [t, s, D], rate=None, threshold=None)           -> keep [t, s] bool
    video_keep_mask(video_embeds [n, D], token_grid [nv, 3], ...)         -> keep [n] bool over several videos
    frame_similarity(x [t, s, D])                                         -> sim [t, s] fp32, slice 0 = -inf
    keep_indices(mask)                                                    -> long indices of kept tokens

The Triton kernel makes one pass over x: for a block of tokens it streams D in chunks, accumulating dot and both
squared norms in fp32 (the previous slice is mostly an L2 hit: it was read s tokens earlier), and writes the
similarity and, in threshold mode, the keep flag. Rate mode adds one stable sort of (t-1)*s floats (deterministic
ties). backend: 'triton' | 'torch' | 'auto' (triton on CUDA, torch otherwise).
"""

import torch
import triton
import triton.language as tl

from kernels.logprobs import INTERPRET, _use_triton  # one backend rule for every kernel

EPS = 1e-8  # cosine denominator floor: a zero token is "dissimilar" (similarity 0) rather than NaN


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_D": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
            for bt, bd, w in [(4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8), (2, 1024, 4)]]


@triton.autotune(configs=_configs(), key=["D"])
@triton.jit
def _similarity_kernel(x_ptr, sim_ptr, keep_ptr, TS, S, D, stride_x, threshold, HAS_THRESHOLD: tl.constexpr,
                       EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # flat token index over t * s
    inside = rows < TS
    has_prev = inside & (rows >= S)
    cur = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    prev = cur - S * stride_x
    dot = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    n_cur = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    n_prev = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = has_prev[:, None] & (ds < D)[None, :]
        a = tl.load(cur + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(prev + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += a * b
        n_cur += a * a
        n_prev += b * b
    denom = tl.maximum(tl.sqrt(tl.sum(n_cur, 1)) * tl.sqrt(tl.sum(n_prev, 1)), EPS)
    sim = tl.where(has_prev, tl.sum(dot, 1) / denom, float("-inf"))
    tl.store(sim_ptr + rows, sim, mask=inside)
    if HAS_THRESHOLD:
        tl.store(keep_ptr + rows, ((rows < S) | (sim < threshold)).to(tl.int8), mask=inside)


def _similarity_triton(x, threshold=None):
    t, s, D = x.shape
    if t * s == 0:
        return x.new_empty(t, s, dtype=torch.float32), x.new_ones(t, s, dtype=torch.bool)
    x2 = x.reshape(t * s, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    sim = torch.empty(t * s, device=x.device, dtype=torch.float32)
    keep = torch.empty(t * s, device=x.device, dtype=torch.int8) if threshold is not None else sim
    grid = lambda meta: (triton.cdiv(t * s, meta["BLOCK_T"]),)
    _similarity_kernel[grid](x2, sim, keep, t * s, s, D, x2.stride(0), 0.0 if threshold is None else float(threshold),
                             HAS_THRESHOLD=threshold is not None, EPS=EPS)
    sim = sim.view(t, s)
    return sim, (keep.view(t, s).bool() if threshold is not None else None)


def _similarity_torch(x):
    xf = x.float()
    cur, prev = xf[1:], xf[:-1]  # [t-1, s, D]
    denom = (cur.norm(dim=-1) * prev.norm(dim=-1)).clamp_min(EPS)
    sim = (cur * prev).sum(-1) / denom
    return torch.cat([torch.full_like(xf[:1, :, 0], float("-inf")), sim])  # [t, s]


def frame_similarity(x, backend="auto"):
    """Cosine similarity [t, s] fp32 of each token of x [t, s, D] to the same position in the previous slice;
    slice 0 (no predecessor) is -inf, i.e. maximally dissimilar."""
    if x.dim() != 3:
        raise ValueError(f"x must be [t, s, D], got shape {tuple(x.shape)}")
    return _similarity_triton(x)[0] if _use_triton(backend, x) else _similarity_torch(x)


def _rate_mask(sim, rate):
    t, s = sim.shape
    keep = torch.zeros(t * s, dtype=torch.bool, device=sim.device)
    keep[:s] = True
    k = round((1.0 - rate) * (t - 1) * s)
    if k > 0:
        order = torch.sort(sim[1:].reshape(-1), stable=True).indices  # least similar first, ties by index
        keep[s + order[:k]] = True
    return keep.view(t, s)


def _check_mode(rate, threshold):
    if (rate is None) == (threshold is None):
        raise ValueError("give exactly one of rate (fraction of tokens after slice 0 to drop) or threshold")
    if rate is not None and not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


def prune_video_tokens(x, rate=None, threshold=None, backend="auto"):
    """Keep mask [t, s] bool for one video's merged tokens x [t, s, D]: slice 0 always kept; of the other slices
    keep the fraction 1 - rate least similar to their predecessor, or those with similarity < threshold."""
    _check_mode(rate, threshold)
    if x.dim() != 3:
        raise ValueError(f"x must be [t, s, D], got shape {tuple(x.shape)}")
    if _use_triton(backend, x):
        sim, keep = _similarity_triton(x, threshold)
        if keep is not None:
            return keep
    else:
        sim = _similarity_torch(x)
        if threshold is not None:
            keep = sim < threshold
            keep[0] = True
            return keep
    return _rate_mask(sim, rate)


def keep_indices(mask):
    """Flat long indices of the True entries of mask (stream compaction; order preserved)."""
    return mask.reshape(-1).nonzero()[:, 0]


def video_keep_mask(video_embeds, token_grid, rate=None, threshold=None, backend="auto"):
    """Keep mask [n] bool over the concatenated merged tokens of several videos (model.encode_video output).

    token_grid [nv, 3] holds each video's grid in merged tokens (model.merged_grid: t, h/m, w/m); video i
    contributes t * h/m * w/m tokens, in order. Each video is pruned on its own (prune_video_tokens)."""
    _check_mode(rate, threshold)
    grids = torch.as_tensor(token_grid).reshape(-1, 3).tolist()
    sizes = [(t, hm * wm) for t, hm, wm in grids]
    n = sum(t * s for t, s in sizes)
    if video_embeds.dim() != 2 or video_embeds.shape[0] != n:
        raise ValueError(f"video_embeds {tuple(video_embeds.shape)} does not match the merged-token grids {grids} "
                         f"(expected [{n}, D])")
    masks, start = [], 0
    for t, s in sizes:
        x = video_embeds[start:start + t * s].reshape(t, s, -1)
        masks.append(prune_video_tokens(x, rate=rate, threshold=threshold, backend=backend).reshape(-1))
        start += t * s
    if not masks:
        return torch.zeros(0, dtype=torch.bool, device=video_embeds.device)
    return torch.cat(masks)
