"""evaluation.py / inference.py and the eval.py / sample.py CLIs: result schema, ms-swift predictions scoring,
resumable evaluation, bad inputs, the LLM judge (against a local fake OpenAI-compatible server) and sample.py end to
end on a real face clip."""
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import common
import evaluation as E
import inference as S
import reward as R
from reward import LEVELS
from tiny import tokenizer_config

QUESTION = "Analyse the person's attributes, facial expression and emotion step by step, then give the emotion."

ROOT = Path(__file__).resolve().parents[1]
VIDEO_KW = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
TREE = ("<think>\nattribute: gender=female; age=young; hair=long black\nexpression: AU6 cheek raiser; "
        "AU12 lip corner puller\nemotion: happiness (high intensity)\n</think>\n<answer>happiness</answer>")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: one thread avoids oversubscription (10x faster under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def emo(tmp_path_factory):
    """A tiny EmoSynth build (videos, test.jsonl, tokenizer/)."""
    sys.path.insert(0, str(ROOT / "data" / "emosynth"))
    try:
        from prepare import prepare
    finally:
        sys.path.pop(0)
    return Path(prepare(tmp_path_factory.mktemp("emosynth"), num_train=6, num_val=2, num_test=8, workers=1,
                        verbose=False))


@pytest.fixture(scope="module")
def tiny_ckpt(emo, tmp_path_factory):
    """A random tiny VidEmo saved as one of our checkpoints, with the EmoSynth tokenizer (its special ids)."""
    import data as D
    from model import VidEmo
    tok = D.load_tokenizer(emo / "tokenizer")
    torch.manual_seed(0)
    model = VidEmo(tokenizer_config(tok)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    common.save_checkpoint(str(path), model.save_pretrained, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model, tok, _ = S.load_model(str(tiny_ckpt))
    return model, tok


# ----------------------------------------------------------------------------------------------------------------------
# schema, groups, table


def test_result_schema_groups_and_table():
    rows = [
        {"task": "emotion_single", "scores": {"accuracy": 1.0}},
        {"task": "emotion_single", "scores": {"accuracy": 0.0}},
        {"task": "au_detection", "scores": {"f1": 0.5}},
        {"task": "head_pose", "scores": {"accuracy": 1.0}},
        {"task": "appearance_caption", "scores": {"caption": 0.25}},
        {"task": "fine_grained_caption", "scores": {"tree": 0.8}},
        {"skip": "video: no such file"}, {"skip": "video: no such file"}, {"skip": "missing task"},
    ]
    r = E.summarize(rows)
    assert set(r) >= {"tasks", "groups", "skipped"}
    assert r["tasks"]["emotion_single"] == {"metric": "accuracy", "score": 0.5, "n": 2}
    assert r["tasks"]["au_detection"] == {"metric": "f1", "score": 0.5, "n": 1}
    for t in r["tasks"].values():
        assert set(t) == {"metric", "score", "n"} and 0.0 <= t["score"] <= 1.0
    assert r["groups"] == pytest.approx({"attribute": (1.0 + 0.25) / 2, "expression": (0.5 + 0.5) / 2,
                                         "emotion": 0.8})
    assert r["skipped"] == {"video: no such file": 2, "missing task": 1}
    table = E.format_table(r)
    a, x, c = (table.index(s) for s in ("Attribute perception", "Expression analysis", "Fine-grained emotion caption"))
    assert a < x < c
    assert table.index("head_pose") < x < table.index("emotion_single") < table.index("au_detection") < c
    assert "**62.5**" in table and "**50.0**" in table and "**80.0**" in table  # group averages x100
    assert "video: no such file x2" in table
    json.dumps(r)  # JSON-serialisable


def test_options_and_reasons():
    q = "<video>Which emotion? (A) happiness (B) anger (high intensity) (C) fear. Answer with a letter."
    assert R.parse_options(q) == {"A": "happiness", "B": "anger (high intensity)", "C": "fear"}
    assert R.parse_options("Which?\nA. neutral\nB. sadness\n") == {"A": "neutral", "B": "sadness"}
    for resp in ("B", "(B)", "B.", "(B) anger (high intensity)", "<answer>B</answer>"):
        assert R.resolve_options(resp, q) == "anger (high intensity)"
    assert R.resolve_options("A happy person", q) == "A happy person"  # an article, not an option letter
    assert R.resolve_options("B", "no options here") == "B"
    assert E.skip_reason("video videos/1.mp4: /data/videos/1.mp4: no such file") == "video: no such file"
    assert E.skip_reason("600 tokens > max_seq_len 512") == "N tokens > max_seq_len N"
    assert R.task_from_name("/x/MAFW_Multiple-Label-Emotion-Recognition.json") == "emotion_multi"
    assert R.task_from_name("CelebV-Text_Emotion-Caption.json") == "emotion_caption"
    assert R.task_from_name("test_au_detection.jsonl") == "au_detection"
    assert R.task_from_name("whatever.jsonl") is None


# ----------------------------------------------------------------------------------------------------------------------
# --predictions: an ms-swift `swift infer` output scored without a model


def swift_line(question, response, labels, task=None):
    line = {"response": response, "labels": labels, "videos": ["clips/a.mp4"], "logprobs": None,
            "messages": [{"role": "user", "content": "<video>" + question}]}
    if task:
        line["task"] = task
    return line


def test_predictions_file_scoring(tmp_path):
    lines = [
        swift_line("What emotion?", "happiness", "happiness", "emotion_single"),                   # 1
        swift_line("What emotion?", "The person looks sad.", "anger", "emotion_single"),            # 0
        swift_line("Which? (A) happiness (B) sadness", "<answer>B</answer>", "sadness", "emotion_single"),  # 1
        swift_line("Which?", "I think the answer is surprised", "surprise", "emotion_single"),      # 1 (synonym)
        swift_line("Which emotions?", "happiness", "happiness, surprise", "emotion_multi"),         # F1 2/3
        swift_line("Which AUs?", "au12, AU6 cheek raiser", ["AU6 cheek raiser", "AU12 lip corner puller"],
                   "au_detection"),                                                               # F1 1
        swift_line("Analyse.", TREE, TREE, "fine_grained_caption"),                                 # tree 1
        swift_line("Analyse.", "", TREE, "fine_grained_caption"),                                   # tree 0
        swift_line("Which?", "happiness", "happiness", "no_such_task"),                             # skip
        {"labels": "happiness", "task": "emotion_single"},                                          # skip
    ]
    f = tmp_path / "infer_result.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "res.json"
    p = run_script("eval.py", f"--predictions={f}", f"--out={out}")
    assert p.returncode == 0, p.stderr
    assert "Expression analysis" in p.stdout and "Fine-grained emotion caption" in p.stdout
    r = json.loads(out.read_text())
    t = r["tasks"]
    assert t["emotion_single"] == {"metric": "accuracy", "score": 0.75, "n": 4}
    assert t["emotion_multi"]["score"] == pytest.approx(2 / 3)
    assert t["au_detection"]["score"] == pytest.approx(1.0)
    assert t["fine_grained_caption"] == {"metric": "tree", "score": 0.5, "n": 2}
    assert r["groups"]["expression"] == pytest.approx((0.75 + 2 / 3 + 1.0) / 3)
    assert r["groups"]["emotion"] == pytest.approx(0.5)
    assert sum(r["skipped"].values()) == 3 and r["skipped"]["unknown task no_such_task"] == 1

    # task from the official file name when the lines have none; labels given as a string answer
    g = tmp_path / "MAFW_Multiple-Label-Emotion-Recognition.jsonl"
    g.write_text(json.dumps(swift_line("Which emotions?", "sad and angry", "sadness, anger")) + "\n" +
                 json.dumps(swift_line("Which emotions?", "fear", "sadness, anger")) + "\n")
    r = E.score_predictions_file(str(g))
    assert r["tasks"]["emotion_multi"] == {"metric": "f1", "score": 0.5, "n": 2}


# ----------------------------------------------------------------------------------------------------------------------
# evaluate(): batched generation, predictions file, resume


class Boom(Exception):
    pass


def count_generate(model, fail_after=None):
    """Wrap model.generate: count calls; raise Boom on call number fail_after + 1 (an interrupted run)."""
    orig = type(model).generate.__get__(model)
    calls = []

    def gen(*a, **k):
        if fail_after is not None and len(calls) >= fail_after:
            raise Boom()
        calls.append(k.get("input_ids", a[0] if a else None).shape[0])
        return orig(*a, **k)
    model.generate = gen
    return calls


def test_interrupted_eval_resumes(emo, loaded, tmp_path):
    model, tok = loaded
    import data as D
    records = D.load_records(emo / "test.jsonl")[:12]
    records[5] = dict(records[5], videos=["videos/missing.mp4"])  # a counted skip inside the second batch
    kw = dict(batch_size=4, max_new_tokens=5, progress=False)
    try:
        calls = count_generate(model)
        full = E.evaluate(model, tok, records, None, VIDEO_KW, **kw)  # no file: the uninterrupted reference
        assert len(calls) == 3 and sum(calls) == 11
        assert sum(r["n"] for r in full["tasks"].values()) == 11 and full["skipped"] == {"video: no such file": 1}

        pred = tmp_path / "p.jsonl"
        count_generate(model, fail_after=2)
        with pytest.raises(Boom):
            E.evaluate(model, tok, records, None, VIDEO_KW, predictions_path=str(pred), **kw)
        rows = E.read_predictions(str(pred))
        assert len(rows) == 8 and {r["index"] for r in rows} == set(range(8))
        assert all(set(r) >= {"key", "task", "response", "labels", "messages", "videos", "scores"}
                   for r in rows if "skip" not in r)
        with open(pred, "a") as f:  # a crash mid-write leaves a torn line: ignored, then cut before appending
            f.write('{"key": "8:abc", "resp')

        calls = count_generate(model)
        resumed = E.evaluate(model, tok, records, None, VIDEO_KW, predictions_path=str(pred), **kw)
        assert calls == [4]  # only the last batch was generated
        assert resumed == full
        rows = E.read_predictions(str(pred))
        assert sorted(r["index"] for r in rows) == list(range(12))  # each record once

        calls = count_generate(model)  # a finished run: nothing regenerated, same result from the file
        assert E.evaluate(model, tok, records, None, VIDEO_KW, predictions_path=str(pred), **kw) == full
        assert calls == []
        # another mode (EVS pruning) never reuses these rows
        calls = count_generate(model)
        pruned = E.evaluate(model, tok, records[:2], None, VIDEO_KW, predictions_path=str(pred), batch_size=4,
                            max_new_tokens=3, video_prune_rate=0.5, progress=False)
        assert calls == [2] and sum(v["n"] for v in pruned["tasks"].values()) == 2

        # tree reasoning (4 generate calls per record: 3 levels x K samples, then the answer) resumes too, with the
        # same samples as an uninterrupted run (one seed per record)
        recs, tkw = records[:3], dict(batch_size=1, max_new_tokens=3, reasoning="tree", samples=2, progress=False)
        count_generate(model)
        tree_full = E.evaluate(model, tok, recs, None, VIDEO_KW, **tkw)
        tpred = tmp_path / "tree.jsonl"
        count_generate(model, fail_after=5)  # dies inside the second record
        with pytest.raises(Boom):
            E.evaluate(model, tok, recs, None, VIDEO_KW, predictions_path=str(tpred), **tkw)
        calls = count_generate(model)
        assert E.evaluate(model, tok, recs, None, VIDEO_KW, predictions_path=str(tpred), **tkw) == tree_full
        assert calls == [1] * 8
        assert all(r["response"].startswith("<think>\nattribute:") for r in E.read_predictions(str(tpred)))
    finally:
        model.__dict__.pop("generate", None)


def test_eval_video_cache_changes_nothing(emo, loaded):
    """evaluate decodes each clip once (a record sharing a clip is a cache hit) and answers exactly as without it."""
    model, tok = loaded
    import data as D
    records = D.load_records(emo / "test.jsonl")[:3]
    records = records + [dict(r, task="sentiment_single") if r.get("task") != "sentiment_single" else
                         dict(r, task="emotion_single") for r in records]  # every clip asked twice
    kw = dict(batch_size=2, max_new_tokens=4, progress=False)
    cache, none = D.VideoCache(64), D.VideoCache(0)  # 0 MB: nothing fits, every record decodes its clip
    assert E.evaluate(model, tok, records, None, VIDEO_KW, video_cache=cache, **kw) == \
        E.evaluate(model, tok, records, None, VIDEO_KW, video_cache=none, **kw)
    clips = len({r["videos"][0] for r in records})
    assert (cache.misses, cache.hits) == (clips, len(records) - clips) and none.hits == 0


def test_bad_records_are_counted_skips(emo, loaded, tmp_path):
    model, tok = loaded
    good = json.loads((emo / "test.jsonl").read_text().splitlines()[0])
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    os.symlink(emo / good["videos"][0], tmp_path / "videos" / "good.mp4")
    lines = [
        json.dumps(dict(good, videos=["videos/good.mp4"])),
        json.dumps(dict(good, videos=["videos/nope.mp4"])),
        json.dumps(dict(good, videos=["videos/broken.mp4"])),
        json.dumps({"videos": ["videos/good.mp4"], "task": "emotion_single"}),
        json.dumps(dict(good, task="no_such_task", videos=["videos/good.mp4"])),
        json.dumps(dict(good, messages=[{"role": "user", "content": 5}], videos=["videos/good.mp4"])),
        "{not json",
        "[1, 2]",
    ]
    f = tmp_path / "test.jsonl"
    f.write_text("\n".join(lines) + "\n")
    records = E.load_eval_records(str(f))
    r = E.evaluate(model, tok, records, None, VIDEO_KW, batch_size=4, max_new_tokens=3, progress=False)
    assert sum(v["n"] for v in r["tasks"].values()) == 1
    sk = r["skipped"]
    assert sum(sk.values()) == 7, sk
    assert sk["video: no such file"] == 1 and sk["unknown task no_such_task"] == 1
    assert sum(v for k, v in sk.items() if k.startswith("video:")) == 2, sk  # missing + undecodable
    assert any("messages" in k for k in sk) and sum(k.startswith("malformed entry") for k in sk) >= 1


def test_bad_checkpoint_and_video_errors(tmp_path, tiny_ckpt, real_videos):
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.InputError, match="checkpoint directory not found"):
        S.load_model(str(tmp_path / "nope"))
    with pytest.raises(common.InputError, match="no config.json"):
        S.load_model(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for fn in os.listdir(tiny_ckpt):
        if fn != "COMPLETE":
            os.symlink(tiny_ckpt / fn, broken / fn)
    os.remove(broken / "model.safetensors")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(common.InputError, match="could not load the model"):
        S.load_model(str(broken))
    # the CLIs: one clear line on stderr, exit code 2, no traceback
    p = run_script("eval.py", f"--init_from={tmp_path / 'nope'}", f"--test_file={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:"), p.stderr
    p = run_script("sample.py", f"--init_from={tiny_ckpt}", f"--video={tmp_path / 'missing.mp4'}")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "video not found" in p.stderr
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 2000)
    p = run_script("sample.py", f"--init_from={tiny_ckpt}", f"--video={bad}")
    assert p.returncode == 2 and "cannot use" in p.stderr and "Traceback" not in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------------------------------
# LLM judge against a local fake OpenAI-compatible server


class FakeJudge(http.server.BaseHTTPRequestHandler):
    replies = []  # contents returned in turn
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append((self.path, self.headers.get("Authorization"), body))
        content = FakeJudge.replies.pop(0) if FakeJudge.replies else "Score: 5"
        if content is None:
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_llm_judge_fake_server(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = E.Judge(url, "judge-model", "FAKE_JUDGE_KEY", timeout=5, retries=1)
        # reply formats: plain, N/10, markdown, a first unparsable reply then a retry, server errors twice
        FakeJudge.replies[:] = ["Score: 7", "I'd give it 8/10.", "**9**", "no idea", "6", None, None]
        FakeJudge.seen[:] = []
        f = tmp_path / "captions.jsonl"
        ref = "A young female with long black hair and glasses."
        f.write_text("".join(json.dumps(swift_line("Describe the person.", resp, ref, "appearance_caption")) + "\n"
                             for resp in ("a", "b", "c", "d", "e")))
        r = E.score_predictions_file(str(f), judge=judge)
        t = r["tasks"]["appearance_caption"]
        assert t["n"] == 5 and t["judge_failed"] == 1
        assert t["judge"] == pytest.approx((0.7 + 0.8 + 0.9 + 0.6 + 0.0) / 5)
        path, auth, body = FakeJudge.seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-model"
        assert ref in body["messages"][-1]["content"] and "0" in body["messages"][-1]["content"]
        assert 0.0 <= t["score"] <= 1.0  # the rule-based score stays alongside
        assert "judge 60.0" in E.format_table(r)
    finally:
        server.shutdown()
        server.server_close()
    assert E.parse_judge_score("Score: 42. Overall 6") == 6.0 and E.parse_judge_score("nothing") is None


# ----------------------------------------------------------------------------------------------------------------------
# tree reasoning and sample.py end to end


def test_tree_reasoning_structure(loaded, real_videos):
    import data as D
    model, tok = loaded
    rec = {"messages": [{"role": "user", "content": "<video>" + QUESTION}],
           "videos": [str(real_videos / "single_face.mp4")]}
    item = D.encode_prompt(rec, tok, None, VIDEO_KW)
    item["index"] = 0
    gen = torch.Generator().manual_seed(0)
    text, cands = S.tree_reasoning(model, tok, item, K=3, level_max_tokens=6, max_new_tokens=4, generator=gen,
                                   return_candidates=True)
    lines = text.split("\n")
    assert lines[0] == "<think>" and lines[1].startswith("attribute:") and lines[2].startswith("expression:")
    assert lines[3].startswith("emotion:") and lines[4] == "</think>" and text.endswith("</answer>")
    for level, line in zip(LEVELS, lines[1:4]):
        assert len(cands[level]) == 3
        best = max(s for l, s in cands[level] if l.split(":", 1)[1].strip()) if any(
            l.split(":", 1)[1].strip() for l, _ in cands[level]) else None
        chosen = [s for l, s in cands[level] if l == line]
        assert chosen and (best is None or chosen[0] == best)
    # self-consistency: the candidate that agrees with the others wins over a more likely outlier
    lines = ["emotion: happiness", "emotion: anger; fear", "emotion: happiness; surprise"]
    assert S.pick_candidate(lines, [-1.0, -0.1, -2.0], "consistency") == 0
    assert S.pick_candidate(lines, [-1.0, -0.1, -2.0], "logprob") == 1
    assert S.pick_candidate(["emotion:", "emotion: fear"], [-0.1, -3.0], "logprob") == 1  # empty lines lose


def test_sample_cli_real_clip(tiny_ckpt, real_videos, emo, loaded):
    video = real_videos / "single_face.mp4"
    common_args = [f"--init_from={tiny_ckpt}", f"--video={video}", "--max_new_tokens=6", "--level_max_tokens=5"]
    p = run_script("sample.py", *common_args)  # plain: the greedy response of inference.generate_plain
    assert p.returncode == 0, p.stderr
    import data as D
    item = dict(D.encode_prompt({"messages": [{"role": "user", "content": "<video>" + QUESTION}],
                                 "videos": [str(video)]}, loaded[1], "", VIDEO_KW), index=0)
    text = S.generate_plain(*loaded, [item], max_new_tokens=6)[0]
    assert "affective tree:" in p.stdout and "\nanswer:" in p.stdout and "response:\n" + text.strip() in p.stdout
    p = run_script("sample.py", *common_args, "--reasoning=tree", "--samples=2", "--scorer=consistency")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "[attribute] 2 candidates" in out and "[emotion] 2 candidates" in out
    tree = out[out.index("affective tree:"):out.index("response:")].splitlines()
    assert tree[1] == "root"
    assert [l.strip() for l in tree if l.startswith("  ") and not l.startswith("    ")] == list(LEVELS)
    assert "<think>\nattribute:" in out and "</answer>" in out
    # eval CLI on our checkpoint: default video root = the data file's folder; the second run reuses every row
    data = emo / "test.jsonl"
    res = emo.parent / "cli_eval.json"
    args = [f"--init_from={tiny_ckpt}", f"--test_file={data}", "--max_records=3", "--max_new_tokens=3",
            f"--out={res}", "--progress=False"]
    p = run_script("eval.py", *args)
    assert p.returncode == 0, p.stderr
    r = json.loads(res.read_text())
    assert sum(v["n"] for v in r["tasks"].values()) + sum(r["skipped"].values()) == 3
    rows = E.read_predictions(r["predictions"])
    assert len(rows) == 3 and all(row["tag"].startswith("plain|w") for row in rows)
