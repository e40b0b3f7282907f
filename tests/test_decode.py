"""Decode with finished rows leaving the batch (generate's compact_every), eager and static-shape (decode="static":
the step a CUDA graph captures): greedy output identical to eager decode that never compacts, and sampled tokens
drawn from the right distributions (the log-probs generate reports equal a teacher-forced forward over what it
sampled, row by row, after rows have left)."""
import pytest
import torch

from model import VidEmo
from tiny import PAD, fake_video_inputs, tiny_config

EOS = list(range(0, 500, 7))  # many stop tokens: rows of a random model end at different steps


def _model(seed=0):
    torch.manual_seed(seed)
    return VidEmo(tiny_config(tied=False, window=True, initializer_range=0.2)).eval()


@pytest.mark.parametrize("every,decode", [(1, "eager"), (3, "eager"), (8, "eager"), (0, "static"), (1, "static"),
                                          (3, "static")])
def test_greedy_identical_with_compaction(every, decode):
    model = _model()
    inp = fake_video_inputs([(2, 8, 8), (2, 6, 6), (2, 4, 8)], side="left", seed=1)
    ids = inp.pop("input_ids")
    kw = dict(max_new_tokens=24, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=2,
              return_logprobs=True, **inp)
    want, lp_want = model.generate(ids, compact_every=0, **kw)
    got, lp_got = model.generate(ids, compact_every=every, decode=decode, **kw)
    ends = [(r == PAD).nonzero()[0, 0].item() if (r == PAD).any() else r.numel() for r in want]
    assert len(set(ends)) > 2  # rows do finish at different steps
    assert torch.equal(got, want)
    torch.testing.assert_close(lp_got, lp_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_decode_ignores_what_fresh_memory_holds(decode, monkeypatch):
    """Static decode attends over the whole cache buffer, the unwritten slots hidden by the mask; a NaN there would
    still poison every score (NaN + -inf = NaN). Fresh allocations are filled with NaN here, as freed memory may be:
    the output must be the one from zeroed memory."""
    model = _model()
    inp = fake_video_inputs([(2, 8, 8)], side="left", seed=3)  # one prompt, no padding: the unpacked prefill
    ids = inp.pop("input_ids")
    kw = dict(max_new_tokens=12, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, decode=decode,
              num_return_sequences=2, **inp)
    want, _ = model.generate(ids, **kw)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype", torch.get_default_dtype()).is_floating_point else empty(*a, **k))
    assert torch.equal(model.generate(ids, **kw)[0], want)


@pytest.mark.parametrize("decode,seconds", [("eager", None), ("static", None), ("eager", [9.8, 0.5])])
def test_sampled_logprobs_match_teacher_forcing_after_compaction(decode, seconds):
    """seconds 9.8 per grid (a 20 s clip sampled to 8 frames): the video's temporal positions pass the text after it;
    decoding continues from the next text position, as the teacher-forced forward places the completion."""
    model = _model(1)
    grids = [(2, 8, 8), (2, 6, 6)] if seconds is None else [(4, 2, 2), (2, 6, 6)]
    inp = fake_video_inputs(grids, side="left", seed=2, seconds=seconds)
    ids = inp.pop("input_ids")
    g = torch.Generator().manual_seed(0 if seconds is None else 1)  # (a sampled video placeholder would end the check)
    toks, lps = model.generate(ids, max_new_tokens=20, temperature=0.8, eos_token_id=EOS, pad_token_id=PAD,
                               num_return_sequences=4, return_logprobs=True, generator=g, compact_every=2,
                               decode=decode, **inp)
    valid = torch.zeros_like(toks, dtype=torch.bool)  # up to and including each row's first stop token
    for i, row in enumerate(toks):
        stop = [j for j, t in enumerate(row.tolist()) if t in EOS]
        valid[i, :(stop[0] + 1 if stop else row.numel())] = True
    assert valid.sum(1).unique().numel() > 2
    rep = lambda t: t.repeat_interleave(4, 0)  # noqa: E731
    full_ids = torch.cat([rep(ids), toks], 1)
    attn = torch.cat([rep(inp["attention_mask"]), valid.long()], 1)
    labels = torch.cat([torch.full_like(rep(ids), -100), toks.masked_fill(~valid, -100)], 1)
    n_vid = model.vision_token_counts(inp["video_grid_thw"])
    with torch.no_grad():
        emb = model.encode_video(inp["pixel_values_videos"], inp["video_grid_thw"])
        per = list(emb.split(n_vid.tolist()))
        emb_rows = torch.cat([p for p in per for _ in range(4)])
        grid = rep(inp["video_grid_thw"])
        tf = model(full_ids, attention_mask=attn, video_embeds=emb_rows, video_grid_thw=grid,
                   second_per_grid_ts=rep(inp["second_per_grid_ts"]), labels=labels, temperature=0.8)
    torch.testing.assert_close(lps[valid], tf, rtol=1e-4, atol=1e-4)


def test_static_decode_shapes_stay_fixed():
    """Every static step sees the same tensors: one cache buffer address per layer, whole-buffer shapes, and batch
    sizes drawn from the power-of-two buckets only (what makes one CUDA graph per size possible)."""
    model = _model(2)
    inp = fake_video_inputs([(2, 8, 8), (2, 6, 6), (2, 4, 8)], side="left", seed=3)
    ids = inp.pop("input_ids")
    seen = []
    attn = model.layers[0].self_attn
    hook = attn.register_forward_hook(lambda m, a, o: a[0].shape[1] == 1 and seen.append(  # decode steps only
        (a[0].shape[0], a[4].k[0].data_ptr(), tuple(a[4].k[0].shape), a[3].shape[-1])))
    try:
        toks, _ = model.generate(ids, max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD, num_return_sequences=2,
                                 compact_every=1, decode="static", **inp)
    finally:
        hook.remove()
    decode_steps = seen
    assert len({ptr for _, ptr, _, _ in decode_steps}) == 1 and len({shp for _, _, shp, _ in decode_steps}) == 1
    assert {m for _, _, _, m in decode_steps} == {ids.shape[1] + 24}  # the mask spans the whole cache
    sizes = [b for b, _, _, _ in decode_steps]
    assert set(sizes) <= {6, 4, 2, 1} and len(set(sizes)) > 1  # 6 rows = the full batch, then buckets
    assert sizes == sorted(sizes, reverse=True)


def test_decode_graphs_needs_cuda():
    model = _model()
    inp = fake_video_inputs([(2, 4, 4)], side="left", seed=1)
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(inp.pop("input_ids"), max_new_tokens=2, decode="graphs", **inp)


@pytest.mark.parametrize("grids,every,temperature", [([(2, 8, 8), (2, 6, 6), (2, 4, 8)], 3, 0.0),
                                                      ([(2, 8, 8), (2, 6, 6), (2, 4, 8)], 1, 0.9),
                                                      ([(2, 6, 6)], 0, 0.9), ([(2, 8, 8), (2, 8, 8)], 8, 0.0)])
def test_prompt_kv_once_per_group_equals_copies(grids, every, temperature):
    """The rollout's cache with each prompt's keys/values once per group (GroupKVCache: a group's decode queries
    attend in one masked SDPA call) against the cache that copies them to every completion: same tokens, same
    log-probs, whether the prompts are padded (packed prefill) or not, greedy or sampled, rows leaving the batch."""
    model = _model(2)
    inp = fake_video_inputs(grids, side="left", seed=4)
    ids = inp.pop("input_ids")
    G = int(torch.randint(2, 6, ()))
    kw = dict(max_new_tokens=20, temperature=temperature, eos_token_id=EOS[::4], pad_token_id=PAD, num_return_sequences=G,
              return_logprobs=True, compact_every=every, **inp)
    want, lp_want = model.generate(ids, share_prompt_kv=False, generator=torch.Generator().manual_seed(5), **kw)
    got, lp_got = model.generate(ids, share_prompt_kv=True, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, want)
    torch.testing.assert_close(lp_got, lp_want, rtol=1e-5, atol=1e-5)
    assert (lp_want != 0).sum() > 5 * len(grids) * G  # rows ran for several steps
