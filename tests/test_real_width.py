"""The whole path at Qwen2.5-VL-3B widths, truncated depth (slow: VIDEMO_SLOW=1 python -m pytest -q -m slow
tests/test_real_width.py).

A Hub-format directory as Qwen2.5-VL-3B-Instruct ships it (flat transformers-4 config.json with rope_scaling.type =
"mrope", bf16 weights in two shards + index, chat_template.json beside a text-only template in tokenizer_config.json,
the real Qwen tokenizer) at the real widths (hidden 2048, intermediate 11008, 16 heads / 2 kv, vocab 151936, tied;
ViT 1280 wide, 16 heads, merger to 2048, window 112) but 2 decoder and 2 vision layers, random weights. It goes
through every entry point: VidEmo.from_pretrained, sample.py, eval.py, train_sft.py (2 steps) and train_rl.py
(1 step) from the SFT checkpoint; the RL checkpoint loads in transformers' Qwen2_5_VLForConditionalGeneration and
gives our logits (fp32, 1e-4 relative). About 2.2 GB of fp32 weights; peak RSS ~11 GB (SFT/RL: weights, grads,
AdamW moments; RL also the reference model).
"""
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny import QWEN25_VL_TEMPLATE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("VIDEMO_SLOW") != "1", reason="slow: set VIDEMO_SLOW=1 to run")]

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-VL-3B-Instruct's config.json (transformers 4.41 layout), depth cut to 2 + 2. Full attention in vision block
# 1 (the real [7, 15, 23, 31] are all past depth 2): block 0 runs windowed attention, block 1 full attention.
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 128000, "max_window_layers": 70, "model_type": "qwen2_5_vl",
    "num_attention_heads": 16, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 2, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
VIDEO = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)  # EmoSynth clips: 8 x 112 x 112


def run(script, *args, timeout=1200):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=timeout)
    assert r.returncode == 0, f"{script} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    print(f"[real-width] {script}: {time.time() - t0:.0f} s, children peak RSS "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.1f} GiB")
    return r.stdout


def perturb(model, seed=0):
    """Random norms and biases too (our init leaves them at ones / zeros), so a misapplied one cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, qwen_tokenizer_dir):
    """The 3B-format directory: bf16, two shards + index, chat_template.json, the real Qwen tokenizer."""
    from model import VidEmo
    d = tmp_path_factory.mktemp("real") / "qwen25vl_3b_d2"
    torch.manual_seed(0)
    model = VidEmo(QWEN25_VL_3B)
    perturb(model)
    sd = model.state_dict()
    first = sum(v.numel() * 2 for k, v in sd.items() if k.startswith("visual.") or k == "embed_tokens.weight")
    model.save_pretrained(d, dtype=torch.bfloat16, max_shard_size=first)  # shard 1: ViT + embedding, 2: decoder
    del model, sd
    for f in ("preprocessor_config.json", "generation_config.json"):  # the Hub repo's own, carried from here on
        os.remove(d / f)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (d / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
        "transformers_version": "4.49.0"}, indent=2))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and "text_config" not in cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen_tokenizer_dir / f, d / f)  # its tokenizer_config.json holds a text-only template
    (d / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25_VL_TEMPLATE}, indent=2))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    yield d
    shutil.rmtree(d, ignore_errors=True)  # ~1 GB; pytest keeps its last temporary directories


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("emosynth_prepare", ROOT / "data/emosynth/prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.prepare(tmp_path_factory.mktemp("emosynth") / "build", verbose=False, num_train=24, num_val=4,
                            num_test=8, workers=1))


def video_batch(tok, clip):
    """A real clip through data.py at EmoSynth's settings, as one prompt with its placeholder run."""
    import data as D
    item = D.encode_prompt({"messages": [{"role": "user", "content": "<video>What emotion does the person show?"}],
                            "videos": [str(clip)]}, tok, "", VIDEO)
    item["index"] = 0
    batch = D.collate_prompts([item], tok.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts")}, batch["mm_token_type_ids"]


def test_real_width_end_to_end(hub_dir, build, tmp_path):
    try:
        end_to_end(hub_dir, build, tmp_path)
    finally:  # the SFT and RL checkpoints hold fp32 masters + AdamW moments: ~15 GB
        for d in ("sft", "rl"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)


def end_to_end(hub_dir, build, tmp_path):
    import data as D
    from model import VidEmo
    t_start = time.time()
    # ---- our loader: bf16 shards -> the model (as stored), the VL template chosen over the text one
    model = VidEmo.from_pretrained(hub_dir)
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() > 500e6
    tok = D.load_tokenizer(hub_dir)
    assert tok.chat_template == QWEN25_VL_TEMPLATE
    clip = next(iter(sorted(build.rglob("*.mp4"))))
    inputs, mm = video_batch(tok, clip)
    n_video = int((inputs["input_ids"] == QWEN25_VL_3B["video_token_id"]).sum())
    assert n_video == 4 * 4 * 4  # 8 frames x 112 px -> t=4, 8x8 patches, 2x2 merge
    with torch.no_grad():
        tokens, _ = model.float().generate(**inputs, max_new_tokens=4,
                                           eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 4
    del model

    # ---- sample.py and eval.py straight from the Hub-format directory
    txt = run("sample.py", f"--video={clip}", f"--init_from={hub_dir}", "--max_new_tokens=4", "--device=cpu")
    assert "response:" in txt
    res = tmp_path / "eval.json"
    run("eval.py", f"--init_from={hub_dir}", f"--test_file={build / 'test.jsonl'}", "--max_records=2",
        "--batch_size=2", "--max_new_tokens=4", f"--out={res}", "--device=cpu", "--progress=False")
    assert sum(t["n"] for t in json.loads(res.read_text())["tasks"].values()) == 2

    # ---- 2 SFT steps from it (fp32 masters, saved bf16 as stored), then 1 GRPO step from the SFT checkpoint
    sft = tmp_path / "sft"
    run("train_sft.py", f"--init_from={hub_dir}", f"--data_dir={build}", f"--out_dir={sft}", "--max_steps=2",
        "--batch_size=1", "--grad_accum=1", "--warmup_steps=0", "--lr=1e-5", "--min_lr=0", "--log_every=1", "--eval_every=0",
        "--save_every=2", "--eval_at_end=False", "--val_file=none", "--num_workers=0", "--device=cpu")
    losses = [json.loads(line)["loss"] for line in open(sft / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for f in ("preprocessor_config.json", "generation_config.json"):  # the Hub files, carried over unchanged
        assert (sft / "ckpt" / f).read_text() == (hub_dir / f).read_text()
    assert json.loads((sft / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    rl = tmp_path / "rl"
    run("train_rl.py", f"--init_from={sft / 'ckpt'}", f"--data_dir={build}", f"--out_dir={rl}", "--max_steps=1",
        "--num_generations=2", "--prompts_per_step=1", "--grad_accum=1", "--max_completion_length=8",
        "--tasks=('emotion_single',)", "--eval_every=0", "--eval_at_end=False", "--save_every=1",
        "--warmup_steps=0", "--lr=1e-6", "--min_lr=0", "--sample_table_every=0", "--dynamic_sampling=False", "--device=cpu")
    rows = [json.loads(line) for line in open(rl / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward" in r] == [1]
    ckpt = rl / "ckpt"
    assert (ckpt / "COMPLETE").is_file() and D.load_tokenizer(ckpt).chat_template == QWEN25_VL_TEMPLATE

    # ---- the saved checkpoint in transformers, fp32: our logits
    from transformers import Qwen2_5_VLForConditionalGeneration
    ours = VidEmo.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        mine = ours(**inputs)
    del ours
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32,
                                                                  attn_implementation="sdpa",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = inputs["input_ids"]
    assert torch.equal(mm, 2 * (ids == QWEN25_VL_3B["video_token_id"]).long())  # 0 text, 2 video
    with torch.no_grad():
        ref = hf.eval()(**inputs, mm_token_type_ids=mm).logits
    assert mine.shape == ref.shape == (1, ids.shape[1], 151936)
    rel = ((mine - ref).abs().max() / ref.abs().max()).item()
    print(f"[real-width] logits vs transformers: max rel {rel:.2e}; total {time.time() - t_start:.0f} s; "
          f"peak RSS self {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, children "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.1f} GiB")
    assert rel <= 1e-4
