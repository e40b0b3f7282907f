"""kernels/: fused log-probs and EVS token pruning vs fp64 references written out here (Triton via the interpreter)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.logprobs as lp
from kernels.logprobs import logits_logprobs, naive_logits_logprobs, naive_logprobs, token_logprobs
from kernels.token_compress import frame_similarity, keep_indices, prune_video_tokens, video_keep_mask

# the interpreter evaluates both sides of tl.where (e.g. 0 * -inf on padded columns): harmless numpy warnings
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# Triton on CPU tensors needs the interpreter; `TRITON_INTERPRET=0 pytest tests/test_kernels.py` on a GPU machine
# runs the compiled kernels in test_cuda_compiled instead
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not lp.INTERPRET, reason="needs TRITON_INTERPRET=1"))]
N, D, V = 37, 29, 1013  # not multiples of any block size


def ref_logprobs(logits, targets, tau, ignore_index=-100):
    """fp64 log_softmax(logits / tau) gathered at targets, entropy -sum p log p; ignored rows 0."""
    logp_all = torch.log_softmax(logits.double() / tau, -1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    ent = -(logp_all.exp() * torch.where(logp_all.isfinite(), logp_all, 0.0)).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make(dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:5]] = -100  # ignored rows
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return h, w, t, g_lp, g_ent


@pytest.fixture
def small_chunks(monkeypatch):
    # force several vocabulary chunks in both backward paths and several row launches in the Triton forward
    monkeypatch.setattr(lp, "CHUNK_BYTES", N * 4 * 300)
    monkeypatch.setattr(lp, "FWD_ROWS", 16)
    monkeypatch.setattr(lp, "TORCH_CHUNK_ELEMS", 20 * 300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_vs_fp64(backend, tau, dtype, small_chunks):
    h, w, t, g_lp, g_ent = make(dtype, seed=int(tau * 10) + (dtype == torch.bfloat16))
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    r_lp, r_ent = ref_logprobs(h64 @ w64.T, t, tau)
    (r_lp * g_lp.double() + r_ent * g_ent.double()).sum().backward()

    h, w = h.requires_grad_(), w.requires_grad_()
    logp, ent = token_logprobs(h, w, t, temperature=tau, return_entropy=True, backend=backend)
    (logp * g_lp + ent * g_ent).sum().backward()
    assert logp.dtype == ent.dtype == torch.float32
    val_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (5e-5, 2e-2)  # bf16: dlogits rounded to bf16
    assert (logp.double() - r_lp).abs().max() <= val_tol
    assert (ent.double() - r_ent).abs().max() <= val_tol
    assert rel(h.grad, h64.grad) <= grad_tol and rel(w.grad, w64.grad) <= grad_tol
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (h.grad[ignored] == 0).all()  # ignored rows get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_logprobs_vs_fp64(backend, tau, dtype, small_chunks):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(N, V, generator=g)).to(dtype)
    x[:4, 100:300] = float("-inf")  # masked vocabulary entries must not produce NaN
    t = torch.randint(0, V, (N,), generator=g)
    t[[5, 17]] = -100
    t[:4] = torch.tensor([0, 99, 300, V - 1])  # targets of the masked rows stay outside the masked range
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    x64 = x.double().requires_grad_()
    r_lp, r_ent = ref_logprobs(x64, t, tau)
    (r_lp * g_lp.double() + r_ent * g_ent.double()).sum().backward()

    x = x.requires_grad_()
    logp, ent = logits_logprobs(x, t, temperature=tau, return_entropy=True, backend=backend)
    (logp * g_lp + ent * g_ent).sum().backward()
    val_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-5, 1e-2)
    assert (logp.double() - r_lp).abs().max() <= val_tol
    assert (ent.double() - r_ent).abs().max() <= val_tol
    assert rel(x.grad, x64.grad) <= grad_tol
    assert x.grad.isfinite().all() and (x.grad[[5, 17]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_only_frozen_weight_and_shapes(backend):
    h, w, t, g_lp, _ = make(torch.float32, seed=7)
    # [B, T, D] hidden, frozen weight (reference-model style), log-probs only
    hb = h[:36].reshape(4, 9, D).clone().requires_grad_()
    tb = t[:36].reshape(4, 9)
    logp = token_logprobs(hb, w, tb, temperature=0.9, backend=backend)
    assert logp.shape == (4, 9)
    (logp * g_lp[:36].reshape(4, 9)).sum().backward()
    h64 = hb.detach().double().requires_grad_()
    r_lp, _ = ref_logprobs(h64 @ w.double().T, tb, 0.9)
    (r_lp * g_lp[:36].reshape(4, 9).double()).sum().backward()
    assert (logp.double() - r_lp).abs().max() <= 1e-5
    assert rel(hb.grad, h64.grad) <= 1e-4 and w.grad is None
    # gradient through the entropy alone
    hh = h.clone().requires_grad_()
    _, ent = token_logprobs(hh, w, t, return_entropy=True, backend=backend)
    ent.sum().backward()
    h64 = h.double().requires_grad_()
    ref_logprobs(h64 @ w.double().T, t, 1.0)[1].sum().backward()
    assert rel(hh.grad, h64.grad) <= 1e-4
    # every row ignored: zeros, zero gradient
    hz = h.clone().requires_grad_()
    out = token_logprobs(hz, w, torch.full((N,), -100), backend=backend)
    out.sum().backward()
    assert (out == 0).all() and (hz.grad == 0).all()


def test_naive_and_errors():
    h, w, t, _, _ = make(torch.float64, seed=11)
    r_lp, r_ent = ref_logprobs(h @ w.T, t, 0.7)
    n_lp, n_ent = naive_logprobs(h, w, t, 0.7, return_entropy=True)
    assert torch.allclose(n_lp, r_lp) and torch.allclose(n_ent, r_ent)
    assert torch.allclose(naive_logits_logprobs(h @ w.T, t, 0.7), r_lp)
    bad = t.clone()
    bad[0] = V
    with pytest.raises(ValueError, match="out of range"):
        token_logprobs(h, w, bad, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(h, w, t, backend="cuda")
    with pytest.raises(ValueError, match="temperature"):
        logits_logprobs(h @ w.T, t, temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(h, w[:, :5], t)
    # mixed dtypes are promoted, like a matmul would need
    out = token_logprobs(h.float(), w, t, backend="torch")
    assert out.dtype == torch.float32 and (out.double() - ref_logprobs(h @ w.T, t, 1.0)[0]).abs().max() < 1e-5


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any allocating torch op produces (in-place, out= and view ops allocate nothing;
    this also skips the interpreter's host/device copies of kernel arguments)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.max = max(self.max, o.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_builds_full_logits(backend, monkeypatch):
    n, v, d = 32, 2000, 4
    monkeypatch.setattr(lp, "CHUNK_BYTES", n * 4 * 512)
    monkeypatch.setattr(lp, "TORCH_CHUNK_ELEMS", 4096)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    with MaxNumel() as probe:
        logp, ent = token_logprobs(h, w, t, return_entropy=True, backend=backend)
        (logp + ent).sum().backward()
    assert probe.max <= max(v * d, n * 512) < n * v // 3  # nothing bigger than the weight or one chunk
    with MaxNumel() as probe:
        naive_logprobs(h, w, t).sum().backward()
    assert probe.max >= n * v  # the probe does see a full logits tensor


# ----------------------------------------------------------------------------------------------------------------
# token compression

def ref_similarity(x):
    x = x.double()
    t, s, _ = x.shape
    sim = torch.full((t, s), float("-inf"), dtype=torch.float64)
    for i in range(1, t):
        for j in range(s):
            a, b = x[i, j], x[i - 1, j]
            sim[i, j] = (a @ b) / max((a @ a).sqrt() * (b @ b).sqrt(), 1e-8)
    return sim


def ref_keep(x, rate=None, threshold=None):
    sim = ref_similarity(x)
    t, s = sim.shape
    keep = torch.zeros(t, s, dtype=torch.bool)
    keep[0] = True
    if threshold is not None:
        keep[1:] = sim[1:] < threshold
        return keep
    k = round((1 - rate) * (t - 1) * s)
    cand = sorted((sim[i, j].item(), (i - 1) * s + j) for i in range(1, t) for j in range(s))
    for _, idx in cand[:k]:
        keep[1 + idx // s, idx % s] = True
    return keep


def video(t, s, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, s, d, generator=g)
    x[2] = x[1] + 0.3 * torch.randn(s, d, generator=g)  # a near-static slice, as in real video
    x[1, s // 2] = 0.0  # a zero token: similarity 0, not NaN
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_and_masks(backend):
    x = video(5, 23, 37, seed=0)
    sim = frame_similarity(x, backend=backend)
    ref = ref_similarity(x)
    assert torch.isinf(sim[0]).all() and (sim[1:].double() - ref[1:]).abs().max() <= 1e-5
    for rate in [0.0, 0.3, 0.5, 0.77, 1.0]:
        keep = prune_video_tokens(x, rate=rate, backend=backend)
        assert torch.equal(keep, ref_keep(x, rate=rate)), rate
        assert keep.sum() == 23 + round((1 - rate) * 4 * 23)
    for thr in [-0.1, 0.05, 0.5, 2.0]:
        assert torch.equal(prune_video_tokens(x, threshold=thr, backend=backend), ref_keep(x, threshold=thr)), thr
    # bf16 tokens: fp32 reduction of the same values
    xb = x.to(torch.bfloat16)
    assert (frame_similarity(xb, backend=backend)[1:].double() - ref_similarity(xb)[1:]).abs().max() <= 1e-5
    # one slice: all kept
    assert prune_video_tokens(x[:1], rate=0.9, backend=backend).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_ties_break_by_index(backend):
    # slices 1 and 2 are constant per slice, so all their tokens have bit-identical similarities
    x = torch.zeros(3, 10, 16)
    x[0] = torch.randn(16)
    x[1] = torch.randn(16)
    x[2] = x[1]
    keep = prune_video_tokens(x, rate=0.75, backend=backend)  # k = 5 of 20
    order = 0 if ref_similarity(x)[1, 0] < ref_similarity(x)[2, 0] else 1
    expect = torch.zeros(3, 10, dtype=torch.bool)
    expect[0] = True
    expect[1 + order, :5] = True
    assert torch.equal(keep, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_keep_mask_multi_video(backend):
    from model import merged_grid
    patch_grids = torch.tensor([[3, 4, 6], [2, 2, 4], [1, 2, 2], [4, 6, 2]])  # merged tokens: 3x6, 2x2, 1x1, 4x3
    grids = merged_grid(patch_grids, 2)  # the one vision-token rule
    assert grids.tolist() == [[3, 2, 3], [2, 1, 2], [1, 1, 1], [4, 3, 1]]
    sizes = [(3, 6), (2, 2), (1, 1), (4, 3)]
    vids = [video(t, s, 24, seed=i) if t > 2 else torch.randn(t, s, 24) for i, (t, s) in enumerate(sizes)]
    embeds = torch.cat([v.reshape(-1, 24) for v in vids])  # [n, D]
    for kw in [dict(rate=0.5), dict(threshold=0.2)]:
        keep = video_keep_mask(embeds, grids, backend=backend, **kw)
        expect = torch.cat([ref_keep(v, **kw).reshape(-1) for v in vids])
        assert keep.dtype == torch.bool and torch.equal(keep, expect), kw
    idx = keep_indices(keep)
    assert idx.tolist() == [i for i, k in enumerate(keep.tolist()) if k]
    with pytest.raises(ValueError, match="merged-token grids"):
        video_keep_mask(embeds[:-1], grids, rate=0.5, backend=backend)
    with pytest.raises(ValueError, match="exactly one"):
        video_keep_mask(embeds, grids, rate=0.5, threshold=0.1, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available() or lp.INTERPRET, reason="compiled Triton kernels need CUDA")
def test_cuda_compiled():
    """Compiled kernels (autotuned configs) on realistic-ish shapes vs fp64 references."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    n, d, v = 1000, 384, 50_000 + 17
    for dtype, val_tol, grad_tol in [(torch.bfloat16, 1e-4, 2e-2), (torch.float32, 1e-4, 1e-3)]:
        h = torch.randn(n, d, device=dev, generator=g).to(dtype).requires_grad_()
        w = (0.1 * torch.randn(v, d, device=dev, generator=g)).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev, generator=g)
        t[::7] = -100
        g_lp, g_ent = torch.randn(n, device=dev, generator=g), torch.randn(n, device=dev, generator=g)
        h64, w64 = h.double().detach().requires_grad_(), w.double().detach().requires_grad_()
        logits64 = h64 @ w64.T
        r_lp, r_ent = ref_logprobs(logits64, t, 0.7)
        (r_lp * g_lp + r_ent * g_ent).sum().backward()
        logp, ent = token_logprobs(h, w, t, 0.7, return_entropy=True, backend="triton")
        (logp * g_lp + ent * g_ent).sum().backward()
        assert (logp.double() - r_lp).abs().max() <= val_tol and (ent.double() - r_ent).abs().max() <= val_tol
        assert rel(h.grad, h64.grad) <= grad_tol and rel(w.grad, w64.grad) <= grad_tol
        x = logits64.detach().to(dtype).requires_grad_()
        x64 = x.double().detach().requires_grad_()
        r_lp, r_ent = ref_logprobs(x64, t, 0.7)
        (r_lp * g_lp + r_ent * g_ent).sum().backward()
        logp, ent = logits_logprobs(x, t, 0.7, return_entropy=True, backend="triton")
        (logp * g_lp + ent * g_ent).sum().backward()
        assert (logp.double() - r_lp).abs().max() <= val_tol and (ent.double() - r_ent).abs().max() <= val_tol
        assert rel(x.grad, x64.grad) <= grad_tol
    x = video(9, 300, 1280, seed=1).to(dev)
    for kw in [dict(rate=0.6), dict(threshold=0.3)]:
        assert torch.equal(prune_video_tokens(x, backend="triton", **kw).cpu(), ref_keep(x.cpu(), **kw))
