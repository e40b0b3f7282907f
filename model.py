"""The VidEmo network: the Qwen2.5-VL architecture written out in one file.

    pixels [N, 3*2*14*14] --VisionTower--> merged video/image tokens [n, D]
    input_ids [B, L] --embed_tokens--> [B, L, D], placeholders <|video_pad|>/<|image_pad|> replaced by those tokens
    3-D M-RoPE positions [3, B, L] (temporal, height, width) from input_ids + grids (like HF's get_rope_index)
    optional keep-mask: dropped video tokens leave the sequence, survivors keep their positions
    Qwen2 decoder (GQA, q/k/v bias, RMSNorm, SwiGLU) -> final norm -> lm_head logits [B, L, V]
    or, given labels, the log-prob of every supervised label through kernels.logprobs (no [N, V] logits)

The vision-token rule, written once here (merged_grid) and used by data, trainers, kernels and generation: a
video (or image) of t x h x w patches gives t * (h/m) * (w/m) merged tokens (m = spatial_merge_size), one per
<|video_pad|> placeholder, raster order within each temporal slice, slices in time order.

Checkpoints are Hugging Face Qwen2.5-VL directories (config.json + safetensors), so Qwen2.5-VL-3B/7B-Instruct
and the released VidEmo checkpoints load, and what we save loads back into transformers.
Generation: batched, static KV cache, greedy or temperature/top-k/top-p sampling, stop on EOS.
"""

import functools
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from kernels.logprobs import token_logprobs
from kernels.token_compress import video_keep_mask as _video_keep_mask

try:  # optional: packed variable-length attention for the vision tower on GPU
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None



def flash_ok(x):
    """flash-attn's varlen kernel applies: installed, CUDA, half precision."""
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}

# -----------------------------------------------------------------------------
# config: accept both the transformers-4 layout (text keys at top level) and the transformers-5 layout


def text_settings(config):
    """The text-decoder settings as one flat dict, whichever layout the config.json uses."""
    tc = {k: v for k, v in config.items() if k not in ("vision_config", "text_config")}
    tc.update(config.get("text_config") or {})
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    heads = tc.get("num_attention_heads", 64)
    return dict(
        vocab_size=tc.get("vocab_size", 152064),
        hidden_size=tc.get("hidden_size", 8192),
        intermediate_size=tc.get("intermediate_size", 29568),
        num_hidden_layers=tc.get("num_hidden_layers", 80),
        num_attention_heads=heads,
        num_key_value_heads=tc.get("num_key_value_heads") or heads,
        hidden_act=tc.get("hidden_act", "silu"),
        rms_norm_eps=tc.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", tc.get("rope_theta", 1000000.0)),
        mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
        initializer_range=tc.get("initializer_range", 0.02),
        # pre-v5 saves put tie_word_embeddings inside text_config; transformers honours either place
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False) or
                                 (config.get("text_config") or {}).get("tie_word_embeddings", False)),
    )


def vision_settings(config):
    vc = dict(config.get("vision_config") or {})
    rope = vc.get("rope_parameters") or {}
    return dict(
        depth=vc.get("depth", 32),
        hidden_size=vc.get("hidden_size", 3584),
        hidden_act=vc.get("hidden_act", "silu"),
        intermediate_size=vc.get("intermediate_size", 3420),
        num_heads=vc.get("num_heads", 16),
        in_channels=vc.get("in_channels", vc.get("in_chans", 3)),
        patch_size=vc.get("patch_size", 14),
        spatial_merge_size=vc.get("spatial_merge_size", 2),
        temporal_patch_size=vc.get("temporal_patch_size", 2),
        tokens_per_second=vc.get("tokens_per_second", 4),
        window_size=vc.get("window_size", 112),
        out_hidden_size=vc.get("out_hidden_size", 3584),
        fullatt_block_indexes=list(vc.get("fullatt_block_indexes", [7, 15, 23, 31])),
        rope_theta=rope.get("rope_theta", 10000.0),
        initializer_range=vc.get("initializer_range", 0.02),
    )


def merged_grid(grid_thw, merge_size):
    """Patch grids [nv, 3] (t, h, w) -> merged-token grids [nv, 3] (t, h/m, w/m). A video gives prod(row) tokens,
    one per placeholder; sum over the rows = the batch's video tokens."""
    g = torch.as_tensor(grid_thw).reshape(-1, 3)
    if bool((g[:, 1:] % merge_size).any()):
        raise ValueError(f"grid {g.tolist()}: h and w must be multiples of the merge size {merge_size}")
    return torch.stack([g[:, 0], g[:, 1] // merge_size, g[:, 2] // merge_size], 1)


def vision_token_counts(grid_thw, merge_size):
    """[nv] merged tokens per video/image of the grids [nv, 3]: t * h * w / merge_size^2."""
    return merged_grid(grid_thw, merge_size).prod(-1)


def scratch_config(vocab_size, token_ids, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, n_inner=384, vision_depth=2,
                   vision_embd=64, vision_heads=2, vision_inner=128, tie_embeddings=True):
    """A Qwen2.5-VL config dict for a model trained from scratch. token_ids: the ids of <|vision_start|>,
    <|vision_end|>, <|image_pad|>, <|video_pad|>, <|im_end|>, <|endoftext|> in the tokenizer."""
    half = (n_embd // n_head) // 2  # M-RoPE sections (t, h, w) sum to head_dim / 2, Qwen's 2:3:3 split
    hw = (half - half // 4) // 2
    ids = token_ids
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": vocab_size, "hidden_size": n_embd, "intermediate_size": n_inner,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv_head,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * hw, hw, hw]},
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


@functools.lru_cache(maxsize=32)
def inv_freq(dim, theta, device):
    """RoPE inverse frequencies for rotary dimension `dim` (cached per device; never written to)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))  # [dim/2]


def apply_rope(x, cos, sin_signed):
    """Rotary embedding in the rotate-half layout: x*cos + rotate_half(x)*sin, with rotate_half(x)*sin written
    as roll(x)*[-sin, sin] (the same products, fewer kernels). cos/sin_signed broadcast against x [..., hd]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def rope_tables(freqs, dtype):
    """freqs [..., hd/2] -> cos [..., hd], sin_signed [..., hd] (= [-sin, sin] per half) in `dtype`."""
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # same arithmetic, fewer kernels
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # statistics in fp32
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, act="silu", bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        if act not in ACT:
            raise ValueError(f"config: hidden_act {act!r} is not supported (known: {', '.join(ACT)})")
        self.act = ACT[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

# -----------------------------------------------------------------------------
# vision tower: patch embed -> blocks (window / full attention, 2-D rotary) -> 2x2 patch merger


class PatchEmbed(nn.Module):
    """A Conv3d with kernel == stride is a linear map over each flattened (C, 2, 14, 14) patch. The weight keeps
    HF's Conv3d shape [D, C, t, p, p] so checkpoints load as they are."""

    def __init__(self, vs):
        super().__init__()
        p, t = vs["patch_size"], vs["temporal_patch_size"]
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(vs["hidden_size"], vs["in_channels"], t, p, p))

    def forward(self, x):  # x [N, C*t*p*p]
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))  # [N, D]


def segment_plan(cu_seqlens, device):
    """Group the segments of a packed sequence by length, so that each group is one batched SDPA call.
    Returns (groups, inverse): groups = [(length, index [n, length] or None when the whole sequence is one
    run of equal segments)], inverse = permutation that puts the concatenated group outputs back in order."""
    cu = torch.as_tensor(cu_seqlens).tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]
    starts = [a for a, b in zip(cu[:-1], cu[1:]) if b > a]
    if len(set(lens)) == 1:
        return [(lens[0], None)], None
    groups, order = [], []
    for n in sorted(set(lens)):
        s = torch.tensor([a for a, m in zip(starts, lens) if m == n], device=device)
        idx = s[:, None] + torch.arange(n, device=device)  # [n_seg, n]
        groups.append((n, idx))
        order.append(idx.flatten())
    return groups, torch.argsort(torch.cat(order))


class Packed:
    """Variable-length sequences laid end to end in one row (no padding): cu_seqlens [n + 1] boundaries, the
    longest length, and segment_plan's equal-length groups for the SDPA path. Causal attention stays inside each
    sequence: what a key-padding mask gives the padded batch, without computing the padding."""

    def __init__(self, lengths):
        self.lengths = lengths  # [n] long
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.max_len = int(lengths.max())
        self.plan = segment_plan(self.cu_seqlens, lengths.device)


class VisionAttention(nn.Module):
    def __init__(self, vs):
        super().__init__()
        dim = vs["hidden_size"]
        self.n_head = vs["num_heads"]
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, plan, cu_seqlens):  # x [N, D], cos/sin [N, hd] fp32
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.n_head, -1).unbind(1)  # each [N, H, hd]
        # rotary in fp32 (as the reference does), then back to the activation dtype
        c, s = cos[:, None], sin[:, None]
        q = apply_rope(q.float(), c, s).to(x.dtype)
        k = apply_rope(k.float(), c, s).to(x.dtype)
        if flash_ok(x):
            max_len = max(n for n, _ in plan[0])  # the longest segment
            y = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)  # [N, H, hd]
        else:
            groups, inverse = plan
            outs = []
            for n, idx in groups:  # segments of equal length attend in one batched call
                qs, ks, vs_ = (t.view(-1, n, *t.shape[1:]) if idx is None else t[idx] for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs_.transpose(1, 2))
                outs.append(o.transpose(1, 2).reshape(-1, *q.shape[1:]))  # [n_seg*n, H, hd]
            y = outs[0] if inverse is None else torch.cat(outs)[inverse]
        return self.proj(y.reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, vs):
        super().__init__()
        self.norm1 = RMSNorm(vs["hidden_size"], eps=1e-6)
        self.norm2 = RMSNorm(vs["hidden_size"], eps=1e-6)
        self.attn = VisionAttention(vs)
        self.mlp = SwiGLU(vs["hidden_size"], vs["intermediate_size"], vs["hidden_act"], bias=True)

    def forward(self, x, cos, sin, plan, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, plan, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate each 2x2 group (consecutive in the input order), MLP to the LLM width."""

    def __init__(self, vs):
        super().__init__()
        self.group_dim = vs["hidden_size"] * vs["spatial_merge_size"] ** 2
        self.ln_q = RMSNorm(vs["hidden_size"], eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.group_dim, self.group_dim), nn.GELU(),
                                 nn.Linear(self.group_dim, vs["out_hidden_size"]))

    def forward(self, x):  # [N, d] -> [N/4, D]
        return self.mlp(self.ln_q(x).view(-1, self.group_dim))


class VisionTower(nn.Module):
    def __init__(self, vs):
        super().__init__()
        self.vs = vs
        self.patch_embed = PatchEmbed(vs)
        self.blocks = nn.ModuleList([VisionBlock(vs) for _ in range(vs["depth"])])
        self.merger = PatchMerger(vs)

    def layout(self, grid_thw):
        """Per-patch (h, w) rotary positions, the window reordering and the attention segments.
        Patches arrive block-major: the 4 patches of each 2x2 merge group are consecutive."""
        m = self.vs["spatial_merge_size"]
        win = self.vs["window_size"] // m // self.vs["patch_size"]  # window side, in merged tokens
        pos, window_index, cu_win, cu_full = [], [], [0], [0]
        offset = 0
        for (t, h, w), (_, gh, gw) in zip(grid_thw.tolist(), merged_grid(grid_thw, m).tolist()):
            hh = torch.arange(h)[:, None].expand(h, w).reshape(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
            ww = torch.arange(w)[None, :].expand(h, w).reshape(gh, m, gw, m).permute(0, 2, 1, 3).flatten()
            pos.append(torch.stack([hh, ww], -1).repeat(t, 1))  # [t*h*w, 2]
            grid = torch.arange(gh * gw).view(gh, gw)
            windows = [grid[i:i + win, j:j + win].flatten() for i in range(0, gh, win) for j in range(0, gw, win)]
            for f in range(t):  # windows never cross frames
                for wnd in windows:
                    window_index.append(wnd + offset + f * gh * gw)
                    cu_win.append(cu_win[-1] + wnd.numel() * m * m)
                cu_full.append(cu_full[-1] + h * w)  # full attention is still per frame
            offset += t * gh * gw
        return torch.cat(pos), torch.cat(window_index), cu_win, cu_full

    def forward(self, pixels, grid_thw, grad_ckpt=False):  # pixels [N, C*t*p*p], grid_thw [n, 3]
        dev = pixels.device
        pos, window_index, cu_win, cu_full = self.layout(grid_thw.cpu())
        pos, window_index = pos.to(dev), window_index.to(dev)
        unit = self.vs["spatial_merge_size"] ** 2
        x = self.patch_embed(pixels)  # [N, d]
        N, d = x.shape
        if N != pos.shape[0]:
            raise ValueError(f"pixel rows ({N}) do not match the grids {grid_thw.tolist()} ({pos.shape[0]} patches)")
        # reorder merge groups so that every window is a contiguous run
        x = x.view(N // unit, unit, d)[window_index].view(N, d)
        hd = d // self.vs["num_heads"]
        freqs = (pos[..., None].float() * inv_freq(hd // 2, self.vs["rope_theta"], dev)).flatten(1)  # [N, hd/2]
        freqs = freqs.view(N // unit, unit, -1)[window_index].view(N, -1)
        cos, sin = rope_tables(freqs, torch.float32)  # [N, hd]
        plans = {name: (segment_plan(cu, dev), torch.tensor(cu, dtype=torch.int32, device=dev))
                 for name, cu in (("full", cu_full), ("window", cu_win))}
        for i, blk in enumerate(self.blocks):
            plan, cu = plans["full" if i in self.vs["fullatt_block_indexes"] else "window"]
            if grad_ckpt:
                x = checkpoint(blk, x, cos, sin, plan, cu, use_reentrant=False)
            else:
                x = blk(x, cos, sin, plan, cu)
        x = self.merger(x)  # [N/4, D]
        return x[torch.argsort(window_index)]  # back to the original token order

# -----------------------------------------------------------------------------
# Qwen2 decoder


class KVCache:
    """Preallocated per-layer key/value buffers [B, kv_heads, max_len, hd]. The prefill may run on B/expand rows
    (one per prompt); its keys/values are copied to the `expand` rows of each prompt's completions.

    Decode is eager (keys sliced to the length so far, `bias` the additive key mask [B, 1, 1, max_len] or None) or,
    with static=True, fixed-shape: a step writes its key at position `at` (a device tensor) with index_copy_ and
    attends over the whole buffer, `bias` hiding the positions not written yet; rows that leave the batch are
    compacted into the front of the same buffers (`b` rows in use). No shape, address or host value changes from
    step to step, so a step can be captured as a CUDA graph."""

    def __init__(self, n_layer, batch, n_kv, max_len, hd, dtype, device, expand=1, static=False, zero=False):
        # zero: slots a step attends over before (or without) a key lands there -- padding holes of a packed prefill,
        # the whole buffer of a static decode -- must not hold NaN bits: a NaN score stays NaN under a -inf mask
        make = torch.zeros if zero or static else torch.empty
        self.k = [make(batch, n_kv, max_len, hd, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [make(batch, n_kv, max_len, hd, dtype=dtype, device=device) for _ in range(n_layer)]
        self.expand, self.len, self.static, self.b = expand, 0, static, batch
        self.slots = None  # packed prefill: (cache row [M], position [M]) of each real prompt token, per completion
        self.bias = None  # [B, 1, 1, max_len] additive key mask (0 = visible, -inf = not), or None: all visible
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # static: the position the next step writes

    def update(self, i, k, v):  # k, v [b, n_kv, T, hd] -> keys/values to attend over
        T, s = k.shape[2], self.len
        if s == 0:  # prefill: store (copied per completion), attend over the fresh keys
            if self.expand > 1:
                self.k[i][:, :, :T] = k.repeat_interleave(self.expand, 0)
                self.v[i][:, :, :T] = v.repeat_interleave(self.expand, 0)
            else:
                self.k[i][:, :, :T] = k
                self.v[i][:, :, :T] = v
            return k, v
        if self.static:
            kb, vb = self.k[i][:self.b], self.v[i][:self.b]
            kb.index_copy_(2, self.at, k)
            vb.index_copy_(2, self.at, v)
            return kb, vb
        self.k[i][:, :, s:s + T] = k
        self.v[i][:, :, s:s + T] = v
        return self.k[i][:, :, :s + T], self.v[i][:, :, :s + T]

    def write_packed(self, i, k, v):
        """Packed prefill: k, v [Hkv, N, hd] of the prompts' real tokens, end to end, into their padded slots."""
        rows, cols = self.slots
        self.k[i][rows, :, cols] = k.transpose(0, 1).repeat_interleave(self.expand, 0)  # [N * expand, Hkv, hd]
        self.v[i][rows, :, cols] = v.transpose(0, 1).repeat_interleave(self.expand, 0)

    def step_mask(self):
        """The key mask of the next decode step ([b, 1, 1, S] additive, or None when every key is visible)."""
        if self.static:
            m = self.bias[:self.b]
            m.index_fill_(3, self.at, 0.0)  # the step's own position becomes visible
            return m
        return None if self.bias is None else self.bias[..., :self.len + 1]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def keep(self, index):
        """Only rows `index` [b'] of the batch stay, in that order."""
        if self.static:  # in place, into the front of the same buffers: captured graphs keep their addresses
            for buf in self.k + self.v + [self.bias]:
                buf[:index.numel()] = buf[index]
            self.b = index.numel()
        else:
            self.k = [k[index] for k in self.k]
            self.v = [v[index] for v in self.v]
            self.bias = None if self.bias is None else self.bias[index]


class GroupKVCache(KVCache):
    """The rollout's cache for n completions per prompt (eager decode): one buffer per group [B, kv_heads, L + n *
    max_new, hd] holding the prompt's keys/values once, then the completions' generated ones time-major (step t of
    slot r at column L + t * n + r), so everything written so far is the prefix [:L + (t+1) * n]. A decode step is
    one SDPA call per layer: the n * g queries of a group (g heads per kv head) against that prefix, a fixed mask
    keeping each query to the prompt and its own slot's columns. The prompt's keys are read once per group, not n
    times, and never copied at prefill; rows that finish leave the batch (keep) with nothing moved in the cache (the
    group's grid computes zeros for them)."""

    def __init__(self, n_layer, B, n, n_kv, L, max_new, hd, dtype, device):
        self.W = -(-(L + n * max_new) // 16) * 16  # columns, padded so mask rows stay 16-aligned for fused SDPA
        self.pk = [torch.zeros(B, n_kv, self.W, hd, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pv = [torch.zeros(B, n_kv, self.W, hd, dtype=dtype, device=device) for _ in range(n_layer)]
        self.B, self.n, self.L, self.len, self.static, self.b = B, n, L, 0, False, B * n
        rows = torch.arange(B * n, device=device)
        self.group, self.slot = rows // n, rows % n  # [b] each live row's prompt and its place in the group
        self.slots = None  # packed prefill: (prompt row [N], position [N]) of each real prompt token
        self.bias = None  # [B, 1, 1, L] additive prompt-key mask (left padding), or None
        self.mask = None  # [B or 1, 1, n*g, W] additive, built at the first decode step (g known then)

    def update(self, i, k, v):  # prefill only (decode goes through attend): k, v [B, n_kv, L, hd]
        self.pk[i][:, :, :k.shape[2]] = k
        self.pv[i][:, :, :k.shape[2]] = v
        return k, v

    def write_packed(self, i, k, v):  # k, v [Hkv, N, hd] of the prompts' real tokens
        rows, cols = self.slots
        self.pk[i][rows, :, cols] = k.transpose(0, 1)
        self.pv[i][rows, :, cols] = v.transpose(0, 1)

    def step_mask(self):
        return None  # attend applies its own mask

    def keep(self, index):
        self.group, self.slot = self.group[index], self.slot[index]
        self.b = index.numel()

    def _mask(self, g, dtype):  # query r*g + j (slot r) sees the prompt and columns L + s*n + r
        q_slot = torch.arange(self.n * g, device=self.group.device) // g  # [n*g]
        c = torch.arange(self.W, device=q_slot.device) - self.L
        own = (c[None] >= 0) & (c[None] % self.n == q_slot[:, None])  # [n*g, W]
        m = torch.zeros(1, 1, self.n * g, self.W, dtype=dtype, device=q_slot.device)
        m.masked_fill_(~(own | (c < 0)[None]), float("-inf"))
        if self.bias is not None:  # left padding of each prompt
            m = m + F.pad(self.bias.to(dtype), (0, self.W - self.L))  # [B, 1, n*g, W]
        return m

    def attend(self, i, q, k, v):  # q [b, H, 1, hd], k/v [b, Hkv, 1, hd] of this step -> [b, H * hd]
        b, H, _, hd = q.shape
        Hkv = k.shape[1]
        g, t, full = H // Hkv, self.len - self.L, b == self.B * self.n  # t: generated tokens already cached
        cols = slice(self.L + t * self.n, self.L + (t + 1) * self.n)
        for buf, x in ((self.pk[i], k), (self.pv[i], v)):
            if full:  # [B*n, Hkv, hd] -> the group's n slots of step t
                buf[:, :, cols] = x[:, :, 0].view(self.B, self.n, Hkv, hd).transpose(1, 2)
            else:
                buf[self.group, :, self.L + t * self.n + self.slot] = x[:, :, 0]
        if self.mask is None:
            self.mask = self._mask(g, q.dtype)
        q = q.reshape(b, Hkv, g, hd)  # head h = kv * g + j, as in the copied cache's decode
        if full:
            qg = q.view(self.B, self.n, Hkv, g, hd)
        else:  # rows have left: the live ones in their slots, zeros elsewhere
            qg = q.new_zeros(self.B, self.n, Hkv, g, hd)
            qg[self.group, self.slot] = q
        qg = qg.transpose(1, 2).reshape(self.B, Hkv, self.n * g, hd)
        end = cols.stop
        o = F.scaled_dot_product_attention(qg, self.pk[i][:, :, :end], self.pv[i][:, :, :end],
                                           attn_mask=self.mask[..., :end].to(qg.dtype))  # [B, Hkv, n*g, hd]
        o = o.view(self.B, Hkv, self.n, g, hd).transpose(1, 2)  # [B, n, Hkv, g, hd]
        o = o.reshape(self.B * self.n, Hkv, g, hd) if full else o[self.group, self.slot]
        return o.reshape(b, H * hd)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.pk + self.pv)


class DecodeGraphs:
    """A decode step replayed from CUDA graphs, one per batch size, each captured the first time that size comes up
    (compaction keeps sizes to a few buckets). `step(tok, r)` must touch only tensors whose addresses stay fixed:
    the static KVCache, its mask and position, and the input buffers here. Its warm-up run is harmless: a step
    rewrites the same cache slot with the same values."""

    def __init__(self, step, batch, device):
        self.step, self.graphs, self.pool = step, {}, None
        self.tok = torch.zeros(batch, dtype=torch.long, device=device)
        self.r = torch.zeros(batch, dtype=torch.long, device=device)

    def __call__(self, tok, r):  # tok, r [b] -> logits [b, V] (overwritten by the next call)
        b = tok.shape[0]
        self.tok[:b].copy_(tok)
        self.r[:b].copy_(r)
        if b not in self.graphs:
            args = (self.tok[:b], self.r[:b])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(*args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(*args)
            self.pool = graph.pool()
            self.graphs[b] = (graph, out)
        graph, out = self.graphs[b]
        graph.replay()
        return out


class SharedPrefix:
    """GRPO groups laid end to end in one row: each group is its prompt once, then its G completions, each right
    after the one before. A prompt attends causally to itself; a completion attends to its whole prompt and causally
    to itself, never to a sibling, so every token sees what it sees in its own [prompt; completion] row while the
    prompt's tokens are computed once per group. prompt_lens [B], comp_lens [B*G] (tokens fed per completion).

    A group's completions attend in one of two ways, whichever computes fewer scores: "dense", all S = sum(comp_lens)
    completion tokens against [prompt; all completions] under a [S, P + S] mask (few, short completions), or
    "batched", the G completions as a batch of G rows [C_max] against [prompt K/V; own K/V] (G * C_max * (P + C_max)
    scores: no sibling blocks computed when G * C >> P, but a copy of the prompt's K/V per completion). "auto" batches
    from batch_from_G completions per group on (measured on CPU, bench.py --section=shared_prefix: at G = 4 the
    copies cost more than the sibling blocks they save, from G = 8 batching wins); `mode` forces one.

    Batched rows need no mask where `lower_right` holds (on CUDA by default): completions are right-padded, so with
    causal attention aligned to the bottom right (query t sees keys up to P + t) a real token never reaches padding,
    and SDPA runs its FlashAttention kernel instead of the masked memory-efficient one. On CPU SDPA would materialise
    that mask anyway, so the CPU keeps its measured choice; on CUDA "auto" batches from G = 2 on."""

    mode = "auto"  # auto | dense | batched
    batch_from_G = 8
    lower_right = "cuda"  # "cuda" | True | False: batched rows as bottom-right causal attention, no mask

    def __init__(self, prompt_lens, comp_lens, G, device):
        self.groups = []  # (start, prompt length, completion tokens, plan) per group
        self.prompt_lens, self.comp_lens, self.G = prompt_lens.tolist(), comp_lens.tolist(), G
        self._flash = None  # flash-attn's varlen plan, built on first use
        self.unmasked = self.lower_right is True or (self.lower_right == "cuda" and torch.device(device).type == "cuda")
        batch_from = 2 if self.unmasked else self.batch_from_G
        start = 0
        for b, P in enumerate(self.prompt_lens):
            cs = comp_lens[b * G:(b + 1) * G].to(device)
            S, C = int(cs.sum()), int(cs.max()) if G else 0
            plan = None
            if S:
                batched = self.mode == "batched" or (self.mode == "auto" and G >= batch_from
                                                     and G * C * (P + C) < S * (P + S))
                plan = self._batched(P, cs, C, device) if batched else self._dense(P, cs, S, device)
            self.groups.append((start, P, S, plan))
            start += P + S

    def flash_plan(self, device):
        """Two varlen calls for every group at once: the prompts (causal), and each completion as queries [C_j]
        against keys [its prompt; itself] (causal aligned to the bottom right: query t sees the prompt and its own
        tokens up to t). -> (prompt token index [Np], cu [B+1], max P, completion token index [Nc], key index [Nk],
        cu_q [n+1], cu_k [n+1], max C, max P + C)."""
        if self._flash is None:
            p_idx, c_idx, k_idx, lq, lk = [], [], [], [], []
            for b, (s, P, S, _) in enumerate(self.groups):
                prompt = torch.arange(s, s + P)
                p_idx.append(prompt)
                at = s + P
                for c in self.comp_lens[b * self.G:(b + 1) * self.G]:
                    if c:
                        own = torch.arange(at, at + c)
                        c_idx.append(own)
                        k_idx += [prompt, own]
                        lq.append(c)
                        lk.append(P + c)
                        at += c
            cu = lambda n: F.pad(torch.tensor(n).cumsum(0), (1, 0)).to(device, torch.int32)  # noqa: E731
            cat = lambda xs: torch.cat(xs).to(device) if xs else torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
            self._flash = (cat(p_idx), cu(self.prompt_lens), max(self.prompt_lens), cat(c_idx), cat(k_idx), cu(lq),
                           cu(lk), max(lq, default=0), max(lk, default=0))
        return self._flash

    def attend_flash(self, q, k, v):  # q [H, N, hd], k/v [Hkv, N, hd] -> [N, H, hd] (flash-attn takes GQA as is)
        p_idx, cu_p, max_p, c_idx, k_idx, cu_q, cu_k, max_q, max_k = self.flash_plan(q.device)
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [N, heads, hd]
        out = q.new_empty(q.shape)
        out[p_idx] = flash_attn_varlen_func(q[p_idx], k[p_idx], v[p_idx], cu_p, cu_p, max_p, max_p, causal=True)
        if c_idx.numel():  # each completion against [prompt K/V; own K/V] (the prompt's K/V gathered per completion)
            out[c_idx] = flash_attn_varlen_func(q[c_idx], k[k_idx], v[k_idx], cu_q, cu_k, max_q, max_k, causal=True)
        return out

    @staticmethod
    def _dense(P, cs, S, device):
        seg = torch.repeat_interleave(torch.arange(len(cs), device=device), cs)  # [S] completion of each token
        idx = torch.arange(S, device=device)
        own = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])  # causal inside its completion
        return "dense", torch.cat([torch.ones(S, P, dtype=torch.bool, device=device), own], 1)  # [S, P + S]

    @staticmethod
    def _batched(P, cs, C, device):
        t = torch.arange(C, device=device)
        real = t[None] < cs[:, None]  # [G, C] token t of completion g exists
        at = (F.pad(cs.cumsum(0), (1, 0))[:-1, None] + t[None]).where(real, 0)  # [G, C] its offset among the S
        own = (t[None, :] <= t[:, None])[None] & real[:, None, :]  # [G, C, C] causal over its real tokens
        mask = torch.cat([torch.ones(len(cs), C, P, dtype=torch.bool, device=device), own], 2)  # [G, C, P + C]
        return "batched", (at, real, mask[:, None])

    def attend(self, q, k, v):  # q [H, N, hd], k/v [Hkv, N, hd] -> [N, H, hd]
        if flash_ok(q):
            return self.attend_flash(q, k, v)
        k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], 0) for t in (k, v))  # SDPA: kv heads repeated
        outs = []
        for s, P, S, plan in self.groups:
            outs.append(F.scaled_dot_product_attention(q[None, :, s:s + P], k[None, :, s:s + P], v[None, :, s:s + P],
                                                       is_causal=True)[0])  # [H, P, hd] the prompt, once
            if not S:
                continue
            e = s + P + S
            if plan[0] == "dense":  # the group's completions against [its prompt; themselves], K/V read in place
                outs.append(F.scaled_dot_product_attention(q[None, :, s + P:e], k[None, :, s:e], v[None, :, s:e],
                                                           attn_mask=plan[1])[0])  # [H, S, hd]
                continue
            at, real, mask = plan[1]  # one row per completion: [prompt K/V; its own K/V]
            G = at.shape[0]
            qc, kc, vc = (x[:, s + P:e][:, at].transpose(0, 1) for x in (q, k, v))  # [G, H, C, hd]
            kp, vp = (x[None, :, s:s + P].expand(G, -1, -1, -1) for x in (k, v))  # [G, H, P, hd]
            if self.unmasked:  # query t sees keys up to P + t: the prompt and its own tokens, never its padding
                mask = causal_lower_right(qc.shape[2], P + qc.shape[2])
            y = F.scaled_dot_product_attention(qc, torch.cat([kp, kc], 2), torch.cat([vp, vc], 2), attn_mask=mask)
            outs.append(y.transpose(0, 1)[:, real])  # [H, S, hd] real rows, in token order
        return torch.cat(outs, 1).transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, ts):
        super().__init__()
        D = ts["hidden_size"]
        self.n_head, self.n_kv = ts["num_attention_heads"], ts["num_key_value_heads"]
        self.hd = D // self.n_head
        self.q_proj = nn.Linear(D, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):  # x [B, T, D], cos/sin [B, 1, T, hd]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, Packed):  # B = 1: sequences end to end
            if cache is not None:  # generate's packed prefill
                cache.write_packed(layer, k[0], v[0])
            return self.o_proj(self._packed(q[0], k[0], v[0], mask).reshape(1, T, -1))
        if isinstance(mask, SharedPrefix):  # B = 1: GRPO groups, each prompt once
            return self.o_proj(mask.attend(q[0], k[0], v[0]).reshape(1, T, -1))
        if cache is not None:
            if T == 1 and isinstance(cache, GroupKVCache):  # rollout decode: the prompt's keys once per group
                return self.o_proj(cache.attend(layer, q, k, v)[:, None])
            k, v = cache.update(layer, k, v)
            if T == 1:  # one query per row: the heads of a kv group become that group's queries, no kv repeat
                g = self.n_head // self.n_kv
                y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.hd), k, v, attn_mask=mask)
                return self.o_proj(y.reshape(B, 1, -1))  # [B, Hkv, g, hd] is head order h = kv * g + j
        gqa = self.n_kv != self.n_head
        if gqa and mask is not None and x.is_cuda:  # CUDA's masked SDPA kernels lack GQA: repeat the kv heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, 1) for t in (k, v))
            gqa = False
        # mask None: no padding, plain causal (a single decode query sees the whole cache)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _packed(self, q, k, v, packed):  # q [H, N, hd], k/v [Hkv, N, hd] -> [N, H, hd]
        if flash_ok(q):
            cu, n = packed.cu_seqlens, packed.max_len
            return flash_attn_varlen_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu, n, n,
                                          causal=True)
        if self.n_kv != self.n_head:  # the per-group calls below are few and small: repeat kv heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, 0) for t in (k, v))
        groups, inverse = packed.plan
        if 2 * len(groups) > packed.lengths.numel():  # mostly distinct lengths: contiguous views, one call each (a
            lens = packed.lengths.tolist()  # gather per group would cost an index backward over all N per group)
            outs = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True)[0].transpose(0, 1)
                    for qs, ks, vs in zip(q.split(lens, 1), k.split(lens, 1), v.split(lens, 1))]  # [n, H, hd]
            return torch.cat(outs)
        outs = []
        for n, idx in groups:  # sequences of equal length attend in one batched causal call
            qs, ks, vs = (t.view(t.shape[0], -1, n, t.shape[-1]).transpose(0, 1) if idx is None else
                          t[:, idx].transpose(0, 1) for t in (q, k, v))  # [n_seq, H, n, hd]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            outs.append(o.transpose(1, 2).reshape(-1, *o.shape[1:2], o.shape[-1]))  # [n_seq * n, H, hd]
        return outs[0] if inverse is None else torch.cat(outs)[inverse]


class DecoderLayer(nn.Module):
    def __init__(self, ts):
        super().__init__()
        self.input_layernorm = RMSNorm(ts["hidden_size"], ts["rms_norm_eps"])
        self.self_attn = Attention(ts)
        self.post_attention_layernorm = RMSNorm(ts["hidden_size"], ts["rms_norm_eps"])
        self.mlp = SwiGLU(ts["hidden_size"], ts["intermediate_size"], ts["hidden_act"])

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

# -----------------------------------------------------------------------------
# checkpoint checks: damaged or foreign weights are one line naming the file, the tensor or the model_type


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be what it claims (damaged, foreign, inconsistent). common.run prints it as
    one line (input_error), whichever script loads it."""
    input_error = True


class CheckpointFileMissing(FileNotFoundError):
    input_error = True


# model_types that are not Qwen2.5-VL, with why they cannot load (a text-only LLM has no vision tower; the other VL
# generations have other vision towers and tensor names)
FOREIGN = {"qwen2": "a text-only LLM (no vision tower)", "qwen3": "a text-only LLM (no vision tower)",
           "qwen2_moe": "a text-only LLM (no vision tower)", "llama": "a text-only LLM (no vision tower)",
           "mistral": "a text-only LLM (no vision tower)",
           "qwen2_vl": "Qwen2-VL (its vision tower has no window attention and LayerNorm blocks)",
           "qwen3_vl": "Qwen3-VL (another vision tower and decoder)",
           "qwen3_vl_moe": "Qwen3-VL (another vision tower and decoder)",
           "qwen2_5_omni": "Qwen2.5-Omni (thinker/talker layout)"}


def safetensors_header(path):
    """{tensor name: (dtype, shape)} from a .safetensors file's header alone, after checking that the file holds every
    byte its header describes (an interrupted copy is cut short). Raises CheckpointError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file or truncated ({size} bytes; header length "
                                  f"{n if n >= 0 else '?'})")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON (damaged file)") from None
    tensors, end = {}, 0
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = (v["dtype"], tuple(int(x) for x in v["shape"]))
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, ValueError, IndexError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: {size} bytes, its header describes {8 + n + end} (an interrupted "
                              f"copy or download?)")
    return tensors


def check_hf_config(config, where):
    """A config.json that describes a Qwen2.5-VL: the model_type, integer widths > 0 that divide as the layers need.
    Raises CheckpointError naming the key."""
    mt = config.get("model_type")
    arch = config.get("architectures")
    if mt in FOREIGN or (mt is not None and mt != "qwen2_5_vl"):
        why = FOREIGN.get(mt, "not a Qwen2.5-VL model")
        raise CheckpointError(f"{where}: model_type {mt!r} ({', '.join(arch) if isinstance(arch, list) else arch}) is "
                              f"{why}; VidEmo loads Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl')")
    if mt is None and not isinstance(config.get("vision_config"), dict):
        raise CheckpointError(f"{where}: no model_type and no vision_config: not a Qwen2.5-VL config")
    ts, vs = text_settings(config), vision_settings(config)
    for prefix, d, keys in (("", ts, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads")),
                            ("vision_config.", vs, ("depth", "hidden_size", "intermediate_size", "num_heads",
                                                    "patch_size", "spatial_merge_size", "temporal_patch_size",
                                                    "out_hidden_size", "window_size"))):
        for k in keys:
            if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] <= 0:
                raise CheckpointError(f"{where}: {prefix}{k} must be a positive integer, got {d[k]!r}")
    if ts["hidden_size"] % ts["num_attention_heads"]:
        raise CheckpointError(f"{where}: hidden_size {ts['hidden_size']} is not a multiple of num_attention_heads "
                              f"{ts['num_attention_heads']}")
    if ts["num_attention_heads"] % ts["num_key_value_heads"]:
        raise CheckpointError(f"{where}: num_attention_heads {ts['num_attention_heads']} is not a multiple of "
                              f"num_key_value_heads {ts['num_key_value_heads']}")
    if vs["hidden_size"] % vs["num_heads"]:
        raise CheckpointError(f"{where}: vision_config.hidden_size {vs['hidden_size']} is not a multiple of "
                              f"vision_config.num_heads {vs['num_heads']}")


def check_widths(config, shapes, where):
    """The config's widths against the stored tensors (shapes: {our name: (shape, file)}), before any model is built:
    a config.json from another model size is named by key and tensor, not by a later shape error."""
    ts, vs = text_settings(config), vision_settings(config)

    def want(name, dim, key, value):
        if name in shapes and len(shapes[name][0]) > dim and shapes[name][0][dim] != value:
            shape, fn = shapes[name]
            raise CheckpointError(f"{where}: {key}={value} but {fn} stores '{VidEmo._hf_name(name)}' as "
                                  f"{list(shape)}: config.json does not describe these weights")

    want("embed_tokens.weight", 1, "hidden_size", ts["hidden_size"])
    want("embed_tokens.weight", 0, "vocab_size", ts["vocab_size"])
    want("layers.0.mlp.gate_proj.weight", 0, "intermediate_size", ts["intermediate_size"])
    hd = ts["hidden_size"] // ts["num_attention_heads"]
    want("layers.0.self_attn.k_proj.weight", 0, "num_key_value_heads x head_dim", ts["num_key_value_heads"] * hd)
    want("visual.patch_embed.proj.weight", 0, "vision_config.hidden_size", vs["hidden_size"])
    want("visual.blocks.0.mlp.gate_proj.weight", 0, "vision_config.intermediate_size", vs["intermediate_size"])
    for prefix, key, n in (("layers.", "num_hidden_layers", ts["num_hidden_layers"]),
                           ("visual.blocks.", "vision_config.depth", vs["depth"])):
        stored = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
        if stored and max(stored) + 1 != n:
            raise CheckpointError(f"{where}: {key}={n} but the weights hold {max(stored) + 1} blocks "
                                  f"('{VidEmo._hf_name(prefix + str(max(stored)))}.*')")


# -----------------------------------------------------------------------------
# the whole model


class VidEmo(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.ts, self.vs = ts, vs = text_settings(config), vision_settings(config)
        self.video_token_id = config.get("video_token_id", 151656)
        self.image_token_id = config.get("image_token_id", 151655)
        hd = ts["hidden_size"] // ts["num_attention_heads"]
        if sum(ts["mrope_section"]) * 2 != hd:
            raise ValueError(f"config: mrope_section {ts['mrope_section']} must sum to head_dim/2 = {hd // 2}")
        if vs["out_hidden_size"] != ts["hidden_size"]:
            raise ValueError(f"config: vision_config.out_hidden_size {vs['out_hidden_size']} != "
                             f"hidden_size {ts['hidden_size']}")
        self.visual = VisionTower(vs)
        self.embed_tokens = nn.Embedding(ts["vocab_size"], ts["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(ts) for _ in range(ts["num_hidden_layers"])])
        self.norm = RMSNorm(ts["hidden_size"], ts["rms_norm_eps"])
        self.lm_head = nn.Linear(ts["hidden_size"], ts["vocab_size"], bias=False)
        if ts["tie_word_embeddings"]:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":
            self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.ts["initializer_range"]
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, PatchEmbed):
            nn.init.normal_(module.proj.weight, std=self.vs["initializer_range"])
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_params(self, exclude_embeddings=False):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    # --- vision -------------------------------------------------------------

    def encode_video(self, pixel_values_videos, video_grid_thw):
        """[N_patches, C*2*14*14] pixels -> [n_merged, D] video tokens (in placeholder order)."""
        grid = torch.as_tensor(video_grid_thw).view(-1, 3)
        return self.visual(pixel_values_videos, grid, self.gradient_checkpointing and torch.is_grad_enabled())

    def encode_image(self, pixel_values, image_grid_thw):
        grid = torch.as_tensor(image_grid_thw).view(-1, 3)
        return self.visual(pixel_values, grid, self.gradient_checkpointing and torch.is_grad_enabled())

    def vision_token_counts(self, grid_thw):
        """[nv] merged tokens (= placeholders) per video of the grids [nv, 3]."""
        return vision_token_counts(grid_thw, self.vs["spatial_merge_size"])

    def video_keep_mask(self, video_embeds, video_grid_thw, rate=None, threshold=None):
        """EVS keep-mask [n] bool over encode_video's tokens (kernels.token_compress): each video's first temporal
        slice is kept, later tokens most like the token at their position one slice earlier are dropped."""
        return _video_keep_mask(video_embeds, merged_grid(video_grid_thw, self.vs["spatial_merge_size"]),
                                rate=rate, threshold=threshold)

    # --- positions ----------------------------------------------------------

    def rope_index(self, input_ids, attention_mask=None, video_grid_thw=None, image_grid_thw=None,
                   second_per_grid_ts=None):
        """3-D M-RoPE positions, as transformers' get_rope_index. Text advances all three axes by 1; a vision
        run of t*h*w/4 tokens gets (start + t*interval, start + row, start + col), interval = tokens_per_second *
        seconds-per-grid for videos (1 for images), and the text after it starts at start + max(h, w)/2.
        Padding gets 0. Returns (positions [3, B, L] long, next_position [B]: what a text token after the last real
        one gets, where decoding continues, as transformers' generate does; not the max position + 1, which a
        video's scaled temporal positions can exceed: a 20 s clip of 4 frames reaches t = 19 over 3 merged tokens)."""
        B, L = input_ids.shape
        dev = input_ids.device
        m = self.vs["spatial_merge_size"]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = torch.zeros(3, B, L, dtype=torch.long, device=dev)
        grids = {self.video_token_id: iter([] if video_grid_thw is None else torch.as_tensor(video_grid_thw).tolist()),
                 self.image_token_id: iter([] if image_grid_thw is None else torch.as_tensor(image_grid_thw).tolist())}
        if second_per_grid_ts is not None:
            second_per_grid_ts = torch.as_tensor(second_per_grid_ts).flatten().cpu()
        n_video = 0
        next_pos = torch.zeros(B, dtype=torch.long, device=dev)
        ids_cpu, real_cpu = input_ids.cpu(), real.cpu()
        for b in range(B):
            ids = ids_cpu[b][real_cpu[b]]
            kind = torch.where((ids == self.video_token_id) | (ids == self.image_token_id), ids, -1)
            bounds = [0] + (torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1).tolist() + [len(ids)]
            parts, cur = [], 0
            for s, e in zip(bounds[:-1], bounds[1:]):
                tok = int(kind[s])
                if tok == -1:  # text
                    parts.append(torch.arange(cur, cur + e - s).expand(3, -1))
                    cur += e - s
                    continue
                name = "video" if tok == self.video_token_id else "image"
                try:
                    grid = next(grids[tok])
                except StopIteration:
                    raise ValueError(f"input_ids hold more {name} placeholder runs than {name}_grid_thw "
                                     "rows") from None
                t, hm, wm = merged_grid([grid], m)[0].tolist()
                if e - s != t * hm * wm:
                    raise ValueError(f"{name} placeholder run of {e - s} tokens does not match grid {grid} "
                                     f"({t * hm * wm} merged tokens)")
                if tok == self.video_token_id:  # same arithmetic (and dtype) as the reference
                    sec = 1 if second_per_grid_ts is None else second_per_grid_ts[n_video]
                    interval = self.vs["tokens_per_second"] * sec
                    n_video += 1
                else:
                    interval = 1
                tt = (torch.arange(t) * interval).long() + cur
                hh, ww = torch.arange(hm) + cur, torch.arange(wm) + cur
                tt, hh, ww = torch.meshgrid(tt, hh, ww, indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1))
                cur += max(hm, wm)
            p = torch.cat(parts, 1) if parts else torch.zeros(3, 0, dtype=torch.long)
            pos[:, b, real[b]] = p.to(dev)
            next_pos[b] = cur
        return pos, next_pos

    def mrope(self, pos, dtype):
        """cos, sin_signed [B, 1, L, hd] from 3-D positions [3, B, L]: the rotary frequency bands are split into
        mrope_section chunks that take the temporal, height and width position in turn."""
        hd = self.ts["hidden_size"] // self.ts["num_attention_heads"]
        freqs = pos[..., None].float() * inv_freq(hd, self.ts["rope_theta"], pos.device)  # [3, B, L, hd/2]
        chunks = freqs.split(self.ts["mrope_section"], dim=-1)
        freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], -1)  # [B, L, hd/2]
        return rope_tables(freqs[:, None], dtype)

    # --- keep-mask (token compression) ---------------------------------------

    @staticmethod
    def _compact(keep, left):
        """Move the kept tokens of each row together (order preserved), padded on the left or right to the
        longest row. Pad slots point at dropped or padding positions. -> index [B, L'], new mask [B, L'] bool."""
        B, L = keep.shape
        n = int(keep.sum(1).max())
        if n == 0:
            raise ValueError("keep-mask leaves no token in any row")
        ar = torch.arange(L, device=keep.device)
        if left:
            index = (keep.long() * L + ar).argsort(1)[:, L - n:]
        else:
            index = ((~keep).long() * L + ar).argsort(1)[:, :n]
        return index, keep.gather(1, index)

    def keep_index(self, input_ids, attention_mask, video_keep_mask, padding_side=None):
        """The compaction the forward applies for a video keep-mask (bool over the batch's merged video tokens,
        in placeholder order): index [B, L'] into the original sequence and the new attention mask [B, L']
        (same dtype as attention_mask; long when it is None). Padding side follows the input (left if any row
        starts with padding) unless given. Use `labels.gather(1, index)` to line labels up with the outputs."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        keep = real.clone()
        is_video = input_ids == self.video_token_id
        if video_keep_mask is not None:
            video_keep_mask = video_keep_mask.to(device=input_ids.device, dtype=torch.bool).flatten()
            if video_keep_mask.numel() != int(is_video.sum()):
                raise ValueError(f"video_keep_mask has {video_keep_mask.numel()} entries but input_ids hold "
                                 f"{int(is_video.sum())} video placeholders")
            keep[is_video] = keep[is_video] & video_keep_mask
        if padding_side is None:
            padding_side = "left" if attention_mask is not None and not bool(real[:, 0].all()) else "right"
        index, new_mask = self._compact(keep, padding_side == "left")
        return index, new_mask.to(torch.long if attention_mask is None else attention_mask.dtype)

    # --- forward --------------------------------------------------------------

    def _prepare(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw, second_per_grid_ts,
                 pixel_values, image_grid_thw, video_embeds, video_keep_mask, padding_side=None, return_index=False):
        """Token + vision embeddings, 3-D positions, optional compaction. -> x [B, L', D], pos [3, B, L'],
        attention mask [B, L'] bool (or None when nothing is padded), next position [B] (and the compaction index
        [B, L'] into the input, or None, with return_index)."""
        x = self.embed_tokens(input_ids)  # [B, L, D]
        for kind, ids, pixels, grid, embeds, enc in (
                ("video", self.video_token_id, pixel_values_videos, video_grid_thw, video_embeds, self.encode_video),
                ("image", self.image_token_id, pixel_values, image_grid_thw, None, self.encode_image)):
            where = input_ids == ids  # [B, L]
            if embeds is None and pixels is not None:
                if grid is None:
                    raise ValueError(f"{kind} pixels given without {kind}_grid_thw")
                embeds = enc(pixels, grid)
            if embeds is None:
                if bool(where.any()):
                    raise ValueError(f"input_ids hold {int(where.sum())} {kind} placeholders but no {kind} was given")
                continue
            if embeds.shape[0] != int(where.sum()):
                raise ValueError(f"{kind} tokens ({embeds.shape[0]}) and {kind} placeholders in input_ids "
                                 f"({int(where.sum())}) do not match")
            x = x.masked_scatter(where[..., None], embeds.to(x.dtype))
        pos, next_pos = self.rope_index(input_ids, attention_mask, video_grid_thw, image_grid_thw,
                                        second_per_grid_ts)
        real = None if attention_mask is None else attention_mask.bool()
        index = None
        if video_keep_mask is not None or padding_side is not None:
            index, real = self.keep_index(input_ids, real, video_keep_mask, padding_side)
            real = real.bool()
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            pos = pos.gather(2, index[None].expand(3, -1, -1))
        if real is not None and bool(real.all()):
            real = None
        return (x, pos, real, next_pos, index) if return_index else (x, pos, real, next_pos)

    def _layers(self, x, cos, sin, mask, cache=None):
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if ckpt:
                x = checkpoint(layer, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len += x.shape[1]
        return x

    @staticmethod
    def _prefill_mask(real):
        """Causal mask with key padding, [B, 1, L, L] bool; padded queries see themselves (no empty rows)."""
        if real is None:
            return None
        L = real.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=real.device).tril()
        return (causal & real[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=real.device)

    def forward(self, input_ids, attention_mask=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None, pixel_values=None, image_grid_thw=None, video_embeds=None,
                video_keep_mask=None, return_hidden=False, labels=None, temperature=1.0, return_entropy=False,
                logprobs_backend="auto", packed=True):
        """-> logits [B, L, V] (or final hidden states [B, L, D] with return_hidden). With video_keep_mask the
        sequence is compacted to [B, L', ...] (see keep_index).

        With labels [B, L] (aligned with input_ids, -100 = not scored): the log-prob of each label under
        softmax(logits / temperature) at the position before it, through kernels.logprobs.token_logprobs (only
        the scored positions reach the LM head, never as an [N, V] tensor). -> logp [n] fp32 in row-major order
        of the scored labels (and entropy [n] with return_entropy). Compaction by the keep-mask is applied to
        the labels too; a label on a dropped video token is an error. With labels and padding, `packed` (default)
        lays the rows' real tokens end to end and attends within each (Packed): no layer computes a padding token;
        the same log-probs as the padded batch. A row's first real token has no position before it in its row, so
        a label there is not scored (the padded batch would score it from a padding position)."""
        x, pos, real, _, index = self._prepare(input_ids, attention_mask, pixel_values_videos, video_grid_thw,
                                               second_per_grid_ts, pixel_values, image_grid_thw, video_embeds,
                                               video_keep_mask, return_index=True)
        if labels is not None and real is not None and packed:
            return self._packed_logprobs(x, pos, real, labels if index is None else labels.gather(1, index),
                                         labels, temperature, return_entropy, logprobs_backend)
        cos, sin = self.mrope(pos, x.dtype)
        h = self.norm(self._layers(x, cos, sin, self._prefill_mask(real)))  # [B, L', D]
        if labels is None:
            return h if return_hidden else self.lm_head(h)
        if index is not None:  # dropped video tokens left the sequence: line the labels up with the output
            if int((labels != -100).sum()) != int((labels.gather(1, index) != -100).sum()):
                raise ValueError("labels fall on video tokens that the keep-mask drops")
            labels = labels.gather(1, index)
        targets = labels[:, 1:]  # [B, L'-1]: position k predicts label k+1
        sel = targets != -100
        return token_logprobs(h[:, :-1][sel], self.lm_head.weight, targets[sel], temperature=temperature,
                              return_entropy=return_entropy, backend=logprobs_backend)

    def _packed_logprobs(self, x, pos, real, labels, given, temperature, return_entropy, backend):
        """forward's labels path on the real tokens only. x [B, L, D], pos [3, B, L], real [B, L] (each row's real
        tokens contiguous: left / right padding, or keep_index's compaction), labels [B, L] lined up with x."""
        if int((given != -100).sum()) != int((labels != -100).sum()):
            raise ValueError("labels fall on video tokens that the keep-mask drops")
        flat = real.flatten().nonzero()[:, 0]  # [N] real positions, row-major
        lengths = real.sum(1)  # [B]
        h = self.norm(self._layers(x.flatten(0, 1)[flat][None], *self.mrope(pos.flatten(1, 2)[:, flat][:, None],
                                                                            x.dtype), Packed(lengths)))[0]  # [N, D]
        targets = labels.flatten()[flat][1:].clone()  # [N-1]: token j predicts label j+1 ...
        ends = (lengths.cumsum(0) - 1)[:-1]
        targets[ends[ends >= 0]] = -100  # ... within its own row (a row's last token never predicts the next's first)
        sel = targets != -100
        return token_logprobs(h[:-1][sel], self.lm_head.weight, targets[sel], temperature=temperature,
                              return_entropy=return_entropy, backend=backend)

    def group_logprobs(self, prompt_ids, prompt_mask, completions, lengths, G, video_embeds=None, video_grid_thw=None,
                       second_per_grid_ts=None, video_keep_mask=None, temperature=1.0, return_entropy=False,
                       logprobs_backend="auto"):
        """GRPO's scoring with each prompt computed once per group (SharedPrefix): prompts [B, Lp] (padded, video
        placeholders; video_embeds [n_vid, D] once per prompt, keep-mask likewise), completions [B*G, Tc] (row
        b*G + j samples j of prompt b), lengths [B*G] its scored tokens. Completion positions continue from the
        prompt's next text position on all three M-RoPE axes, as in generation. -> log-probs [n] (and entropy [n])
        of completions[r, t] for t < lengths[r], row-major: the values forward(labels=...) gives on the per-row
        batch [prompt; completion]. Token t is predicted from token t - 1 of its completion, token 0 from the
        prompt's last token: only the first lengths - 1 completion tokens are fed."""
        x, pos, real, next_pos = self._prepare(prompt_ids, prompt_mask, None, video_grid_thw, second_per_grid_ts,
                                               None, None, video_embeds, video_keep_mask)  # [B, L', D], [3, B, L']
        B, L = x.shape[:2]
        real = torch.ones(B, L, dtype=torch.bool, device=x.device) if real is None else real
        plens = real.sum(1)  # [B]
        fed = (lengths - 1).clamp(min=0)  # [B*G] completion tokens fed
        comp = self.embed_tokens(completions)  # [B*G, Tc, D]
        Tc = completions.shape[1]
        feed = torch.arange(Tc, device=x.device)[None] < fed[:, None]  # [B*G, Tc]
        # the layout, group by group: prompt b's real tokens, then its completions' fed tokens
        p_flat = real.flatten().nonzero()[:, 0]  # [sum P] positions in [B * L']
        c_flat = feed.flatten().nonzero()[:, 0]  # [sum fed] positions in [B*G * Tc]
        p_off = F.pad(plens.cumsum(0), (1, 0)).tolist()
        c_off = F.pad(fed.cumsum(0), (1, 0)).tolist()
        n_p = p_off[-1]
        order, where_last, where_comp = [], [], []  # -> index into cat([prompt tokens, completion tokens])
        at = 0
        for b in range(B):
            P = p_off[b + 1] - p_off[b]
            order.append(torch.arange(p_off[b], p_off[b + 1]))
            where_last.append(at + P - 1)  # the prompt's last token: predicts every completion's token 0
            at += P
            for j in range(b * G, (b + 1) * G):
                n = c_off[j + 1] - c_off[j]
                order.append(torch.arange(n_p + c_off[j], n_p + c_off[j + 1]))
                where_comp.append(at)
                at += n
        order = torch.cat(order).to(x.device)
        h = torch.cat([x.flatten(0, 1)[p_flat], comp.flatten(0, 1)[c_flat]])[order][None]  # [1, N, D]
        c_pos = next_pos.repeat_interleave(G)[:, None] + torch.arange(Tc, device=x.device)  # [B*G, Tc]
        pos = torch.cat([pos.flatten(1, 2)[:, p_flat], c_pos.flatten()[c_flat].expand(3, -1)], 1)[:, order]
        layout = SharedPrefix(plens, fed, G, x.device)
        h = self.norm(self._layers(h, *self.mrope(pos[:, None], h.dtype), layout))[0]  # [N, D]
        # the hidden state that predicts completions[r, t]: the prompt's last token for t = 0, else fed token t - 1
        last = torch.tensor(where_last, device=x.device).repeat_interleave(G)  # [B*G]
        first = torch.tensor(where_comp, device=x.device)  # [B*G] where each completion's fed tokens start
        t = torch.arange(Tc, device=x.device)[None]
        src = torch.where(t == 0, last[:, None], first[:, None] + t - 1)  # [B*G, Tc]
        scored = t < lengths[:, None]
        return token_logprobs(h[src[scored]], self.lm_head.weight, completions[scored], temperature=temperature,
                              return_entropy=return_entropy, backend=logprobs_backend)

    # --- generation -----------------------------------------------------------

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator, want_logp=True):
        """-> token [B], log-prob [B]. The log-prob is taken from the full tempered distribution
        log_softmax(logits / temperature) (plain logits when greedy), before top-k/top-p filtering, like TRL,
        so that it equals what a teacher-forced forward computes."""
        logits = logits.float()
        if temperature <= 0:
            tok = logits.argmax(-1)
        else:
            logits = logits / temperature
            probs = VidEmo.filter_logits(logits, top_k, top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if not want_logp:
            return tok, None
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]

    @staticmethod
    def filter_logits(scaled, top_k=0, top_p=1.0):
        """top-k, then top-p (nucleus) filtering of tempered logits [B, V]: removed tokens get -inf."""
        if top_k > 0:
            kth = torch.topk(scaled, min(top_k, scaled.shape[-1]), -1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if top_p < 1.0:
            srt, order = scaled.sort(-1, descending=True)
            p = srt.softmax(-1)
            drop = (p.cumsum(-1) - p) >= top_p  # keep the smallest prefix whose mass reaches top_p
            scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scaled

    def generate(self, input_ids, attention_mask=None, pixel_values_videos=None, video_grid_thw=None,
                 second_per_grid_ts=None, pixel_values=None, image_grid_thw=None, video_embeds=None,
                 video_keep_mask=None, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, eos_token_id=None,
                 pad_token_id=None, num_return_sequences=1, return_logprobs=False, generator=None, compact_every=8,
                 decode="eager", share_prompt_kv=True):
        """Batched generation with a static KV cache. Prompts may be left or right padded (they are compacted to
        left padding). The vision tower and the prefill run once per prompt; their keys/values are copied to the
        num_return_sequences completions (rows b*n .. b*n+n-1 belong to prompt b). Decode positions continue from
        each prompt's next text position (rope_index), as transformers does. temperature 0 = greedy.
        -> (new tokens [B*n, T] long, pad_token_id after EOS; log-probs [B*n, T] float (0 after EOS) or None).
        Log-probs are log_softmax(logits / temperature) at the chosen token, from the unfiltered distribution
        (top-k/top-p only decide what is sampled), like TRL: they match a teacher-forced forward.
        Every `compact_every` steps (0 = never) the rows that have finished leave the decode batch (their cache rows
        too), and only then does the loop look at the device (no host sync per token): late steps do not compute
        for dead rows. Greedy output is unchanged; sampled rows draw from the same distributions, in a different
        order of random numbers.
        decode: "eager" (keys sliced to the length so far), "static" (every step the same shapes and addresses:
        the whole cache attended under a key mask; compaction to power-of-two batch sizes, in place) or "graphs"
        (static, each step replayed from a CUDA graph: no launch overhead; CUDA only). All three give the same
        greedy tokens.
        share_prompt_kv (eager decode, n > 1): the cache holds each prompt's keys/values once per group
        (GroupKVCache; KV memory B*L + B*n*T rows instead of B*n*(L+T)); False copies them to every completion's row
        (the layout static and graphs decode always use). Both give the same tokens up to float rounding."""
        if decode not in ("eager", "static", "graphs"):
            raise ValueError(f"decode must be eager, static or graphs, got {decode!r}")
        if decode == "graphs" and input_ids.device.type != "cuda":
            raise ValueError("decode='graphs' needs CUDA (use 'static' or 'eager' on CPU)")
        with torch.inference_mode():  # cheaper per op than no_grad; the outputs are cloned back to normal tensors
            tokens, logps = self._generate(input_ids, attention_mask, pixel_values_videos, video_grid_thw,
                                           second_per_grid_ts, pixel_values, image_grid_thw, video_embeds,
                                           video_keep_mask, max_new_tokens, temperature, top_p, top_k,
                                           eos_token_id, pad_token_id, num_return_sequences, return_logprobs,
                                           generator, compact_every, decode, share_prompt_kv)
        return tokens.clone(), (logps.clone() if logps is not None else None)

    def _decode_step(self, cache, tcos, tsin, tok, r):
        """One decode step: tokens [b] at rotary rows r [b] -> logits [b, V]; writes the step's keys into cache."""
        mask = cache.step_mask()
        h = self._layers(self.embed_tokens(tok)[:, None], tcos[r][:, None, None], tsin[r][:, None, None], mask, cache)
        return self.lm_head(self.norm(h[:, 0]))

    @staticmethod
    def _bucket(n, full):
        """Static decode's batch sizes: the full batch, else the smallest power of two >= n."""
        size = 1
        while size < n:
            size *= 2
        return min(size, full)

    def _generate(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw, second_per_grid_ts,
                  pixel_values, image_grid_thw, video_embeds, video_keep_mask, max_new_tokens, temperature, top_p,
                  top_k, eos_token_id, pad_token_id, num_return_sequences, return_logprobs, generator, compact_every,
                  decode, share_prompt_kv=False):
        n, static = num_return_sequences, decode != "eager"
        eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long,
                              device=input_ids.device).flatten()
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
        x, pos, real, next_pos = self._prepare(input_ids, attention_mask, pixel_values_videos, video_grid_thw,
                                               second_per_grid_ts, pixel_values, image_grid_thw, video_embeds,
                                               video_keep_mask, padding_side="left")
        B, L, _ = x.shape
        S = L + max_new_tokens
        dev = x.device.type  # under autocast the keys / values are bf16 whatever the (fp32 master) embedding gives
        cache_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        kv_args = (self.ts["num_key_value_heads"], S, self.layers[0].self_attn.hd, cache_dtype, x.device)
        grouped = share_prompt_kv and n > 1 and not static
        if grouped:
            cache = GroupKVCache(len(self.layers), B, n, kv_args[0], L, max_new_tokens, *kv_args[2:])
        else:
            cache = KVCache(len(self.layers), B * n, *kv_args, expand=n, static=static, zero=real is not None)
        if real is None:
            h = self._layers(x, *self.mrope(pos, x.dtype), None, cache)[:, -1]  # [B, D]
        else:  # packed prefill: only the prompts' real tokens pass the layers; their keys land in their padded slots
            flat = real.flatten().nonzero()[:, 0]  # [N] positions in the left-padded [B, L] grid
            packed = Packed(real.sum(1))
            if grouped:  # (prompt row, position) of each real token
                cache.slots = flat // L, flat % L
            else:  # (completion row, position): each token once per completion
                cache.slots = ((flat // L)[:, None] * n + torch.arange(n, device=x.device)).flatten(), \
                    (flat % L).repeat_interleave(n)
            h = self._layers(x.flatten(0, 1)[flat][None], *self.mrope(pos.flatten(1, 2)[:, flat][:, None], x.dtype),
                             packed, cache)[0]  # [N, D]
            h = h[packed.cu_seqlens[1:].long() - 1]  # [B, D]: each prompt's last token
            cache.len = L
        logits = self.lm_head(self.norm(h)).repeat_interleave(n, 0)  # [B*n, V]
        if grouped:
            if real is not None:
                cache.bias = torch.zeros(B, 1, 1, L, dtype=x.dtype, device=x.device).masked_fill_(
                    ~real[:, None, None], float("-inf"))
        elif real is not None or static:  # decode attends over the prompt's real tokens + everything generated; an
            # additive float mask built once (SDPA would convert a bool mask in every layer of every step)
            cache.bias = torch.zeros(B * n, 1, 1, S, dtype=x.dtype, device=x.device)
            if real is not None:
                cache.bias[:, 0, 0, :L].masked_fill_(~real.repeat_interleave(n, 0), float("-inf"))
            if static:
                cache.bias[..., L:] = float("-inf")  # each step opens its own position
                cache.at.fill_(L)
        # decode rotary table over every position a step can reach (text tokens: same position on all three
        # axes); each step then only looks rows up
        base = int(next_pos.min())
        span = int(next_pos.max()) - base + max_new_tokens
        freq = inv_freq(self.layers[0].self_attn.hd, self.ts["rope_theta"], x.device)
        tcos, tsin = rope_tables(torch.arange(base, base + span, device=x.device).float()[:, None] * freq, x.dtype)
        step = functools.partial(self._decode_step, cache, tcos, tsin)
        if decode == "graphs":
            step = DecodeGraphs(step, B * n, x.device)
        rows = next_pos.repeat_interleave(n) - base  # [B*n]
        tokens = torch.full((B * n, max_new_tokens), pad_token_id, dtype=torch.long, device=x.device)
        logps = torch.zeros(B * n, max_new_tokens, device=x.device) if return_logprobs else None
        done = torch.zeros(B * n, dtype=torch.bool, device=x.device)  # of the rows still in the batch
        alive = torch.arange(B * n, device=x.device)  # [b] which output row each decode row is
        last = torch.full((B * n,), max_new_tokens - 1, device=x.device)  # the step of each row's stop token
        T = 0
        for t in range(max_new_tokens):
            tok, lp = self._sample(logits, temperature, top_k, top_p, generator, return_logprobs)
            if eos.numel():
                tok = tok.masked_fill(done, pad_token_id)
            tokens[alive, t] = tok
            if return_logprobs:
                logps[alive, t] = lp.masked_fill(done, 0.0)
            T = t + 1
            if eos.numel():
                stop = torch.isin(tok, eos) & ~done
                last[alive] = torch.where(stop, t, last[alive])
                done |= stop
                if compact_every <= 0 or (t + 1) % compact_every == 0 or t == max_new_tokens - 1:
                    live = (~done).nonzero()[:, 0]  # the one host sync, every compact_every steps
                    if live.numel() == 0:
                        break
                    size = self._bucket(live.numel(), done.numel()) if static else live.numel()
                    if compact_every > 0 and size < done.numel():  # finished rows leave the batch
                        # static: a power-of-two batch, topped up with finished rows (they write only padding)
                        keep = torch.cat([live, done.nonzero()[:size - live.numel(), 0]])
                        alive, done, rows, tok = alive[keep], done[keep], rows[keep], tok[keep]
                        cache.keep(keep)
            if t == max_new_tokens - 1:
                break
            logits = step(tok, rows + t)
            if static:
                cache.at += 1
        if eos.numel():  # the batch ends with its last row to stop (a compaction step may come later)
            T = min(T, int(last.max()) + 1)
        return tokens[:, :T], (logps[:, :T] if return_logprobs else None)

    # --- checkpoints ----------------------------------------------------------

    @staticmethod
    def _internal_name(key):
        """HF checkpoint key (transformers-4 or -5 naming) -> our parameter name, or None if unknown."""
        for prefix, new in (("model.visual.", "visual."), ("model.language_model.", ""), ("visual.", "visual."),
                            ("model.", ""), ("lm_head.", "lm_head.")):
            if key.startswith(prefix):
                return new + key[len(prefix):]
        return None

    @staticmethod
    def _hf_name(name):  # ours -> the Hub's (transformers-4) naming, which every transformers version loads
        return name if name.startswith(("visual.", "lm_head.")) else "model." + name

    # What a checkpoint holds beside config.json and the weights, for the stacks that read them (transformers'
    # AutoProcessor / AutoImageProcessor / GenerationConfig, vLLM, SGLang). Loaded from a directory that has them,
    # they are carried over byte for byte; otherwise save_pretrained writes ours (hf_preprocessor_config, ...).
    SIDE_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json")
    # data.py's preprocessing, which model.py cannot import (data -> model): OpenAI CLIP mean/std as Qwen uses,
    # x / 255 then normalised, and data.VIDEO_DEFAULTS' pixel budget. tests/test_checkpoint_files.py checks these
    # equal data.CLIP_MEAN / CLIP_STD / VIDEO_DEFAULTS and that transformers' processor reproduces our patches.
    IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
    IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
    MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 128 * 28 * 28

    def hf_preprocessor_config(self):
        """preprocessor_config.json in the Qwen2-VL image-processor format (read by transformers 4 and 5)."""
        vs = self.vs
        return {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_convert_rgb": True, "do_resize": True, "resample": 3,  # PIL bicubic, as data.load_image
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(self.IMAGE_MEAN), "image_std": list(self.IMAGE_STD),
            "min_pixels": self.MIN_PIXELS, "max_pixels": self.MAX_PIXELS,
            "size": {"shortest_edge": self.MIN_PIXELS, "longest_edge": self.MAX_PIXELS},
            "patch_size": vs["patch_size"], "temporal_patch_size": vs["temporal_patch_size"],
            "merge_size": vs["spatial_merge_size"],
        }

    def hf_generation_config(self):
        """generation_config.json: bos / pad / eos ids from config.json (top level or text_config). Generation stops
        on <|im_end|> (config eos_token_id) and on <|endoftext|> (Qwen's bos_token_id, also its pad), as Qwen's own."""
        text = self.config.get("text_config") or {}
        get = lambda k: self.config.get(k, text.get(k))  # noqa: E731
        bos, pad, eos = get("bos_token_id"), get("pad_token_id"), get("eos_token_id")
        endoftext = pad if pad is not None else bos
        eos_ids = []
        for i in (eos if isinstance(eos, list) else [eos]) + [endoftext]:
            if isinstance(i, int) and i not in eos_ids:
                eos_ids.append(i)
        out = {"bos_token_id": bos, "pad_token_id": endoftext,
               "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0]}
        return {k: v for k, v in out.items() if v is not None and v != []}

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a Hugging Face Qwen2.5-VL directory (config.json + model.safetensors, or shards + index).
        Every tensor is checked (known key, right shape, none missing) before the model is returned. The directory's
        SIDE_FILES (preprocessor / generation configs) are remembered in `model.hf_files`, and save_pretrained
        writes them back unchanged."""
        from safetensors import safe_open
        path = str(path)  # a local directory: common.resolve_checkpoint turns a Hub id into one
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a checkpoint directory")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file) and os.path.isfile(os.path.join(path, "adapter_config.json")):
            import lora  # LoRA adapters alone (lora_save=adapter, or peft's): their base, the adapters merged in
            model = cls.from_pretrained(lora.resolve_base(path), device=device)
            stored = model.embed_tokens.weight.dtype
            lora.merge_(lora.load_adapter(model.float(), path))
            return model.to(dtype or stored)
        if not os.path.isfile(cfg_file):
            raise CheckpointFileMissing(f"{cfg_file}: missing (a Qwen2.5-VL checkpoint directory needs config.json)")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not a valid config ({e})") from None
        check_hf_config(config, cfg_file)
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            if bad := [fn for fn in files if os.path.basename(fn) != fn or fn in ("", ".", "..")]:
                raise CheckpointError(f"{index_file}: shard {bad[0]!r} is not a file name in the checkpoint directory")
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointFileMissing(f"{path}: no model.safetensors or model.safetensors.index.json "
                                        "(pickled .bin checkpoints are not read)")
        for fn in files:
            if not os.path.isfile(os.path.join(path, fn)):
                raise CheckpointFileMissing(f"{os.path.join(path, fn)}: shard listed in the index is missing")
        # headers first (cheap): truncated files, and a config.json that does not describe these weights
        shapes = {}
        for fn in files:
            for key, (_, shape) in safetensors_header(os.path.join(path, fn)).items():
                if (name := cls._internal_name(key)) is not None:
                    shapes[name] = (shape, os.path.join(path, fn))
        check_widths(config, shapes, cfg_file)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            if name is not None and name != "auto" and not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{cfg_file}: torch_dtype {name!r} is not a torch dtype (float32, bfloat16, ...)")
            dtype = dtype if isinstance(dtype, torch.dtype) else None

        try:
            with torch.device("meta"):
                model = cls(config)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{cfg_file}: {type(e).__name__}: {e}") from None
        tied = model.ts["tie_word_embeddings"]
        expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        state = {}
        for fn in files:
            full = os.path.join(path, fn)
            try:
                with safe_open(full, framework="pt", device=str(device or "cpu")) as f:
                    keys = list(f.keys())
                    for key in keys:
                        name = cls._internal_name(key)
                        if name == "lm_head.weight" and tied:
                            continue  # tied: the head is the embedding
                        if name not in expected:
                            raise CheckpointError(f"{full}: unknown tensor '{key}' for this config")
                        shape = tuple(f.get_slice(key).get_shape())
                        if shape != tuple(expected[name]):
                            raise CheckpointError(f"{full}: tensor '{key}' has shape {list(shape)}, the config "
                                             f"expects {list(expected[name])}")
                        if name in state:
                            raise CheckpointError(f"{full}: tensor '{key}' appears twice in the checkpoint")
                        t = f.get_tensor(key)
                        if not t.is_floating_point():
                            raise CheckpointError(f"{full}: tensor '{key}' is {str(t.dtype).removeprefix('torch.')}, "
                                                  "not floating point (a quantized or foreign checkpoint?)")
                        if not bool(torch.isfinite(t).all()):  # a diverged or corrupt export: caught here, not in eval
                            n_bad = int((~torch.isfinite(t)).sum())
                            raise CheckpointError(f"{full}: tensor '{key}' holds {n_bad} NaN/inf value(s)")
                        if t.is_floating_point():
                            dtype = dtype or t.dtype  # no dtype asked for or in config.json: as stored
                            t = t.to(dtype)
                        state[name] = t
                    if weight_map is not None:
                        for key, wf in weight_map.items():
                            if wf == fn and key not in keys:
                                raise CheckpointError(f"{full}: tensor '{key}' listed in the index is not in the shard")
            except (ValueError, FileNotFoundError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # safetensors raises its own error types for unreadable files
                raise CheckpointError(f"{full}: cannot read safetensors ({type(e).__name__}: {e})") from None
        missing = sorted(set(expected) - set(state))
        if missing:
            shown = ", ".join(cls._hf_name(k) for k in missing[:5])
            raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {shown}"
                             f"{' ...' if len(missing) > 5 else ''}")
        if tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:  # assign replaced the parameter objects: re-tie
            model.lm_head.weight = model.embed_tokens.weight
        model.hf_files = {}
        for fn in cls.SIDE_FILES:
            full = os.path.join(path, fn)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    model.hf_files[fn] = f.read()
        return model.eval()

    def save_pretrained(self, path, max_shard_size=4 * 2 ** 30, dtype=None, state_dict=None):
        """Write config.json + safetensors (sharded with an index when larger than max_shard_size bytes) in
        the Hub layout that transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained reads. dtype: the
        floating-point dtype to store (default: as the weights are). state_dict: write these tensors (our names)
        instead of the module's own: a gathered FSDP state, or LoRA adapters merged into the base."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        for fn in os.listdir(path):  # stale weights from an earlier save would shadow the new ones
            if fn == "model.safetensors" or fn == "model.safetensors.index.json" or \
                    (fn.startswith("model-") and fn.endswith(".safetensors")):
                os.remove(os.path.join(path, fn))
        tied = self.ts["tie_word_embeddings"]
        sd = self.state_dict() if state_dict is None else state_dict
        tensors = {self._hf_name(k): v.detach().cpu().contiguous() for k, v in sd.items()
                   if not (tied and k == "lm_head.weight")}
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        config = dict(self.config)
        config.setdefault("model_type", "qwen2_5_vl")
        config.setdefault("architectures", ["Qwen2_5_VLForConditionalGeneration"])
        dname = str(dtype or sd["embed_tokens.weight"].dtype).removeprefix("torch.")
        present = [k for k in ("dtype", "torch_dtype") if k in config]
        for key in present or ["torch_dtype"]:
            config[key] = dname
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        side = dict(getattr(self, "hf_files", None) or {})  # as loaded, else ours
        if "preprocessor_config.json" not in side:
            side["preprocessor_config.json"] = json.dumps(self.hf_preprocessor_config(), indent=2).encode()
        if "generation_config.json" not in side:
            side["generation_config.json"] = json.dumps(self.hf_generation_config(), indent=2).encode()
        for fn, content in side.items():
            with open(os.path.join(path, fn), "wb") as f:
                f.write(content)
        shards, size = [{}], 0
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
