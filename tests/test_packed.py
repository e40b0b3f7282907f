"""Packed training passes (model.Packed): the rows' real tokens end to end, attention within each sequence. Same
log-probs and gradients as the padded batch (itself pinned to transformers in test_model.py) on fresh random
inputs: left / right padding, GQA and window attention, EVS compaction, empty label rows."""
import pytest
import torch

from model import VidEmo
from tiny import VISION_END, fake_video_inputs, tiny_config


def _labels(inputs, seed):
    """Random supervised spans on text tokens after the video (never on a row's first real token)."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lab = torch.full_like(ids, -100)
    for b in range(ids.shape[0]):
        real = mask[b].nonzero()[:, 0]
        start = int((ids[b] == VISION_END).nonzero()[0, 0]) + 1
        keep = torch.rand(len(real), generator=g) < 0.7
        for j, pos in enumerate(real.tolist()):
            if pos >= start and keep[j]:
                lab[b, pos] = ids[b, pos]
    return lab


def _grads(model, inputs, labels, packed, weights=None, **kw):
    model.zero_grad()
    logp = model(**inputs, labels=labels, packed=packed, **kw)
    w = torch.linspace(-1, 1, logp.numel()) if weights is None else weights
    (logp * w).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MOSTLY_DISTINCT = [(2, 8, 8), (2, 6, 6), (2, 4, 8), (2, 6, 6)]  # 4 lengths in 4 rows: one SDPA call per sequence
# 18 + 0, 17 + 1, 16 + 2 video + leading text tokens: three rows of one length, one longer -> one call per length
MOSTLY_EQUAL = [(2, 6, 6), (1, 2, 34), (2, 4, 8), (2, 8, 8)]


@pytest.mark.parametrize("side,cfg,grids", [("left", dict(tied=True), MOSTLY_DISTINCT),
                                            ("right", dict(tied=False, window=True), MOSTLY_DISTINCT),
                                            ("left", dict(tied=False), MOSTLY_EQUAL)])
def test_packed_equals_padded(side, cfg, grids):
    torch.manual_seed(0)
    model = VidEmo(tiny_config(**cfg)).train()
    inputs = fake_video_inputs(grids, side=side, seed=1, n_after=9)
    n_lengths = inputs["attention_mask"].sum(1).unique().numel()
    assert n_lengths == (4 if grids is MOSTLY_DISTINCT else 2)
    labels = _labels(inputs, seed=2)
    want, g_want = _grads(model, inputs, labels, packed=False)
    got, g_got = _grads(model, inputs, labels, packed=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert g_got.keys() == g_want.keys()
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-6, msg=n)
    # entropy and temperature follow the same path
    a = model(**inputs, labels=labels, temperature=0.7, return_entropy=True, packed=True)
    b = model(**inputs, labels=labels, temperature=0.7, return_entropy=True, packed=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_packed_with_keep_mask_and_a_row_without_labels():
    torch.manual_seed(3)
    model = VidEmo(tiny_config(tied=False, window=True)).eval()
    inputs = fake_video_inputs([(4, 8, 8), (2, 6, 6), (4, 4, 8)], side="left", seed=4, n_after=7)
    labels = _labels(inputs, seed=5)
    labels[1] = -100  # a row that scores nothing still shapes nothing else
    with torch.no_grad():
        emb = model.encode_video(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        keep = model.video_keep_mask(emb, inputs["video_grid_thw"], rate=0.5)
        kw = dict(video_embeds=emb, video_keep_mask=keep)
        rest = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        want = model(**rest, labels=labels, packed=False, **kw)
        got = model(**rest, labels=labels, packed=True, **kw)
    assert not bool(keep.all()) and want.numel() == int((labels != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
