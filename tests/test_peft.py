"""LoRA adapters in peft's format, both ways, against peft itself on transformers' Qwen2_5_VLForConditionalGeneration:
our `lora_save=adapter` output under peft gives our adapted logits; an adapter peft trained (language + vision
targets, random non-zero B) loads through our loader to peft's logits; the files are what vLLM's LoRA loader takes;
what we cannot apply exactly is one error line naming the field."""
import json
import re
import warnings

import pytest
import torch
import torch.nn as nn

import lora
from model import VidEmo
from tiny import fake_video_inputs, hf_inputs, make_hf_model, tiny_config

peft = pytest.importorskip("peft")  # a test-only dependency (requirements.txt)

INPUTS = dict(grids=[(2, 8, 8), (2, 6, 6)], side="left")


def _ours(model, inputs):
    with torch.no_grad():
        return model(**inputs)  # [B, L, V]


def _theirs(model, inputs):
    with torch.no_grad():
        return model(**hf_inputs(inputs)).logits  # [B, L, V]


def _max_diff(a, b, inputs):
    m = inputs["attention_mask"].bool()  # padded positions are garbage on both sides
    return (a - b).abs()[m].max().item()


def _peft_load(base_dir, adapter_dir):
    """transformers' model from base_dir with peft's adapter from adapter_dir; peft's warnings (missing or unexpected
    adapter keys, ...) are returned so that a test can demand there are none."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, attn_implementation="sdpa",
                                                            dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(hf, adapter_dir).eval()
    return pm, [str(w.message) for w in caught if "adapter" in str(w.message).lower() or "lora" in str(w.message)]


def _lora_paths(module):
    """Module paths (relative to the transformers model) that carry a peft LoRA layer."""
    from peft.tuners.lora import LoraLayer
    return {n.removeprefix("base_model.model.") for n, m in module.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("cfg", [dict(tied=True), dict(tied=False, window=True)])
def test_our_adapter_loads_in_peft_with_our_logits(tmp_path, cfg):
    torch.manual_seed(0)
    model = VidEmo(tiny_config(**cfg)).eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    # the decoder's seven projections plus vision targets (qkv, the merger's first linear): the vision tower also has
    # gate/up/down_proj, which must NOT be adapted
    targets = lora.DEFAULT_TARGETS + ("visual.qkv", "visual.mlp.0")
    names = lora.add_adapters(model, 4, 8.0, targets)
    with torch.no_grad():
        for m in lora.layers(model).values():
            m.lora_B.normal_(std=0.05)  # B = 0 at init: give the update values
    lora.save_adapter(adapter_dir, model, str(base_dir), targets)
    inputs = fake_video_inputs(**INPUTS, seed=3)
    ours = _ours(model, inputs)
    with lora.disabled(model):
        assert _max_diff(ours, _ours(model, inputs), inputs) > 1e-3  # the adapters do change the output
    pm, warned = _peft_load(base_dir, adapter_dir)
    assert not warned, warned
    assert _lora_paths(pm) == {lora.peft_module(n) for n in names}  # exactly our layers, no vision mlp
    assert not any(p.startswith("model.visual.blocks") and p.endswith(("gate_proj", "up_proj", "down_proj"))
                   for p in _lora_paths(pm))
    diff = _max_diff(_theirs(pm, inputs), ours, inputs)
    print(f"ours -> peft: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5
    back = VidEmo.from_pretrained(adapter_dir)  # our loader merges the same adapters
    assert not lora.layers(back)
    assert _max_diff(_ours(back, inputs), ours, inputs) <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_ours_with_peft_logits(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_hf_model(tiny_config(tied=False, window=True), seed=5).save_pretrained(base_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, attn_implementation="sdpa",
                                                            dtype=torch.float32)
    # language and vision targets: "down_proj" matches the decoder's and the vision blocks' (peft's suffix rule)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "qkv", "mlp.0"],
                     lora_dropout=0.0, use_rslora=rslora, task_type="CAUSAL_LM")
    torch.manual_seed(7)
    pm = get_peft_model(hf, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # peft starts B at 0
    pm.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir) and saved["use_rslora"] == rslora
    paths = _lora_paths(pm)
    assert any(p.startswith("model.visual.blocks") and p.endswith("attn.qkv") for p in paths)
    assert any(p.startswith("model.visual.blocks") and p.endswith("mlp.down_proj") for p in paths)
    assert "model.visual.merger.mlp.0" in paths and "model.language_model.layers.1.mlp.down_proj" in paths
    inputs = fake_video_inputs(**INPUTS, seed=11)
    theirs = _theirs(pm.eval(), inputs)
    with pm.disable_adapter():
        assert _max_diff(_theirs(pm, inputs), theirs, inputs) > 1e-3
    ours = VidEmo.from_pretrained(adapter_dir)
    diff = _max_diff(_ours(ours, inputs), theirs, inputs)
    print(f"peft -> ours (rslora={rslora}): max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5
    # the unmerged route: the same layers wrapped, the same logits
    base = VidEmo.from_pretrained(base_dir)
    lora.load_adapter(base, adapter_dir)
    assert {lora.peft_module(n) for n in lora.layers(base)} == paths
    assert _max_diff(_ours(base, inputs), theirs, inputs) <= 1e-5


def _vllm_module(key):
    """vLLM's reading of an adapter key for Qwen2.5-VL: strip base_model.model., map the Hub prefixes the way its
    hf_to_vllm_mapper does, drop .lora_A.weight / .lora_B.weight -> (module, "lora_A" | "lora_B"), else None."""
    if not key.startswith("base_model.model."):
        return None
    name = key[len("base_model.model."):]
    for old, new in (("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
                     ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    return ".".join(parts[:-2]), parts[-2]


def test_adapter_files_are_what_vllm_reads(tmp_path, monkeypatch):
    from safetensors import safe_open
    torch.manual_seed(1)
    model = VidEmo(tiny_config())
    linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
    names = lora.add_adapters(model, 8, 32.0, lora.DEFAULT_TARGETS + ("visual.qkv",))
    hub = "Qwen/Qwen2.5-VL-3B-Instruct"
    lora.save_adapter(tmp_path / "a", model, hub, ())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == hub  # a Hub id stays a Hub id
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32 and type(cfg["lora_alpha"]) is int
    assert isinstance(cfg["target_modules"], str) and cfg["bias"] == "none" and cfg["modules_to_save"] is None
    assert cfg["use_dora"] is False and cfg["use_rslora"] is False and cfg["fan_in_fan_out"] is False
    # peft's own config class takes every field
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "a")).r == 8
    pairs = {}
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            parsed = _vllm_module(key)
            assert parsed is not None, key
            module, ab = parsed
            assert module.startswith(("language_model.model.layers.", "visual.blocks.")), module
            assert module.rsplit(".", 1)[-1] in linear_names  # vLLM's expected_lora_modules: linear-layer names
            pairs.setdefault(module, {})[ab] = tuple(f.get_slice(key).get_shape())
    assert len(pairs) == len(names)
    for module, ab in pairs.items():
        (r, n_in), (n_out, r2) = ab["lora_A"], ab["lora_B"]
        assert r == r2 == cfg["r"] and n_in > 0 and n_out > 0
    # the regex target selects exactly the saved layers (peft full-matches it against module paths)
    every = [lora.peft_module(n) for n, m in VidEmo(tiny_config()).named_modules() if type(m) is nn.Linear]
    chosen = {p for p in every if re.fullmatch(cfg["target_modules"], p)}
    assert chosen == {lora.peft_module(n) for n in names}
    # a path base stays as passed (relative: read from the working directory, as peft does)
    monkeypatch.chdir(tmp_path)
    VidEmo(tiny_config(tied=False)).save_pretrained(tmp_path / "rel_base")
    torch.manual_seed(2)
    m2 = VidEmo.from_pretrained("rel_base")
    lora.add_adapters(m2, 2, 4.0)
    lora.save_adapter("rel_adapter", m2, "rel_base", ())
    assert json.loads((tmp_path / "rel_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "rel_base"
    VidEmo.from_pretrained("rel_adapter")


def _peft_adapter(tmp_path, **lora_kw):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        make_hf_model(tiny_config(), seed=2).save_pretrained(base_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    out = tmp_path / ("adapter_" + "_".join(sorted(lora_kw)))
    get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **lora_kw)) \
        .save_pretrained(out)
    return out


@pytest.mark.parametrize("kw, field", [
    (dict(use_dora=True), "use_dora"),
    (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(alpha_pattern={"v_proj": 8}), "alpha_pattern"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_peft_adapters_are_one_line_naming_the_field(tmp_path, kw, field):
    adapter = _peft_adapter(tmp_path, **kw)
    with pytest.raises(ValueError) as e:
        VidEmo.from_pretrained(adapter)
    msg = str(e.value)
    assert field in msg and "adapter_config.json" in msg and "\n" not in msg, msg


def test_adapter_on_the_wrong_base_or_no_base(tmp_path):
    adapter = _peft_adapter(tmp_path)
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    other = tmp_path / "other"
    wider = tiny_config(hidden_size=96, rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]})  # head_dim 24
    VidEmo(wider).save_pretrained(other)
    cfg_file.write_text(json.dumps(dict(cfg, base_model_name_or_path=str(other))))
    with pytest.raises(ValueError, match=r"do not fit the base model .*other.*q_proj") as e:
        VidEmo.from_pretrained(adapter)
    assert "\n" not in str(e.value)
    cfg_file.write_text(json.dumps(dict(cfg, base_model_name_or_path=str(tmp_path / "missing"))))
    with pytest.raises(ValueError, match="base_model_name_or_path") as e:
        VidEmo.from_pretrained(adapter)
    assert "\n" not in str(e.value)
    cfg_file.write_text(json.dumps(dict(cfg, base_model_name_or_path=None)))
    with pytest.raises(ValueError, match="base_model_name_or_path is not set"):
        VidEmo.from_pretrained(adapter)
    cfg_file.write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(ValueError, match="peft_type"):
        VidEmo.from_pretrained(adapter)


def test_older_videmo_adapters_still_load(tmp_path):
    """The layout lora_save=adapter wrote before (our parameter names, no peft_type) loads to the same weights."""
    from safetensors.torch import save_file
    torch.manual_seed(4)
    model = VidEmo(tiny_config()).eval()
    model.save_pretrained(tmp_path / "base")
    lora.add_adapters(model, 4, 8.0, ("q_proj", "visual.qkv"))
    with torch.no_grad():
        for m in lora.layers(model).values():
            m.lora_B.normal_(std=0.05)
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in lora.adapter_state(model).items()},
              str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path / "base"), "r": 4, "lora_alpha": 8.0,
         "target_modules": ["q_proj", "visual.qkv"], "adapted_layers": sorted(lora.layers(model))}))
    inputs = fake_video_inputs(**INPUTS, seed=2)
    assert _max_diff(_ours(VidEmo.from_pretrained(tmp_path / "old"), inputs), _ours(model, inputs), inputs) <= 1e-5
