"""sample.py --json: one JSON object on stdout (tree, answer, per-level log-probs under tree reasoning) that agrees
with the text mode and with inference.tree_reasoning called directly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data as D
import inference as S
import reward as R
from tiny import tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
KW = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)  # sample.py's defaults


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import av

    from model import VidEmo
    from tiny import build_emosynth
    tmp = tmp_path_factory.mktemp("sample")
    emo = Path(build_emosynth(tmp / "emo", num_train=2, num_val=1, num_test=1, workers=1))
    tok = D.load_tokenizer(emo / "tokenizer")
    torch.manual_seed(0)
    common.save_checkpoint(str(tmp / "ckpt"), VidEmo(tokenizer_config(tok)).save_pretrained, tokenizer=tok)
    video = tmp / "clip.mp4"  # 2 s of random frames
    rng = np.random.default_rng(0)
    with av.open(str(video), "w") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 112, 112, "yuv420p"
        for _ in range(8):
            c.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))))
        c.mux(s.encode())
    return tmp / "ckpt", video


def sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_json_tree_reasoning_matches_the_library(setup):
    ckpt, video = setup
    args = [f"--init_from={ckpt}", f"--video={video}", "--reasoning=tree", "--samples=3", "--level_max_tokens=6",
            "--max_new_tokens=5", "--seed=3"]
    p = sample(*args, "--json=True")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)  # stdout is the JSON object and nothing else
    assert set(out) == {"checkpoint", "video", "question", "reasoning", "scorer", "response", "tree", "answer",
                        "levels"}
    # the same call in-process: the same text, candidates and log-probs
    model, tok, _ = S.load_model(str(ckpt))
    item = dict(D.encode_prompt({"messages": [{"role": "user", "content": "<video>" + out["question"]}],
                                 "videos": [str(video)]}, tok, "", KW), index=0)
    torch.manual_seed(3)
    text, cands = S.tree_reasoning(model, tok, item, 3, "logprob", 0.9, 6, 5, 0.0, torch.Generator().manual_seed(3),
                                   return_candidates=True)
    assert out["response"] == text.strip() and out["answer"] == R.extract_answer(text)
    assert list(out["tree"]) == list(R.LEVELS) and list(out["levels"]) == list(R.LEVELS)
    for level in R.LEVELS:
        lv = out["levels"][level]
        assert [c["line"] for c in lv["candidates"]] == [ln for ln, _ in cands[level]]
        for c, (_, s) in zip(lv["candidates"], cands[level]):
            assert (c["logprob"] is None and s == float("-inf")) or abs(c["logprob"] - s) < 1e-6
        assert lv["chosen"] in text.split("\n") and lv["chosen"].startswith(level + ":")
        assert lv["logprob"] == next(c["logprob"] for c in lv["candidates"] if c["line"] == lv["chosen"])


def test_json_plain_and_bad_input(setup, tmp_path):
    ckpt, video = setup
    p = sample(f"--init_from={ckpt}", f"--video={video}", "--max_new_tokens=5", "--json=True")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["levels"] is None and out["scorer"] is None and out["reasoning"] == "plain"
    assert out["tree"].keys() == set(R.LEVELS) and isinstance(out["answer"], str)
    p = sample(f"--init_from={ckpt}", f"--video={tmp_path / 'none.mp4'}", "--json=True")
    assert p.returncode != 0 and "none.mp4" in p.stderr and not p.stdout.strip()
