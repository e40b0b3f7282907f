"""model.py against transformers' Qwen2_5_VLForConditionalGeneration (the reference), fp32, tiny random models."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import VidEmo
from tiny import (IM_END, PAD, VIDEO_PAD, fake_video_inputs, hf_inputs, make_hf_model, pad_batch, text_ids,
                  tiny_config, to_v5_layout)

torch.set_num_threads(2)
TOL = 1e-4
CONFIGS = {"tied": dict(tied=True), "window_gqa": dict(tied=False, window=True)}


def hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**hf_inputs(inputs)).logits


def our_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def max_diff(a, b, mask=None):
    d = (a.float() - b.float()).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(config, HF model, ours loaded from the HF save)."""
    cfg = tiny_config(**CONFIGS[request.param])
    hf = make_hf_model(cfg, seed=0)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return cfg, hf, VidEmo.from_pretrained(d), d


# --- logits ------------------------------------------------------------------------------------------------


def batch_cases():
    gen = torch.Generator().manual_seed(5)
    ids, mask = pad_batch([text_ids(12, gen), text_ids(7, gen)], side="right")
    return {
        "text": {"input_ids": ids, "attention_mask": mask},
        "one_video": fake_video_inputs([(2, 8, 8)], seed=1, seconds=[0.5]),
        "batch_left": fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=2, seconds=[1.0, 0.5]),
        "batch_right": fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="right", seed=3, seconds=[1.0, 0.5]),
        "image": fake_video_inputs([(1, 8, 8)], seed=4, image=True),
        "two_images": fake_video_inputs([(1, 8, 8), (1, 4, 6)], side="left", seed=6, image=True),
    }


@pytest.mark.parametrize("case", list(batch_cases()))
def test_logits_match_hf(pair, case):
    cfg, hf, ours, _ = pair
    inputs = batch_cases()[case]
    ref, out = hf_logits(hf, inputs), our_logits(ours, inputs)
    assert out.shape == ref.shape
    assert max_diff(out, ref, inputs["attention_mask"]) <= TOL


def test_num_params_and_hidden(pair):
    cfg, hf, ours, _ = pair
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == cfg["tie_word_embeddings"]
    inputs = fake_video_inputs([(2, 8, 8)], seed=7)
    with torch.no_grad():
        h = ours(**inputs, return_hidden=True)
        assert torch.allclose(h @ ours.lm_head.weight.T, ours(**inputs), atol=1e-5)


def test_video_embeds_reuse(pair):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=8)
    with torch.no_grad():
        emb = ours.encode_video(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        assert emb.shape == ((64 + 36) * 2 // 4, ours.ts["hidden_size"])
        kw = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        assert torch.equal(ours(**kw, video_embeds=emb), ours(**inputs))


# --- checkpoints -------------------------------------------------------------------------------------------


def test_hf_save_uses_transformers4_names(pair):
    _, _, _, d = pair
    keys = load_file(os.path.join(d, "model.safetensors")).keys()
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_ours_save_loads_in_hf(tmp_path, layout):
    """A fresh VidEmo (our own init) saved by us loads in transformers with no missing/unexpected keys."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cfg = tiny_config(tied=layout == "v4", window=layout == "v5")
    cfg = to_v5_layout(cfg) if layout == "v5" else cfg
    torch.manual_seed(0)
    ours = VidEmo(cfg).eval()
    ours.save_pretrained(tmp_path)
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=9)
    assert max_diff(our_logits(ours, inputs), hf_logits(hf.eval(), inputs), inputs["attention_mask"]) <= TOL
    back = VidEmo.from_pretrained(tmp_path)
    assert torch.equal(our_logits(back, inputs), our_logits(ours, inputs))


def test_transformers5_names_and_sharded(tmp_path):
    cfg = tiny_config(tied=False, window=True)
    hf = make_hf_model(cfg, seed=3)
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="right", seed=10)
    ref = hf_logits(hf, inputs)
    # transformers-5 in-memory names (model.language_model.*, model.visual.*) + v5 config layout
    v5 = tmp_path / "v5"
    v5.mkdir()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd) and any(k.startswith("model.visual.") for k in sd)
    save_file(sd, v5 / "model.safetensors", metadata={"format": "pt"})
    (v5 / "config.json").write_text(json.dumps(to_v5_layout(cfg)))
    ours = VidEmo.from_pretrained(v5)
    assert max_diff(our_logits(ours, inputs), ref, inputs["attention_mask"]) <= TOL
    # our sharded save, with index, loads back in ours and in transformers
    sh = tmp_path / "sharded"
    ours.save_pretrained(sh, max_shard_size=100_000)
    index = json.loads((sh / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sh / "model.safetensors").exists()
    again = VidEmo.from_pretrained(sh)
    assert torch.equal(our_logits(again, inputs), our_logits(ours, inputs))
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(sh, attn_implementation="sdpa").eval()
    assert max_diff(hf_logits(hf2, inputs), ref, inputs["attention_mask"]) <= TOL


def test_dtype_and_gradient_checkpointing(pair):
    _, _, ours, d = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=11)
    model = VidEmo.from_pretrained(d).train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        logits = model(**inputs)
        (logits.float().logsumexp(-1) * inputs["attention_mask"]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    bf = VidEmo.from_pretrained(d, dtype=torch.bfloat16)
    assert bf(**inputs).dtype == torch.bfloat16
    assert ours.to(torch.float64)(**inputs).dtype == torch.float64
    ours.float()


# --- generation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_greedy_generate_matches_hf(pair, decode):
    cfg, hf, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=12)
    L = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(inputs), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD)[:, L:]
    seq, lp = ours.generate(**inputs, max_new_tokens=16, return_logprobs=True, decode=decode)
    assert torch.equal(seq, ref)
    # with an EOS that row 0 emits early: HF stops / pads the same way
    eos = int(ref[0, 3])
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(inputs), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)[:, L:]
    seq, _ = ours.generate(**inputs, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD, decode=decode)
    assert torch.equal(seq, ref)


def test_generate_right_padding_and_text_only(pair):
    _, _, ours, _ = pair
    left = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=13)
    right = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="right", seed=13)
    assert torch.equal(ours.generate(**left, max_new_tokens=8)[0], ours.generate(**right, max_new_tokens=8)[0])
    gen = torch.Generator().manual_seed(0)
    seqs = [text_ids(9, gen), text_ids(5, gen)]
    ids, mask = pad_batch(seqs, side="left")
    batch = ours.generate(ids, mask, max_new_tokens=6)[0]
    for i, s in enumerate(seqs):  # a padded row generates what it generates alone
        alone = ours.generate(torch.tensor([s]), max_new_tokens=6)[0]
        assert torch.equal(batch[i:i + 1], alone)


def teacher_forced_logprobs(model, inputs, seq, n, temperature):
    """log_softmax(logits / T) at the generated tokens, from one full no-cache forward over prompt + completion."""
    ids = inputs["input_ids"].repeat_interleave(n, 0)
    mask = inputs["attention_mask"].repeat_interleave(n, 0)
    emb = model.encode_video(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    sizes = (inputs["video_grid_thw"].prod(-1) // 4).tolist()
    emb = torch.cat([e.repeat(n, 1) for e in emb.split(sizes)])
    gen_mask = torch.ones_like(seq)
    gen_mask[:, 1:] = (seq[:, :-1] != IM_END).long().cummin(1).values  # real up to and including EOS
    logits = model(torch.cat([ids, seq], 1), torch.cat([mask, gen_mask], 1), video_embeds=emb,
                   video_grid_thw=inputs["video_grid_thw"].repeat_interleave(n, 0),
                   second_per_grid_ts=inputs["second_per_grid_ts"].repeat_interleave(n, 0))
    L = ids.shape[1]
    logits = logits[:, L - 1:-1].float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(logits, -1).gather(-1, seq[..., None])[..., 0], gen_mask


def test_sampling_logprobs_teacher_forced(pair):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=14)
    n, temp = 3, 0.7
    g = torch.Generator().manual_seed(0)
    seq, lp = ours.generate(**inputs, max_new_tokens=12, temperature=temp, top_k=40, top_p=0.9,
                            num_return_sequences=n, return_logprobs=True, generator=g, eos_token_id=IM_END,
                            pad_token_id=PAD)
    assert seq.shape[0] == 2 * n and lp.shape == seq.shape
    assert not seq.is_inference() and not lp.is_inference()  # usable as training inputs
    with torch.no_grad():
        ref, gen_mask = teacher_forced_logprobs(ours, inputs, seq, n, temp)
    assert max_diff(lp, ref, gen_mask) <= TOL
    # the same generator seed gives the same samples; copies of one prompt differ
    g = torch.Generator().manual_seed(0)
    seq2, _ = ours.generate(**inputs, max_new_tokens=12, temperature=temp, top_k=40, top_p=0.9,
                            num_return_sequences=n, generator=g, eos_token_id=IM_END, pad_token_id=PAD)
    assert torch.equal(seq, seq2)
    assert not torch.equal(seq[0], seq[1])
    # greedy logprobs are log_softmax of plain logits
    seq, lp = ours.generate(**inputs, max_new_tokens=6, return_logprobs=True)
    with torch.no_grad():
        ref, gen_mask = teacher_forced_logprobs(ours, inputs, seq, 1, 0.0)
    assert max_diff(lp, ref, gen_mask) <= TOL


def test_top_k1_and_tiny_top_p_are_greedy(pair):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=15)
    greedy = ours.generate(**inputs, max_new_tokens=10)[0]
    g = torch.Generator().manual_seed(1)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=10, temperature=1.3, top_k=1, generator=g)[0], greedy)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=10, temperature=1.3, top_p=1e-6, generator=g)[0],
                       greedy)


def test_filter_logits_matches_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in [(0, 0.8), (20, 1.0), (50, 0.6), (5, 0.95)]:
        ref = x.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(VidEmo.filter_logits(x.clone(), k, p)), torch.isinf(ref))


def test_eos_stop_and_pad_fill(pair):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=16)
    greedy, _ = ours.generate(**inputs, max_new_tokens=12)
    eos = [int(greedy[0, 2]), int(greedy[1, 4])]
    seq, lp = ours.generate(**inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, return_logprobs=True)
    stops = [next(i for i, t in enumerate(row.tolist()) if t in eos) for row in greedy]
    assert seq.shape[1] == max(stops) + 1 < 12  # stops once every row has ended
    for r, s in enumerate(stops):
        assert torch.equal(seq[r, :s + 1], greedy[r, :s + 1])
        assert (seq[r, s + 1:] == PAD).all() and (lp[r, s + 1:] == 0).all()


# --- keep-mask (token compression hook) ------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_keep_all_equals_plain(pair, side):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side=side, seed=17)
    n = int((inputs["input_ids"] == VIDEO_PAD).sum())
    keep = torch.ones(n, dtype=torch.bool)
    index, mask = ours.keep_index(inputs["input_ids"], inputs["attention_mask"], keep)
    assert torch.equal(index, torch.arange(inputs["input_ids"].shape[1]).expand_as(index))
    assert torch.equal(mask, inputs["attention_mask"])
    assert torch.equal(our_logits(ours, dict(inputs, video_keep_mask=keep)), our_logits(ours, inputs))


@pytest.mark.parametrize("side", ["left", "right"])
def test_keep_mask_matches_hand_built_reference(pair, side):
    """Reference: per sample, physically delete the dropped placeholders, give transformers the merged video
    features of the survivors and the ORIGINAL 3-D positions of the survivors, no padding."""
    cfg, hf, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side=side, seed=18)
    ids, amask = inputs["input_ids"], inputs["attention_mask"]
    is_vid = ids == VIDEO_PAD
    keep = torch.rand(int(is_vid.sum()), generator=torch.Generator().manual_seed(0)) < 0.5
    out = our_logits(ours, dict(inputs, video_keep_mask=keep))  # [B, L', V]
    index, new_mask = ours.keep_index(ids, amask, keep)
    assert out.shape[:2] == index.shape == new_mask.shape

    hfin = hf_inputs(inputs)
    with torch.no_grad():
        feats = torch.cat(hf.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                     return_dict=True).pooler_output)
        pos, _ = hf.model.get_rope_index(ids, hfin["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
                                         second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=amask)
        embeds = hf.model.get_input_embeddings()(ids).masked_scatter(is_vid[..., None], feats)
    token_keep = amask.bool().clone()
    token_keep[is_vid] = keep
    for b in range(ids.shape[0]):
        cols = token_keep[b]
        with torch.no_grad():
            ref = hf(inputs_embeds=embeds[b:b + 1, cols], position_ids=pos[:, b:b + 1, cols]).logits[0]
        mine = out[b][new_mask[b].bool()]
        assert mine.shape == ref.shape
        assert max_diff(mine, ref) <= TOL
        # keep_index gathers the surviving tokens in order and keeps the padding side
        assert torch.equal(ids[b].gather(0, index[b])[new_mask[b].bool()], ids[b][cols])
    starts_padded = (new_mask[:, 0] == 0).any()
    ends_padded = (new_mask[:, -1] == 0).any()
    assert (starts_padded and not ends_padded) if side == "left" else (ends_padded and not starts_padded)


def test_keep_mask_generate_consistent_with_forward(pair):
    """Greedy generation on a compacted prompt = argmax of a teacher-forced forward with the same keep-mask."""
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=19)
    keep = torch.rand(int((inputs["input_ids"] == VIDEO_PAD).sum()), generator=torch.Generator().manual_seed(1)) < 0.6
    seq, lp = ours.generate(**inputs, video_keep_mask=keep, max_new_tokens=8, return_logprobs=True)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], seq], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(seq)], 1))
    logits = our_logits(ours, dict(full, video_keep_mask=keep))[:, -seq.shape[1] - 1:-1]
    assert torch.equal(logits.argmax(-1), seq)
    assert max_diff(torch.log_softmax(logits, -1).gather(-1, seq[..., None])[..., 0], lp) <= TOL


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config(tied=False, window=True)
    torch.manual_seed(0)
    VidEmo(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_missing_and_broken_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        VidEmo.from_pretrained(saved)
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        VidEmo.from_pretrained(saved)


def test_corrupt_shard(saved):
    (saved / "model.safetensors").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="model.safetensors"):
        VidEmo.from_pretrained(saved)


def test_missing_shard(saved):
    sd = load_file(saved / "model.safetensors")
    os.remove(saved / "model.safetensors")
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:10]}, saved / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < 10 else
                                                "model-00002-of-00002.safetensors") for i, k in enumerate(keys)}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        VidEmo.from_pretrained(saved)


@pytest.mark.parametrize("problem", ["wrong_shape", "unknown_key", "missing_key"])
def test_bad_tensors(saved, problem):
    sd = load_file(saved / "model.safetensors")
    if problem == "wrong_shape":
        key = "model.layers.1.self_attn.k_proj.weight"
        sd[key] = torch.zeros(5, 7)
    elif problem == "unknown_key":
        key = "model.layers.0.self_attn.rotary.weight"
        sd[key] = torch.zeros(3)
    else:
        key = "visual.merger.ln_q.weight"
        del sd[key]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        VidEmo.from_pretrained(saved)
    assert "model.safetensors" in str(e.value) or problem == "missing_key"


def test_bad_forward_inputs(pair):
    _, _, ours, _ = pair
    inputs = fake_video_inputs([(2, 8, 8)], seed=20)
    with pytest.raises(ValueError, match="placeholders"):
        ours(inputs["input_ids"])  # placeholders but no video
    with pytest.raises(ValueError, match="video_keep_mask"):
        ours(**inputs, video_keep_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid"):
        ours(**dict(inputs, video_grid_thw=torch.tensor([[2, 8, 4]])))
