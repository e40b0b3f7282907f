"""plot.py: curve reading, running mean against a direct computation, a readable PNG, clear errors."""
import json
import os
import random
import subprocess
import sys

import pytest
from PIL import Image

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plot(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_running_mean_matches_direct_window():
    rng = random.Random(0)
    values = [rng.uniform(-3, 3) for _ in range(57)]
    for window in (1, 4, 25, 100):
        got = plot.running_mean(values, window)
        want = [sum(values[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(values))]
        assert got == pytest.approx(want, abs=1e-9)


def test_plot_writes_png_and_reads_only_rows_with_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val/x": 0.5}] + [{"step": s, "reward": s * 0.01, "loss": 1.0 / s} for s in range(1, 41)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    steps, values = plot.read_curve(path, "reward")
    assert steps == list(range(1, 41)) and values[-1] == pytest.approx(0.40)
    assert plot.read_curve(path, "val/x") == ([0], [0.5])
    out = tmp_path / "curve.png"
    r = run_plot(f"--metrics={path},{path}", "--key=reward", f"--out={out}", "--smooth=5", "--labels=a,b")
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.size == (720, 420) and len(img.convert("RGB").getcolors(1 << 16)) > 3  # axes, curves, text


def test_plot_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        plot.read_curve(path, "loss")
    path.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="no rows with key 'reward'"):
        plot.read_curve(path, "reward")
    for args, needle in (([f"--metrics={path}", "--colour=red"], "colour"),
                         ([f"--metrics={path}", "--key=reward"], "no rows with key 'reward'"),
                         ([f"--metrics={path}", "--labels=a,b"], "labels")):
        r = run_plot(*args)  # one line naming the problem, exit code 2
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
