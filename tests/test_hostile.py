"""More hostile inputs, each built here: preemption signals, a second run on one output, outputs that cannot be
written, a judge that stalls or answers HTML, damaged or foreign weights, record shapes of other chat formats,
hostile record files, a torn predictions file. Each ends in a clear one-line error, a counted skip, or a clean stop
that resumes; never a crash mid-run, a hang or silent loss."""
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import common
import data as D
import evaluation as E
from model import CheckpointError, VidEmo
from tiny import one_line_error, tiny_config, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
VIDEO_KW = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)


def py(code, *args, **kw):
    """A fresh python with the repo on its path (a real pid, its own signal handlers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def script(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def emo(tmp_path_factory):
    from tiny import build_emosynth
    return Path(build_emosynth(tmp_path_factory.mktemp("emosynth"), num_train=4, num_val=2, num_test=6, workers=1))


@pytest.fixture(scope="module")
def tiny_ckpt(emo, tmp_path_factory):
    tok = D.load_tokenizer(emo / "tokenizer")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    common.save_checkpoint(str(path), VidEmo(tokenizer_config(tok)).eval().save_pretrained, tokenizer=tok)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM / SIGUSR1 are a flag every rank agrees on; eval stops at once and resumes


def test_stop_signal_is_a_flag_and_restores_handlers():
    seen = []
    term = signal.getsignal(signal.SIGTERM)
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with common.StopSignal() as stop:
            assert not stop.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the handler
            assert stop.should_stop() and stop.exit_code == 143
            os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first one's name
            assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == term  # the previous handlers are back
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        with common.StopSignal(interrupt=True) as stop, pytest.raises(common.Stopped, match="SIGUSR1"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # interrupted at once
        assert stop.exit_code == 138
    finally:
        signal.signal(signal.SIGUSR1, before)


RANKS = """
import os, sys, signal, torch, torch.distributed as dist, common
dist.init_process_group("gloo")
stop = common.StopSignal()
for step in range(1, 50):
    if dist.get_rank() == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
    if stop.should_stop():
        print("stopped at", step, flush=True)
        break
dist.destroy_process_group()
"""


def test_every_rank_stops_at_the_same_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANKS], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["stopped at 3", "stopped at 3"], outs


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        time.sleep(0.3)
        return i


@pytest.mark.parametrize("init", [common.StopSignal.worker_init, None])
def test_dataloader_workers_outlive_a_group_signal(init):
    """A SIGTERM to the whole process group (a scheduler's) reaches the DataLoader workers too: with worker_init they
    ignore it and the main process decides; without, the loader fails in the main process."""
    loader = torch.utils.data.DataLoader(Items(), batch_size=1, num_workers=1, worker_init_fn=init)
    it = iter(loader)
    got = [int(next(it))]
    subprocess.run(["kill", "-TERM", str(it._workers[0].pid)], check=True)  # not from the parent, as a group signal
    if init is None:
        with pytest.raises(RuntimeError, match="killed by signal"):  # (raised by the loader's SIGCHLD handler)
            time.sleep(0.5)
            got += [int(x) for x in it]
    else:
        time.sleep(0.5)
        got += [int(x) for x in it]
        assert got == list(range(6))


def test_eval_stops_on_sigterm_and_resumes(emo, tiny_ckpt, tmp_path):
    out = tmp_path / "r.json"
    pred = tmp_path / "r.predictions.jsonl"
    args = [f"--init_from={tiny_ckpt}", f"--test_file={emo / 'test.jsonl'}", f"--out={out}", "--batch_size=1",
            "--max_records=8", "--max_new_tokens=100", "--progress=False"]  # a random tiny model rarely stops
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "eval.py", *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    t0 = time.time()
    while not (pred.exists() and pred.read_text().count("\n") >= 2):
        assert p.poll() is None and time.time() - t0 < 60, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    t1 = time.time()
    _, err = p.communicate(timeout=30)
    assert time.time() - t1 < 5 and p.returncode == 143, err  # at once, and not reported as success
    assert "eval stopped by SIGTERM" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".lock").exists()  # no result yet; the lock released
    n_before = len(E.read_predictions(str(pred)))
    r = script("eval.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = E.read_predictions(str(pred))
    n = 8
    assert sorted(r["index"] for r in rows) == list(range(n)) and 2 <= n_before < n  # each record once
    assert json.loads(out.read_text())["n"] == n


# ----------------------------------------------------------------------------------------------------------------------
# output locks and unwritable outputs


HOLD = """
import sys, time, common
common.lock_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys, emo, tiny_ckpt):
    out = tmp_path / "out"
    holder = py(HOLD, out)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(common.InputError, match=f"in use by another run: pid {holder.pid} on "
                                                    f"{socket.gethostname()} since"):
            common.lock_dir(out)
        # eval.py's --out: the same lock, refused as one line before the model loads
        taken = common.lock_file(str(tmp_path / "r.json") + ".lock", "out", str(tmp_path / "r.json"))
        r = script("eval.py", f"--init_from={tiny_ckpt}", f"--test_file={emo / 'test.jsonl'}",
                   f"--out={tmp_path / 'r.json'}", timeout=60)
        one_line_error(r, "out", "r.json is in use by another run", f"pid {os.getpid()}")
        taken.release()
    finally:
        holder.kill()  # SIGKILL: no atexit, the lock file stays behind
        holder.wait()
    assert (out / common.LOCK_NAME).exists()
    lock = common.lock_dir(out)  # the kernel dropped the dead holder's flock: taken over, with a note
    assert f"taking over the lock left by a run that is no longer running: pid {holder.pid}" in capsys.readouterr().err
    assert json.loads((out / common.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / common.LOCK_NAME).exists()


FSIZE = """
import resource, signal, sys, common
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # every write fails as on a full disk (EFBIG)
try:
    common.check_writable(sys.argv[1])
except common.InputError as e:
    print(e)
"""


def test_unwritable_outputs_are_found_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, why in (("/proc/videmo_out", "cannot write there"), (afile, "exists and is not a directory"),
                      (afile / "sub", "cannot write there (Not a directory)")):
        with pytest.raises(common.InputError, match=re.escape(f"out_dir {path}: {why}")):
            common.check_writable(path)
    with pytest.raises(common.InputError, match=r"GiB free, the run needs about"):
        common.check_writable(tmp_path, need_bytes=10 ** 18)
    p = py(FSIZE, tmp_path / "full")
    out, err = p.communicate(timeout=60)
    assert out.strip() == f"out_dir {tmp_path / 'full'}: cannot write there (File too large)", err
    assert os.listdir(tmp_path / "full") == []  # the probe is gone
    assert common.check_writable(tmp_path / "ok") == str(tmp_path / "ok") and os.listdir(tmp_path / "ok") == []


# ----------------------------------------------------------------------------------------------------------------------
# a judge that misbehaves without failing


class BadJudge(http.server.BaseHTTPRequestHandler):
    mode = "trickle_body"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        try:
            if self.mode == "trickle_body":  # headers, then a byte every 0.1 s: a per-read timeout never fires
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.mode == "trickle_headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(100):
                    self.wfile.write(b"X-Slow: 1\r\n")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.mode == "html":  # a proxy's error page, with status 200
                body = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.mode == "garbage":  # not HTTP at all
                self.wfile.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            elif self.mode == "endless":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"[" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode,why", [("trickle_body", "no complete reply within the 1 s deadline"),
                                      ("trickle_headers", "no complete reply within the 1 s deadline"),
                                      ("html", "answered 200 with text/html, not JSON (starts '<html><head><title>502"),
                                      ("garbage", "BadStatusLine"), ("endless", "reply over 1 MB")])
def test_a_misbehaving_judge_is_a_named_counted_failure(mode, why, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (BadJudge,), {"mode": mode}))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = E.Judge(url, "m", "", timeout=1, retries=0, give_up_after=2)
        t0 = time.time()
        assert [judge("q", "ref", "resp") for _ in range(3)] == [None] * 3
        assert time.time() - t0 < 4.5 and judge.failures == 3 and judge.gave_up  # two tries, then given up
        err = capsys.readouterr().err
        assert err.count(f"judge {url}/chat/completions: {why}") == 1, err  # each reason once, naming the URL
        assert "giving up on the judge" in err
    finally:
        server.shutdown()
        server.server_close()


def test_judge_url_without_a_scheme_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        E.Judge("localhost:8000/v1", "m")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"response": "x", "task": "appearance_caption", "labels": "y"}) + "\n")
    one_line_error(script("eval.py", f"--predictions={f}", "--judge_url=localhost:8000", timeout=60),
                   "config key 'judge_url'")


# ----------------------------------------------------------------------------------------------------------------------
# damaged or foreign weights: one line naming the file, the tensor or the model_type, before any work


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(d, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d):
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:len(blob) * 2 // 3])


def _index_outside(d):
    (d / "model.safetensors").rename(d.parent / "elsewhere.safetensors")
    from safetensors import safe_open
    with safe_open(d.parent / "elsewhere.safetensors", "pt") as f:
        keys = list(f.keys())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../elsewhere.safetensors"
                                                                               for k in keys}}))


DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("edit,needle", [
    (_truncate, r"model.safetensors: truncated: \d+ bytes, its header describes \d+"),
    (lambda d: _edit_config(d, hidden_size=32), r"config.json: hidden_size=32 but .*model.safetensors stores "
                                                r"'model.embed_tokens.weight' as \[512, 64\]"),
    (lambda d: _edit_config(d, num_hidden_layers=3), r"num_hidden_layers=3 but the weights hold 2 blocks"),
    (lambda d: _edit_config(d, model_type="qwen2", architectures=["Qwen2ForCausalLM"], vision_config=None),
     r"config.json: model_type 'qwen2' \(Qwen2ForCausalLM\) is a text-only LLM"),
    (lambda d: _edit_config(d, model_type="qwen2_vl"), r"model_type 'qwen2_vl' .* is Qwen2-VL"),
    (lambda d: _edit_config(d, model_type="qwen3_vl"), r"model_type 'qwen3_vl' .* is Qwen3-VL"),
    (lambda d: _edit_config(d, num_hidden_layers="2"), r"num_hidden_layers must be a positive integer, got '2'"),
    (lambda d: _edit_config(d, num_attention_heads=3), r"hidden_size 64 is not a multiple of num_attention_heads 3"),
    (lambda d: _edit_tensor(d, lambda sd: sd[DOWN].__setitem__((0, 0), float("nan"))),
     rf"model.safetensors: tensor '{DOWN}' holds 1 NaN/inf value"),
    (lambda d: _edit_tensor(d, lambda sd: sd.__setitem__(DOWN, sd[DOWN].to(torch.int8))),
     rf"tensor '{DOWN}' is int8, not floating point"),
    (_index_outside, r"index.json: shard '../elsewhere.safetensors' is not a file name in the checkpoint"),
])
def test_damaged_or_foreign_weights_are_one_line(tmp_path, edit, needle, capsys):
    d = tmp_path / "ckpt"
    VidEmo(tiny_config()).save_pretrained(d)
    edit(d)
    with pytest.raises(CheckpointError, match=needle):
        VidEmo.from_pretrained(d)
    with pytest.raises(SystemExit) as e:  # any script: one line and exit code 2, no traceback
        common.run(lambda: VidEmo.from_pretrained(d))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_a_checkpoint_marked_complete_without_weights(tmp_path):
    common.save_checkpoint(str(tmp_path / "c"), VidEmo(tiny_config()).save_pretrained)
    os.remove(tmp_path / "c" / "model.safetensors")
    assert common.resolve_checkpoint(str(tmp_path / "c")) == str(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        VidEmo.from_pretrained(tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------------------
# records in other chat formats, hostile record files


def test_record_shapes_of_other_chat_formats(emo):
    tok = D.load_tokenizer(emo / "tokenizer")
    good = dict(D.load_records(emo / "test.jsonl")[0])
    want = D.encode_prompt(good, tok, None, VIDEO_KW)
    text = good["messages"][0]["content"].replace("<video>", "")
    clip = good["videos"][0]
    parts = [{"type": "video"}, {"type": "text", "text": text}]
    carried = [{"type": "video", "video": clip}, {"type": "text", "text": text}]
    for rec in (dict(good, videos=clip), dict(good, videos=[{"path": clip}]),
                dict(good, videos=["file://" + str(emo / clip)]),
                dict(good, messages=[dict(good["messages"][0], content=parts)] + good["messages"][1:]),
                dict({k: v for k, v in good.items() if k != "videos"},
                     messages=[dict(good["messages"][0], content=carried)] + good["messages"][1:])):
        got = D.encode_prompt(rec, tok, None, VIDEO_KW)
        assert torch.equal(got["input_ids"], want["input_ids"]), rec
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"])
    t0 = time.time()
    for url in ("https://example.com/clip.mp4", "http://10.255.255.1/clip.mp4"):  # never fetched: at once
        with pytest.raises(D.SkipRecord, match=f"video {url}: remote URL, not fetched"):
            D.encode_prompt(dict(good, videos=[url]), tok, None, VIDEO_KW)
    assert time.time() - t0 < 1
    bad = [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": text}]
    with pytest.raises(D.SkipRecord, match=r"messages\[0\].content\[0\]: a content part of type 'audio'"):
        D.encode_prompt(dict(good, messages=[dict(good["messages"][0], content=bad)]), tok, None, VIDEO_KW)
    # load_records reads them into the plain shape (what scoring and the reasoning format read)
    f = emo.parent / "parts.jsonl"
    f.write_text(json.dumps(dict(good, videos=[{"path": clip}],
                                 messages=[dict(good["messages"][0], content=parts)] + good["messages"][1:])) + "\n")
    r = D.load_records(f)[0]
    assert r["videos"] == [clip] and r["messages"][0]["content"] == "<video>" + text


def test_hostile_record_files(tmp_path):
    rec = {"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "caf\u00e9"}],
           "videos": ["a.mp4"]}
    line = json.dumps(rec, ensure_ascii=False)
    files = {
        "nul.jsonl": (line + "\n" + line[:20] + "\x00" + line[20:] + "\n" + "\x00" * 64 + "\n").encode(),
        "deep.jsonl": (line + "\n" + "[" * 100000 + "]" * 100000 + "\n").encode(),
        "deep_list.json": ("[" * 100000 + "]" * 100000).encode(),
        "bigint.jsonl": (line + "\n" + '{"labels": ' + "9" * 5000 + "}\n").encode(),
        "utf16.jsonl": (line + "\n" + line + "\n").encode("utf-16"),
        "latin1.jsonl": (line + "\n").encode("latin-1") + (line + "\n").encode(),
    }
    want = {"nul.jsonl": (1, 2), "deep.jsonl": (1, 1), "deep_list.json": (0, 1), "bigint.jsonl": (1, 1),
            "utf16.jsonl": (2, 0), "latin1.jsonl": (1, 1)}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        bad = []
        recs = D.load_records(tmp_path / name, skipped=bad)
        assert (len(recs), len(bad)) == want[name], (name, bad)
        assert all(r["messages"][1]["content"] == "caf\u00e9" for r in recs), name  # never silently altered
    bad = []
    D.load_records(tmp_path / "latin1.jsonl", skipped=bad)
    assert bad == [f"{tmp_path / 'latin1.jsonl'}:1: not UTF-8 text (save the file as UTF-8)"]
    (tmp_path / "p.jsonl").write_bytes(files["deep.jsonl"] + b'{"response": "x", "labels": ' + b"9" * 5000 + b"}\n")
    assert sum(E.score_predictions_file(str(tmp_path / "p.jsonl"))["skipped"].values()) == 3


def test_a_negative_seed_and_a_spaced_value_are_config_errors():
    with pytest.raises(D.SettingError, match="config key 'seed': must be an integer >= 0"):
        D.CurriculumSampler(["emotion"] * 4, 2, seed=-1)
    with pytest.raises(common.ConfigError, match=r"config key 'lr': give its value as --lr=VALUE"):
        common.configure({"lr": 1e-3, "flag": False}, ["--lr", "3e-4"])
    assert common.configure({"lr": 1e-3, "flag": False}, ["--flag", "--lr=1", "--lr=2"]) == {"lr": 2.0, "flag": True}


# ----------------------------------------------------------------------------------------------------------------------
# evaluation inputs: a torn predictions file, over-long prompts, labels of the wrong type


def test_torn_predictions_and_odd_records_score_each_record_once(emo, tiny_ckpt, tmp_path):
    import inference
    model, tok, _ = inference.load_model(str(tiny_ckpt))
    records = D.load_records(emo / "test.jsonl")[:4]
    kw = dict(batch_size=4, max_new_tokens=3, progress=False)
    pred = tmp_path / "p.jsonl"
    full = E.evaluate(model, tok, records, None, VIDEO_KW, predictions_path=str(pred), **kw)
    assert sum(v["n"] for v in full["tasks"].values()) == 4
    # killed between the last row's closing brace and its newline: a complete row, but torn for an appender
    pred.write_bytes(pred.read_bytes().rstrip(b"\n"))
    resumed = E.evaluate(model, tok, records, None, VIDEO_KW, predictions_path=str(pred), **kw)
    assert resumed == full
    assert sorted(r["index"] for r in E.read_predictions(str(pred))) == [0, 1, 2, 3]
    long = dict(records[0], messages=[dict(records[0]["messages"][0], content=records[0]["messages"][0]["content"]
                                           + " really" * 6000)] + records[0]["messages"][1:])
    odd = [long, dict(records[1], labels={"happiness": 1}), dict(records[2], labels=[1, 2]), records[3]]
    t0 = time.time()
    r = E.evaluate(model, tok, odd, None, VIDEO_KW, **kw)
    assert time.time() - t0 < 20 and sum(v["n"] for v in r["tasks"].values()) == 1
    assert r["skipped"] == {"N tokens > max_seq_len N": 1, "labels must be a string or a list of strings, got dict": 1,
                            "labels must be a string or a list of strings, got list": 1}, r["skipped"]


def test_eval_refuses_pixel_budgets_it_cannot_use():
    one_line_error(script("eval.py", "--max_pixels=0", timeout=60), "config key 'max_pixels'")
