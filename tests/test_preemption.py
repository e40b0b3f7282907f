"""Preemption: SIGTERM (or SIGUSR1) reaching a trainer mid-run -> it finishes the step, writes a checkpoint at that
step, prints how to resume and exits 143; --resume then continues exactly as the uninterrupted run (same losses).
Under torchrun a signal on one rank stops both at the same step. The signal is sent by the process itself right before
the K-th preemption check (a real SIGTERM through the real handler), so the step it lands on is known."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import build_emosynth

ROOT = Path(__file__).resolve().parents[1]
# runs a trainer as __main__ after arranging a real SIGTERM to this process before its K-th StopSignal check
DRIVER = """
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
import common
K, R = int(os.environ.get("SIGTERM_AT", 0)), int(os.environ.get("SIGTERM_RANK", 0))
orig, calls = common.StopSignal.should_stop, [0]
def should_stop(self, device=None):
    calls[0] += 1
    if calls[0] == K and int(os.environ.get("RANK", 0)) == R:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes: wait until it has
            if self.received:
                break
            time.sleep(0.001)
    return orig(self, device)
common.StopSignal.should_stop = should_stop
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""
TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_inner=64", "--vision_depth=1",
              "--vision_embd=32", "--vision_heads=2", "--vision_inner=64"]
COMMON = ["--max_steps=4", "--log_every=1", "--eval_every=0", "--save_every=0", "--eval_at_end=False",
          "--num_workers=1", "--warmup_steps=1", "--lr=1e-2", "--min_lr=1e-3", "--replay=0.5"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(build_emosynth(tmp_path_factory.mktemp("emosynth") / "build", num_train=48, num_val=8, num_test=8,
                              workers=1, vocab_size=600))


def launch(tmp_path, args, nproc=1, sigterm_at=0, rank=0):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), SIGTERM_AT=str(sigterm_at),
               SIGTERM_RANK=str(rank))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + [str(driver), str(ROOT / "train_sft.py")] + args, capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=600)


def losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def saved_step(out_dir):
    import torch
    return torch.load(os.path.join(out_dir, "ckpt", "trainer_state.pt"), weights_only=False)["step"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_the_step_and_resume_is_exact(tiny_data, tmp_path, nproc):
    """SIGTERM before step 3 (one process; under torchrun to rank 1 only): checkpoint at step 2 with no save_every,
    exit 143 with the resume command; --resume gives the uninterrupted run's losses."""
    args = [f"--data_dir={tiny_data}", f"--batch_size={4 // nproc}"] + TINY_MODEL + COMMON
    straight = tmp_path / "straight"
    r = launch(tmp_path, args + [f"--out_dir={straight}"], nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "preempted"
    r = launch(tmp_path, args + [f"--out_dir={out}"], nproc, sigterm_at=3, rank=nproc - 1)
    # one process exits 143 (128 + SIGTERM); torchrun reports its workers' 143 and exits 1 itself
    assert r.returncode == 143 if nproc == 1 else r.returncode == 1 and "exitcode  : 143" in r.stderr, \
        (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "resume with:" in r.stdout + r.stderr and "--resume=True" in r.stdout + r.stderr
    assert sorted(losses(out)) == [1, 2] and saved_step(out) == 2
    r = launch(tmp_path, args + [f"--out_dir={out}", "--resume=True"], nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = losses(straight), losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-7), s


def test_a_second_run_on_the_same_out_dir_is_refused(tiny_data, tmp_path):
    """While a run holds out_dir, another is refused at once naming the holder; nothing it would write appears."""
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common, "
                               f"time; common.lock_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = launch(tmp_path, [f"--data_dir={tiny_data}", f"--out_dir={out}"] + TINY_MODEL + COMMON)
        assert r.returncode == 2 and "in use by another run" in r.stderr and str(holder.pid) in r.stderr, r.stderr
        assert not (out / "metrics.jsonl").exists() and not (out / "ckpt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert fcntl is not None
