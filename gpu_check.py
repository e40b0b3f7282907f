"""GPU check: the CUDA paths against fp32 / torch references on one H100/H200 (under 10 minutes), as one JSON.

    python gpu_check.py --out=out/gpu_check.json                    # all checks; exit 1 if any check fails
    python gpu_check.py --checks=kernels,bf16_forward                 # a subset (rerun what failed)
    python gpu_check.py --checks=shared_prefix --depth=36             # the whole 3B model (per-row peak ~92 GiB)
    python gpu_check.py --dry_run=True --out=/tmp/gpu_check.json     # CPU, tiny shapes: kernels (Triton interpreted),
                                                                     # bf16_forward, flash_attn, decode

Checks (each writes its figures under checks.<name> with "ok", and the file is rewritten after every check):
  kernels       Triton token_logprobs / logits_logprobs forward + backward vs the torch backend and an fp64
                reference; the EVS similarity / keep-mask kernel vs its torch reference (same masks)
  bf16_forward  a Qwen2.5-VL-3B-shaped model at truncated depth: bf16 autocast logits vs fp32 (relative error, top-1
                agreement) and the fused label log-probs of both
  flash_attn    the vision tower with flash_attn_varlen_func vs the SDPA path (skipped when flash_attn is missing)
  fsdp_rl       a tiny EmoSynth build, a 20-step scratch SFT, then `torchrun --nproc_per_node=1 train_rl.py
                --fsdp=True` (NCCL, FSDP2 world 1): finished, and its step times
  shared_prefix one GRPO group (~1,024 video tokens, G = 8, 256-token completions): the shared-prefix passes vs
                per-row (bf16 log-probs, every gradient's cosine, reference + update ms, peak), and the rollout with
                the prompt's keys once per group vs copied (KV MiB, decode ms per step, partings)
  memory        torch.cuda.max_memory_allocated of one SFT step (bf16 autocast, AdamW) on the 3B-shaped model vs the
                memory plan (memplan, when that module exists)
  decode        greedy decode tokens/s of the 3B-shaped model at batch `decode_batch` (bf16): generate's eager,
                static-shape and CUDA-graph decode steps and transformers' generate; rows may part only at near-ties
                (partings: fp32 gives the same tokens, bf16 paths sum in different orders)
  bench         `python bench.py --section=kernels` and `--section=sft` (the whole 3B model's MFU), their output
Without CUDA (and without --dry_run=True) it stops at once: one line, exit code 2.
"""
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import common
import memplan
import model as M
from kernels.logprobs import INTERPRET, logits_logprobs, naive_logits_logprobs, token_logprobs
from kernels.token_compress import frame_similarity, prune_video_tokens
from model import VidEmo, scratch_config

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with a config file or --key=value; `--help` lists them)
out = "out/gpu_check.json"
checks = ("kernels", "bf16_forward", "flash_attn", "shared_prefix", "fsdp_rl", "memory", "decode", "bench")
dry_run = False  # CPU, tiny shapes, Triton through TRITON_INTERPRET=1: kernels, bf16_forward, flash_attn only
depth = 4  # decoder layers (vision blocks: as many, at most its 32) of the 3B-shaped model; 36 = the whole model
batch = 2  # videos per batch in bf16_forward / memory
frames = 8  # frames per video (2 per temporal patch)
size = 224  # frame side in pixels (multiple of 28)
text_len = 128  # text tokens after each video (supervised in the memory step)
decode_batch = 64  # prompts in the decode check (one video each)
decode_tokens = 64  # greedy tokens per prompt (no EOS: every row decodes them all)
sp_frames = 8  # shared_prefix: frames of the group's video (8 x 448² = 1,024 video tokens)
sp_size = 448
sp_G = 8
sp_completion = 256
sft_steps = 20  # scratch SFT steps before the FSDP RL run
rl_steps = 3
work_dir = ""  # default: a fresh temporary directory (EmoSynth build, SFT and RL outputs)
subprocess_timeout = 300  # seconds for each subprocess (EmoSynth, SFT, RL, each bench section)
seed = 0
# ----------------------------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
ALL_CHECKS = ("kernels", "bf16_forward", "flash_attn", "shared_prefix", "fsdp_rl", "memory", "decode", "bench")
DRY_CHECKS = ("kernels", "bf16_forward", "flash_attn", "shared_prefix", "decode")
# Qwen2.5-VL-3B-Instruct's widths (config.json), depth set by `depth`
QWEN25VL_3B = memplan.builtin_config("qwen2.5-vl-3b")


def model_config(cfg):
    """The 3B-shaped config at `depth` (full attention in the last vision block), or a tiny one for the dry run."""
    if cfg["dry_run"]:
        return scratch_config(512, {"<|vision_start|>": 500, "<|vision_end|>": 501, "<|image_pad|>": 502,
                                    "<|video_pad|>": 503, "<|im_end|>": 504, "<|endoftext|>": 505})
    c = json.loads(json.dumps(QWEN25VL_3B))
    c["num_hidden_layers"] = cfg["depth"]  # depth 36: the whole 3B model (its vision tower has 32 blocks)
    c["vision_config"]["depth"] = min(cfg["depth"], c["vision_config"]["depth"])
    c["vision_config"]["fullatt_block_indexes"] = [c["vision_config"]["depth"] - 1]
    return c


def video_batch(config, n, frames, size, text_len, device, seed):
    """n samples of a random video (frames x size x size) + text_len text tokens; labels on the text."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = frames // 2, size // 14, size // 14
    n_video = t * h * w // 4
    ids = [[config["vision_start_token_id"]] + [config["video_token_id"]] * n_video + [config["vision_end_token_id"]] +
           torch.randint(0, min(config["vocab_size"], 500), (text_len,), generator=g).tolist() for _ in range(n)]
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    labels[:, :n_video + 2] = -100
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
           "pixel_values_videos": torch.randn(n * t * h * w, 3 * 2 * 14 * 14, generator=g),
           "video_grid_thw": torch.tensor([[t, h, w]] * n), "second_per_grid_ts": torch.ones(n)}
    return {k: v.to(device) for k, v in out.items()}


def rel(a, b):
    """max |a - b| / max |b|, in fp64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# two bf16 paths may part at a near-tie: their logits differ from fp32's by up to ~2^-6 of the largest logit at this
# depth (bf16_forward's logits_rel_err_max), so from each other by up to twice that
NEAR_TIE = 2 ** -5


def partings(model, inputs, a, b, autocast=None):
    """Greedy outputs a, b [B, T] of the same prompts (inputs: forward's prompt inputs) by two decode paths. Where a
    row parts, a teacher-forced forward over [prompt; a] scores its first differing step: the gap between the two
    chosen tokens' logits over the row's largest |logit|. -> (fraction of rows equal, the largest gap; 0.0 when no
    row parts). Greedy decoding that only parts at near-ties (gap <= NEAR_TIE) agrees as far as bf16 can tell."""
    differ = a != b
    rows = differ.any(1).nonzero()[:, 0]
    if rows.numel() == 0:
        return 1.0, 0.0
    j = differ[rows].float().argmax(1)  # [r] each parting row's first differing step
    ids = inputs["input_ids"]
    fwd = dict(inputs, input_ids=torch.cat([ids, a], 1), attention_mask=torch.cat(
        [inputs.get("attention_mask", torch.ones_like(ids)), torch.ones_like(a)], 1))
    with torch.no_grad(), (autocast or torch.autocast(ids.device.type, enabled=False)):
        h = model(**fwd, return_hidden=True)  # [B, L + T, D]
        logits = model.lm_head(h[rows, ids.shape[1] - 1 + j]).float()  # [r, V]: the step that parted
    gap = (logits.gather(1, a[rows, j][:, None]) - logits.gather(1, b[rows, j][:, None])).abs()[:, 0]
    return 1 - rows.numel() / a.shape[0], (gap / logits.abs().amax(1)).max().item()


def run_sub(cmd, timeout, env=None):
    """A subprocess from the repository root: (return code, seconds, output tail)."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, **(env or {})))
        return r.returncode, time.time() - t0, (r.stdout + r.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-6000:]
        return 124, time.time() - t0, tail + f"\n(timed out after {timeout} s)"


# ----------------------------------------------------------------------------------------------------------------------
# (1) Triton kernels vs the torch backend and fp64


def check_kernels(cfg, dev):
    dry = cfg["dry_run"]
    n, d, v = (37, 29, 1013) if dry else (2048, 2048, 151936)  # not multiples of any block / the real vocabulary
    tau = 0.7
    res, ok = {"shape": {"N": n, "D": d, "V": v}, "temperature": tau}, True
    g = torch.Generator(device=dev).manual_seed(cfg["seed"])
    for dtype, grad_tol in [(torch.bfloat16, 2e-2), (torch.float32, 1e-3)]:
        name = str(dtype).removeprefix("torch.")
        h0 = torch.randn(n, d, device=dev, generator=g).to(dtype)
        w0 = (0.1 * torch.randn(v, d, device=dev, generator=g)).to(dtype)
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        t[::7] = -100
        g_lp, g_ent = torch.randn(n, device=dev, generator=g), torch.randn(n, device=dev, generator=g)
        h64, w64 = h0.double().requires_grad_(), w0.double().requires_grad_()
        logits64 = h64 @ w64.T
        # log-probs and entropies: fp32 sums of d products in any order (a tiled kernel's, a tensor core's) part
        # from fp64 by ~sqrt(d) roundings of the logits' scale; 4x that bound, and never under 5e-5
        val_tol = max(5e-5, 4 * math.sqrt(d) * 2 ** -24 * (logits64.detach().abs().max().item() / tau))
        res[f"value_tol_{name}"] = val_tol
        r_lp, r_ent = naive_logits_logprobs(logits64, t, tau, return_entropy=True)  # fp64 in, fp64 out
        (r_lp * g_lp + r_ent * g_ent).sum().backward()
        row = {}
        for backend in ("triton", "torch"):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            logp, ent = token_logprobs(h, w, t, tau, return_entropy=True, backend=backend)
            (logp * g_lp + ent * g_ent).sum().backward()
            row[backend] = {"logp_abs_err": (logp.double() - r_lp).abs().max().item(),
                            "entropy_abs_err": (ent.double() - r_ent).abs().max().item(),
                            "grad_h_rel_err": rel(h.grad, h64.grad), "grad_w_rel_err": rel(w.grad, w64.grad)}
            row[backend]["ok"] = (row[backend]["logp_abs_err"] <= val_tol and row[backend]["entropy_abs_err"] <= val_tol
                                  and row[backend]["grad_h_rel_err"] <= grad_tol
                                  and row[backend]["grad_w_rel_err"] <= grad_tol)
            row[backend]["_out"] = (logp.detach(), h.grad, w.grad)
        a, b = row["triton"].pop("_out"), row["torch"].pop("_out")
        row["triton_vs_torch"] = {"logp_abs_diff": (a[0] - b[0]).abs().max().item(),
                                  "grad_h_rel_diff": rel(a[1], b[1]), "grad_w_rel_diff": rel(a[2], b[2])}
        if not dry:
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            for backend in ("triton", "torch"):
                row[backend]["fwd_ms"] = common.cuda_ms(lambda: token_logprobs(h, w, t, tau, backend=backend))
                row[backend]["fwd_bwd_ms"] = common.cuda_ms(
                    lambda: torch.autograd.grad(token_logprobs(h, w, t, tau, backend=backend).sum(), [h, w]))
        # logits_logprobs: the same scoring from materialised logits
        x = logits64.detach().to(dtype).requires_grad_()
        x64 = x.double().detach().requires_grad_()
        r_lp2, r_ent2 = naive_logits_logprobs(x64, t, tau, return_entropy=True)
        (r_lp2 * g_lp + r_ent2 * g_ent).sum().backward()
        lp2, ent2 = logits_logprobs(x, t, tau, return_entropy=True, backend="triton")
        (lp2 * g_lp + ent2 * g_ent).sum().backward()
        row["logits_logprobs_triton"] = {"logp_abs_err": (lp2.double() - r_lp2).abs().max().item(),
                                         "entropy_abs_err": (ent2.double() - r_ent2).abs().max().item(),
                                         "grad_rel_err": rel(x.grad, x64.grad)}
        row["logits_logprobs_triton"]["ok"] = (row["logits_logprobs_triton"]["logp_abs_err"] <= val_tol and
                                               row["logits_logprobs_triton"]["entropy_abs_err"] <= val_tol and
                                               row["logits_logprobs_triton"]["grad_rel_err"] <= grad_tol)
        ok &= row["triton"]["ok"] and row["torch"]["ok"] and row["logits_logprobs_triton"]["ok"]
        res[f"token_logprobs_{name}"] = row
        del h64, w64, logits64, x, x64
    # EVS token compression: the similarity kernel and both keep-mask modes vs the torch reference
    ts, s, dd = (5, 23, 37) if dry else (9, 300, 1280)
    gx = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(ts, s, dd, generator=gx)
    x[2] = x[1] + 0.3 * torch.randn(s, dd, generator=gx)  # a near-static slice, as in real video
    x[1, s // 2] = 0.0  # a zero token: similarity 0, not NaN
    comp = {"shape": [ts, s, dd]}
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dev, dtype)
        sim_t, sim_r = frame_similarity(xd, backend="triton"), frame_similarity(xd, backend="torch")
        key = str(dtype).removeprefix("torch.")
        comp[f"similarity_abs_diff_{key}"] = (sim_t[1:].double() - sim_r[1:].double()).abs().max().item()
        for kw in (dict(rate=0.6), dict(threshold=0.3)):
            m_t = prune_video_tokens(xd, backend="triton", **kw)
            m_r = prune_video_tokens(xd, backend="torch", **kw)
            comp[f"mask_equal_{key}_{next(iter(kw))}"] = bool(torch.equal(m_t.cpu(), m_r.cpu()))
    comp["ok"] = comp["similarity_abs_diff_float32"] <= 1e-5 and all(v for k, v in comp.items()
                                                                      if k.startswith("mask_equal_float32"))
    if not dry:
        xd = x.to(dev)
        comp["prune_rate_ms_triton"] = common.cuda_ms(lambda: prune_video_tokens(xd, rate=0.5, backend="triton"))
        comp["prune_rate_ms_torch"] = common.cuda_ms(lambda: prune_video_tokens(xd, rate=0.5, backend="torch"))
    res["token_compress"] = comp
    res["ok"] = ok and comp["ok"]
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (2) bf16 autocast forward vs fp32


def check_bf16_forward(cfg, dev):
    config = model_config(cfg)
    torch.manual_seed(cfg["seed"])
    model = VidEmo(config).to(dev).eval()
    frames_, size_, text_ = (4, 56, 16) if cfg["dry_run"] else (cfg["frames"], cfg["size"], cfg["text_len"])
    inputs = video_batch(config, cfg["batch"], frames_, size_, text_, dev, cfg["seed"])
    plain = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        ref = model(**plain).float()
        ref_lp = model(**inputs)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            got = model(**plain).float()
            got_lp = model(**inputs)
    err = (got - ref).abs()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    # agreement where fp32's top-1 is clear (margin over the runner-up above bf16's resolution of the logits)
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 8 * err.max()
    top1_clear = (got.argmax(-1) == ref.argmax(-1))[clear].float().mean().item() if clear.any() else float("nan")
    res = {"params_M": round(model.num_params() / 1e6, 1), "layers": config["num_hidden_layers"],
           "tokens": int(inputs["input_ids"].numel()), "logits_rel_err_max": rel(got, ref),
           "logits_rel_err_mean": (err.mean() / ref.abs().mean()).item(), "top1_agreement": top1,
           "top1_agreement_clear": top1_clear, "clear_positions": int(clear.sum()),
           "label_logp_abs_err_max": (got_lp.float() - ref_lp.float()).abs().max().item(),
           "label_logp_fp32_mean": ref_lp.float().mean().item()}
    res["ok"] = res["logits_rel_err_max"] <= 5e-2 and (math.isnan(top1_clear) or top1_clear >= 0.99)
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (3) flash-attn vs SDPA in the vision tower


def check_flash_attn(cfg, dev):
    if M.flash_attn_varlen_func is None or dev.type != "cuda":
        why = "flash_attn does not import" if M.flash_attn_varlen_func is None else "flash_attn needs CUDA"
        print(f"  flash_attn: skipped ({why})")
        return {"skipped": why, "ok": True}
    config = model_config(cfg)
    torch.manual_seed(cfg["seed"])
    tower = VidEmo(config).visual.to(dev).eval()
    inputs = video_batch(config, cfg["batch"], cfg["frames"], cfg["size"], 0, dev, cfg["seed"])
    px, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    flash = M.flash_attn_varlen_func

    def sdpa(fn):  # run fn with the SDPA path forced (model.py picks flash-attn when it imports)
        M.flash_attn_varlen_func = None
        try:
            return fn()
        finally:
            M.flash_attn_varlen_func = flash
    with torch.no_grad():
        ref = tower(px, grid).float()  # fp32: SDPA (flash-attn takes half precision only)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_flash = tower(px, grid).float()
            y_sdpa = sdpa(lambda: tower(px, grid).float())
            ms_flash = common.cuda_ms(lambda: tower(px, grid))
            ms_sdpa = sdpa(lambda: common.cuda_ms(lambda: tower(px, grid)))
    res = {"patches": int(px.shape[0]), "flash_vs_sdpa_rel": rel(y_flash, y_sdpa), "flash_vs_fp32_rel": rel(y_flash, ref),
           "sdpa_vs_fp32_rel": rel(y_sdpa, ref), "tower_ms_flash_bf16": ms_flash, "tower_ms_sdpa_bf16": ms_sdpa}
    res["ok"] = res["flash_vs_sdpa_rel"] <= 2e-2 and res["flash_vs_fp32_rel"] <= 2 * res["sdpa_vs_fp32_rel"] + 1e-2
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (3b) shared-prefix GRPO scoring vs the per-row layout, bf16


def check_shared_prefix(cfg, dev):
    """One GRPO group on the 3B-shaped model (~1,024 video tokens, G completions of sp_completion tokens): the
    policy's log-probs and every gradient under bf16 autocast, shared_prefix vs per-row, and the reference +
    update times of both."""
    import grpo
    config = model_config(cfg)
    torch.manual_seed(cfg["seed"])
    with dev:  # built in place: at full depth a CPU init would take longer than the check
        model = VidEmo(config).train()
    frames_, size_, G, C = (4, 56, 3, 8) if cfg["dry_run"] else (cfg["sp_frames"], cfg["sp_size"], cfg["sp_G"],
                                                                   cfg["sp_completion"])
    inp = video_batch(config, 1, frames_, size_, 16, dev, cfg["seed"])
    grid = inp["video_grid_thw"]
    g = torch.Generator().manual_seed(cfg["seed"])
    seqs = torch.randint(0, min(config["vocab_size"], 500), (G, C), generator=g).to(dev)  # no stop: C tokens each
    with torch.no_grad():
        emb = model.encode_video(inp["pixel_values_videos"], grid)
    mb = grpo.group_batch(inp["input_ids"], inp["attention_mask"], seqs, emb, grid, inp["second_per_grid_ts"], None,
                          G, model.vision_token_counts(grid), config["eos_token_id"], config.get("pad_token_id") or 0,
                          (config["video_token_id"],), pixels=inp["pixel_values_videos"])
    w = torch.linspace(-1, 1, G * C, device=dev).view(G, C)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    out, times = {}, {}
    for shared in (False, True):
        def ref():
            with torch.no_grad(), autocast:
                return grpo.completion_logps(model, mb, 1.0, reencode=True, shared_prefix=shared)[0]

        def update():
            model.zero_grad(set_to_none=True)
            with autocast:
                lp = grpo.completion_logps(model, mb, 1.0, reencode=True, shared_prefix=shared)[0]
            (lp.float() * w).sum().backward()
            return lp
        lp = update()
        out[shared] = (lp.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            times[shared] = (common.cuda_ms(ref, 3), common.cuda_ms(update, 3), torch.cuda.max_memory_allocated())
        else:
            times[shared] = (0.0, 0.0, 0)
    cos = min(torch.nn.functional.cosine_similarity(out[True][1][n].flatten(), gr.flatten(), 0).item()
              for n, gr in out[False][1].items() if gr.abs().max() > 0)
    P = int(inp["input_ids"].shape[1])
    res = {"prompt_tokens": P, "G": G, "completion": C, "token_ratio": G * (P + C) / (P + G * C),
           "attention": "flash-attn varlen" if M.flash_ok(emb.new_zeros(1, dtype=torch.bfloat16)) else "sdpa",
           "logp_abs_err_mean": (out[True][0] - out[False][0]).abs().mean().item(),
           "logp_abs_err_max": (out[True][0] - out[False][0]).abs().max().item(), "grad_cosine_min": cos,
           "ref_ms_rows": times[False][0], "ref_ms_shared": times[True][0], "update_ms_rows": times[False][1],
           "update_ms_shared": times[True][1], "peak_gib_rows": times[False][2] / 2 ** 30,
           "peak_gib_shared": times[True][2] / 2 ** 30}
    if dev.type == "cuda":
        res["time_ratio"] = (times[False][0] + times[False][1]) / (times[True][0] + times[True][1])
        # reference + update ms with the completions' attention each way of model.SharedPrefix: the dense [S, P + S]
        # mask, batched rows under a mask, batched rows bottom-right causal without a mask (CUDA's default)
        for name, mode, unmasked in (("dense", "dense", False), ("batched_masked", "batched", False),
                                     ("batched_lower_right", "batched", True)):
            M.SharedPrefix.mode, M.SharedPrefix.lower_right = mode, unmasked
            try:
                res[f"shared_ms_{name}"] = common.cuda_ms(ref, 3) + common.cuda_ms(update, 3)
            finally:
                M.SharedPrefix.mode, M.SharedPrefix.lower_right = "auto", "cuda"
    tol = 2e-2 if dev.type == "cuda" else 1e-4  # bf16 sums in another order vs fp32
    res["ok"] = res["logp_abs_err_mean"] <= tol and res["grad_cosine_min"] >= (0.99 if dev.type == "cuda" else 0.9999)
    # the rollout of the same group: G greedy completions of C tokens (no stop), the prompt's keys/values once per
    # group (GroupKVCache) vs copied to every completion: KV bytes, decode time per step, agreement
    model.eval()
    ts = model.ts
    kv_row = 2 * ts["num_hidden_layers"] * ts["num_key_value_heads"] * (ts["hidden_size"] // ts["num_attention_heads"])
    kv_row *= 2 if dev.type == "cuda" else 4  # bytes per cached position (bf16 under autocast)
    gen, first = {}, {}
    for share in (False, True):
        def run(n, share=share):
            with autocast:
                return model.generate(inp["input_ids"], inp["attention_mask"], video_embeds=emb, video_grid_thw=grid,
                                       second_per_grid_ts=inp["second_per_grid_ts"], max_new_tokens=n,
                                       num_return_sequences=G, pad_token_id=0, return_logprobs=True,
                                       share_prompt_kv=share)
        gen[share] = run(C)
        if dev.type == "cuda":
            first[share] = (common.cuda_ms(lambda: run(1), 3), common.cuda_ms(lambda: run(C), 3))
    rows = {"input_ids": inp["input_ids"].repeat(G, 1), "video_embeds": emb.repeat(G, 1),
            "video_grid_thw": grid.repeat(G, 1), "second_per_grid_ts": inp["second_per_grid_ts"].repeat(G)}
    same, gap = partings(model, rows, gen[False][0], gen[True][0], autocast)
    res.update(rollout_kv_mib_copied=G * (P + C) * kv_row / 2 ** 20, rollout_kv_mib_once=(P + G * C) * kv_row / 2 ** 20,
               rollout_token_agreement=(gen[True][0] == gen[False][0]).float().mean().item(),
               rollout_rows_same=same, rollout_parting_gap_max=gap,
               rollout_first_logp_abs_err=(gen[True][1][:, 0] - gen[False][1][:, 0]).abs().max().item())
    if dev.type == "cuda":
        for share, key in ((False, "copied"), (True, "once")):
            res[f"rollout_decode_ms_step_{key}"] = (first[share][1] - first[share][0]) / (C - 1)
        res["rollout_decode_time_ratio"] = res["rollout_decode_ms_step_copied"] / res["rollout_decode_ms_step_once"]
    # fp32: the same tokens; bf16: rows part only at near-ties
    res["ok"] = res["ok"] and (gap <= NEAR_TIE if dev.type == "cuda" else same == 1.0)
    model.train()
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (4) FSDP2 world-1 GRPO step over NCCL


def check_fsdp_rl(cfg, work):
    py = sys.executable
    build, sft, rl = (os.path.join(work, k) for k in ("emosynth", "sft", "rl"))
    res, T = {}, cfg["subprocess_timeout"]
    steps = [
        ("emosynth", [py, "data/emosynth/prepare.py", f"--out_dir={build}", "--num_train=128", "--num_val=8",
                      "--num_test=8", "--workers=4"]),
        ("sft", [py, "train_sft.py", f"--data_dir={build}", f"--out_dir={sft}", f"--max_steps={cfg['sft_steps']}",
                 "--eval_at_end=False", "--eval_every=0", f"--save_every={cfg['sft_steps']}", "--val_file=none",
                 "--num_workers=2", "--batch_size=8", "--warmup_steps=2", "--log_every=5"]),
        ("rl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_rl.py", "--fsdp=True",
                f"--init_from={os.path.join(sft, 'ckpt')}", f"--data_dir={build}", f"--out_dir={rl}",
                f"--max_steps={cfg['rl_steps']}", "--num_generations=4", "--prompts_per_step=4", "--grad_accum=2",
                "--max_completion_length=48", "--eval_every=0", "--eval_at_end=False",
                f"--save_every={cfg['rl_steps']}", "--sample_table_every=0", "--log_every=1"]),
    ]
    for name, cmd in steps:
        rc, sec, tail = run_sub(cmd, T)
        res[name] = {"returncode": rc, "seconds": round(sec, 1)}
        if rc != 0:
            res[name]["output_tail"] = tail
            res["ok"] = False
            return res
    res["rl"]["command"] = " ".join(cmd[1:])
    rows = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl")) if '"step_time"' in line]
    res["rl"].update(finished=len(rows) == cfg["rl_steps"] and os.path.isfile(os.path.join(rl, "ckpt", "COMPLETE")),
                     step_time_s=[round(r["step_time"], 3) for r in rows],
                     t_generate_s=[round(r.get("t_generate", float("nan")), 3) for r in rows],
                     t_update_s=[round(r.get("t_update", float("nan")), 3) for r in rows],
                     loss=[r.get("loss") for r in rows],
                     finite=all(math.isfinite(r.get("loss", 0.0)) and math.isfinite(r.get("grad_norm", 0.0))
                                for r in rows))
    res["ok"] = res["rl"]["finished"] and res["rl"]["finite"]
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (5) memory of one SFT step vs the plan


def check_memory(cfg, dev):
    """One SFT step (bf16 autocast, fp32 masters, AdamW, no activation checkpointing) on the 3B-shaped model: peak
    allocated bytes vs memplan.plan for the same workload (full fine-tuning, one GPU)."""
    config = model_config(cfg)
    w = memplan.Workload("sft", frames=cfg["frames"], height=cfg["size"], width=cfg["size"], text=64,
                         completion=cfg["text_len"], batch=cfg["batch"], ckpt=False)
    inputs = {k: v.to(dev) for k, v in memplan.sft_inputs(config, w, seed=cfg["seed"]).items()}
    plan = memplan.plan(config, memplan.Recipe("full", "ddp", world=1), w, cuda=True)
    res = {}
    torch.manual_seed(cfg["seed"])
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = VidEmo(config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp = model(**inputs)
        (-logp.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # the first step allocates the AdamW moments
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    res.update(layers=config["num_hidden_layers"], params_M=round(model.num_params() / 1e6, 1), batch=cfg["batch"],
               seq_len=int(inputs["input_ids"].shape[1]), patches=int(inputs["pixel_values_videos"].shape[0]),
               max_allocated_GiB=measured / 2**30, step_s=round(time.time() - t0, 3))
    res["plan_GiB"] = {k: v / 2**30 for k, v in plan.items() if not k.startswith("n_")}
    res["plan_total_over_measured"] = plan["total"] / measured
    res["ok"] = True  # figures to compare, not a pass / fail
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (6) decode: eager vs static vs CUDA graphs vs transformers


def check_decode(cfg, dev):
    """Prefill + decode_tokens greedy tokens for decode_batch prompts (a video each); decode tokens/s from the extra
    time over a 1-token generate (fastest of 3 each), for each of generate's decode modes ("graphs" only on CUDA)
    and transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # a check-only peer
    config = model_config(cfg)
    B, T = (4, 8) if cfg["dry_run"] else (cfg["decode_batch"], cfg["decode_tokens"])
    frames_, size_, text_ = (4, 56, 16) if cfg["dry_run"] else (4, 224, 32)
    torch.manual_seed(cfg["seed"])
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        VidEmo(config).save_pretrained(d)
        ours = VidEmo.from_pretrained(d, dtype=dtype, device=dev).eval()
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa",
                                                                dtype=dtype).to(dev).eval()
    inputs = {k: v for k, v in video_batch(config, B, frames_, size_, text_, dev, cfg["seed"]).items() if k != "labels"}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    hf_inputs = dict(inputs, mm_token_type_ids=2 * (inputs["input_ids"] == config["video_token_id"]).long())
    L = inputs["input_ids"].shape[1]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, n, repeats=3):  # the fastest of `repeats` runs after a warm-up (and, for graphs, the capture)
        fn(n)
        best = math.inf
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn(n)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best, out

    runs = {m: (lambda n, m=m: ours.generate(**inputs, max_new_tokens=n, decode=m)[0])
            for m in (("eager", "static", "graphs") if dev.type == "cuda" else ("eager", "static"))}
    runs["transformers"] = lambda n: hf.generate(**hf_inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                                                 pad_token_id=0)[:, L:]
    res, outs = {"batch": B, "new_tokens": T, "prompt_tokens": L, "dtype": str(dtype)}, {}
    with torch.no_grad():
        for name, fn in runs.items():
            t1, _ = timed(fn, 1)
            tn, outs[name] = timed(fn, T)
            res[f"{name}_decode_tok_s"] = round(B * (T - 1) / (tn - t1), 1)
            res[f"{name}_total_s"] = round(tn, 4)
    ok = True
    for name in runs:
        if name != "eager":  # fp32: the same tokens; bf16: rows part only at near-ties (the kernels' sums differ)
            same, gap = partings(ours, inputs, outs["eager"], outs[name])
            res[f"{name}_rows_same_as_eager"], res[f"{name}_parting_gap_max"] = same, gap
            res[f"{name}_vs_eager"] = round(res[f"{name}_decode_tok_s"] / res["eager_decode_tok_s"], 3)
            if name != "transformers":
                ok &= same == 1.0 if dtype == torch.float32 else gap <= NEAR_TIE
    best = max((n for n in runs if n != "transformers"), key=lambda n: res[f"{n}_decode_tok_s"])
    res["best_vs_transformers"] = round(res[f"{best}_decode_tok_s"] / res["transformers_decode_tok_s"], 3)
    res["ok"] = ok  # ours against itself; transformers' partings are a figure
    return res


# ----------------------------------------------------------------------------------------------------------------------
# (7) bench.py's GPU figures


def check_bench(cfg):
    res = {}
    for section in ("kernels", "sft"):  # the sections with CUDA rows (generate's figures are CPU-only)
        rc, sec, tail = run_sub([sys.executable, "bench.py", f"--section={section}"], cfg["subprocess_timeout"])
        print(f"--- bench.py --section={section} (exit {rc}, {sec:.0f} s)\n{tail}")
        res[section] = {"returncode": rc, "seconds": round(sec, 1), "output": tail}
    res["ok"] = all(r["returncode"] == 0 for r in res.values())
    return res


# ----------------------------------------------------------------------------------------------------------------------


def main():
    cfg = common.configure(globals())
    names = tuple(cfg["checks"])
    common.check([("checks", names, set(names) <= set(ALL_CHECKS), f"a tuple of {', '.join(ALL_CHECKS)}"),
                  ("depth", cfg["depth"], cfg["depth"] >= 1, ">= 1"),
                  ("frames", cfg["frames"], cfg["frames"] >= 2 and cfg["frames"] % 2 == 0, "even, >= 2"),
                  ("size", cfg["size"], cfg["size"] >= 28 and cfg["size"] % 28 == 0, "a multiple of 28")])
    if cfg["dry_run"]:
        if not INTERPRET:  # Triton on CPU tensors: the interpreter, which must be set before kernels are imported
            env = dict(os.environ, TRITON_INTERPRET="1")
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
        names = tuple(n for n in names if n in DRY_CHECKS)
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise common.InputError("gpu_check.py needs a CUDA GPU (--dry_run=True runs the CPU checks at tiny "
                                    "sizes)")
        if INTERPRET:
            raise common.InputError("TRITON_INTERPRET=1 is set: unset it to check the compiled kernels")
        dev = torch.device("cuda")
    out_path = os.path.abspath(cfg["out"])
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": cfg["dry_run"],
              "flash_attn": M.flash_attn_varlen_func is not None, "checks": {}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    t_all = time.time()
    for name in names:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.time()
        try:
            if name == "kernels":
                res = check_kernels(cfg, dev)
            elif name == "bf16_forward":
                res = check_bf16_forward(cfg, dev)
            elif name == "flash_attn":
                res = check_flash_attn(cfg, dev)
            elif name == "shared_prefix":
                res = check_shared_prefix(cfg, dev)
            elif name == "fsdp_rl":
                work = cfg["work_dir"] or tempfile.mkdtemp(prefix="gpu_check_")  # kept, for a look after
                res = dict(check_fsdp_rl(cfg, work), work_dir=work)
            elif name == "memory":
                res = check_memory(cfg, dev)
            elif name == "decode":
                res = check_decode(cfg, dev)
            else:
                res = check_bench(cfg)
        except Exception as e:  # one check's crash is its figure; the others still run
            res = {"ok": False, "error": f"{type(e).__name__}: {common.first_line(e)}",
                   "traceback": traceback.format_exc()[-4000:]}  # the whole story: a GPU run is rarely repeated
            print(res["traceback"], file=sys.stderr, flush=True)
        res["seconds"] = round(time.time() - t0, 1)
        gc.collect()  # the check's model and optimizer: freed before the next check (or a subprocess) runs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        report["checks"][name] = res
        report["ok"] = all(r["ok"] for r in report["checks"].values())
        report["wall_s"] = round(time.time() - t_all, 1)
        with open(out_path + ".tmp", "w") as f:
            json.dump(report, f, indent=2, default=str)
        os.replace(out_path + ".tmp", out_path)
        brief = {k: v for k, v in res.items() if not isinstance(v, (dict, list, str)) or k == "error"}
        print(f"[gpu_check] {name}: {'ok' if res['ok'] else 'FAILED'} {json.dumps(brief, default=str)}", flush=True)
    failed = [n for n, r in report["checks"].items() if not r["ok"]]
    print(f"[gpu_check] {len(names) - len(failed)}/{len(names)} checks ok in {time.time() - t_all:.0f} s -> {out_path}")
    if failed:
        print(f"[gpu_check] failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
