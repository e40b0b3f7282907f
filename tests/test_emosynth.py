# EmoSynth (data/emosynth/prepare.py): determinism, record format against the task table, no label leakage, decodable
# videos, visible cues, and the tokenizer (special tokens, Qwen chat format, lossless round trip).
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("emosynth_prepare", ROOT / "data" / "emosynth" / "prepare.py")
ep = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ep)

TINY = dict(num_train=40, num_val=12, num_test=12, seed=3, workers=2)

# The reference: the task table written out by hand (not read from the module under test)
EMOTIONS = ["neutral", "happiness", "sadness", "anger", "fear", "surprise", "disgust"]
AUS = ["AU1 inner brow raiser", "AU2 outer brow raiser", "AU4 brow lowerer", "AU5 upper lid raiser", "AU6 cheek raiser",
       "AU9 nose wrinkler", "AU12 lip corner puller", "AU15 lip corner depressor", "AU20 lip stretcher",
       "AU25 lips part", "AU26 jaw drop"]
APPEARANCE = ["glasses", "hat", "beard", "long hair", "short hair", "bald", "black hair", "brown hair", "blonde hair",
              "red hair", "gray hair", "young", "adult", "elderly", "male", "female"]
ACTIONS = ["head nod", "head shake", "head turn left", "head turn right", "blink", "mouth open", "none"]
POSES = ["frontal", "turned left", "turned right", "tilted up", "tilted down"]
PERSONS = [f"person {c}" for c in "abcdefgh"]
FINE = ["neutral"] + [f"{e} ({i} intensity)" for e in EMOTIONS[1:] for i in ("low", "medium", "high")]
S3 = ["positive", "neutral", "negative"]
S5 = ["strongly positive", "positive", "neutral", "negative", "strongly negative"]
MICRO = EMOTIONS[1:] + ["none"]
TRANS = [f"{a} to {b}" for a in EMOTIONS for b in EMOTIONS if a != b]
TASKS = {  # task -> (level, metric, label vocabulary or None for free text)
    "appearance_recognition": ("attribute", "f1", APPEARANCE), "appearance_caption": ("attribute", "caption", None),
    "action_recognition": ("attribute", "f1", ACTIONS), "action_caption": ("attribute", "caption", None),
    "identity": ("attribute", "accuracy", PERSONS), "head_pose": ("attribute", "accuracy", POSES),
    "emotion_single": ("expression", "accuracy", EMOTIONS), "emotion_multi": ("expression", "f1", EMOTIONS),
    "emotion_fine": ("expression", "accuracy", FINE), "sentiment_single": ("expression", "accuracy", S3),
    "sentiment_fine": ("expression", "accuracy", S5), "micro_expression": ("expression", "accuracy", MICRO),
    "au_detection": ("expression", "f1", AUS), "emotion_caption": ("expression", "caption", None),
    "emotion_transition": ("expression", "accuracy", TRANS), "fine_grained_caption": ("emotion", "tree", None),
}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return ep.prepare(tmp_path_factory.mktemp("emosynth") / "a", verbose=False, **TINY)


@pytest.fixture(scope="module")
def records(build):
    return {s: read_jsonl(build / f"{s}.jsonl") for s in ("train", "val", "test")}


def test_deterministic_and_idempotent(build, tmp_path):
    again = ep.prepare(tmp_path / "b", verbose=False, **dict(TINY, workers=1))
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.jsonl", "tokenizer/tokenizer.json"):
        assert (build / name).read_bytes() == (again / name).read_bytes(), name
    vids = sorted(p.name for p in (build / "videos").iterdir())
    assert vids == sorted(p.name for p in (again / "videos").iterdir())
    for v in vids:  # 2 workers vs 1: the same mp4 bytes (our integer RGB->YUV, x264 cpu-independent, 1 thread)
        assert (build / "videos" / v).read_bytes() == (again / "videos" / v).read_bytes(), v
    a, b = (json.loads((d / "done.json").read_text()) for d in (build, again))
    assert a == b and a["digest"] == ep.digest(build) == ep.digest(again)
    (again / "videos" / vids[0]).write_bytes((again / "videos" / vids[0]).read_bytes()[:-1])
    assert ep.digest(again) != a["digest"]  # the digest reads the bytes
    meta = [json.loads(l) for l in open(build / "meta.jsonl")]
    spec = {k: v for k, v in meta[0].items() if k not in ("video", "split")}
    assert np.array_equal(ep.render_clip(spec, TINY.get("size", 112)), ep.render_clip(spec, TINY.get("size", 112)))
    # a complete build with the same arguments is left alone; another seed gives other data
    stamp = (build / "done.json").stat().st_mtime_ns
    ep.prepare(build, verbose=False, **TINY)
    assert (build / "done.json").stat().st_mtime_ns == stamp
    other = ep.prepare(tmp_path / "c", verbose=False, **dict(TINY, seed=4, num_train=10, num_val=7, num_test=7))
    assert (other / "val.jsonl").read_bytes() != (build / "val.jsonl").read_bytes()


def test_record_format_and_tasks(build, records):
    for split, recs in records.items():
        assert {r["task"] for r in recs} == set(TASKS), split
        for r in recs:
            assert set(r) <= {"messages", "videos", "task", "level", "labels", "tree"}
            level, metric, vocab = TASKS[r["task"]]
            assert r["level"] == level and ep.TASKS[r["task"]] == (level, metric)
            user, asst = r["messages"]
            assert user["role"] == "user" and user["content"].startswith("<video>")
            assert asst["role"] == "assistant" and asst["content"]
            assert len(r["videos"]) == 1 and re.fullmatch(r"videos/\d{6}\.mp4", r["videos"][0])
            assert (build / r["videos"][0]).is_file()
            labels, answer = r["labels"], asst["content"]
            assert labels and all(isinstance(x, str) and x == x.strip() for x in labels)
            if vocab is not None:  # closed-set tasks: canonical labels, answer = labels joined in order
                assert set(labels) <= set(vocab), (r["task"], labels)
                assert labels == [v for v in vocab if v in labels], (r["task"], labels)
                assert answer == ", ".join(labels)
                if metric == "accuracy":
                    assert len(labels) == 1
            if r["task"] == "action_recognition" and "none" in labels:
                assert labels == ["none"]
            if r["task"] == "appearance_recognition":
                assert sum(x in labels for x in ("long hair", "short hair", "bald")) == 1
                assert sum(x.endswith(" hair") and x not in ("long hair", "short hair") for x in labels) == \
                    (0 if "bald" in labels else 1)
                assert sum(x in labels for x in ("young", "adult", "elderly")) == 1
                assert sum(x in labels for x in ("male", "female")) == 1
            if r["task"] == "emotion_multi":
                assert 1 <= len(labels) <= 2 and ("neutral" not in labels or labels == ["neutral"])
            if r["task"] == "fine_grained_caption":
                assert r["tree"] == answer
                m = re.fullmatch(r"<think>\nattribute: (.+)\nexpression: (.+)\nemotion: (.+)\n</think>\n"
                                 r"<answer>(.+)</answer>", answer)
                assert m, answer
                assert m.group(4) == labels[0] and labels[0] in EMOTIONS and m.group(3) in FINE
                assert m.group(3).split(" (")[0] == labels[0]
                assert all(a in AUS for a in m.group(2).split("; ")) or m.group(2) == "none"
            elif r["task"].endswith("caption"):
                assert answer.endswith(".") and "tree" not in r


def test_labels_match_ground_truth(build, records):
    """Labels agree with the per-clip ground truth in meta.jsonl, and the FACS table of the emotions."""
    facs = {"neutral": [], "happiness": [6, 12], "sadness": [1, 4, 15], "anger": [4, 5, 20],
            "fear": [1, 2, 4, 5, 20, 25], "surprise": [1, 2, 5, 26], "disgust": [9, 15]}
    meta = {m["video"]: m for m in read_jsonl(build / "meta.jsonl")}
    full = {int(a.split()[0][2:]): a for a in AUS}
    for r in records["train"] + records["test"]:
        m, task, labels = meta[r["videos"][0]], r["task"], r["labels"]
        if task == "emotion_single":
            assert labels == [m["emotion"]] and m["kind"] == "expr"
        if task in ("au_detection", "emotion_multi"):
            emos = m["emotions"] or [m["emotion"]]
            aus = sorted({c for e in emos for c in facs[e]})
            if task == "au_detection":
                assert labels == [full[c] for c in aus]
            else:
                assert sorted(labels) == sorted(emos)
        if task == "sentiment_fine":
            pol = {"neutral": "neutral", "happiness": "positive", "surprise": "positive"}.get(m["emotion"], "negative")
            assert labels == [pol if pol == "neutral" or m["intensity"] != "high" else "strongly " + pol]
        if task == "head_pose":
            assert m["head_motion"] == "none" and labels == [m["pose"]]
        if task == "action_recognition":
            au = np.array(m["frames"]["au"])
            mouth = au[:, AUS.index("AU25 lips part")].max() + au[:, AUS.index("AU26 jaw drop")].max() + \
                max(m["frames"]["mouth_act"]) > 0
            assert ("mouth open" in labels) == bool(mouth)
            assert ("blink" in labels) == any(m["frames"]["blink"])
        if task == "micro_expression":
            au = np.array(m["frames"]["au"])
            flashes = (au.max(1) > 0).sum()
            assert (labels == ["none"]) == (flashes == 0) and flashes <= 2


def test_classes_balanced(records):
    train = records["train"]
    for task in ("emotion_single", "sentiment_single", "head_pose", "identity", "micro_expression"):
        counts = {}
        for r in train:
            if r["task"] == task:
                counts[r["labels"][0]] = counts.get(r["labels"][0], 0) + 1
        assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)


def test_questions_do_not_leak_labels(records):
    """Prompts come from a fixed per-task list chosen independently of the label, and never name a class."""
    for recs in records.values():
        for r in recs:
            prompt = r["messages"][0]["content"]
            assert prompt[len("<video>"):] in ep.QUESTIONS[r["task"]]
    for task, qs in ep.QUESTIONS.items():
        assert 1 <= len(qs) <= 3
        vocab = TASKS[task][2] or []
        words = set(vocab) | set(APPEARANCE + ACTIONS + POSES + PERSONS + EMOTIONS + AUS + S5)
        words |= {"low", "medium", "high", "happy", "sad", "angry", "afraid", "surprised", "disgusted", "smile"}
        for q in qs:
            for w in words:
                assert not re.search(r"\b" + re.escape(w.lower()) + r"\b", q.lower()), (task, w, q)


def test_videos_decode(build, records):
    import av
    used = sorted({r["videos"][0] for recs in records.values() for r in recs})
    assert len(used) == sum(TINY[k] for k in ("num_train", "num_val", "num_test"))
    for rel in used[:: max(1, len(used) // 12)]:
        with av.open(str(build / rel)) as c:
            st = c.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert float(st.average_rate) == pytest.approx(4.0)
        assert len(frames) == 8 and frames[0].shape == (112, 112, 3) and frames[0].dtype == np.uint8
        assert frames[0].std() > 20  # a drawing, not a blank frame


def test_other_geometry_cli_and_safety(tmp_path):
    import av
    import subprocess
    import sys
    script = str(ROOT / "data" / "emosynth" / "prepare.py")
    r = subprocess.run([sys.executable, script, f"--out_dir={tmp_path / 'g'}", "--num_train=7", "--num_val=6",
                        "--num_test=6", "--size=56", "--frames=4", "--fps=2", "--workers=1", "--difficulty=2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, script, "--num_trian=7"], capture_output=True, text=True)
    assert r.returncode == 2 and "num_trian" in r.stderr and "Traceback" not in r.stderr  # the common CLI convention
    out = tmp_path / "g"
    assert json.loads((out / "done.json").read_text())["args"]["difficulty"] == 2
    rel = read_jsonl(out / "val.jsonl")[0]["videos"][0]
    with av.open(str(out / rel)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (56, 56, 3)
    clip = ep.render_clip(ep.make_clip(np.random.default_rng(0), "expr", 8, 0, ep.random_appearance(
        np.random.default_rng(0)), emotion="surprise", intensity="high"), 112)
    ep.write_mp4(tmp_path / "m4.mp4", clip, 4, codec="mpeg4")  # the fallback when PyAV lacks libx264
    with av.open(str(tmp_path / "m4.mp4")) as c:
        back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert back.shape == clip.shape and np.abs(back.astype(int) - clip).mean() < 8
    with pytest.raises(ValueError, match="frames"):
        ep.prepare(tmp_path / "bad", verbose=False, frames=7)
    with pytest.raises(ValueError, match="size=113: need an even number >= 28"):  # before any file is written
        ep.prepare(tmp_path / "odd", verbose=False, size=113)
    assert not (tmp_path / "odd").exists()
    with pytest.raises(TypeError, match="num_trian"):
        ep.prepare(tmp_path / "bad", verbose=False, num_trian=3)
    (tmp_path / "foreign" / "videos").mkdir(parents=True)  # someone else's data is never deleted
    with pytest.raises(FileExistsError, match="refusing"):
        ep.prepare(tmp_path / "foreign", verbose=False, num_train=7, num_val=6, num_test=6)


def _clip(**kw):
    app = dict(face="round", skin=1, hair_len="short", hair_colour="brown", age="adult", gender="male", beard=True,
               glasses=True, hat=True)  # the most occluded face: every cue must still show
    app.update(kw.pop("app", {}))
    return ep.render_clip(ep.make_clip(np.random.default_rng(0), "expr", 8, 0, app, **kw), 112)


def changed(a, b):
    return int((np.abs(a.astype(int) - b.astype(int)).max(-1) > 40).sum())


def test_cues_are_bold():
    """Each emotion at low intensity, each AU alone at half amplitude, and each attribute visibly changes the
    picture by a good number of high-contrast pixels (thin cues are not learnt by a tiny model)."""
    apex = {e: _clip(emotion=e, intensity="low")[3] for e in EMOTIONS}
    for i, a in enumerate(EMOTIONS):
        for b in EMOTIONS[i + 1:]:
            assert changed(apex[a], apex[b]) >= 60, (a, b)
    neutral = apex["neutral"]
    for k, code in enumerate(ep.AU_CODES):
        spec = ep.make_clip(np.random.default_rng(0), "expr", 8, 0, dict(
            face="oval", skin=3, hair_len="long", hair_colour="black", age="elderly", gender="female", beard=False,
            glasses=True, hat=True))
        base = ep.render_clip(spec, 112)[3]
        spec["frames"]["au"][3][k] = 0.5
        assert changed(ep.render_clip(spec, 112)[3], base) >= 20, code
    for kw in [dict(app={"glasses": False}), dict(app={"hat": False}), dict(app={"beard": False}),
               dict(app={"hair_len": "long"}), dict(app={"hair_len": "bald"}), dict(app={"hair_colour": "gray"}),
               dict(app={"age": "young"}), dict(app={"age": "elderly"}), dict(app={"gender": "female"}),
               dict(pose="turned left"), dict(pose="tilted up")]:
        assert changed(_clip(**kw)[3], neutral) >= 60, kw
    blink = _clip(blink=True)
    assert changed(blink.min(0), blink.max(0)) >= 12  # eyes close on some frames


def test_micro_and_transition_timing():
    rng = np.random.default_rng(1)
    app = ep.random_appearance(rng)
    micro = ep.render_clip(ep.make_clip(rng, "micro", 8, 0, app, micro="anger"), 112)
    diffs = [changed(f, micro[0]) for f in micro]
    flash = [t for t, d in enumerate(diffs) if d > 0]
    assert len(flash) == 2 and flash[1] == flash[0] + 1 and flash[0] % 2 == 0  # one whole Qwen temporal patch
    trans = ep.render_clip(ep.make_clip(rng, "transition", 8, 0, app, transition=["happiness", "sadness"]), 112)
    assert changed(trans[0], trans[3]) == 0 and changed(trans[4], trans[7]) == 0 and changed(trans[3], trans[4]) > 25


def test_tokenizer(build, records, qwen_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(build / "tokenizer"))
    assert 300 < len(tok) <= 4096
    ids = {}
    for t in ep.QWEN_SPECIAL + ["<think>", "</think>", "<answer>", "</answer>"]:
        ids[t] = tok.encode(t, add_special_tokens=False)
        assert len(ids[t]) == 1 and tok.convert_ids_to_tokens(ids[t][0]) == t, t
    assert len({v[0] for v in ids.values()}) == len(ids)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == ids["<|im_end|>"][0] and tok.pad_token_id == ids["<|endoftext|>"][0]
    # lossless on every text of the build
    texts = {m["content"] for recs in records.values() for r in recs for m in r["messages"]}
    for x in texts:
        assert tok.decode(tok.encode(x, add_special_tokens=False)) == x
    assert tok.decode(tok.encode("héllo  wörld\t✓ AU99", add_special_tokens=False)) == "héllo  wörld\t✓ AU99"
    # Qwen chat format: the default system prompt, and the same text as the real Qwen template given a system turn
    msgs = [{"role": "user", "content": "<video>What emotion?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<video>What emotion?<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "anger"}], tokenize=False)
    assert full == text + "anger<|im_end|>\n"
    qwen = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        qwen.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc[0] == ids["<|im_start|>"][0] and enc[-1] != ids["<|im_end|>"][0]
    parts = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    assert "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>" in \
        tok.apply_chat_template(parts, tokenize=False)


def test_rgb_to_yuv420p_matches_the_bt601_formulas():
    """Our exact RGB->YUV against the BT.601 limited-range formulas in float (rounded), and decodable by PyAV."""
    import av
    rng = np.random.default_rng()
    f = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    out = ep.rgb_to_yuv420p(f)
    assert out.shape == (9, 10) and out.dtype == np.uint8
    x = f.astype(float)
    y = 16 + (65.738 * x[..., 0] + 129.057 * x[..., 1] + 25.064 * x[..., 2]) / 256
    m = x.reshape(3, 2, 5, 2, 3).mean(axis=(1, 3))
    u = 128 + (-37.945 * m[..., 0] - 74.494 * m[..., 1] + 112.439 * m[..., 2]) / 256
    v = 128 + (112.439 * m[..., 0] - 94.154 * m[..., 1] - 18.285 * m[..., 2]) / 256
    flat = out.reshape(-1).astype(float)
    assert np.abs(flat[:60] - y.ravel()).max() <= 1.0
    assert np.abs(flat[60:75] - u.ravel()).max() <= 1.0 and np.abs(flat[75:] - v.ravel()).max() <= 1.0
    back = av.VideoFrame.from_ndarray(out, format="yuv420p").to_ndarray(format="rgb24")
    assert back.shape == f.shape
    with pytest.raises(ValueError, match="even"):
        ep.rgb_to_yuv420p(f[:5])
