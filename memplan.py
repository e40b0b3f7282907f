"""Memory plan: what one GPU holds for each training recipe (full fine-tuning under DDP or FSDP2, LoRA), SFT and RL,
derived from the network as model.py writes it, and the measurements on CPU that check the formulas (bench.py's memory
section prints both; tests/test_memplan.py asserts the plan is within 20 % of the measurement).

    config = load_config("qwen2.5-vl-7b")                     # a built-in shape, an HF dir or a config.json path
    parts = plan(config, Recipe("full", "fsdp2", world=8), Workload("rl", frames=8, height=448, width=448, ...))
    -> {"params": bytes, "grads": ..., "optim": ..., "act": ..., "act_ckpt": ..., "kv": ..., "scorer": ...,
        "ref": ..., "rollout_copy": ..., "buffers": ..., "total": ...}

Conventions (the trainers' semantics; on CUDA compute is bf16 under autocast, on CPU everything is fp32):
- full fine-tuning: fp32 master weights (4 B/param), fp32 grads (4 B), AdamW's two fp32 moments (8 B).
- LoRA: frozen base in bf16 (2 B/param); per targeted nn.Linear(in, out) fp32 lora_A [r, in] + lora_B [out, r] with
  grads and AdamW; the RL reference is the base with the adapters off (no second model).
- activations: the tensors autograd saves for backward in one micro-batch, counted tensor by tensor from model.py's
  forward (see _decoder_layer / _vision_block); with checkpointing each block keeps only its input, plus one block's
  full set while it is recomputed in backward.
- total = persistent state (params, grads, optimizer, reference, buffers) + the larger of the two phases that never
  overlap: the rollout (KV cache + FSDP2's unsharded policy for generation) and the update (activations with
  checkpointing as `ckpt` says + the scorer's chunk).
- buffers: DDP's gradient buckets (world > 1), autocast's bf16 weight cache (DDP), FSDP2's unsharded units.
Meta-device models give exact parameter counts without reading any weights.
"""

import json
import os
from dataclasses import dataclass

import torch

import lora
import model as M
from kernels import logprobs as LP

GiB = 2 ** 30

# ----------------------------------------------------------------------------------------------------------------------
# configs: the two built-in Qwen2.5-VL shapes, or a checkpoint's config.json

_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
           "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
           "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
BUILTIN = {
    "qwen2.5-vl-3b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                      "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-vl-7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                      "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
}


def builtin_config(name):
    """The config dict (transformers-4 layout) of a built-in shape: 'qwen2.5-vl-3b' or 'qwen2.5-vl-7b'."""
    t = BUILTIN[name]
    return dict(t, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_act="silu",
                rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653, eos_token_id=151645, bos_token_id=151643, max_position_embeddings=128000,
                vision_config=dict(_VISION, out_hidden_size=t["hidden_size"]))


def load_config(src):
    """A built-in shape name, an HF checkpoint dir (its config.json) or a config.json path -> config dict."""
    if src in BUILTIN:
        return builtin_config(src)
    path = os.path.join(src, "config.json") if os.path.isdir(src) else src
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{src}: not a built-in shape ({', '.join(BUILTIN)}), a checkpoint dir with "
                                f"config.json or a config.json file")
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def meta_model(config):
    """VidEmo on the meta device: shapes only, no memory, no weights read."""
    with torch.device("meta"):
        return M.VidEmo(config)

# ----------------------------------------------------------------------------------------------------------------------
# parameters


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_linears(model, targets=DEFAULT_TARGETS):
    """The nn.Linear modules LoRA adapts: a decoder linear whose last name is in targets; an entry 'visual.<name>'
    targets the vision tower's linears of that name (e.g. 'visual.qkv', 'visual.proj')."""
    dec = {t for t in targets if not t.startswith("visual.")}
    vis = {t[len("visual."):] for t in targets if t.startswith("visual.")}
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        last = name.rsplit(".", 1)[-1]
        if (name.startswith("visual.") and last in vis) or (name.startswith("layers.") and last in dec):
            out.append((name, mod))
    return out


def param_counts(model, lora_rank=16, lora_targets=DEFAULT_TARGETS):
    """Exact counts (a tied weight once): total, vision tower (incl. merger), LLM, LoRA adapter params, largest
    decoder block, the FSDP2 root unit (embeddings, final norm, head) and how many targeted linears."""
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters())
    block = max(sum(p.numel() for p in blk.parameters()) for blk in model.layers)
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("visual.", "layers.")))
    lins = lora_linears(model, lora_targets)
    lora = sum(lora_rank * (m.in_features + m.out_features) for _, m in lins)  # lora_A [r, in] + lora_B [out, r]
    head = model.lm_head.weight.numel()
    return dict(total=total, vision=vision, llm=total - vision, lora=lora, block=block, root=root, head=head,
                n_lora=len(lins), lora_out=sum(m.out_features for _, m in lins))

# ----------------------------------------------------------------------------------------------------------------------
# sequence shapes


def video_shape(config, frames, height, width):
    """-> (grid (t, h, w) in patches, vision patches, merged video tokens) of one video of frames x height x width
    (sides rounded to multiples of patch * merge = 28 as Qwen's smart-resize does)."""
    vs = M.vision_settings(config)
    unit = vs["patch_size"] * vs["spatial_merge_size"]
    h = max(1, round(height / unit)) * vs["spatial_merge_size"]
    w = max(1, round(width / unit)) * vs["spatial_merge_size"]
    t = max(1, frames // vs["temporal_patch_size"])
    patches = t * h * w
    return (t, h, w), patches, patches // vs["spatial_merge_size"] ** 2


@dataclass
class Workload:
    """One micro-batch. SFT: `batch` samples of [video + text + completion], completion tokens scored. RL: `prompts`
    prompts per rank x G completions in one update micro-batch; the rollout generates `completion` tokens."""
    stage: str = "sft"  # sft | rl
    frames: int = 8
    height: int = 448
    width: int = 448
    text: int = 200  # prompt text tokens (incl. the chat template)
    completion: int = 256  # generated / supervised tokens
    batch: int = 1  # SFT micro-batch (samples)
    prompts: int = 2  # RL prompts per rank
    G: int = 8  # RL completions per prompt
    beta: float = 0.04  # RL KL coefficient: > 0 keeps a frozen reference (full fine-tuning)
    ckpt: bool = True  # activation checkpointing for the total
    entropy: bool = True  # RL scores entropies in the update (train_rl: with_entropy on the first pass)
    padded: bool = False  # SFT: rows padded to the longest (an attention mask); RL rows always are
    shared_prefix: bool = True  # RL: each group is its prompt once + G completions (train_rl's shared_prefix)


@dataclass
class Recipe:
    method: str = "full"  # full | lora
    parallel: str = "ddp"  # ddp | fsdp2
    world: int = 1
    lora_rank: int = 16
    lora_targets: tuple = DEFAULT_TARGETS


def _seq(config, w):
    """-> rows, tokens per row, vision patches with grad, scored tokens, padded (attention mask present)."""
    _, patches, vid = video_shape(config, w.frames, w.height, w.width)
    L = vid + 2 + w.text + w.completion  # <|vision_start|> video <|vision_end|> text completion
    if w.stage == "sft":
        # planned rows are all the same length: no padding, no mask (a padded batch adds a [B, 1, L, L] mask per layer)
        return w.batch, L, w.batch * patches, w.batch * w.completion, w.padded
    # RL update: the vision tower re-encodes each prompt's video once (train_vision). shared_prefix: one packed
    # segment per group, [prompt; G completions]; else prompts x G rows [prompt; completion]. Scored: the completions
    if w.shared_prefix:
        return w.prompts, L + (w.G - 1) * w.completion, w.prompts * patches, w.prompts * w.G * w.completion, True
    return w.prompts * w.G, L, w.prompts * patches, w.prompts * w.G * w.completion, True

# ----------------------------------------------------------------------------------------------------------------------
# activations: bytes autograd saves per block, tensor by tensor (cuda = bf16 autocast, else fp32)
#
# CPU fp32 (measured; F.rms_norm saves its input x, rstd [N] and x_hat [N, D]; the linear after it saves its input):
#   decoder layer: norm1 3ND+N | SDPA q ND, k, v N*kvd each, out ND (o_proj's input is a view of it), lse N*H
#                  | norm2 3ND+N | SwiGLU gate, silu(gate), up, product: 4NI     (+ a float mask [B, 1, L, L] if padded)
# CUDA autocast (bf16 matmuls, fp32 master weights): the residual stream is fp32 (the embedding is fp32 and
# fp32 + bf16 promotes), so each norm saves fp32 x and x_hat; every linear casts its input to bf16 itself (autocast
# caches only weight casts), so q/k/v save three bf16 copies and gate/up two; rope turns q, k fp32 (cos is fp32) and
# SDPA saves their bf16 casts; a padded batch with GQA repeats k, v to all heads (CUDA's masked kernels lack GQA) and
# converts the bool mask to a bf16 bias per layer. These CUDA figures are derived, not measured (no GPU here).


def _decoder_layer(ts, N, rows, L, masked, cuda, packed=False):
    D, I = ts["hidden_size"], ts["intermediate_size"]
    H, kv = ts["num_attention_heads"], ts["num_key_value_heads"]
    kvd = D // H * kv
    if not cuda:
        b = 4 * (3 * N * D + N) * 2  # two norms
        # SDPA: q, out, k, v, lse. Packed rows of several lengths (CPU: one SDPA call per length) repeat GQA's k, v
        # to all heads, and o_proj saves the outputs put back in order (a copy, not a view of SDPA's output)
        b += 4 * (2 * N * D + 2 * N * (D if packed and kv != H else kvd) + N * H) + (4 * N * D if packed else 0)
        b += 4 * 4 * N * I  # SwiGLU
        b += 4 * rows * L * L if masked else 0  # SDPA's float copy of the bool mask
        return b
    b = (4 * 2 * N * D + 4 * N) * 2  # two norms: fp32 x, x_hat, rstd
    b += 2 * N * D * (3 + 2)  # bf16 input casts: q, k, v and gate, up
    b += 2 * N * D * 2 + 4 * N * H  # SDPA: q, out bf16, lse fp32
    b += 2 * 2 * N * (D if masked and kv != H else kvd)  # k, v bf16 (flash-attn's varlen kernel takes GQA as is)
    b += 2 * rows * L * L if masked else 0  # the bias SDPA makes of the bool mask
    b += 2 * 4 * N * I  # SwiGLU, bf16
    return b


def _vision_block(vs, N, equal, cuda):
    """One ViT block over N patches. equal: its attention segments all have one length (one batched SDPA over views
    of the qkv output, which keeps that whole [N, 3d] storage alive through v); otherwise q, k, v are gathered into
    groups and the output gathered back (copies)."""
    d, I, h = vs["hidden_size"], vs["intermediate_size"], vs["num_heads"]
    if not cuda:
        attn = (2 * N * d + 3 * N * d) if equal else (3 * N * d + N * d)  # q, k + qkv storage | q, k, v groups + y
        return 4 * ((3 * N * d + N) * 2 + attn + N * d + N * h + 4 * N * I)  # + SDPA out, lse
    # bf16 residual (patch_embed's output is bf16): the norm saves fp32 x.float(), rsqrt, the bf16 x_hat; the
    # weight multiply promotes to fp32, so the next linear saves a bf16 cast (one for qkv, two for gate/up)
    norms = (4 * N * d + 4 * N + 2 * N * d) * 2 + 2 * N * d * 3
    attn = (2 * 3 * N * d + 2 * 2 * N * d) if equal else (2 * 3 * N * d + 2 * N * d)
    return norms + attn + 2 * N * d + 4 * N * h + 2 * 4 * N * I


def _segments_equal(model, grid):
    """(full blocks equal, window blocks equal): whether each attention kind is one run of equal segments."""
    _, _, cu_win, cu_full = model.visual.layout(torch.tensor([grid]))
    same = lambda cu: len({b - a for a, b in zip(cu[:-1], cu[1:]) if b > a}) == 1
    return same(cu_full), same(cu_win)


def activations(model, w, cuda=True, ckpt=False, vision_grad=True, lora=None, recompute=True):
    """Bytes saved for backward by one micro-batch of workload w. ckpt: each decoder layer / ViT block keeps only its
    input (+ with `recompute` one block's full set, alive while it is recomputed in backward). lora: (rank, number of
    adapted decoder linears) adds each adapter's [N, r] intermediate; vision_grad False: the tower builds no graph."""
    ts, vs, config = model.ts, model.vs, model.config
    rows, L, patches, scored, packed = _seq(config, w)
    masked = False  # labelled passes run packed (model.Packed): a padded batch builds no attention mask
    N = rows * L
    D, hd = ts["hidden_size"], ts["hidden_size"] // ts["num_attention_heads"]
    act = 2 if cuda else 4  # bytes of an activation element (bf16 / fp32)
    layer = _decoder_layer(ts, N, rows, L, masked, cuda, packed)
    if w.stage == "rl" and w.shared_prefix:  # SharedPrefix: each group's completions attend under a [S, P + S]
        # mask (dense) or as G rows [C] against [prompt K/V; own K/V] (batched), whichever has fewer scores
        S, C = w.G * w.completion, w.completion
        P = L - S
        if w.G >= M.SharedPrefix.batch_from_G and w.G * C * (P + C) < S * (P + S):  # batched: the [G, 1, C, P + C]
            # mask, the gathered q and the cat K/V
            layer += rows * ((2 if cuda else 4) * w.G * C * (P + C) + act * w.G * (C + 2 * (P + C)) * D)
        else:
            layer += (2 if cuda else 4) * rows * S * (P + S)  # SDPA's additive copy of the bool mask, per layer
    nl = ts["num_hidden_layers"]
    # around the layers: ids (int64) for the embedding backward, masked_scatter's mask, M-RoPE cos/sin fp32
    # [rows, 1, L, hd] (shared by all layers), the final norm (x, x_hat, rstd: fp32), the scorer's inputs: the
    # scored hidden rows (bf16 cast on CUDA), targets int64, lse and entropy fp32
    top = 8 * N + N + 2 * 4 * N * hd + 4 * (2 * N * D + N)
    top += scored * (D * act + 8 + 4 + 4)
    if lora is not None:
        r, n_lin = lora
        layer += act * N * r * n_lin // nl  # x @ A.T [N, r] per adapted linear
    dec = nl * (4 * N * D) + (layer if recompute else 0) if ckpt else nl * layer  # ckpt: fp32 residual input
    vis = 0
    if vision_grad:
        grid, _, _ = video_shape(config, w.frames, w.height, w.width)
        eq_full, eq_win = _segments_equal(model, grid)
        P, d = patches, vs["hidden_size"]
        blocks = [_vision_block(vs, P, eq_full if i in vs["fullatt_block_indexes"] else eq_win, cuda)
                  for i in range(vs["depth"])]
        patch_dim = vs["in_channels"] * vs["temporal_patch_size"] * vs["patch_size"] ** 2
        # patch embed saves the pixels (a bf16 cast on CUDA); rotary cos/sin [P, hd_v] fp32 for all blocks
        vis = P * patch_dim * act + 2 * 4 * P * (d // vs["num_heads"])
        # merger: RMSNorm (x, x_hat, rstd) then Linear 4d -> 4d, GELU, Linear 4d -> D over P/4 groups
        vis += 4 * (5 * P * d + P) if not cuda else 4 * P * d + 4 * P + 2 * P * d * 4
        vis += vs["depth"] * act * P * d + (max(blocks) if recompute else 0) if ckpt else sum(blocks)
    return top + dec + vis

# ----------------------------------------------------------------------------------------------------------------------
# the KV cache and the scorer


def kv_cache_bytes(ts, rows, max_len, elem):
    """The rollout's cache, per layer k and v, allocated in full: 2 x layers x rows x kv_heads x max_len x head_dim x
    bytes. model.KVCache (the prompt copied to each completion): rows = prompts x G, max_len = prompt + completion;
    model.GroupKVCache (each prompt once per group, eager decode): rows = prompts, max_len = prompt + G x completion
    (the cache rounds it up to a multiple of 16)."""
    hd = ts["hidden_size"] // ts["num_attention_heads"]
    return 2 * ts["num_hidden_layers"] * rows * ts["num_key_value_heads"] * max_len * hd * elem


def scorer_bytes(N, V, D, cuda=True, need_w=True, entropy=False, weight_copy=True):
    """Peak transient bytes of kernels.logprobs.token_logprobs forward + backward over N scored rows (beyond its
    saved inputs, which activations() counts).
    CUDA (Triton): forward partials [min(N, FWD_ROWS), n_slots] fp32 (2, or 3 with entropy); backward one dlogits
    buffer [N, V_chunk] bf16 (CHUNK_BYTES), grad_h [N, D] fp32, grad_W [V, D] bf16 when the head trains; the bf16
    copy of the fp32 head (autocast: weight.to(bf16), saved for backward) with weight_copy.
    CPU (torch backend, fp32): fp32 blocks [rows, cols] of TORCH_CHUNK_ELEMS: forward z and exp(z) (+ e*z with
    entropy); backward z (+ z - c with entropy), grad_h [N, D], grad_W [V, D] and its per-chunk fp32 accumulator."""
    vec = 4 * N * 7  # m, s, a, target logit, lse, logp, entropy / g [N] fp32
    if cuda:
        n_slots = -(-V // LP.MAX_BV) * (LP.MAX_BV // LP.SLOT)
        fwd = 4 * min(N, LP.FWD_ROWS) * n_slots * (3 if entropy else 2)
        cols = LP._chunk_cols(N, V, 2)  # the kernel's own chunk width for bf16 dlogits
        bwd = 2 * N * min(cols, V) + 4 * N * D + 2 * N * D + (2 * V * D if need_w else 0)
        return vec + max(fwd, bwd) + (2 * V * D if weight_copy else 0)
    rows, cols = LP._blocks(N, V)
    blk = 4 * rows * cols
    fwd = blk * (3 if entropy else 2)
    bwd = blk * (2 if entropy else 1) + 4 * N * D + (4 * V * D + 4 * cols * D if need_w else 0)
    return vec + max(fwd, bwd)

# ----------------------------------------------------------------------------------------------------------------------
# the plan


def plan(config, recipe, w, cuda=True, model=None):
    """Per-GPU bytes of each part for recipe x workload (see the module docstring). -> dict of ints."""
    model = model or meta_model(config)
    ts = model.ts
    pc = param_counts(model, recipe.lora_rank, recipe.lora_targets)
    full, fsdp = recipe.method == "full", recipe.parallel == "fsdp2"
    n = recipe.world if fsdp else 1  # FSDP2 shards by the world; DDP replicates
    rl = w.stage == "rl"
    if full:
        trained = pc["total"]  # SFT trains everything (freeze flags off); RL with train_vision too
        params = 4 * pc["total"] // n
        grads, optim = 4 * trained // n, 8 * trained // n
        # DDP (world > 1): gradient buckets, about one more fp32 gradient copy; autocast's per-forward cache of bf16
        # weight casts (every linear; the embedding runs fp32 and the head is cast by the scorer itself)
        buckets = 4 * trained if (not fsdp and recipe.world > 1) else 0
        cache = 2 * (pc["total"] - pc["root"]) if not fsdp else 0
        # FSDP2 (MixedPrecisionPolicy param_dtype=bf16): the root unit (embeddings, head, norm) stays unsharded through
        # forward and backward; the largest other units are unsharded two at a time (prefetch): vision tower + block
        # in forward, two blocks in backward; bf16 params + bf16 grads
        units = (pc["root"] + max(pc["vision"] + pc["block"], 2 * pc["block"])) * (2 + 2) if fsdp else 0
        ref = 2 * pc["total"] // n if (rl and w.beta > 0) else 0  # frozen bf16 reference
        rollout_copy = 2 * pc["total"] if (rl and fsdp) else 0  # generation unshards the whole policy in bf16
        lora = None
    else:
        params = 2 * pc["total"] + 4 * pc["lora"]  # bf16 frozen base + fp32 adapters
        grads, optim = 4 * pc["lora"], 8 * pc["lora"]
        buckets = 4 * pc["lora"] if recipe.world > 1 else 0
        cache, units, ref, rollout_copy = 0, 0, 0, 0  # base already bf16; reference = adapters off
        lora = (recipe.lora_rank, sum(1 for nm, _ in lora_linears(model, recipe.lora_targets)
                                      if nm.startswith("layers.")))
    vision_grad = full or any(t.startswith("visual.") for t in recipe.lora_targets)
    act = activations(model, w, cuda, ckpt=False, vision_grad=vision_grad, lora=lora)
    act_ckpt = activations(model, w, cuda, ckpt=True, vision_grad=vision_grad, lora=lora)
    rows, L, _, scored, _ = _seq(config, w)
    # the scorer: full fine-tuning trains the head (grad_W) and autocast makes a bf16 copy of the fp32 head
    scorer = scorer_bytes(scored, ts["vocab_size"], ts["hidden_size"], cuda, need_w=full,
                          entropy=rl and w.entropy, weight_copy=full and cuda)
    kv = 0
    if rl:
        # model.generate allocates the cache in the autocast dtype on CUDA (bf16 whatever the master weights); 4 B on
        # CPU (fp32)
        elem = 2 if cuda else 4
        rows_kv, row_len, _, _, _ = _seq(config, w)  # the cache follows the layout (shared_prefix: GroupKVCache)
        kv = kv_cache_bytes(ts, rows_kv, row_len, elem)
    persistent = params + grads + optim + ref + buckets + cache
    update = (act_ckpt if w.ckpt else act) + scorer + units
    rollout = kv + rollout_copy
    return dict(params=params, grads=grads, optim=optim, act=act, act_ckpt=act_ckpt, kv=kv, scorer=scorer, ref=ref,
                rollout_copy=rollout_copy, buffers=buckets + cache + units, total=persistent + max(update, rollout),
                n_params=pc["total"], n_lora=pc["lora"] if not full else 0)


HEADROOM = 0.9  # of a card's memory the plan may fill: the CUDA context, NCCL buffers and allocator fragmentation


def fits(total, card_gib):
    """An "80 GB" H100/H200 share reports 79.6 GiB, a "24 GB" card 24.0 GiB: "yes" when the plan leaves 10 % free,
    "tight" when it fits only without that margin."""
    if total <= HEADROOM * card_gib * GiB:
        return "yes"
    return "tight" if total <= card_gib * GiB else "no"


RECIPES_COLUMNS = (("params", "params"), ("grads", "grads"), ("optim", "AdamW"), ("act", "act"),
                   ("act_ckpt", "act ckpt"), ("kv", "KV cache"), ("scorer", "scorer"), ("ref", "ref model"),
                   ("rollout_copy", "rollout copy"), ("buffers", "buffers"), ("total", "total"))


def table(config, recipes, w, cuda=True):
    """Markdown table (GiB per GPU), one row per (label, Recipe), with fits-80/24-GB flags."""
    model = meta_model(config)
    head = "| recipe | " + " | ".join(c for _, c in RECIPES_COLUMNS) + " | 80 GB | 24 GB |"
    lines = [head, "|" + "---|" * (len(RECIPES_COLUMNS) + 3)]
    for label, r in recipes:
        p = plan(config, r, w, cuda, model)
        cells = " | ".join(f"{p[k] / GiB:.2f}" for k, _ in RECIPES_COLUMNS)
        lines.append(f"| {label} | {cells} | {fits(p['total'], 79.6)} | {fits(p['total'], 24.0)} |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------------------
# measurements on CPU (fp32), to check the formulas


def _profiled(fn):
    """Run fn under torch.profiler (CPU memory) -> (its result, net bytes allocated and still alive at the end, peak
    bytes above the start). The allocator events of torch ops, in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # the raw allocator records (+bytes on malloc, -bytes on free), not the per-op sums (a Python autograd
    # Function's event owns the frees of its children's buffers, which would misplace them in time)
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    cur = peak = 0
    for e in records:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, cur, peak


def sft_inputs(config, w, seed=0):
    """A random SFT micro-batch of workload w (all rows the same length: no padding) for a real forward."""
    g = torch.Generator().manual_seed(seed)
    grid, patches, vid = video_shape(config, w.frames, w.height, w.width)
    rows, L, _, _, _ = _seq(config, w)
    V = M.text_settings(config)["vocab_size"]
    vs_id, ve_id, pad = config["vision_start_token_id"], config["vision_end_token_id"], config["video_token_id"]
    specials = {vs_id, ve_id, pad, config.get("image_token_id", -1)}
    text = torch.randint(0, V, (rows, w.text + w.completion), generator=g)
    text[torch.isin(text, torch.tensor(sorted(specials)))] = 0  # no stray vision tokens in the text
    ids = torch.cat([torch.full((rows, 1), vs_id), torch.full((rows, vid), pad), torch.full((rows, 1), ve_id), text], 1)
    labels = ids.clone()
    labels[:, :L - w.completion] = -100  # only the completion is scored
    patch_dim = 3 * 2 * 14 * 14
    out = dict(input_ids=ids, labels=labels, video_grid_thw=torch.tensor([grid] * rows),
               pixel_values_videos=torch.randn(rows * patches, patch_dim, generator=g))
    if w.padded:  # the last row ends 3 tokens early (right padding, not scored): the forward builds a mask
        out["attention_mask"] = torch.ones_like(ids)
        out["attention_mask"][-1, -3:] = 0
        labels[-1, -3:] = -100
    return out


def measure_activations(model, inputs, ckpt):
    """Real forward with labels (fp32, CPU): (bytes held after the forward by the graph, by the profiler; bytes of
    the saved tensors, deduplicated by storage, parameters excluded, from saved_tensors_hooks; with checkpointing the
    hooks do not see what the checkpoints keep, so this count is for ckpt=False)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t
    model.gradient_checkpointing = ckpt
    model.train()

    def fwd():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return model(**inputs)
    logp, held, _ = _profiled(fwd)
    model.gradient_checkpointing = False
    held -= logp.numel() * logp.element_size()  # the output itself
    del logp
    return held, sum(seen.values())


def measure_states(model, inputs):
    """One real forward/backward/AdamW step -> bytes of (params, grads, optimizer state) tensors (tied counted once)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    (-model(**inputs).mean()).backward()
    opt.step()
    nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    params = list(model.parameters())
    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]  # step: a 0-d counter per param
    out = nb(params), nb(p.grad for p in params if p.grad is not None), nb(state)
    opt.zero_grad(set_to_none=True)
    return out


def measure_kv(model, rows_prompts, G, prompt_len, new_tokens, share=False):
    """Bytes a real generate() allocates in its cache (model.KVCache, or model.GroupKVCache under share, patched to
    record the instance)."""
    made, name = [], "GroupKVCache" if share else "KVCache"

    class Recorder(getattr(M, name)):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    ids = torch.randint(0, 100, (rows_prompts, prompt_len))
    orig = getattr(M, name)
    setattr(M, name, Recorder)
    try:
        model.eval()
        model.generate(ids, max_new_tokens=new_tokens, num_return_sequences=G, temperature=1.0, eos_token_id=None,
                       share_prompt_kv=share)
    finally:
        setattr(M, name, orig)
    return made[0].nbytes()


def measure_scorer(N, V, D, need_w=True, entropy=False, seed=0):
    """Peak bytes of token_logprobs forward + backward (torch backend, fp32) above its inputs, by the profiler."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    wt = (torch.randn(V, D, generator=g) * 0.02).requires_grad_(need_w)
    t = torch.randint(0, V, (N,), generator=g)

    def run():
        out = LP.token_logprobs(h, wt, t, return_entropy=entropy, backend="torch")
        loss = (out[0] + out[1]).sum() if entropy else out.sum()
        loss.backward()
    _, _, peak = _profiled(run)
    return peak


def check(config, w, seed=0):
    """Measured (CPU, fp32) vs plan for a small config and workload w (SFT: full fine-tuning, one process).
    -> list of (part, plan bytes, measured bytes)."""
    torch.manual_seed(seed)
    model = M.VidEmo(config).float()
    ts = model.ts
    inputs = sft_inputs(config, w, seed)
    rows, L, _, scored, _ = _seq(config, w)
    out = []
    p = plan(config, Recipe("full", "ddp", 1), w, cuda=False, model=meta_model(config))
    params, grads, optim = measure_states(model, inputs)
    out += [("params", p["params"], params), ("grads", p["grads"], grads), ("optim", p["optim"], optim)]
    held, saved = measure_activations(model, inputs, ckpt=False)
    out += [("act (saved tensors)", p["act"], saved), ("act (held after fwd)", p["act"], held)]
    held_ckpt, _ = measure_activations(model, inputs, ckpt=True)
    plan_ckpt = activations(model, w, cuda=False, ckpt=True, recompute=False)
    out.append(("act ckpt (held after fwd)", plan_ckpt, held_ckpt))
    G, new = 2, 8
    out.append(("kv cache", kv_cache_bytes(ts, rows * G, L + new, 4), measure_kv(model, rows, G, L, new)))
    out.append(("kv cache, prompt once per group", kv_cache_bytes(ts, rows, L + G * new, 4),
                measure_kv(model, rows, G, L, new, share=True)))
    V, D = ts["vocab_size"], ts["hidden_size"]
    out.append(("scorer", scorer_bytes(scored, V, D, cuda=False, need_w=True), measure_scorer(scored, V, D)))
    out.append(("scorer (entropy, frozen head)", scorer_bytes(scored, V, D, cuda=False, need_w=False, entropy=True),
                measure_scorer(scored, V, D, need_w=False, entropy=True)))
    # LoRA on the same model (fp32 base on CPU): adapter grads + AdamW, and the activations of the frozen base
    r = 8
    names = lora.add_adapters(model, r, 2.0 * r)
    pl = plan(config, Recipe("lora", "ddp", 1, r), w, cuda=False, model=meta_model(config))
    _, grads, optim = measure_states(model, inputs)
    held, saved = measure_activations(model, inputs, ckpt=False)
    out += [("LoRA grads", pl["grads"], grads), ("LoRA optim", pl["optim"], optim),
            ("LoRA act (saved tensors)", activations(model, w, cuda=False, vision_grad=False, lora=(r, len(names))),
             saved)]
    return out
