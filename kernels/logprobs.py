"""
Fused LM-head scoring: per-token log-probs (and entropies) of targets, never an [N, V] tensor in memory.

    token_logprobs(hidden [N, D], weight [V, D], targets [N])  -> logp [N] (, entropy [N])   from hidden states
    logits_logprobs(logits [N, V], targets [N])                 -> logp [N] (, entropy [N])   from logits held already
    naive_logprobs / naive_logits_logprobs                      -> the same via full log_softmax (tests, benches)

With z = (h @ W.T) / tau, lse = logsumexp(z), p = softmax(z):
    logp = z[target] - lse                 d logp / dz = onehot - p
    H    = lse - sum(p z)                  d H / dz    = -p * (z - sum(p z))
and d/d(h @ W.T) = (d/dz) / tau. Rows whose target == ignore_index give logp = H = 0 and no gradient.

Design of the Triton path of token_logprobs (H100, bf16, N ~ 8k, V ~ 152k, D ~ 3.5k):
- forward: one program per (BLOCK_N x BLOCK_V) logits tile, grouped launch order (L2 reuse of weight tiles) exactly
  like a matmul, but the epilogue reduces the fp32 tile to per-row partials (max, sum-exp, sum-exp*(z-max)) instead
  of storing it: 12 bytes per row per tile instead of 2 bytes per logit. A tiny combine kernel merges the partials and
  dots h with W[target] for the target logit. So the forward costs one GEMM without its [N, V] output write.
- backward: recomputes the logits per vocabulary chunk with the same tile kernel, whose epilogue writes dlogits
  ([N, V_chunk], input dtype, chunk sized by CHUNK_BYTES); cuBLAS then does grad_W[chunk] = dlogits.T @ h (one
  write, no accumulation) and grad_h += dlogits @ W[chunk] (fp32 accumulator, [N, D] is small). Softmax values come
  from the fp32 accumulator, never from bf16-rounded logits. Cost: 4 GEMMs in all (naive: 3) and O(N * V_chunk) memory.
The torch backend does the same thing in plain torch (fp32 chunks of rows x vocabulary); it is the CPU path.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton reads it when kernels are decorated
CHUNK_BYTES = 256 << 20  # Triton backward: bytes of the one dlogits buffer [N, V_chunk]
FWD_ROWS = 16384  # Triton forward: rows per launch (bounds the [rows, V / 128] fp32 partials)
TORCH_CHUNK_ELEMS = 1 << 22  # torch backend: fp32 elements of one logits block (16 MiB)
NEG = -1e30  # finite "minus infinity" for running maxima: keeps (m_old - m_new) * 0 == 0 instead of NaN
_NEG = tl.constexpr(NEG)  # the same, visible inside kernels


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: logits tiles from hidden @ weight.T

def _mm_configs():
    if INTERPRET:  # one small config: the interpreter runs every program in numpy
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 16, "GROUP": 2}, num_warps=4, num_stages=1)]
    c = lambda bn, bv, bk, w, s: triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP": 8},
                                               num_warps=w, num_stages=s)
    return [c(128, 256, 64, 8, 3), c(128, 128, 64, 8, 4), c(128, 128, 64, 4, 4), c(256, 128, 64, 8, 3),
            c(64, 256, 64, 4, 4), c(128, 256, 32, 8, 4), c(64, 128, 32, 4, 4)]


MM_CONFIGS = _mm_configs()
SLOT = min(c.kwargs["BLOCK_V"] for c in MM_CONFIGS)  # vocabulary width of one forward partial
MAX_BV = max(c.kwargs["BLOCK_V"] for c in MM_CONFIGS)
assert all(MAX_BV % c.kwargs["BLOCK_V"] == 0 and c.kwargs["BLOCK_V"] % SLOT == 0 for c in MM_CONFIGS)
EVEN_K = {"EVEN_K": lambda a: a["D"] % a["BLOCK_K"] == 0}


@triton.jit
def _tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    # grouped order: GROUP row tiles sweep the vocabulary together, so each weight tile is read once from HBM per
    # group and each hidden strip stays in L2 (the usual matmul swizzle)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tl.cdiv(V, BLOCK_V)
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_tiles - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _logits_tile(h_ptr, w_ptr, pid_n, pid_v, N, V, D, stride_h, stride_w, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """acc [BLOCK_N, BLOCK_V] fp32 = h[rows] @ w[cols].T; out-of-range rows/cols wrap around (never stored/used)."""
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)) % V
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]  # [BLOCK_N, BLOCK_K]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]  # [BLOCK_K, BLOCK_V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = ks < D - k * BLOCK_K
            a = tl.load(h_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16/fp16
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.autotune(configs=MM_CONFIGS, key=["V", "D"])
@triton.heuristics(EVEN_K)
@triton.jit
def _fwd_tiles_kernel(h_ptr, w_ptr, pm_ptr, ps_ptr, pa_ptr, N, V, D, stride_h, stride_w, n_slots, inv_tau,
                      ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SLOT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                      EVEN_K: tl.constexpr):
    pid_n, pid_v = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP)
    acc = _logits_tile(h_ptr, w_ptr, pid_n, pid_v, N, V, D, stride_h, stride_w, UPCAST, PRECISION,
                       BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = (cols < V)[None, :]
    z = tl.where(cmask, acc * inv_tau, float("-inf"))  # [BLOCK_N, BLOCK_V] fp32
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, 1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    off = rows.to(tl.int64) * n_slots + pid_v * (BLOCK_V // SLOT)
    tl.store(pm_ptr + off, m, mask=rmask)
    tl.store(ps_ptr + off, s, mask=rmask)
    if ENTROPY:
        a = tl.sum(tl.where(cmask, e * (z - m[:, None]), 0.0), 1)
        tl.store(pa_ptr + off, a, mask=rmask)
    for j in tl.static_range(1, BLOCK_V // SLOT):  # this tile spans several slots: the others get neutral partials
        tl.store(pm_ptr + off + j, tl.full((BLOCK_N,), _NEG, tl.float32), mask=rmask)
        tl.store(ps_ptr + off + j, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)
        if ENTROPY:
            tl.store(pa_ptr + off + j, tl.zeros((BLOCK_N,), tl.float32), mask=rmask)


@triton.jit
def _combine_kernel(pm_ptr, ps_ptr, pa_ptr, h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr,
                    N, D, n_slots, stride_h, stride_w, inv_tau, ignore_index, ENTROPY: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    # merge the per-tile partials: M = max, S = sum exp(z - M), A = sum exp(z - M) * (z - M)
    M = tl.full((BLOCK_R,), _NEG, tl.float32)
    S = tl.zeros((BLOCK_R,), tl.float32)
    A = tl.zeros((BLOCK_R,), tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        sl = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (sl < n_slots)[None, :]
        off = rows64[:, None] * n_slots + sl[None, :]
        m = tl.load(pm_ptr + off, mask=mask, other=_NEG)
        s = tl.load(ps_ptr + off, mask=mask, other=0.0)
        M_new = tl.maximum(M, tl.max(m, 1))
        scale = tl.exp(M - M_new)
        w = tl.exp(m - M_new[:, None])
        if ENTROPY:
            a = tl.load(pa_ptr + off, mask=mask, other=0.0)
            A = scale * (A + (M - M_new) * S) + tl.sum(w * (a + (m - M_new[:, None]) * s), 1)
        S = scale * S + tl.sum(w * s, 1)
        M = M_new
    # target logit: fp32 dot of h with W[target]
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (tgt != ignore_index)
    t = tl.where(valid, tgt, 0).to(tl.int64)
    dot = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = valid[:, None] & (ds < D)[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :], mask=dm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + t[:, None] * stride_w + ds[None, :], mask=dm, other=0.0).to(tl.float32)
        dot += h * w
    log_s = tl.log(S)
    lse = M + log_s
    tl.store(logp_ptr + rows, tl.where(valid, tl.sum(dot, 1) * inv_tau - lse, 0.0), mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    if ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, log_s - A / S, 0.0), mask=rmask)


@triton.autotune(configs=MM_CONFIGS, key=["V", "D"])
@triton.heuristics(EVEN_K)
@triton.jit
def _bwd_tiles_kernel(h_ptr, w_ptr, dl_ptr, tgt_ptr, lse_ptr, c_ptr, glp_ptr, gent_ptr, N, V, D, v0,
                      stride_h, stride_w, stride_dl, inv_tau, ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """dlogits [N, V] (V = this chunk's width, w_ptr at the chunk's first row v0) for one tile, recomputed."""
    pid_n, pid_v = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP)
    acc = _logits_tile(h_ptr, w_ptr, pid_n, pid_v, N, V, D, stride_h, stride_w, UPCAST, PRECISION,
                       BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    z = acc * inv_tau
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(glp_ptr + rows, mask=rmask, other=0.0)  # zero on ignored rows
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    p = tl.exp(z - lse[:, None])
    if ENTROPY:
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)  # sum(p z)
        ge = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        d = -p * (g[:, None] + ge[:, None] * (z - c[:, None]))
    else:
        d = -p * g[:, None]
    d = tl.where((cols + v0)[None, :] == tgt[:, None], d + g[:, None], d) * inv_tau
    ptrs = dl_ptr + rows.to(tl.int64)[:, None] * stride_dl + cols[None, :]
    tl.store(ptrs, d.to(dl_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < V)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: rows of logits already in memory (one program per row, online over vocabulary tiles)

def _row_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_V": 128}, num_warps=4)]
    return [triton.Config({"BLOCK_V": 4096}, num_warps=8), triton.Config({"BLOCK_V": 8192}, num_warps=16),
            triton.Config({"BLOCK_V": 2048}, num_warps=4)]


@triton.autotune(configs=_row_configs(), key=["V"])
@triton.jit
def _logits_fwd_kernel(x_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, stride_x, inv_tau, ignore_index,
                       ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = -1e30  # running max, sum exp(z - m), sum exp(z - m) * (z - m)
    s = 0.0
    a = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(z, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if ENTROPY:  # e == 0 where z == -inf (padding or masked logits): skip, 0 * inf is NaN
            a = scale * (a + (m - m_new) * s) + tl.sum(tl.where(e > 0, e * (z - m_new), 0.0), 0)
        s = scale * s + tl.sum(e, 0)
        m = m_new
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    zt = tl.load(x_row + tl.where(valid, tgt, 0)).to(tl.float32) * inv_tau
    log_s = tl.log(s)
    tl.store(logp_ptr + row, tl.where(valid, zt - m - log_s, 0.0))
    tl.store(lse_ptr + row, m + log_s)
    if ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - a / s, 0.0))


@triton.autotune(configs=_row_configs(), key=["V"])
@triton.jit
def _logits_bwd_kernel(x_ptr, dx_ptr, tgt_ptr, lse_ptr, c_ptr, glp_ptr, gent_ptr, V, stride_x, stride_dx, inv_tau,
                       ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(glp_ptr + row)  # zero on ignored rows
    tgt = tl.load(tgt_ptr + row)
    if ENTROPY:
        c = tl.load(c_ptr + row)
        ge = tl.load(gent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32) * inv_tau
        p = tl.exp(z - lse)
        d = -p * g
        if ENTROPY:
            d -= tl.where(p > 0, p * ge * (z - c), 0.0)
        d = tl.where(cols == tgt, d + g, d) * inv_tau
        tl.store(dx_ptr + row * stride_dx + cols, d.to(dx_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers

def _precision(dtype):
    # fp32 inputs must not silently drop to tf32 on GPU; the interpreter upcasts everything to fp32
    return "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"


def _fwd_triton(hidden, weight, targets, inv_tau, entropy, ignore_index):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    rows = min(N, FWD_ROWS)  # partials are [rows, n_slots]: bounded, however many tokens come in
    n_slots = triton.cdiv(V, MAX_BV) * (MAX_BV // SLOT)
    pm = torch.empty(rows, n_slots, device=dev, dtype=torch.float32)
    ps = torch.empty_like(pm)
    pa = torch.empty_like(pm) if entropy else ps
    # slots past the last tile of a narrower-BLOCK_V config are never written: make them neutral
    tail = MAX_BV // SLOT
    pm[:, -tail:] = NEG
    ps[:, -tail:] = 0.0
    pa[:, -tail:] = 0.0
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp.new_empty(0)
    BLOCK_R = 16
    for n0 in range(0, N, rows):
        n = min(rows, N - n0)
        h = hidden[n0:n0 + n]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        _fwd_tiles_kernel[grid](h, weight, pm, ps, pa, n, V, D, h.stride(0), weight.stride(0), n_slots, inv_tau,
                                ENTROPY=entropy, UPCAST=INTERPRET, PRECISION=_precision(hidden.dtype), SLOT=SLOT)
        _combine_kernel[(triton.cdiv(n, BLOCK_R),)](
            pm, ps, pa, h, weight, targets[n0:], logp[n0:], lse[n0:], ent[n0:] if entropy else lse[n0:], n, D,
            n_slots, h.stride(0), weight.stride(0), inv_tau, ignore_index, ENTROPY=entropy, BLOCK_R=BLOCK_R,
            BLOCK_S=64 if INTERPRET else 128, BLOCK_D=64 if INTERPRET else 256, num_warps=4)
    return logp, lse, ent


def _chunk_cols(N, V, elem_bytes):
    cols = CHUNK_BYTES // max(1, N * elem_bytes)
    return max(MAX_BV, min(V, cols // MAX_BV * MAX_BV))


def _bwd_triton(hidden, weight, targets, lse, c, g_lp, g_ent, inv_tau, need_h, need_w):
    N, D = hidden.shape
    V = weight.shape[0]
    entropy = g_ent is not None
    cols = _chunk_cols(N, V, hidden.element_size())
    dl = torch.empty(N, min(cols, V), device=hidden.device, dtype=hidden.dtype)  # the only [N, V_chunk] buffer
    grad_h = torch.zeros(N, D, device=hidden.device, dtype=torch.float32) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w_c, dl_c = weight[v0:v1], dl[:, :v1 - v0]
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(v1 - v0, meta["BLOCK_V"]),)
        _bwd_tiles_kernel[grid](hidden, w_c, dl_c, targets, lse, c if entropy else lse, g_lp,
                                g_ent if entropy else g_lp, N, v1 - v0, D, v0, hidden.stride(0), weight.stride(0),
                                dl.stride(0), inv_tau, ENTROPY=entropy, UPCAST=INTERPRET,
                                PRECISION=_precision(hidden.dtype))
        if need_w:
            torch.mm(dl_c.t(), hidden, out=grad_w[v0:v1])
        if need_h:
            if dl.dtype == torch.float32:
                grad_h.addmm_(dl_c, w_c)
            else:
                grad_h += dl_c @ w_c
    return grad_h, grad_w


def _logits_fwd_triton(logits, targets, inv_tau, entropy, ignore_index):
    N, V = logits.shape
    logp = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp.new_empty(0)
    _logits_fwd_kernel[(N,)](logits, targets, logp, lse, ent if entropy else lse, V, logits.stride(0), inv_tau,
                             ignore_index, ENTROPY=entropy)
    return logp, lse, ent


def _logits_bwd_triton(logits, targets, lse, c, g_lp, g_ent, inv_tau):
    N, V = logits.shape
    entropy = g_ent is not None
    dx = torch.empty_like(logits)
    _logits_bwd_kernel[(N,)](logits, dx, targets, lse, c if entropy else lse, g_lp, g_ent if entropy else g_lp, V,
                             logits.stride(0), dx.stride(0), inv_tau, ENTROPY=entropy)
    return dx


# ----------------------------------------------------------------------------------------------------------------
# torch backend: the same algorithm in fp32 blocks of rows x vocabulary (CPU path, and the reference design)

def _blocks(N, V):
    cols = min(V, max(256, TORCH_CHUNK_ELEMS // max(N, 1)))
    rows = min(N, max(1, TORCH_CHUNK_ELEMS // cols))
    return rows, cols


def _fwd_torch(hidden, weight, targets, inv_tau, entropy, ignore_index):
    N, D = hidden.shape
    V = weight.shape[0]
    rows, cols = _blocks(N, V)
    h32 = hidden.float() * inv_tau if inv_tau != 1.0 else hidden.float()  # [N, D]; z = (h / tau) @ W.T
    m = torch.full((N,), NEG, device=hidden.device)  # running max, sum exp(z - m), sum exp(z - m) * (z - m)
    s = torch.zeros(N, device=hidden.device)
    a = torch.zeros(N, device=hidden.device)
    for v0 in range(0, V, cols):
        w32 = weight[v0:v0 + cols].float()  # [c, D]
        for n0 in range(0, N, rows):
            sl = slice(n0, n0 + rows)
            z = h32[sl] @ w32.T  # [r, c]
            m_new = torch.maximum(m[sl], z.amax(1))
            scale = torch.exp(m[sl] - m_new)
            z -= m_new[:, None]
            e = torch.exp(z)
            if entropy:
                a[sl] = scale * (a[sl] + (m[sl] - m_new) * s[sl]) + (e * z).sum(1)
            s[sl] = scale * s[sl] + e.sum(1)
            m[sl] = m_new
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    zt = torch.empty(N, device=hidden.device)
    for n0 in range(0, N, rows):  # target logits, a row block of W[target] at a time
        zt[n0:n0 + rows] = (h32[n0:n0 + rows] * weight[t[n0:n0 + rows]].float()).sum(1)
    log_s = torch.log(s)
    lse = m + log_s
    logp = torch.where(valid, zt - lse, 0.0)
    ent = torch.where(valid, log_s - a / s, 0.0) if entropy else logp.new_empty(0)
    return logp, lse, ent


def _dlogits_torch(z, lse, c, g, ge, tgt, v0):
    """d/dz of sum(g * logp + ge * H) for a block z [r, c] of scaled logits whose first column is vocabulary v0.
    Overwrites z (in-place ops keep the CPU path at one block of temporaries)."""
    zc = None if ge is None else z - c[:, None]
    p = z.sub_(lse[:, None]).exp_()  # softmax, in z's storage
    if zc is None:
        d = p.mul_(-g[:, None])
    else:
        d = zc.mul_(ge[:, None]).add_(g[:, None]).mul_(p).neg_()
        d.masked_fill_(p == 0, 0.0)  # p == 0 where z == -inf: 0 * inf would be NaN
    hit = (tgt >= v0) & (tgt < v0 + z.shape[1])
    r = hit.nonzero()[:, 0]
    d[r, tgt[r] - v0] += g[r]
    return d


def _bwd_torch(hidden, weight, targets, lse, c, g_lp, g_ent, inv_tau, need_h, need_w):
    N, D = hidden.shape
    V = weight.shape[0]
    rows, cols = _blocks(N, V)
    h32 = hidden.float() * inv_tau if inv_tau != 1.0 else hidden.float()  # [N, D]; z = (h / tau) @ W.T
    grad_h = torch.zeros(N, D, device=hidden.device) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    for v0 in range(0, V, cols):
        w32 = weight[v0:v0 + cols].float()  # [c, D]
        gw = torch.zeros_like(w32) if need_w else None
        for n0 in range(0, N, rows):
            sl = slice(n0, n0 + rows)
            z = h32[sl] @ w32.T  # [r, c]
            d = _dlogits_torch(z, lse[sl], None if c is None else c[sl], g_lp[sl],
                               None if g_ent is None else g_ent[sl], targets[sl], v0)  # d/dz, in z's storage
            if need_h:
                grad_h[sl].addmm_(d, w32)  # times 1/tau at the end
            if need_w:
                gw.addmm_(d.T, h32[sl])  # h32 already carries the 1/tau
        if need_w:
            grad_w[v0:v0 + cols] = gw
    if need_h and inv_tau != 1.0:
        grad_h *= inv_tau
    return grad_h, grad_w


def _logits_fwd_torch(logits, targets, inv_tau, entropy, ignore_index):
    N, V = logits.shape
    rows = max(1, TORCH_CHUNK_ELEMS // V)
    lse = torch.empty(N, device=logits.device)
    ent = torch.zeros(N, device=logits.device) if entropy else lse.new_empty(0)
    for n0 in range(0, N, rows):
        z = logits[n0:n0 + rows].float() * inv_tau  # [r, V]
        lse[n0:n0 + rows] = torch.logsumexp(z, 1)
        if entropy:
            z -= lse[n0:n0 + rows, None]  # log p
            ent[n0:n0 + rows] = -torch.where(z > float("-inf"), z.exp() * z, 0.0).sum(1)
    valid = targets != ignore_index
    zt = logits.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0].float() * inv_tau
    logp = torch.where(valid, zt - lse, 0.0)
    if entropy:
        ent = torch.where(valid, ent, 0.0)
    return logp, lse, ent


def _logits_bwd_torch(logits, targets, lse, c, g_lp, g_ent, inv_tau):
    N, V = logits.shape
    rows = max(1, TORCH_CHUNK_ELEMS // V)
    dx = torch.empty_like(logits)
    for n0 in range(0, N, rows):
        sl = slice(n0, n0 + rows)
        z = logits[sl].float() * inv_tau
        dx[sl] = _dlogits_torch(z, lse[sl], None if c is None else c[sl], g_lp[sl],
                                None if g_ent is None else g_ent[sl], targets[sl], 0).mul_(inv_tau)
    return dx


# ----------------------------------------------------------------------------------------------------------------
# autograd

def _grads_in(ctx, g_logp, g_ent, targets, n):
    """Upstream gradients as fp32, zero on ignored rows; g_ent None when the entropy is not differentiated."""
    valid = (targets != ctx.ignore_index).float()
    g_lp = torch.zeros(n, device=targets.device) if g_logp is None else g_logp.float() * valid
    g_ent = g_ent.float() * valid if (g_ent is not None and ctx.entropy) else None
    return g_lp.contiguous(), None if g_ent is None else g_ent.contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_tau, entropy, use_triton, ignore_index):
        fwd = _fwd_triton if use_triton else _fwd_torch
        logp, lse, ent = fwd(hidden, weight, targets, inv_tau, entropy, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_tau, ctx.entropy, ctx.use_triton, ctx.ignore_index = inv_tau, entropy, use_triton, ignore_index
        ctx.set_materialize_grads(False)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return (None,) * 7
        g_lp, g_ent = _grads_in(ctx, g_logp, g_ent, targets, hidden.shape[0])
        c = lse - ent if g_ent is not None else None  # sum(p z)
        bwd = _bwd_triton if ctx.use_triton else _bwd_torch
        grad_h, grad_w = bwd(hidden, weight, targets, lse, c, g_lp, g_ent, ctx.inv_tau, need_h, need_w)
        return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, None, None, None, None, None


class _LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_tau, entropy, use_triton, ignore_index):
        fwd = _logits_fwd_triton if use_triton else _logits_fwd_torch
        logp, lse, ent = fwd(logits, targets, inv_tau, entropy, ignore_index)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.inv_tau, ctx.entropy, ctx.use_triton, ctx.ignore_index = inv_tau, entropy, use_triton, ignore_index
        ctx.set_materialize_grads(False)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return (None,) * 6
        g_lp, g_ent = _grads_in(ctx, g_logp, g_ent, targets, logits.shape[0])
        c = lse - ent if g_ent is not None else None
        bwd = _logits_bwd_triton if ctx.use_triton else _logits_bwd_torch
        return bwd(logits, targets, lse, c, g_lp, g_ent, ctx.inv_tau), None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# public API

def _use_triton(backend, x):
    if backend == "auto":
        return x.is_cuda
    if backend == "triton":
        if not (x.is_cuda or INTERPRET):
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing kernels")
        return True
    if backend == "torch":
        return False
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _check_targets(targets, V, ignore_index):
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets out of range [0, {V}) (and not ignore_index={ignore_index})")


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, backend="auto",
                   ignore_index=-100):
    """Log-prob of each target under softmax(hidden @ weight.T / temperature), without building the logits.

    hidden [..., D], weight [V, D] (lm_head), targets [...] -> logp [...] fp32 (and entropy [...] fp32).
    Differentiable w.r.t. hidden and weight. backend: 'triton' | 'torch' (chunked, never the whole [N, V]) | 'auto'
    (triton on CUDA, torch otherwise) | 'naive' (the plain log_softmax reference, for debugging).
    """
    if backend == "naive":
        return naive_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index)
    inv_tau = _check_temperature(temperature)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] and weight [V, D] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    V, D = weight.shape
    _check_targets(targets, V, ignore_index)
    if torch.is_autocast_enabled(hidden.device.type):  # follow autocast like the matmul it replaces would
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
    elif hidden.dtype != weight.dtype:
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dt), weight.to(dt)
    use_triton = _use_triton(backend, hidden)
    shape = targets.shape
    h = hidden.reshape(-1, D).contiguous()
    t = targets.reshape(-1).long().contiguous()
    if h.shape[0] == 0:
        z = hidden.sum() * 0 + weight.sum() * 0  # keeps the graph connected
        out = torch.zeros(shape, device=hidden.device) + z.float()
        return (out, out.clone()) if return_entropy else out
    logp, ent = _TokenLogprobs.apply(h, weight.contiguous(), t, inv_tau, bool(return_entropy), use_triton,
                                     int(ignore_index))
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)


def logits_logprobs(logits, targets, temperature=1.0, return_entropy=False, backend="auto", ignore_index=-100):
    """Log-prob of each target under softmax(logits / temperature) in one read of the logits.

    logits [..., V], targets [...] -> logp [...] fp32 (and entropy [...] fp32); differentiable w.r.t. logits.
    """
    inv_tau = _check_temperature(temperature)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match logits' leading dims {tuple(logits.shape[:-1])}")
    V = logits.shape[-1]
    _check_targets(targets, V, ignore_index)
    use_triton = _use_triton(backend, logits)
    shape = targets.shape
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1).long().contiguous()
    if x.shape[0] == 0:
        out = torch.zeros(shape, device=logits.device) + logits.sum().float() * 0
        return (out, out.clone()) if return_entropy else out
    logp, ent = _LogitsLogprobs.apply(x, t, inv_tau, bool(return_entropy), use_triton, int(ignore_index))
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)


def naive_logits_logprobs(logits, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """Reference: full log_softmax (fp32, or fp64 for fp64 input), gather, entropy; builds [N, V] several times."""
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0]
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, ent, 0.0)


def naive_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """Reference: logits = hidden @ weight.T in full, then naive_logits_logprobs."""
    return naive_logits_logprobs(hidden @ weight.T, targets, temperature, return_entropy, ignore_index)
