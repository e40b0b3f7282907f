"""gpu_check.py on a machine without a GPU: --dry_run=True runs checks 1-3 at tiny sizes on CPU (Triton through the
interpreter) and writes its JSON; without --dry_run it stops at once with one line and exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "gpu_check.py"), *args], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=120)


@pytest.mark.parametrize("interpret", ["1", "0"])  # "0": the script re-executes itself under the interpreter
def test_dry_run_writes_the_figures(tmp_path, interpret):
    out = tmp_path / "sub" / "gpu_check.json"
    r = run("--dry_run=True", f"--out={out}", env={"TRITON_INTERPRET": interpret})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] is True and rep["ok"] is True
    assert list(rep["checks"]) == ["kernels", "bf16_forward", "flash_attn", "shared_prefix", "decode"]  # the GPU-only ones left out
    k = rep["checks"]["kernels"]
    for dtype in ("bfloat16", "float32"):
        row = k[f"token_logprobs_{dtype}"]
        for backend in ("triton", "torch"):
            assert row[backend]["ok"] and row[backend]["logp_abs_err"] <= 1e-4
        assert row["triton_vs_torch"]["logp_abs_diff"] <= 1e-4 and row["logits_logprobs_triton"]["ok"]
    assert k["token_compress"]["mask_equal_float32_rate"] and k["token_compress"]["mask_equal_float32_threshold"]
    f = rep["checks"]["bf16_forward"]
    assert 0 < f["logits_rel_err_max"] <= 5e-2 and 0.9 <= f["top1_agreement"] <= 1.0
    assert rep["checks"]["flash_attn"]["skipped"]
    sp = rep["checks"]["shared_prefix"]  # shared vs per-row passes, and the rollout with the prompt's keys once
    assert sp["ok"] and sp["grad_cosine_min"] >= 0.9999
    assert sp["rollout_token_agreement"] == 1.0 == sp["rollout_rows_same"]
    assert sp["rollout_kv_mib_once"] < sp["rollout_kv_mib_copied"]
    d = rep["checks"]["decode"]  # eager vs static decode (graphs need CUDA) vs transformers, the same greedy tokens
    assert d["static_rows_same_as_eager"] == 1.0 and d["transformers_rows_same_as_eager"] == 1.0
    assert d["ok"] and "graphs_decode_tok_s" not in d
    assert "5/5 checks ok" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_needs_a_gpu_without_dry_run(tmp_path):
    r = run(f"--out={tmp_path / 'g.json'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: gpu_check.py needs a CUDA GPU (--dry_run=True runs the CPU "
                                             "checks at tiny sizes)"]
    assert not (tmp_path / "g.json").exists()


def test_bad_check_name_is_one_line(tmp_path):
    r = run("--dry_run=True", "--checks=('kernels','nope')", f"--out={tmp_path / 'g.json'}")
    assert r.returncode == 2 and "config key 'checks'" in r.stderr and "Traceback" not in r.stderr


def test_partings_measure_where_greedy_rows_part():
    """gpu_check.partings, the bf16 decode criterion, against logits from a plain teacher-forced forward: equal
    outputs -> (1.0, 0.0); one row changed at one step to its runner-up token -> that row counted, gap = (top-1 -
    top-2) / max |logit| there; changed to its last-ranked token -> a gap far above a near-tie."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import gpu_check
    from model import VidEmo
    from tiny import fake_video_inputs, tiny_config
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    model = VidEmo(tiny_config()).eval()
    inp = fake_video_inputs([(2, 4, 4), (2, 4, 6), (2, 6, 4)], side="left", seed=int(torch.randint(0, 1000, ())))
    a, _ = model.generate(**inp, max_new_tokens=6, temperature=0.0, eos_token_id=None, pad_token_id=0)
    assert gpu_check.partings(model, inp, a, a.clone()) == (1.0, 0.0)
    row, step = 1, int(torch.randint(1, 6, ()))
    with torch.no_grad():
        full = model(**dict(inp, input_ids=torch.cat([inp["input_ids"], a], 1),
                            attention_mask=torch.cat([inp["attention_mask"], torch.ones_like(a)], 1)))
    z = full[row, inp["input_ids"].shape[1] - 1 + step]  # [V] the logits that chose a[row, step]
    assert int(z.argmax()) == int(a[row, step])
    top2 = z.topk(2)
    for tok, want in ((top2.indices[1], (top2.values[0] - top2.values[1]) / z.abs().max()),
                      (z.argmin(), (z.max() - z.min()) / z.abs().max())):
        b = a.clone()
        b[row, step] = tok
        same, gap = gpu_check.partings(model, inp, a, b)
        assert same == 1 - 1 / a.shape[0]
        assert abs(gap - want.item()) < 1e-4
    assert gap > gpu_check.NEAR_TIE
