"""memplan: exact parameter counts from meta models, the built-in Qwen2.5-VL shapes, the sharding arithmetic, and every
part of the plan within 20 % of a measurement on CPU (fp32) at small widths: states after a real AdamW step, the saved
tensors of a real forward (with and without checkpointing), a real generate's KV cache, the scorer's peak."""
import json
import os

import pytest
import torch

import memplan as MP
from model import VidEmo
from tiny import tiny_config


def small(**kw):
    """hidden 256 (head_dim 64): activations dominate the constant noise of a forward."""
    return tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, vocab_size=2048,
                       rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                       vision_config={"hidden_size": 64, "intermediate_size": 128}, **kw)


@pytest.mark.parametrize("name,billions", [("qwen2.5-vl-7b", 8.29), ("qwen2.5-vl-3b", 3.75)])
def test_builtin_shapes_have_the_published_sizes(name, billions):
    n = MP.param_counts(MP.meta_model(MP.load_config(name)))["total"]
    assert abs(n / 1e9 - billions) / billions < 0.01, n


@pytest.mark.parametrize("tied,window", [(True, False), (False, True)])
def test_meta_counts_equal_a_real_model(tied, window):
    cfg = tiny_config(tied=tied, window=window)
    torch.manual_seed(0)
    real = VidEmo(cfg)
    pc = MP.param_counts(MP.meta_model(cfg), lora_rank=4)
    assert pc["total"] == sum(p.numel() for p in real.parameters())
    assert pc["vision"] == sum(p.numel() for p in real.visual.parameters())
    lins = [m for n, m in real.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    assert pc["n_lora"] == len(lins) == 7 * cfg["num_hidden_layers"]
    assert pc["lora"] == sum(4 * (m.in_features + m.out_features) for m in lins)
    vis = MP.param_counts(MP.meta_model(cfg), 4, ("visual.qkv",))
    assert vis["n_lora"] == cfg["vision_config"]["depth"]


def test_load_config_reads_a_dir_a_file_or_a_builtin(tmp_path):
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert MP.load_config(str(tmp_path)) == cfg == MP.load_config(str(tmp_path / "config.json"))
    assert MP.load_config("qwen2.5-vl-3b")["vision_config"]["out_hidden_size"] == 2048
    with pytest.raises(FileNotFoundError):
        MP.load_config(str(tmp_path / "nothing"))


def test_fsdp2_shards_the_states_and_lora_trains_only_adapters():
    cfg = MP.load_config("qwen2.5-vl-7b")
    m = MP.meta_model(cfg)
    w = MP.Workload("rl")
    ddp = MP.plan(cfg, MP.Recipe("full", "ddp", 1), w, model=m)
    fsdp = MP.plan(cfg, MP.Recipe("full", "fsdp2", 8), w, model=m)
    lora = MP.plan(cfg, MP.Recipe("lora", "ddp", 1), w, model=m)
    assert fsdp["optim"] == ddp["optim"] // 8 and fsdp["grads"] == ddp["grads"] // 8
    assert ddp["optim"] == 8 * ddp["n_params"] and fsdp["ref"] == 2 * ddp["n_params"] // 8
    assert fsdp["rollout_copy"] == 2 * ddp["n_params"] and ddp["rollout_copy"] == 0
    assert lora["ref"] == 0 and lora["optim"] == 8 * lora["n_lora"] and lora["params"] > 2 * lora["n_params"]
    assert MP.plan(cfg, MP.Recipe("full", "fsdp2", 8), MP.Workload("rl", beta=0.0), model=m)["ref"] == 0
    assert fsdp["total"] < 80e9 < ddp["total"]


CASES = [  # config, workload: GQA + untied + window attention with uneven windows (84 px), MHA + tied, padding
    (small(tied=False, window=True, num_key_value_heads=2),
     MP.Workload("sft", frames=2, height=84, width=112, text=300, completion=80, batch=3)),
    (small(tied=True, num_key_value_heads=4, num_hidden_layers=4),
     MP.Workload("sft", frames=4, height=112, width=112, text=400, completion=64, batch=4, padded=True)),
]


@pytest.mark.parametrize("config,w", CASES)
def test_plan_within_20_percent_of_measurement(config, w):
    for part, planned, measured in MP.check(config, w, seed=1):
        assert measured > 0 and abs(planned - measured) <= 0.2 * measured, (part, planned, measured)


def test_readme_recipe_plans_match_their_config_files():
    """bench.py's RECIPES (the README's memory table) describe their config/ files: frames, batch, G, completion
    length, beta, LoRA rank, FSDP2 and the world size in the file's torchrun line."""
    import importlib.util
    import re

    import common
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def fresh(script):
        spec = importlib.util.spec_from_file_location(f"fresh_{script}_memplan", os.path.join(root, f"{script}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    bench = fresh("bench")
    assert len(bench.RECIPES) == 10
    for label, file, shape, recipe, work in bench.RECIPES:
        path = os.path.join(root, "config", file)
        cfg = common.configure(vars(fresh("train_sft" if file.startswith("sft_") else "train_rl")), [path])
        method, parallel, world = recipe[:3]
        m = re.search(r"--nproc_per_node=(\d+)", open(path).read())
        assert (int(m.group(1)) if m else 1) == world, file
        assert cfg["fsdp"] == (parallel == "fsdp2") and (cfg["lora_rank"] > 0) == (method == "lora"), file
        if method == "lora":
            assert cfg["lora_rank"] == recipe[3], file
        assert cfg["max_frames"] == work["frames"] and cfg["max_pixels"] == 128 * 28 * 28, file
        assert shape.split("-")[-1].upper() in label and cfg["grad_checkpointing"], file
        if work["stage"] == "sft":
            assert cfg["batch_size"] == work["batch"], file
        else:
            assert cfg["num_generations"] == work["G"] and cfg["max_completion_length"] == work["completion"], file
            assert cfg["prompts_per_step"] // (world * cfg["grad_accum"]) == work["prompts"], file
            assert cfg["beta"] == work.get("beta", 0.04), file
