"""grpo.py + train_rl.py: the GRPO maths against an independent float64 reference written from the formulas with
explicit loops; the training-side log-probs against an unpadded per-row forward; end-to-end runs of train_rl.py (its
own process) with a tiny random VidEmo on a tiny EmoSynth build (real rewards + checkpoint + eval, exact resume,
torchrun DDP == one process)."""
import itertools
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
from grpo import grpo_advantages, grpo_loss, token_advantages

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
EPS_LOW, EPS_HIGH = 0.2, 0.28


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster (and steadier on a busy 2-core machine: no spinning thread barriers) on one
    intra-op thread; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------------
# reference implementation: python loops over groups / sequences / tokens, float64, straight from the formulas


def ref_advantages(rewards, G, scale):
    r = [float(x) for x in rewards]
    n = len(r)

    def unbiased_std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    batch_std = unbiased_std(r)
    out = []
    for b in range(n // G):
        grp = r[b * G:(b + 1) * G]
        mean = sum(grp) / G
        std = unbiased_std(grp) if scale == "group" else batch_std
        for x in grp:
            out.append(x - mean if scale == "none" else (x - mean) / (std + 1e-4))
    return torch.tensor(out, dtype=torch.float64)


def ref_loss(logps, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, t_max=None, num_items=None):
    """Differentiable w.r.t. logps (autograd through the scalar ops); returns (loss, stats)."""
    N, T = logps.shape
    t_max = T if t_max is None else t_max
    seq_terms, total, count = [], 0.0, 0
    kl_sum, n_low, n_high, ratio_sum = 0.0, 0, 0, 0.0
    for i in range(N):
        s, c = 0.0, 0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            a = float(adv[i, t]) if adv.dim() == 2 else float(adv[i])  # per token, or one per sequence
            r = torch.exp(logps[i, t] - old[i, t])
            if r < 1 - eps_low:
                r_clip = torch.tensor(1 - eps_low, dtype=torch.float64)  # constant: no gradient through the clip
            elif r > 1 + eps_high:
                r_clip = torch.tensor(1 + eps_high, dtype=torch.float64)
            else:
                r_clip = r
            surrogate = r * a if r * a <= r_clip * a else r_clip * a  # the pessimistic (min) one
            L = -surrogate
            if beta != 0:
                d = ref[i, t] - logps[i, t]
                k3 = torch.exp(d) - d - 1
                L = L + beta * k3
                kl_sum += k3.item()
            n_low += int(r.item() < 1 - eps_low and a < 0)
            n_high += int(r.item() > 1 + eps_high and a > 0)
            ratio_sum += r.item()
            s = s + L
            c += 1
        seq_terms.append(s / max(c, 1))
        total = total + s
        count += c
    if loss_type == "grpo":
        loss = sum(seq_terms) / N
    elif loss_type in ("bnpo",):
        loss = total / max(count, 1)
    elif loss_type == "dapo":
        loss = total / (max(count, 1) if num_items is None else num_items)
    elif loss_type == "dr_grpo":
        loss = total / (N * t_max)
    stats = {"kl": kl_sum / max(count, 1), "clip_low": n_low / max(count, 1), "clip_high": n_high / max(count, 1),
             "clip_region": (n_low + n_high) / max(count, 1), "ratio": ratio_sum / max(count, 1)}
    return loss, stats


def random_batch(seed, B=3, G=4, T=7, mu_gt_1=False, beta=0.04, zero_std_group=True, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    N = B * G
    logps = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3  # log-probs in (-3, 0]
    if mu_gt_1:  # behaviour policy differs: ratios spread well beyond [0.8, 1.28]
        old = logps + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4
    else:
        old = logps.clone()  # stands for logps.detach(): ratio 1
    ref = logps + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.5 if beta else None
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    if empty_row:
        lengths[0] = 0
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # variable completion lengths
    rewards = torch.rand(N, generator=g, dtype=torch.float64).round(decimals=1)
    if zero_std_group:
        rewards[:G] = 0.5  # one group with all-equal rewards
    return logps, old, ref, mask, rewards


# ----------------------------------------------------------------------------------------------------------------------
# advantages


@pytest.mark.parametrize("scale", SCALES)
def test_advantages_match_formula(scale):
    for seed in range(5):
        G = 2 + seed  # group sizes 2..6
        rewards = torch.rand(4 * G, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        rewards[G:2 * G] = 0.25  # a zero-std group
        got = grpo_advantages(rewards, G, scale)
        want = ref_advantages(rewards, G, scale)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.all(got[G:2 * G] == 0), "zero-std group must get advantage 0"
        # the per-group mean is always removed
        torch.testing.assert_close(got.view(-1, G).sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-9)


def test_advantages_all_equal_batch_and_errors():
    for scale in SCALES:
        assert torch.all(grpo_advantages(torch.full((8,), 3.0), 4, scale) == 0)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(torch.zeros(4), 2, "std")


def test_advantages_group_differs_from_batch():
    r = torch.tensor([0.0, 1.0, 0.0, 0.1])
    g, b = grpo_advantages(r, 2, "group"), grpo_advantages(r, 2, "batch")
    assert not torch.allclose(g, b)
    torch.testing.assert_close(g[:2], torch.tensor([-0.5, 0.5]) / (2 ** -0.5 + 1e-4))  # std of {0, 1} = 1/sqrt(2)


# ----------------------------------------------------------------------------------------------------------------------
# loss and its gradient


@pytest.mark.parametrize("loss_type,scale,beta,mu_gt_1",
                         list(itertools.product(LOSS_TYPES, SCALES, (0.0, 0.04), (False, True))))
def test_loss_and_grad_match_reference(loss_type, scale, beta, mu_gt_1):
    for seed in range(3):
        case = 1000 * seed + 10 * LOSS_TYPES.index(loss_type) + SCALES.index(scale)
        logps, old, ref, mask, rewards = random_batch(case, mu_gt_1=mu_gt_1, beta=beta, empty_row=seed == 2)
        adv = grpo_advantages(rewards, 4, scale)
        torch.testing.assert_close(adv, ref_advantages(rewards, 4, scale), rtol=1e-12, atol=1e-12)
        x = logps.clone().requires_grad_(True)
        # mu = 1: old is logps.detach() (ratio exactly 1 in value, gradient of a plain policy gradient)
        old_in = x.detach() if not mu_gt_1 else old
        loss, stats = grpo_loss(x, old_in, ref, adv, mask, beta, EPS_LOW, EPS_HIGH, loss_type, return_stats=True)
        (grad,) = torch.autograd.grad(loss, x)

        y = logps.clone().requires_grad_(True)
        want, want_stats = ref_loss(y, old_in, ref, adv, mask, beta, EPS_LOW, EPS_HIGH, loss_type)
        (want_grad,) = torch.autograd.grad(want, y)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        for k, v in want_stats.items():
            assert stats[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        assert (grad[mask == 0] == 0).all(), "padding must get no gradient"
        if mu_gt_1:
            assert stats["clip_region"] > 0, "test inputs should exercise the clip"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_token_advantages_match_reference(loss_type):
    """split_advantage: two advantages per sequence, the reasoning's before a boundary and the answer's after it;
    the loss, its gradient and stats against the per-token formula; all-equal columns give the per-sequence loss."""
    for seed in range(3):
        logps, old, ref, mask, rewards = random_batch(50 + seed, mu_gt_1=True)
        N, T = logps.shape
        g = torch.Generator().manual_seed(seed)
        a_think = grpo_advantages(rewards, 4)
        a_answer = grpo_advantages(torch.rand(N, generator=g, dtype=torch.float64), 4)
        boundary = torch.randint(0, T + 1, (N,), generator=g)
        adv = token_advantages(a_think, a_answer, boundary, T)  # [N, T]
        assert adv.shape == (N, T)
        for i in range(N):
            for t in range(T):
                assert adv[i, t] == (a_think[i] if t < boundary[i] else a_answer[i])
        x, y = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
        loss, stats = grpo_loss(x, old, ref, adv, mask, 0.04, EPS_LOW, EPS_HIGH, loss_type, return_stats=True)
        want, want_stats = ref_loss(y, old, ref, adv, mask, 0.04, EPS_LOW, EPS_HIGH, loss_type)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, y)[0],
                                   rtol=1e-10, atol=1e-12)
        for k, v in want_stats.items():
            assert stats[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        same = token_advantages(a_think, a_think, boundary, T)
        torch.testing.assert_close(grpo_loss(logps, old, ref, same, mask, 0.04, EPS_LOW, EPS_HIGH, loss_type),
                                   grpo_loss(logps, old, ref, a_think, mask, 0.04, EPS_LOW, EPS_HIGH, loss_type))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", (0.0, 0.04))
def test_on_policy_gradient_closed_form(loss_type, beta):
    """mu = 1: r = 1, so dL/dl_it = w_it * (-A_i + beta * (1 - exp(l_ref - l))) with the aggregation weight w."""
    logps, _, ref, mask, rewards = random_batch(7, beta=beta)
    adv = grpo_advantages(rewards, 4, "group")
    x = logps.clone().requires_grad_(True)
    loss = grpo_loss(x, x.detach(), ref, adv, mask, beta, EPS_LOW, EPS_HIGH, loss_type)
    (grad,) = torch.autograd.grad(loss, x)
    N, T = logps.shape
    m = mask.double()
    w = {"grpo": m / (N * m.sum(1, keepdim=True)), "bnpo": m / m.sum(), "dapo": m / m.sum(),
         "dr_grpo": m / (N * T)}[loss_type]
    per = -adv[:, None] + (beta * (1 - torch.exp(ref - logps)) if beta else 0.0)
    torch.testing.assert_close(grad, w * per, rtol=1e-10, atol=1e-12)
    # the value: with r = 1 and no KL, the loss is -(aggregated advantage), i.e. ~0 for grpo but not 0 in general
    # (the "why is my GRPO loss 0?" question: the gradient is what matters)
    if beta == 0:
        want = {"grpo": -(adv * (m.sum(1) > 0)).sum() / N, "bnpo": -(m * adv[:, None]).sum() / m.sum(),
                "dapo": -(m * adv[:, None]).sum() / m.sum(), "dr_grpo": -(m * adv[:, None]).sum() / (N * T)}
        torch.testing.assert_close(loss, want[loss_type], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_improves_a_bandit(loss_type):
    """The sign and scale end to end: a categorical policy over 6 tokens (3-token completions, reward = count of
    token 0) trained with grpo_advantages + grpo_loss (mu = 2, KL to the initial policy) learns to emit token 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(6, requires_grad=True)
    ref = torch.log_softmax(torch.zeros(6), -1)
    opt = torch.optim.Adam([logits], lr=0.1)
    B, G, T = 4, 8, 3
    for _ in range(30):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, -1), B * G * T, replacement=True, generator=g)
            tokens = tokens.view(B * G, T)
            old = torch.log_softmax(logits, -1)[tokens]  # [B*G, T]
        adv = grpo_advantages((tokens == 0).sum(1).float(), G, "group")
        mask = torch.ones(B * G, T)
        for _ in range(2):
            logps = torch.log_softmax(logits, -1)[tokens]
            loss = grpo_loss(logps, old, ref[tokens], adv, mask, 0.01, 0.2, 0.28, loss_type)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.softmax(logits, -1)[0] > 0.9  # from 1/6


def test_dr_grpo_max_len_and_dapo_num_items():
    logps, old, ref, mask, rewards = random_batch(3, mu_gt_1=True)
    adv = grpo_advantages(rewards, 4, "none")
    for kw, ref_kw, lt in (({"max_completion_length": 32}, {"t_max": 32}, "dr_grpo"),
                           ({"num_items": 123.0}, {"num_items": 123.0}, "dapo")):
        x = logps.clone().requires_grad_(True)
        got = grpo_loss(x, old, ref, adv, mask, 0.04, EPS_LOW, EPS_HIGH, lt, **kw)
        y = logps.clone().requires_grad_(True)
        want, _ = ref_loss(y, old, ref, adv, mask, 0.04, EPS_LOW, EPS_HIGH, lt, **ref_kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, y)[0],
                                   rtol=1e-10, atol=1e-12)


def test_loss_errors_and_float32():
    logps, old, ref, mask, rewards = random_batch(5)
    adv = grpo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, 0.04, 0.2, 0.2, "grpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.2, "ppo")
    # float32 inputs (what the loop feeds) agree with the float64 path
    l32 = grpo_loss(logps.float(), old.float(), ref.float(), adv.float(), mask.bool(), 0.04, 0.2, 0.28, "grpo")
    l64 = grpo_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.28, "grpo")
    assert l32.dtype == torch.float32
    assert abs(l32.item() - l64.item()) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# the training-side plumbing: completion log-probs of a group batch == an unpadded forward of each row alone


def _tiny_model(seed=0):
    from model import VidEmo
    from tiny import tiny_config
    torch.manual_seed(seed)
    return VidEmo(tiny_config()).eval()


def _counts(grid):
    from model import vision_token_counts
    return vision_token_counts(grid, 2).tolist()


@pytest.mark.parametrize("pruned,shared", [(False, True), (True, True), (True, False)])
def test_completion_logps_match_unpadded_forward(pruned, shared):
    from tiny import IM_END, IMAGE_PAD, PAD, VIDEO_PAD, fake_video_inputs
    model = _tiny_model()
    tau, G, Tc = 0.7, 2, 6
    inp = fake_video_inputs([(2, 4, 4), (4, 4, 6)], side="left", seconds=[0.5, 1.0])  # two prompts, left padded
    with torch.no_grad():
        embeds = model.encode_video(inp["pixel_values_videos"], inp["video_grid_thw"])  # [4*... , D]
    keep = torch.rand(embeds.shape[0], generator=torch.Generator().manual_seed(1)) > 0.4 if pruned else None
    g = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, 500, (2 * G, Tc), generator=g)
    lengths = [Tc, 3, 1, 5]  # row 0 truncated (no EOS), the others end with EOS, pad after
    for j, n in enumerate(lengths):
        if j:
            seqs[j, n - 1] = IM_END
            seqs[j, n:] = PAD
    seqs[3, 3] = VIDEO_PAD  # a sampled placeholder ends the completion (scored, never fed back as a video token)
    lengths[3] = 4
    counts = _counts(inp["video_grid_thw"])
    mb = grpo.group_batch(inp["input_ids"], inp["attention_mask"], seqs, embeds, inp["video_grid_thw"],
                          inp["second_per_grid_ts"], keep, G, counts, IM_END, PAD, (VIDEO_PAD, IMAGE_PAD))
    assert mb.lengths.tolist() == lengths and mb.truncated.tolist() == [True, False, False, False]
    for backend in ("naive", "auto"):
        got, ent = grpo.completion_logps(model, mb, tau, with_entropy=True, backend=backend,
                                         shared_prefix=shared)  # [B*G, Tc]
        for j, n in enumerate(lengths):
            b = j // G
            prompt = inp["input_ids"][b][inp["attention_mask"][b] == 1]
            ids = torch.cat([prompt, seqs[j, :n - 1]])[None]  # the last target is never an input
            seg = embeds.split(counts)[b]
            kseg = keep.split(counts)[b] if pruned else None
            with torch.no_grad():
                logits = model(ids, video_embeds=seg, video_grid_thw=inp["video_grid_thw"][b:b + 1],
                               second_per_grid_ts=inp["second_per_grid_ts"][b:b + 1], video_keep_mask=kseg)
            logp_all = torch.log_softmax(logits[0, -n:].double() / tau, -1)  # the completion sits at the end
            want = logp_all.gather(-1, seqs[j, :n, None])[:, 0]
            torch.testing.assert_close(got[j, :n].double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent[j, :n].double(), -(logp_all.exp() * logp_all).sum(-1), rtol=1e-5, atol=1e-5)
            assert (got[j, n:] == 0).all()


def test_model_scores_labels_like_the_logits():
    """model(ids, labels=...) (the nanoGPT model(idx, targets) idiom) == log_softmax of its own logits at the labels,
    with a keep-mask compacting the sequence too; a label on a dropped video token is an error."""
    from tiny import fake_video_inputs
    model = _tiny_model(3)
    inp = fake_video_inputs([(2, 4, 4), (4, 4, 6)], side="right")
    ids, amask = inp["input_ids"], inp["attention_mask"]
    from tiny import VIDEO_PAD
    labels = torch.where((amask == 1) & (ids != VIDEO_PAD), ids, torch.full_like(ids, -100))  # every text token
    with torch.no_grad():
        embeds = model.encode_video(inp["pixel_values_videos"], inp["video_grid_thw"])
        keep = model.video_keep_mask(embeds, inp["video_grid_thw"], rate=0.5)
    kw = dict(attention_mask=amask, video_embeds=embeds, video_grid_thw=inp["video_grid_thw"],
              second_per_grid_ts=inp["second_per_grid_ts"])
    for mask in (None, keep):
        with torch.no_grad():
            logits = model(ids, video_keep_mask=mask, **kw).double()  # [B, L', V]
            logp = model(ids, video_keep_mask=mask, labels=labels, temperature=0.8, **kw)  # [n]
        lab = labels if mask is None else labels.gather(1, model.keep_index(ids, amask, mask)[0])
        sel = lab[:, 1:] != -100
        want = torch.log_softmax(logits[:, :-1] / 0.8, -1).gather(-1, lab[:, 1:].clamp(min=0)[..., None])[..., 0][sel]
        assert logp.shape == want.shape and want.numel() >= 6
        torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    bad = labels.clone()
    bad[ids == VIDEO_PAD] = VIDEO_PAD
    with pytest.raises(ValueError, match="keep-mask drops"):
        model(ids, video_keep_mask=keep, labels=bad, **kw)


def test_completion_logps_gradient_fused_equals_plain():
    from tiny import IM_END, PAD, fake_video_inputs
    model = _tiny_model(1).train()
    inp = fake_video_inputs([(2, 4, 4), (2, 4, 4)], side="left")
    with torch.no_grad():
        embeds = model.encode_video(inp["pixel_values_videos"], inp["video_grid_thw"])
    seqs = torch.randint(0, 500, (4, 5), generator=torch.Generator().manual_seed(3))
    seqs[1, 2] = IM_END
    mb = grpo.group_batch(inp["input_ids"], inp["attention_mask"], seqs, embeds, inp["video_grid_thw"],
                          inp["second_per_grid_ts"], None, 2, _counts(inp["video_grid_thw"]), IM_END, PAD)
    grads = []
    for backend in ("naive", "auto"):
        model.zero_grad()
        logps, _ = grpo.completion_logps(model, mb, 1.0, backend=backend)
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_reencoded_video_matches_rollout_encoding_and_subset():
    """train_vision: the policy pass re-encodes each prompt's video once and shares it with the prompt's G rows.
    Values and every gradient (vision tower included) equal encoding with grad by hand and expanding per group; the
    rows that dynamic sampling keeps (subset) carry their own prompts' pixels. The grad-enabled train-mode pass
    equals the no-grad pass on the same weights: why train_rl takes mu > 1's old log-probs from update pass 0."""
    from tiny import IM_END, PAD, fake_video_inputs
    model = _tiny_model(2).train()
    G = 2
    inp = fake_video_inputs([(2, 4, 4), (4, 4, 6), (2, 6, 4)], side="left")  # three prompts, different grids
    seqs = torch.randint(0, 500, (3 * G, 5), generator=torch.Generator().manual_seed(4))
    seqs[2, 3] = IM_END
    grid = inp["video_grid_thw"]
    with torch.no_grad():
        rollout_embeds = model.encode_video(inp["pixel_values_videos"], grid)
    mb = grpo.group_batch(inp["input_ids"], inp["attention_mask"], seqs, rollout_embeds, grid,
                          inp["second_per_grid_ts"], None, G, _counts(grid), IM_END, PAD,
                          pixels=inp["pixel_values_videos"])
    weights = torch.linspace(-1, 1, seqs.numel()).view_as(seqs)

    def grads_of(batch, reencode, by_hand=False):
        model.zero_grad()
        if by_hand:
            emb = model.encode_video(inp["pixel_values_videos"], grid)
            batch = dataclasses.replace(batch, video_embeds=emb)
        logps, _ = grpo.completion_logps(model, batch, 1.0, reencode=reencode)
        (logps * weights[:logps.shape[0]]).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, g_want = grads_of(mb, False, by_hand=True)
    got, g_got = grads_of(mb, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert g_got.keys() == g_want.keys() and any(n.startswith("visual.") for n in g_got)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-7, msg=n)
    with torch.no_grad():
        plain, _ = grpo.completion_logps(model, mb, 1.0)  # the rollout encoding: same weights, same values
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-6)
    rows = torch.tensor([False] * G + [True] * G + [False] * G)  # keep only the second prompt's group
    sub = dataclasses.replace(mb, adv=torch.zeros(3 * G)).select(rows)
    assert sub.pixels.shape[0] == int(grid[1].prod()) and sub.prompt_grid.tolist() == [grid[1].tolist()]
    with torch.no_grad():
        part, _ = grpo.completion_logps(model, sub, 1.0, reencode=True)
    torch.testing.assert_close(part, want[rows], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# end to end: a few GRPO steps of train_rl.py (its own process) with a tiny random VidEmo on a tiny EmoSynth build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runs train_rl.py as __main__ after swapping in a synthetic reward (argv[1]: real | vowel | constant)
DRIVER = """
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import common, reward, test_grpo
reward.score = {{"real": reward.score, "vowel": test_grpo._vowel_reward,
                 "constant": test_grpo._constant_reward}}[sys.argv.pop(1)]
K = int(os.environ.get("SIGTERM_AT", 0))  # a real SIGTERM to this process before its K-th preemption check
orig, calls = common.StopSignal.should_stop, [0]
def should_stop(self, device=None):
    calls[0] += 1
    if calls[0] == K:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            if self.received:
                break
            time.sleep(0.001)
    return orig(self, device)
common.StopSignal.should_stop = should_stop
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_rl(tmp_path, args, reward="real", nproc=1, check=True, sigterm_at=0):
    """train_rl.py with args in a fresh process -> (metric rows of the steps, CompletedProcess)."""
    driver = tmp_path / "rl_driver.py"
    driver.write_text(DRIVER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                    script=os.path.join(ROOT, "train_rl.py")))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    r = subprocess.run(launcher + [str(driver), reward] + args, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", SIGTERM_AT=str(sigterm_at)), cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"train_rl failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    path = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    return [row for row in rows if "reward" in row], r


@pytest.fixture(scope="module")
def emosynth_tiny(tmp_path_factory):
    """A tiny EmoSynth build and a tiny random VidEmo checkpoint (with the build's tokenizer) to start from."""
    import importlib.util

    import data as D
    from model import VidEmo
    from tiny import tiny_config
    root = tmp_path_factory.mktemp("rl")
    spec = importlib.util.spec_from_file_location("emosynth_prepare", os.path.join(ROOT, "data", "emosynth",
                                                                                   "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    build = root / "build"
    prep.prepare(build, num_train=24, num_val=4, num_test=8, workers=1, verbose=False)
    tok = D.load_tokenizer(build / "tokenizer")
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("bos_token_id", "<|endoftext|>"), ("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    torch.manual_seed(0)
    model = VidEmo(tiny_config(vocab_size=len(tok), **ids))
    init = root / "init"
    model.save_pretrained(init)
    tok.save_pretrained(init)
    return build, init


def _args(build, init, out, **kw):
    base = dict(init_from=init, data_dir=build, out_dir=out, num_generations=4, prompts_per_step=2, grad_accum=2,
                max_completion_length=12, max_steps=2, warmup_steps=0, lr=1e-3, sample_table_every=1,
                eval_at_end=False, tasks=(), eval_every=0)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def _vowel_reward(completion, record, weights=None, lam=1.0):
    """A synthetic reward with spread on a random model (real rewards are all 0 there, so every group is zero-std)."""
    v = sum(ch in "aeiou" for ch in completion) / max(1, len(completion))
    return {"accuracy": v, "format": 0.0, "total": v}


def _constant_reward(completion, record, weights=None, lam=1.0):
    return {"accuracy": 0.5, "format": 0.0, "total": 0.5}


def test_e2e_real_rewards_checkpoint_and_eval(emosynth_tiny, tmp_path):
    build, init = emosynth_tiny
    out = tmp_path / "out"
    rows, _ = run_rl(tmp_path, _args(build, init, out, eval_at_end=True, eval_max_new_tokens=8, eval_batch_size=4,
                                     eval_max_records=4, grad_accum=1, eval_every=2, eval_val_records=1,
                                     tasks=("emotion_single", "fine_grained_caption"), dynamic_sampling=False))
    assert [r["step"] for r in rows] == [1, 2]
    logged = [json.loads(l) for l in open(out / "metrics.jsonl")]
    # the held-out curve: val scores of the RL tasks before step 1 and every eval_every steps
    val_keys = {"val/emotion_single", "val/fine_grained_caption"}
    assert logged[0]["step"] == 0 and set(logged[0]) == {"step"} | val_keys
    assert val_keys <= set(logged[2]) and not val_keys & set(logged[1])
    logged = logged[1:]
    assert len(logged) == 2
    for key in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_region", "completion_len_mean",
                "completion_len_min", "completion_len_max", "t_generate", "t_score", "t_update", "rollout_tok_per_s",
                "grad_norm", "loss"):
        assert key in logged[-1] and math.isfinite(logged[-1][key]), key
    assert any(k.startswith("reward/") for k in logged[-1])
    # the KV-cache sampler and the teacher-forced training forward see the same policy
    assert logged[0]["rollout_logp_diff"] < 1e-4
    assert os.path.isfile(out / "ckpt" / "COMPLETE") and os.path.isfile(out / "ckpt" / "trainer_state.pt")
    result = json.load(open(out / "eval.json"))
    assert result["n"] > 0


def test_frozen_vision_option(emosynth_tiny, tmp_path):
    """--train_vision=False: the vision tower and merger stay exactly the SFT ones; the LM still learns."""
    from model import VidEmo
    build, init = emosynth_tiny
    rows, _ = run_rl(tmp_path, _args(build, init, tmp_path / "out", train_vision=False, max_steps=1, grad_accum=1,
                                     sample_table_every=0), reward="vowel")
    assert rows[0]["grad_norm"] > 0
    a, b = VidEmo.from_pretrained(tmp_path / "out" / "ckpt"), VidEmo.from_pretrained(init)
    moved = [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)]
    assert moved and not any(n.startswith("visual.") for n in moved)


def test_dynamic_sampling_skips_a_step_with_no_signal(emosynth_tiny, tmp_path):
    """Every completion gets the same reward: every group is zero-std, dynamic sampling (the default) drops them all,
    and the step makes no update rather than a KL-only one."""
    from model import VidEmo
    build, init = emosynth_tiny
    rows, _ = run_rl(tmp_path, _args(build, init, tmp_path / "out", max_steps=1, grad_accum=1, sample_table_every=0,
                                     tasks=("emotion_single",)), reward="constant")
    assert rows[0]["frac_reward_zero_std"] == 1.0 and rows[0]["skipped_update"] == 1 and "kl" not in rows[0]
    a, b = VidEmo.from_pretrained(tmp_path / "out" / "ckpt"), VidEmo.from_pretrained(init)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("kw,needle", [
    (dict(init_from="no_such_ckpt"), "train_sft.py"),
    (dict(tasks=("emotion_singel",)), "unknown task"),
    (dict(prompts_per_step=3), "prompts_per_step"),
    (dict(replay_per_micro=-1), "replay_per_micro"),
    (dict(replay_intensity_weight=0.0), "replay_intensity_weight"),
    (dict(replay_tasks=("head_pos",)), "replay_tasks"),
    (dict(guide_tasks=("emotion_singel",)), "guide_tasks"),
    (dict(val_file="no_val.jsonl", eval_every=10), "val_file"),
    (dict(resume=True, out_dir="fresh"), "resume"),
])
def test_missing_sft_checkpoint_and_bad_config_errors(emosynth_tiny, tmp_path, kw, needle):
    """One line naming the problem, exit code 2, no traceback."""
    build, init = emosynth_tiny
    kw = {k: (str(tmp_path / v) if k in ("init_from", "val_file", "out_dir") else v) for k, v in kw.items()}
    _, r = run_rl(tmp_path, _args(build, init, tmp_path / "out", **kw), check=False)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# every option that changes the update path at once: KL to the reference, mu = 2 (old != current), EVS pruning (one
# keep-mask shared by all passes), dynamic sampling, batch-level reward scaling, SFT replay (its own stream, one
# replayed record beside each micro-batch, in its forward and backward); one prompt per micro-batch
RUN_KW = dict(beta=0.04, num_iterations=2, video_prune_rate=0.5, dynamic_sampling=True, scale_rewards="batch",
              prompts_per_step=2, grad_accum=2, max_completion_length=8, sample_table_every=0, replay_per_micro=1)
COMPARE = ("loss", "grad_norm", "kl", "reward", "reward_std", "entropy", "clip_region", "completion_len_mean",
           "replay_nll")


@pytest.fixture(scope="module")
def straight_run(emosynth_tiny, tmp_path_factory):
    """Two uninterrupted steps with a synthetic reward (so groups have spread): (metric rows, out_dir)."""
    build, init = emosynth_tiny
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "out"
    rows, _ = run_rl(tmp, _args(build, init, out, **RUN_KW), reward="vowel")
    return rows, out


def test_e2e_learning_signal_and_exact_resume(emosynth_tiny, straight_run, tmp_path):
    from model import VidEmo
    build, init = emosynth_tiny
    straight, out = straight_run
    assert straight[0]["frac_reward_zero_std"] < 1 and straight[0]["grad_norm"] > 0
    assert straight[0]["rollout_logp_diff"] < 1e-4  # pruned video tokens: same keep-mask in every pass
    assert straight[1]["kl"] > 0  # the policy moved away from the reference
    a = VidEmo.from_pretrained(out / "ckpt")
    b = VidEmo.from_pretrained(init)
    moved = [n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)]
    assert any(n.startswith("visual.") for n in moved) and any(n.startswith("layers.") for n in moved)  # train_vision
    # killed after step 1, resumed: the same rollouts and updates as the straight run
    first, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", stop_at_step=1, **RUN_KW), reward="vowel")
    both, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", resume=True, **RUN_KW), reward="vowel")
    assert [r["step"] for r in first] == [1] and [r["step"] for r in both] == [1, 2]
    for want, got in zip(straight, both):
        for k in COMPARE:
            assert got[k] == pytest.approx(want[k], abs=1e-6), k
    c = VidEmo.from_pretrained(tmp_path / "b" / "ckpt")  # and the same weights after the second update
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_e2e_sigterm_checkpoints_and_resume_is_exact(emosynth_tiny, straight_run, tmp_path):
    """SIGTERM before step 2 (save_every off): a checkpoint at step 1, exit 143 with the resume command; --resume
    gives the uninterrupted run's step 2."""
    build, init = emosynth_tiny
    straight, _ = straight_run
    kw = dict(RUN_KW, save_every=0)
    first, r = run_rl(tmp_path, _args(build, init, tmp_path / "p", **kw), reward="vowel", check=False, sigterm_at=2)
    assert r.returncode == 143 and "--resume=True" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert [x["step"] for x in first] == [1]
    both, _ = run_rl(tmp_path, _args(build, init, tmp_path / "p", resume=True, **kw), reward="vowel")
    assert [x["step"] for x in both] == [1, 2]
    for k in COMPARE:
        assert both[1][k] == pytest.approx(straight[1][k], abs=1e-6), k


def test_e2e_ddp_two_ranks_equal_one_process(emosynth_tiny, straight_run, tmp_path):
    """torchrun (gloo, 2 CPU ranks, 1 prompt each) reproduces one process accumulating both micro-batches: the
    same rollouts, advantages (batch std gathered over ranks), dapo/grpo normalisation and DDP-reduced gradients
    (the LM-head scoring runs inside the wrapped forward)."""
    build, init = emosynth_tiny
    straight, _ = straight_run
    ddp, _ = run_rl(tmp_path, _args(build, init, tmp_path / "ddp", **dict(RUN_KW, grad_accum=1)), reward="vowel",
                    nproc=2)
    assert [r["step"] for r in ddp] == [1, 2]
    for want, got in zip(straight, ddp):
        for k in COMPARE:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def _predictions(out):
    return [(p["key"], p["response"]) for p in map(json.loads, open(out / "eval_predictions.jsonl"))]


@pytest.mark.parametrize("mu", [1, 2])
def test_e2e_fsdp_two_ranks_equal_one_process(emosynth_tiny, straight_run, tmp_path, mu):
    """FSDP2 (gloo, 2 CPU ranks, policy and reference sharded) == one process on the same global batch. Step 1
    starts from identical weights: same rollouts, losses and grad norms within 1e-5. (Later steps are not compared:
    FSDP's reduce-scatter rounds the gradient sum differently from one process at 1e-7, and Adam's first steps move
    every element by ~lr * sign(g), so mathematically-zero gradients such as the key biases' flip sign on noise.)
    mu = 1 also checkpoints every block of the policy pass, and evaluates greedily at the end on the gathered
    weights: the same predictions as one process. mu = 2
    also stops after step 1 and resumes under FSDP: the same step 2 as the uninterrupted FSDP run."""
    build, init = emosynth_tiny
    kw = dict(RUN_KW, num_iterations=mu)
    if mu == 1:
        kw.update(eval_at_end=True, eval_max_records=4, eval_max_new_tokens=8)
        one, _ = run_rl(tmp_path, _args(build, init, tmp_path / "one", **kw), reward="vowel")
    else:
        one = straight_run[0]
    fsdp_kw = dict(kw, grad_accum=1, fsdp=True, grad_checkpointing=mu == 1)  # checkpointing changes no number
    sharded, _ = run_rl(tmp_path, _args(build, init, tmp_path / "fsdp", **fsdp_kw), reward="vowel", nproc=2)
    assert [r["step"] for r in sharded] == [1, 2]
    for k in COMPARE:
        assert sharded[0][k] == pytest.approx(one[0][k], rel=1e-5, abs=1e-7), k
    if mu == 1:
        assert _predictions(tmp_path / "fsdp") == _predictions(tmp_path / "one")
        return
    first, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", stop_at_step=1, **fsdp_kw), reward="vowel",
                      nproc=2)
    both, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", resume=True, **fsdp_kw), reward="vowel", nproc=2)
    assert [r["step"] for r in first] == [1] and [r["step"] for r in both] == [1, 2]
    for k in COMPARE:
        assert both[1][k] == pytest.approx(sharded[1][k], rel=1e-6, abs=1e-7), k


FSDP_GENERATE = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch, common
from model import VidEmo
from tiny import IM_END, PAD, fake_video_inputs, tiny_config
rank, world, dev = common.setup_distributed("cpu")
torch.manual_seed(0)
model = VidEmo(tiny_config(initializer_range=0.2))  # a large init: the greedy tokens vary
plain = VidEmo(model.config)
plain.load_state_dict(model.state_dict())
inp = fake_video_inputs([(2, 4, 4), (2, 4, 6), (2, 6, 4)], seed=1)
ids = inp.pop("input_ids")
kw = dict(max_new_tokens=12, temperature=0.0, eos_token_id=[IM_END], pad_token_id=PAD, **inp)
want, _ = plain.generate(ids, **kw)
common.shard_model(model, bf16=False)
with common.unsharded(model):
    got, _ = model.generate(ids, **kw)
per_block, _ = model.generate(ids, **kw)  # no explicit gather: FSDP all-gathers block by block
assert torch.equal(got, want) and torch.equal(per_block, want), (got, want)
assert len(set(want.flatten().tolist())) > 3, want  # not a constant sequence
with open({out!r} + f"/rank{{rank}}.ok", "w") as f:  # a file per rank: the ranks' prints can interleave
    f.write(str(tuple(want.shape)))
common.cleanup_distributed()
"""


def test_fsdp_generation_token_identical(tmp_path):
    """Greedy generation by a 2-rank FSDP2-sharded model (gathered once for the rollout, or block by block) is
    token-identical to the unsharded model."""
    driver = tmp_path / "gen.py"
    driver.write_text(FSDP_GENERATE.format(root=ROOT, tests=os.path.join(ROOT, "tests"), out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]  # both ranks got there


def test_e2e_lora_reference_is_the_base_and_resume_is_exact(emosynth_tiny, tmp_path):
    """LoRA GRPO: the reference is the policy with its adapters off, so the KL is 0 before the first update and > 0
    after it; only adapted layers move in the merged checkpoint; a stop + resume reproduces the straight run."""
    from model import VidEmo
    build, init = emosynth_tiny
    kw = dict(RUN_KW, num_iterations=1, lora_rank=4, lora_alpha=8, lr=1e-2)
    straight, _ = run_rl(tmp_path, _args(build, init, tmp_path / "a", **kw), reward="vowel")
    assert straight[0]["kl"] == pytest.approx(0.0, abs=1e-9) and straight[1]["kl"] > 1e-6
    first, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", stop_at_step=1, **kw), reward="vowel")
    both, _ = run_rl(tmp_path, _args(build, init, tmp_path / "b", resume=True, **kw), reward="vowel")
    assert [r["step"] for r in first] == [1] and [r["step"] for r in both] == [1, 2]
    for k in COMPARE:
        assert both[1][k] == pytest.approx(straight[1][k], rel=1e-6, abs=1e-7), k
    a, b = VidEmo.from_pretrained(tmp_path / "a" / "ckpt"), VidEmo.from_pretrained(init)
    moved = {n for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if not torch.equal(p, q)}
    assert moved and all(n.startswith("layers.") and n.endswith("_proj.weight") for n in moved), moved


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("B", [1, 5])
def test_a_group_of_equal_rewards_has_zero_advantage_and_is_flat(scale, B):
    """Fresh random float32 rewards, some groups all one value (a float32 mean of equal values can miss it by an ulp,
    and their std is then ~1e-7, not 0): those groups get advantage exactly 0 and grpo.flat_groups flags them,
    and only them, at one group and at several."""
    torch.manual_seed(B)
    G = 8
    rewards = torch.rand(B, G) * 3
    equal = torch.arange(B) % 2 == 0  # [B]
    rewards[equal] = torch.rand(int(equal.sum()), 1) * 3 + 0.1  # 2.1-like values, not powers of two
    adv = grpo.grpo_advantages(rewards.flatten(), G, scale).view(B, G)
    assert (adv[equal] == 0).all()
    ref = rewards - rewards.double().mean(1, keepdim=True).float()  # the other groups: the formula
    if scale == "group":
        ref = ref / (rewards.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        ref = ref / (rewards.flatten().std() + 1e-4)
    torch.testing.assert_close(adv[~equal], ref[~equal], rtol=1e-5, atol=1e-5)
    assert grpo.flat_groups(rewards.flatten(), G).tolist() == equal.tolist()
