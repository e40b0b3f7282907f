"""eval.py's --report (one self-contained HTML file: tables, bars, gallery with the frames the model saw, training
curves) and --export_official (the official VidEmo evaluation's file names and JSONL fields), read back by
--predictions=DIR to the same numbers."""
import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import data as D
import evaluation as E
import report
import reward as R
from tiny import tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def emo(tmp_path_factory):
    from tiny import build_emosynth
    return Path(build_emosynth(tmp_path_factory.mktemp("emosynth"), num_train=6, num_val=2, num_test=6, workers=1))


@pytest.fixture(scope="module")
def run(emo, tmp_path_factory):
    """A random tiny checkpoint inside a training out_dir with a metrics.jsonl, evaluated by eval.py with --report
    and --export_official."""
    tmp = tmp_path_factory.mktemp("run")
    tok = D.load_tokenizer(emo / "tokenizer")
    torch.manual_seed(0)
    from model import VidEmo
    common.save_checkpoint(str(tmp / "out" / "ckpt"), VidEmo(tokenizer_config(tok)).save_pretrained, tokenizer=tok)
    with open(tmp / "out" / "metrics.jsonl", "w") as f:
        for s in range(1, 41):
            f.write(json.dumps({"step": s, "loss": 3.0 / s ** 0.5, "lr": 1e-3 * min(1, s / 5)}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "val_loss": 2.5 / s ** 0.4}) + "\n")
        f.write('{"step": 41, "loss": 0.4')  # a torn last line (a crash mid-write) is passed over
    r = run_script("eval.py", f"--init_from={tmp / 'out'}", f"--test_file={emo / 'test.jsonl'}",
                   f"--out={tmp / 'eval.json'}", f"--report={tmp / 'report.html'}",
                   f"--export_official={tmp / 'official'}", "--max_new_tokens=12", "--batch_size=16",
                   "--progress=False")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def numbers(result):
    """The scores of an eval.json that an official-format file carries (generation cost is not among them)."""
    out = {"n": result["n"], **{f"skipped/{k}": v for k, v in result["skipped"].items()},
           **{f"group/{g}": v for g, v in result["groups"].items()}}
    for t, v in result["tasks"].items():
        out.update({f"{t}/{k}": x for k, x in v.items() if k not in ("tokens", "seconds", "metric")})
    return out


def max_diff(a, b):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    return max(abs(a[k] - b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------------
# --export_official


def test_export_then_rescore_gives_the_same_eval_json(run):
    folder = run / "official" / "out"  # the method name: the out_dir holding ckpt/
    files = sorted(p.name for p in folder.iterdir())
    assert "AffWild2_Action_Unit_Detection.json" in files and "caption_test_sampling_v2_all_example.json" in files
    assert "MAFW_Multiple-Label-Emotion-Recognition.json" in files and "CelebV-HQ_Appearance-Recognition.json" in files
    line = json.loads((folder / "AffWild2_Action_Unit_Detection.json").read_text().splitlines()[0])
    assert {"messages", "videos", "response", "labels"} <= set(line)
    q = line["messages"][0]
    assert q["role"] == "user" and "<video>" not in q["content"] and q["content"]
    assert isinstance(line["labels"], str) and "," in line["labels"] and ", " not in line["labels"]
    assert isinstance(line["videos"], list) and line["videos"][0].endswith(".mp4")
    r = run_script("eval.py", f"--predictions={run / 'official'}", f"--out={run / 'rescored.json'}")
    assert r.returncode == 0, r.stderr[-3000:]
    first, again = (json.loads((run / f).read_text()) for f in ("eval.json", "rescored.json"))
    d = max_diff(numbers(first), numbers(again))
    print(f"export -> --predictions=DIR: {len(numbers(first))} numbers, max |diff| = {d}")
    assert d == 0.0
    # one method's folder reads the same; a folder of two methods is refused by name
    assert numbers(E.score_predictions_file(str(folder))) == numbers(again)
    shutil.copytree(folder, run / "official" / "other")
    r = run_script("eval.py", f"--predictions={run / 'official'}", f"--out={run / 'x.json'}")
    assert r.returncode != 0 and "pass one method's folder" in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(run / "official" / "other")


def test_official_names_map_back_to_their_tasks():
    for fn, task in E.OFFICIAL_FILES:
        assert R.task_from_name(fn) == task, fn
    for task in R.TASK_METRIC:
        assert R.task_from_name(E.official_file(task)) == task, task
    assert E.official_file("emotion_single") == "MER2023_Single-Label-Emotion-Recognition.json"
    # a record read from an official test file keeps its file (MELD and PERR are both conversation_emotion)
    src = "/data/Emo-CFG/jsons/test/MELD_Single-Label-Conversational-Emotion-Recognition_new.json:17"
    assert E.official_file("conversation_emotion", src) == os.path.basename(src.rsplit(":", 1)[0])
    assert E.official_file("emotion_single", src) == "MER2023_Single-Label-Emotion-Recognition.json"


@pytest.mark.parametrize("answer_format", ["direct", "reasoning"])
def test_export_round_trip_on_mixed_answers(emo, tmp_path, answer_format):
    """Every EmoSynth task, responses right, half right (another clip's reference of the task) and empty, in both
    answer formats: exporting and re-scoring reproduces every number exactly."""
    records = E.load_eval_records(str(emo / "test.jsonl"), answer_format=answer_format)
    refs = {}
    for r in records:
        refs.setdefault(r["task"], []).append(R.reference_text(r))
    rows = []
    for i, rec in enumerate(records):
        t = rec["task"]
        pool = refs[t]
        response = (R.reference_text(rec), pool[(i + 1) % len(pool)], "")[i % 3]
        rows.append({"key": E.record_key(i, rec), "index": i, "task": t, "response": response,
                     "scores": E.score_sample(response, rec, t)})
    rows.append({"key": E.record_key(0, records[0]), "index": 0, "skip": "video: cannot decode"})
    want = E.summarize(rows)
    assert 0 < want["groups"]["expression"] < 1 and len(want["tasks"]) == len(R.TASK_METRIC)
    written = E.export_official(rows, records, str(tmp_path), "m")
    assert written[E.SKIPPED_FILE] == 1 and sum(written.values()) == len(rows)
    got = E.score_predictions_file(str(tmp_path / "m"))
    assert max_diff(numbers(want), numbers(got)) == 0.0
    if answer_format == "reasoning":
        assert any("tree" in v for v in got["tasks"].values())


def test_export_needs_a_model_run(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"response": "a", "labels": "a", "task": "identity"}\n')
    r = run_script("eval.py", f"--predictions={tmp_path / 'p.jsonl'}", f"--export_official={tmp_path / 'o'}")
    assert r.returncode == 2 and "export_official" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------------------
# --report


class Parsed(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text, self.tables, self._cell = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self.tables.append([])

    def handle_data(self, data):
        self.text.append(data)
        if self.tables and self.tags and self.tags[-1] in ("td", "th"):
            self.tables[-1].append(data.strip())


def check_self_contained(text):
    """What makes the file work offline and by mail: no script, no external stylesheet or font, every image a data:
    URI, no http(s) or protocol-relative URL in any attribute or in the CSS."""
    p = Parsed()
    p.feed(text)
    p.close()
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    for tag, k, v in p.attrs:
        assert not v.strip().lower().startswith(("http:", "https:", "//", "file:", "ftp:")), (tag, k, v[:80])
        if tag == "img" and k == "src":
            assert v.startswith("data:image/jpeg;base64,"), v[:80]
    low = text.lower()
    assert "@import" not in low and "url(" not in low and "http://" not in low and "https://" not in low
    return p


def test_report_structure(run):
    text = (run / "report.html").read_text()
    p = check_self_contained(text)
    result = json.loads((run / "eval.json").read_text())
    cells = [c for t in p.tables for c in t]
    for t, v in result["tasks"].items():
        assert t in cells, t
        assert f"{100 * v['score']:.1f}" in cells, t
    imgs = [v for tag, k, v in p.attrs if tag == "img" and k == "src"]
    assert len(imgs) >= 8  # frame strips in the gallery
    import base64
    import io

    from PIL import Image
    im = Image.open(io.BytesIO(base64.b64decode(imgs[0].split(",", 1)[1])))
    assert im.format == "JPEG" and im.height == report.THUMB_HEIGHT
    body = "".join(p.text)
    assert "Training curves" in body and "loss vs step" in body and "val_loss vs step" in body
    assert "Gallery" in body and text.count('class="card') >= len(result["tasks"])
    assert text.count("<svg") >= 4  # the per-task bars and three curves


def test_report_compare_and_frames_are_what_the_model_saw(run, emo, tmp_path):
    result = json.loads((run / "eval.json").read_text())
    other = json.loads(json.dumps(result))
    t0 = next(iter(other["tasks"]))
    other["tasks"][t0]["score"] = result["tasks"][t0]["score"] + 0.25
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = run_script("eval.py", f"--predictions={run / 'official'}", f"--out={tmp_path / 'r.json'}",
                   f"--report={tmp_path / 'r.html'}", f"--compare={tmp_path / 'other.json'}")
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "r.html").read_text()
    p = check_self_contained(text)
    assert "compare" in "".join(p.text) and "-25.0" in text  # the delta column
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = run_script("eval.py", f"--predictions={run / 'official'}", f"--out={tmp_path / 'r.json'}",
                   f"--report={tmp_path / 'r.html'}", f"--compare={tmp_path / 'bad.json'}")
    assert r.returncode != 0 and "bad.json" in r.stderr and "Traceback" not in r.stderr
    # the strip shows the decoded frames the model saw (data.py's path, same sampling and resize)
    rec = E.load_eval_records(str(emo / "test.jsonl"))[0]
    kw = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    thumbs, why = report.frame_strip(rec, None, kw)
    frames = D.record_frames(rec, None, kw)[0]  # uint8 [T, H, W, 3]
    pv = D.video_inputs(os.path.join(emo, rec["videos"][0]), kw)["pixel_values_videos"]
    assert not why and len(thumbs) == min(frames.shape[0], report.MAX_FRAMES)
    assert torch.equal(D.patchify_video(frames)[0], pv)  # [N, 1176]: exactly the model's input
    assert report.frame_strip(dict(rec, videos=["missing.mp4"]), None, kw)[0] == []


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no chromium")
def test_report_renders_in_a_browser_without_errors(run, tmp_path):
    """Headless chromium renders the file with no console error and no network request (it is offline-only)."""
    shot = tmp_path / "shot.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={shot}", "--window-size=1200,2000", (run / "report.html").as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    from PIL import Image
    im = Image.open(shot).convert("L")
    assert im.size == (1200, 2000) and sum(c > 0 for c in im.histogram()) > 20  # drawn, not a blank page


def test_trainers_final_evaluation_writes_the_report(emo, run, tmp_path):
    """evaluation.report(..., html=PATH): the one call the trainers make writes eval.json and the report, with the
    curves of the out_dir's metrics.jsonl and the gallery of this evaluation's rows."""
    import inference
    model, tok, _ = inference.load_model(str(run / "out"))
    shutil.copy(run / "out" / "metrics.jsonl", tmp_path / "metrics.jsonl")
    records = E.load_eval_records(str(emo / "test.jsonl"))[:6]
    kw = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    result = E.report(model, tok, records, None, kw, str(tmp_path), html=str(tmp_path / "report.html"),
                      batch_size=6, max_new_tokens=4, progress=False)
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"] == result["tasks"]
    text = (tmp_path / "report.html").read_text()
    p = check_self_contained(text)
    assert "loss vs step" in "".join(p.text) and text.count('class="card') == sum(v["n"] for v in
                                                                                 result["tasks"].values())
