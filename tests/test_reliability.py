"""Hostile and careless inputs, each built here: a clear error naming the problem, a counted skip, or an intact
checkpoint; never a crash mid-run, a hang, silent loss or code execution."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import common
import data
import evaluation
import reward
from tiny import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_inner=64", "--vision_depth=1",
              "--vision_embd=32", "--vision_heads=2", "--vision_inner=64", "--num_workers=0", "--eval_at_end=False",
              "--eval_every=0", "--log_every=1", "--warmup_steps=1"]


def run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location("emosynth_prepare", ROOT / "data" / "emosynth" / "prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    return Path(prep.prepare(tmp_path_factory.mktemp("emosynth") / "build", num_train=12, num_val=2, num_test=4,
                             workers=1, verbose=False))


def records_file(build, tmp_path, n, edit=lambda i, r: r, name="train.jsonl"):
    recs = [json.loads(l) for l in open(build / "train.jsonl")][:n]
    path = tmp_path / name
    path.write_text("".join(json.dumps(edit(i, r)) + "\n" for i, r in enumerate(recs)))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# 1, 2, 6: batches with no usable record, fewer samples than a batch, silent no-ops


def test_sft_skips_an_empty_batch_and_stops_when_every_record_drops(build, tmp_path):
    train = records_file(build, tmp_path, 8, lambda i, r: dict(r, videos=["videos/missing.mp4"]) if i == 0 else r)
    args = [f"--data_dir={build}", f"--train_file={train}", f"--video_root={build}", "--batch_size=1",
            "--max_steps=8", "--curriculum=False", "--stage_epochs=(1.0, 1.0, 1.0)", f"--out_dir={tmp_path / 'o'}",
            "--save_every=0"] + TINY_MODEL
    r = run("train_sft.py", *args)  # one pass over the 8 records, one per step: the missing clip's step is skipped
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped steps: 1" in r.stdout and common.load_trainer_state(str(tmp_path / "o" / "ckpt"))["step"] == 8
    # a wrong video root: every record drops -> one line naming the file and the reason, within seconds
    r = run("train_sft.py", *args[:2], f"--video_root={tmp_path}", *args[3:])
    one_line_error(r, str(train), "no such file", "video_root")


def test_fewer_samples_than_a_batch_is_an_error_not_a_busy_loop(build, tmp_path):
    train = records_file(build, tmp_path, 3)
    r = run("train_sft.py", f"--data_dir={build}", f"--train_file={train}", "--batch_size=4",
            "--stage_epochs=(1.0, 1.0, 1.0)", f"--out_dir={tmp_path / 'o'}", *TINY_MODEL, timeout=60)
    one_line_error(r, "no full global batch of 4")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run("train_sft.py", f"--data_dir={build}", f"--train_file={empty}", f"--out_dir={tmp_path / 'o'}",
            *TINY_MODEL, timeout=60)
    one_line_error(r, "0 records")


@pytest.mark.parametrize("script,arg,key", [("train_sft.py", "--grad_accum=0", "grad_accum"),
                                            ("train_sft.py", "--max_steps=-5", "max_steps"),
                                            ("train_rl.py", "--grad_accum=0", "grad_accum"),
                                            ("eval.py", "--batch_size=0", "batch_size"),
                                            ("sample.py", "--samples=0", "samples")])
def test_out_of_range_values_are_config_errors(script, arg, key):
    one_line_error(run(script, arg, timeout=60), f"config key '{key}'")


def test_levels_are_normalised_and_the_rest_counted():
    recs = [{"level": "Emotion"}, {"level": " attribute "}, {"level": ["emotion"]}, {"level": 3}, {}, "x"]
    assert [data.curriculum_level(r) for r in recs] == ["emotion", "attribute", None, None, "emotion", None]
    s = data.CurriculumSampler([data.curriculum_level(r) for r in recs], 1)
    assert s.n_excluded == 3 and len(s) == 3


# ----------------------------------------------------------------------------------------------------------------------
# 3, 4, 10: resume never runs code, never overwrites a good checkpoint with a diverged one, refuses breaking changes


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_state_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 3, "x": Payload(marker)}, f)
    with pytest.raises(common.InputError, match="not a VidEmo trainer state"):
        common.load_trainer_state(str(ckpt))
    assert not marker.exists()  # the payload never ran
    torch.save([1, 2], ckpt / "trainer_state.pt")  # loadable, but not ours
    with pytest.raises(common.InputError, match="step"):
        common.load_trainer_state(str(ckpt))


def test_rng_state_round_trips_exactly_through_a_safe_load(tmp_path):
    import random
    random.random(), np.random.rand(), torch.rand(1)
    state = common.rng_state()
    common.save_checkpoint(str(tmp_path / "c"), lambda d: None, trainer_state={"step": 1, "rng": state})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    common.set_rng_state(common.load_trainer_state(str(tmp_path / "c"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_divergence_never_overwrites_the_good_checkpoint(build, tmp_path):
    out = tmp_path / "o"
    base = [f"--data_dir={build}", "--batch_size=2", f"--out_dir={out}", "--save_every=2", *TINY_MODEL]
    r = run("train_sft.py", *base, "--max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    before = (out / "ckpt" / "model.safetensors").read_bytes()
    r = run("train_sft.py", *base, "--max_steps=12", "--resume=True", "--lr=1e30", "--min_lr=1e29",
            "--grad_clip=0.0")
    one_line_error(r, "NaN/inf", "last good checkpoint", "step 2")
    assert (out / "ckpt" / "model.safetensors").read_bytes() == before
    # a breaking change on resume is refused by name; a harmless one is a note
    r = run("train_sft.py", *base, "--max_steps=3", "--resume=True", "--n_embd=64")
    one_line_error(r, "n_embd=32 there, 64 now")
    r = run("train_sft.py", *base, "--max_steps=3", "--resume=True", "--lr=5e-4")
    assert r.returncode == 0 and "lr 0.001 -> 0.0005" in r.stdout + r.stderr, r.stderr[-3000:]


def test_check_resume_rules():
    common.check_resume({"lr": 1.0, "stage_epochs": (1, 2)}, {"lr": 2.0, "stage_epochs": [1, 2]}, ("stage_epochs",))
    with pytest.raises(common.InputError, match="freeze_vision=False there, True now"):
        common.check_resume({"freeze_vision": False}, {"freeze_vision": True}, ("freeze_vision",))


def test_check_resume_older_checkpoint(capsys):
    """A key an older checkpoint's config lacks counts as what it meant before it existed (a change is noted, or
    refused when breaking); a key without such a value is named with the value used now."""
    now = {"lr": 1.0, "lr_schedule": "stage", "mix_first": 0.0, "video_cache_mb": 64, "resume": True}
    common.check_resume({"lr": 1.0}, now, ("mix_first",), {"lr_schedule": "run", "mix_first": 0.0, "gone": 1})
    out = capsys.readouterr().out
    assert "lr_schedule 'run' -> 'stage'" in out and "does not record video_cache_mb" in out
    assert "video_cache_mb=64" in out and "mix_first" not in out and "gone" not in out and "resume=" not in out
    with pytest.raises(common.InputError, match="mix_first=0.0 there, 0.5 now"):
        common.check_resume({"lr": 1.0}, dict(now, mix_first=0.5), ("mix_first",), {"mix_first": 0.0})
    capsys.readouterr()
    common.check_resume(dict(now), dict(now), ())  # the same config: silent
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------------------------------
# 5, 9, 11: sideways phone video, decode bombs, byte-order marks and JSON lists in .jsonl


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_video_is_decoded_upright(tmp_path, rotation):
    frames = np.zeros((4, 56, 112, 3), np.uint8)
    frames[:, :, :28] = 255  # a white strip on the left of the stored (landscape) frame
    frames[:, :14, :, 1] = 200  # and a green band on top, so every quarter turn is told apart
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rot.mp4"
    for path, rot in ((plain, None), (rotated, rotation)):
        with av.open(str(path), "w") as c:
            st = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=4)
            st.width, st.height, st.pix_fmt = 112, 56, "yuv420p"
            if rot is not None:
                st.set_display_rotation(rot)  # counterclockwise degrees, as a phone records it
            for f in frames:
                for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in st.encode():
                c.mux(p)
    kw = dict(fps=4, max_frames=4, min_pixels=28 * 28, max_pixels=112 * 56)
    want = data.load_video(plain, **kw)[0].numpy()
    want = np.ascontiguousarray(np.rot90(want, rotation // 90, axes=(1, 2)))  # what a player shows
    got = data.load_video(rotated, **kw)[0].numpy()
    assert got.shape == want.shape  # portrait after rotation: the resize budget applies to the upright frame
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 3


def test_decode_bombs_are_refused_before_decoding(tmp_path):
    from PIL import Image
    png = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(png)  # a few KB on disk, 144 Mpx decoded
    assert png.stat().st_size < 1_000_000
    with pytest.raises(data.VideoError, match="decode limit"):
        data.load_image(png)


def test_bom_and_json_list_in_jsonl(tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}], "videos": []} for i in range(3)]
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs).encode())
    b = tmp_path / "b.jsonl"  # a pretty-printed JSON list saved as .jsonl
    b.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, indent=2).encode())
    for path in (a, b):
        bad = []
        got = data.load_records(path, skipped=bad)
        assert not bad and [r["messages"][0]["content"] for r in got] == ["q0", "q1", "q2"], path


# ----------------------------------------------------------------------------------------------------------------------
# 7, 8, 12: evaluation inputs: bad prediction lines, a dead judge, outputs and secrets


def test_bad_prediction_lines_are_counted_skips(tmp_path):
    good = {"response": "happiness", "labels": ["happiness"], "task": "emotion_single",
            "messages": [{"role": "user", "content": "<video>What emotion?"}]}
    lines = [good, dict(good, labels=3), dict(good, labels=True), dict(good, task=["emotion_single"]), good]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = evaluation.score_predictions_file(str(f))
    assert r["tasks"]["emotion_single"]["n"] == 2 and r["tasks"]["emotion_single"]["score"] == 1.0
    assert sum(r["skipped"].values()) == 3 and all(k.startswith("bad line") for k in r["skipped"])


def test_an_unresponsive_judge_is_given_up_quickly(tmp_path):
    import socket
    import time
    with socket.socket() as s:  # a port nothing listens on: every call fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = evaluation.Judge(f"http://127.0.0.1:{port}/v1", "m", "", timeout=1, retries=1)
    t0 = time.time()
    scores = [judge("q", "ref", "resp") for _ in range(20)]
    assert scores == [None] * 20 and judge.gave_up and judge.failures == 20 and time.time() - t0 < 10
    rows = [{"task": "appearance_caption", "scores": {"caption": 0.5, "judge": None}}] * 2
    assert "2 of 2 judge calls failed" in evaluation.format_table(evaluation.summarize(rows))


def test_eval_checks_its_output_first_and_keeps_secrets_out(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"response": "a young woman", "task": "appearance_caption",
                             "messages": [{"role": "user", "content": "<video>Describe."},
                                          {"role": "assistant", "content": "A young woman with glasses."}]}) + "\n")
    (tmp_path / "taken").mkdir()
    one_line_error(run("eval.py", f"--predictions={f}", f"--out={tmp_path / 'taken'}", timeout=60), "directory")
    one_line_error(run("eval.py", f"--predictions={f}", "--judge_api_key_env=sk-SECRET123", timeout=60),
                   "judge_api_key_env")
    out = tmp_path / "r.json"
    r = run("eval.py", f"--predictions={f}", f"--out={out}", "--judge_timeout=1",
            "--judge_url=http://user:sk-SECRET123@127.0.0.1:9/v1?api_key=sk-SECRET456", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "SECRET" not in text and json.loads(text)["config"]["judge_url"].startswith("http://***@")


def test_bad_torch_dtype_is_blamed_on_the_config(tmp_path):
    from model import VidEmo
    from tiny import tiny_config
    m = VidEmo(tiny_config())
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["torch_dtype"] = "nn"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: torch_dtype 'nn'"):
        VidEmo.from_pretrained(tmp_path)
    assert reward.task_metric("emotion_single") == "accuracy"


def test_a_broken_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = (\n")
    with pytest.raises(common.ConfigError, match="bad.py: SyntaxError"):
        common.configure({"lr": 1.0}, [str(bad)])


def test_rl_resume_from_an_sft_checkpoint_is_refused(build, tmp_path):
    common.save_checkpoint(str(tmp_path / "o" / "ckpt"), lambda d: None, trainer_state={"step": 3, "sampler": {}})
    r = run("train_rl.py", f"--out_dir={tmp_path / 'o'}", "--resume=True", f"--init_from={tmp_path / 'o' / 'ckpt'}",
            f"--data_dir={build}", f"--tokenizer_dir={build / 'tokenizer'}", "--eval_every=0", timeout=120)
    one_line_error(r, "not written by train_rl.py")


# ----------------------------------------------------------------------------------------------------------------------
# fp32 master weights whatever the stored dtype (a bf16 hub checkpoint must not swallow small AdamW steps)


def test_bf16_init_trains_like_its_fp32_upcast(build, tmp_path):
    import data as D
    from model import VidEmo
    from tiny import tokenizer_config
    tok = D.load_tokenizer(build / "tokenizer")
    torch.manual_seed(0)
    model = VidEmo(tokenizer_config(tok))
    inits = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        d = tmp_path / name
        model.to(torch.bfloat16).to(dt).save_pretrained(d)  # the fp32 copy is the exact upcast of the bf16 one
        tok.save_pretrained(d)
        inits[name] = d
    losses, outs = {}, {}
    for name, d in inits.items():
        out = tmp_path / f"run_{name}"
        r = run("train_sft.py", f"--init_from={d}", f"--data_dir={build}", "--batch_size=2", "--max_steps=20",
                "--lr=1e-6", "--min_lr=1e-6", "--warmup_steps=0", "--save_every=0", "--num_workers=0",
                "--eval_at_end=False", "--eval_every=0", "--log_every=1", f"--out_dir={out}")
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [json.loads(l)["loss"] for l in open(out / "metrics.jsonl")]
        outs[name] = out
    assert len(losses["bf16"]) == 20 and max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])) <= 1e-5
    # the bf16 run saves bf16 weights (as its init was stored) and keeps the fp32 masters for an exact resume
    saved = VidEmo.from_pretrained(outs["bf16"] / "ckpt")
    assert saved.embed_tokens.weight.dtype == torch.bfloat16
    master = common.load_trainer_state(str(outs["bf16"] / "ckpt"))["master_weights"]
    init = VidEmo.from_pretrained(inits["fp32"]).state_dict()
    fp32_run = VidEmo.from_pretrained(outs["fp32"] / "ckpt").state_dict()
    for k in init:  # the same training: the bf16 run's masters are the fp32 run's weights
        torch.testing.assert_close(master[k], fp32_run[k], rtol=0, atol=1e-7, msg=k)
    n_moved = sum(int((master[k] != init[k]).sum()) for k in init)
    n = sum(v.numel() for v in init.values())
    assert n_moved / n > 0.99  # bf16 weights updated in place keep ~1 % of such steps; here only zero-grad ones stay
