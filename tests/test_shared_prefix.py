"""Shared-prefix GRPO (model.group_logprobs, model.SharedPrefix) against the per-row path it replaces: per-token
log-probs, entropies and every parameter's gradient (vision tower included), fp32, fresh random inputs, prompts of
mixed lengths, under each option that changes the passes and runs on CPU."""
import pytest
import torch

import grpo
import lora
from model import VidEmo, vision_token_counts

G = 3


def _batch(model, seed, pruned=False):
    """Three prompts of different video grids and text lengths, G completions each: lengths 1..Tc, a truncated
    one, a sampled video placeholder as a stop."""
    from tiny import IM_END, IMAGE_PAD, PAD, VIDEO_PAD, fake_video_inputs
    inp = fake_video_inputs([(2, 4, 4), (4, 4, 6), (2, 6, 4)], side="left", seed=seed, seconds=[0.5, 1.0, 2.0])
    grid = inp["video_grid_thw"]
    g = torch.Generator().manual_seed(seed)
    Tc = 7
    seqs = torch.randint(0, 500, (3 * G, Tc), generator=g)
    lengths = torch.randint(1, Tc + 1, (3 * G,), generator=g).tolist()
    lengths[0], lengths[1] = Tc, 1
    for j, n in enumerate(lengths):
        if n < Tc or j == 1:
            seqs[j, n - 1] = IM_END
            seqs[j, n:] = PAD
    seqs[4, 1] = VIDEO_PAD
    with torch.no_grad():
        emb = model.encode_video(inp["pixel_values_videos"], grid)
    keep = torch.rand(emb.shape[0], generator=g) > 0.4 if pruned else None
    return grpo.group_batch(inp["input_ids"], inp["attention_mask"], seqs, emb, grid, inp["second_per_grid_ts"],
                            keep, G, vision_token_counts(grid, 2).tolist(), IM_END, PAD, (VIDEO_PAD, IMAGE_PAD),
                            pixels=inp["pixel_values_videos"])


def _run(model, mb, shared, reencode=True, backend="auto", weights=None):
    model.zero_grad()
    lp, ent = grpo.completion_logps(model, mb, 0.7, with_entropy=True, reencode=reencode, backend=backend,
                                    shared_prefix=shared)
    w = weights if weights is not None else torch.linspace(-1, 1, lp.numel()).view_as(lp)
    (lp * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent, grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for n in a[2]:
        scale = b[2][n].abs().max().clamp(min=1e-6)
        assert float((a[2][n] - b[2][n]).abs().max() / scale) < 1e-5, n


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, calls=None):
    """flash_attn_varlen_func's contract in plain torch: sequence i is q[cu_q[i]:cu_q[i+1]] against
    k/v[cu_k[i]:cu_k[i+1]] (kv heads shared by groups of query heads); causal aligns the mask to the bottom right
    (query t of lq sees keys up to t + lk - lq), as flash-attn >= 2.1 does."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    assert max_k == int((cu_k[1:] - cu_k[:-1]).max())
    outs = []
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)  # [H, lq, hd]
        ks, vs = (x[cu_k[i]:cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0) for x in (k, v))
        lq, lk = qs.shape[1], ks.shape[1]
        mask = torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq) if causal else None
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    if calls is not None:
        calls.append(causal)
    return torch.cat(outs)


@pytest.mark.parametrize("case", ["plain", "pruned", "ckpt", "frozen_vision", "lora", "torch_backend", "naive",
                                  "batched", "lower_right", "flash"])
def test_shared_prefix_equals_per_row(case, monkeypatch):
    """Log-probs, entropies and all gradients: shared layout == per-row layout (relative 1e-5). "batched": each
    completion attends as its own row against [prompt K/V; own K/V] (SharedPrefix's other mode); "lower_right": the
    same rows without a mask, causal aligned to the bottom right (CUDA's default, forced here on CPU, completions of
    unequal length right-padded). "flash": the
    shared layout through flash-attn's varlen path (SharedPrefix.attend_flash: prompts causal, each completion
    against [its prompt; itself]), here with a plain-torch stand-in for the CUDA kernel; the per-row side on SDPA."""
    import model as M
    from model import SharedPrefix
    from tiny import tiny_config
    monkeypatch.setattr(SharedPrefix, "mode", "batched" if case in ("batched", "lower_right") else "dense")
    monkeypatch.setattr(SharedPrefix, "lower_right", case == "lower_right")
    calls = []
    if case == "flash":
        monkeypatch.setattr(M, "flash_attn_varlen_func", lambda *a, **k: varlen_reference(*a, **k, calls=calls))
        monkeypatch.setattr(SharedPrefix, "attend", SharedPrefix.attend_flash)
    torch.manual_seed(hash(case) % 1000)
    model = VidEmo(tiny_config(window=case == "plain")).train()
    reencode, backend = True, "auto"
    if case == "ckpt":
        model.gradient_checkpointing = True
    if case == "frozen_vision":  # train_vision=False: the rollout's encoding, the tower gets no gradient
        reencode = False
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("visual."))
    if case == "lora":
        lora.add_adapters(model, 4, 8.0, ("q_proj", "v_proj", "down_proj", "visual.qkv"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_()  # a trained adapter (B = 0 at init would hide it)
    if case in ("torch_backend", "naive"):
        backend = "torch" if case == "torch_backend" else "naive"
    mb = _batch(model, seed=len(case), pruned=case == "pruned")
    want = _run(model, mb, False, reencode, backend)
    got = _run(model, mb, True, reencode, backend)
    _assert_same(got, want)
    if case == "flash":  # two causal calls per layer in the shared forward: the prompts, the completions
        assert all(calls) and len(calls) == 2 * len(model.layers)
    if case == "frozen_vision":
        assert not any(n.startswith("visual.") for n in got[2])
    else:
        assert any(n.startswith("visual.") for n in got[2])
    if case == "lora":
        with lora.disabled(model), torch.no_grad():  # the reference: adapters off, both layouts
            ref_rows = grpo.completion_logps(model, mb, 0.7, shared_prefix=False)[0]
            ref_shared = grpo.completion_logps(model, mb, 0.7, shared_prefix=True)[0]
        torch.testing.assert_close(ref_shared, ref_rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_shared_prefix_loss_and_gradients_on_a_kept_subset(loss_type):
    """Dynamic sampling keeps two of three groups; mu = 2 (old log-probs from pass 0, a changed policy in pass 1);
    the loss of each type and every gradient equal the per-row path's."""
    from tiny import tiny_config
    torch.manual_seed(7)
    model = VidEmo(tiny_config()).train()
    mb = _batch(model, seed=3)
    g = torch.Generator().manual_seed(5)
    mb.adv = torch.randn(3 * G, generator=g)
    mb.ref = torch.randn(mb.valid.shape, generator=g) * 0.1 - 2
    mb.use = torch.tensor([True] * G + [False] * G + [True] * G)
    obj = grpo.Objective(0.04, 0.2, 0.28, loss_type, 9, grad_accum=1)
    obj.begin([mb], torch.device("cpu"))
    sub, _ = obj.batch(mb)
    with torch.no_grad():
        old = grpo.completion_logps(model, sub, 0.7, reencode=True, shared_prefix=False)[0]
        for p in model.parameters():  # pass 1 of mu = 2: the policy moved since the rollout
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = {}
    for shared in (False, True):
        model.zero_grad()
        lp, _ = grpo.completion_logps(model, sub, 0.7, reencode=True, shared_prefix=shared)
        loss, stats = obj(lp, old, sub)
        loss.backward()
        out[shared] = (loss.item(), stats, {n: p.grad.clone() for n, p in model.named_parameters()})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    assert out[True][1]["ratio"] != 1.0 and out[True][1]["ratio"] == pytest.approx(out[False][1]["ratio"], rel=1e-5)
    for n, gw in out[False][2].items():
        scale = gw.abs().max().clamp(min=1e-6)
        assert float((out[True][2][n] - gw).abs().max() / scale) < 1e-5, n


@pytest.mark.parametrize("mode", ["dense", "batched", "lower_right", "auto"])
def test_shared_layout_attends_as_the_rules_say(mode, monkeypatch):
    """model.SharedPrefix: a prompt token sees earlier prompt tokens; a completion token sees its whole prompt and
    the earlier tokens of its own completion, never a sibling's or the next group's (checked against dense
    attention with the rule written out), in either way of computing the completions' attention."""
    from model import SharedPrefix
    monkeypatch.setattr(SharedPrefix, "mode", "batched" if mode == "lower_right" else mode)
    monkeypatch.setattr(SharedPrefix, "lower_right", mode == "lower_right")
    g = torch.Generator()
    # two groups, G = 3, an empty completion; the second group's long completions make "auto" batch them
    plens, clens = torch.tensor([3, 5]), torch.tensor([2, 0, 4, 9, 11, 12])
    N = int(plens.sum() + clens.sum())
    q, k, v = (torch.randn(2, N, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    if mode == "auto":  # G = 3 groups stay dense at the default threshold; from G = 3 on, the long ones batch
        assert [p[0] for *_, p in SharedPrefix(plens, clens, 3, torch.device("cpu")).groups] == ["dense", "dense"]
        monkeypatch.setattr(SharedPrefix, "batch_from_G", 3)
    layout = SharedPrefix(plens, clens, 3, torch.device("cpu"))
    if mode == "auto":
        assert [p[0] for *_, p in layout.groups] == ["dense", "batched"]
    got = layout.attend(q, k, v)  # [N, H, hd]
    group, seg, role = [], [], []  # per token: its group, its completion (-1: prompt)
    for b in range(2):
        group += [b] * int(plens[b])
        seg += [-1] * int(plens[b])
        for j in range(3):
            n = int(clens[b * 3 + j])
            group += [b] * n
            seg += [j] * n
    allowed = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        for t in range(N):
            same = group[i] == group[t]
            allowed[i, t] = same and t <= i and (seg[t] == -1 or seg[t] == seg[i])
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(0, 1)
    torch.testing.assert_close(got, want)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((x * w).sum(), (q, k, v)) for x in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
