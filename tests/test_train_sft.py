"""train_sft.py end to end on a tiny EmoSynth build: DDP and FSDP2 equal one process on the same global batch,
resume is exact, and a real recipe config runs from a tiny random Hugging Face checkpoint."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = dict(num_train=48, num_val=8, num_test=8, workers=1, vocab_size=600)
# a very small model so each torchrun launch is dominated by start-up
TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_inner=64", "--vision_depth=1",
              "--vision_embd=32", "--vision_heads=2", "--vision_inner=64"]
COMMON = ["--max_steps=4", "--log_every=1", "--eval_every=0", "--save_every=2", "--eval_at_end=False",
          "--num_workers=0", "--warmup_steps=1", "--lr=1e-2", "--min_lr=1e-3", "--replay=0.5"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("emosynth_prepare", ROOT / "data/emosynth/prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.prepare(tmp_path_factory.mktemp("emosynth") / "build", verbose=False, **TINY_DATA))


def launch(args, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_sft.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_sft.py")]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train_sft failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_distributed_and_resume_match_one_process(tiny_data, tmp_path):
    data = [f"--data_dir={tiny_data}"]
    ref = str(tmp_path / "ref")
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={ref}"])
    base = losses(ref)
    assert sorted(base) == [1, 2, 3, 4] and base[4] < base[1]  # it learns something

    # 2 processes x 2 samples = the same global batch of 4: same losses, DDP and FSDP2
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=True"])):
        out = str(tmp_path / name)
        launch(data + TINY_MODEL + COMMON + ["--batch_size=2", f"--out_dir={out}"] + extra, nproc=2)
        got = losses(out)
        assert sorted(got) == [1, 2, 3, 4]
        for s in base:
            assert abs(got[s] - base[s]) <= 1e-5, (name, s, got[s], base[s])

    # stop after step 2 (as if killed right after its checkpoint), then --resume: identical loss sequence
    out = str(tmp_path / "resumed")
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={out}", "--stop_at_step=2"])
    assert sorted(losses(out)) == [1, 2]
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={out}", "--resume=True"])
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for s in base:
        assert abs(got[s] - base[s]) <= 1e-6, (s, got[s], base[s])


def test_real_recipe_from_tiny_hf_checkpoint(tiny_data, tmp_path):
    """config/sft_qwen25vl_3b.py (frozen ViT + merger, the real recipe) from a tiny random transformers checkpoint."""
    import torch
    from transformers import AutoTokenizer
    from tiny import make_hf_model, tiny_config

    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_data, "tokenizer"))
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|endoftext|>"))}
    hf = make_hf_model(tiny_config(vocab_size=len(tok), **ids), seed=0)
    init = str(tmp_path / "hf_init")
    hf.save_pretrained(init)
    tok.save_pretrained(init)
    out = str(tmp_path / "recipe")
    launch([str(ROOT / "config/sft_qwen25vl_3b.py"), f"--init_from={init}", f"--train_file={tiny_data}/train.jsonl",
            f"--video_root={tiny_data}", "--fsdp=False", "--grad_checkpointing=True", "--dtype=auto",
            "--fps=4.0", "--max_frames=8", "--max_pixels=12544", "--batch_size=2", "--grad_accum=2",
            "--max_steps=2", "--save_every=2", "--num_workers=0", f"--out_dir={out}"])
    assert sorted(losses(out)) == [1, 2]
    # the ViT stayed frozen, the LLM moved, and the result loads back into transformers
    from transformers import Qwen2_5_VLForConditionalGeneration
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(out, "ckpt"))
    sd0, sd1 = hf.state_dict(), after.state_dict()
    vis = [k for k in sd0 if ".visual." in k or k.startswith("visual.")]
    llm = [k for k in sd0 if "layers.0.mlp.up_proj" in k]
    assert vis and llm
    assert all(torch.equal(sd0[k], sd1[k]) for k in vis)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in llm)


def test_bad_config_and_missing_init(tmp_path):
    r = launch(["--bacth_size=3"], check=False)
    assert r.returncode != 0 and "bacth_size" in r.stderr
    r = launch([f"--init_from={tmp_path}/nope", f"--out_dir={tmp_path}/o", "--data_dir=/nonexistent"], check=False)
    assert r.returncode != 0 and "nope" in (r.stderr + r.stdout)
