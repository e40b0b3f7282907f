"""LoRA (lora.py): the adapted forward equals W + (alpha / r) B A, the merged save loads in transformers with the
adapted model's logits, a step moves only (and every) adapter, adapters off give the base back exactly, and
adapter-only checkpoints load merged."""
import pytest
import torch
import torch.nn as nn

import lora
from model import VidEmo
from tiny import fake_video_inputs, hf_inputs, tiny_config


def _adapted(seed=0, targets=lora.DEFAULT_TARGETS, rank=4, alpha=8.0, **cfg):
    torch.manual_seed(seed)
    model = VidEmo(tiny_config(**cfg)).eval()
    base = VidEmo(model.config).eval()
    base.load_state_dict(model.state_dict())
    names = lora.add_adapters(model, rank, alpha, targets)
    with torch.no_grad():  # B = 0 at init; give it values so the update is not trivially zero
        for m in lora.layers(model).values():
            m.lora_B.normal_(std=0.05)
    return model, base, names


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("cfg", [dict(tied=True), dict(tied=False, window=True)])
def test_merged_save_loads_in_transformers_with_adapted_logits(tmp_path, cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, base, names = _adapted(**cfg)
    assert len(names) == 7 * model.ts["num_hidden_layers"] and not any(n.startswith("visual.") for n in names)
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="left", seed=3)
    adapted = _logits(model, inputs)
    # by hand: every targeted weight replaced by W + (alpha / r) B A
    manual = VidEmo(model.config).eval()
    sd = base.state_dict()
    for n, m in lora.layers(model).items():
        sd[n + ".weight"] = sd[n + ".weight"] + (8.0 / 4) * m.lora_B.detach() @ m.lora_A.detach()
    manual.load_state_dict(sd)
    torch.testing.assert_close(adapted, _logits(manual, inputs), rtol=1e-5, atol=1e-5)
    assert (adapted - _logits(base, inputs)).abs().max() > 1e-3  # the adapters do change the output
    model.save_pretrained(tmp_path, state_dict=lora.merged_state_dict(model))
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        theirs = hf.eval()(**hf_inputs(inputs)).logits
    m = inputs["attention_mask"].bool()
    assert (theirs - adapted).abs()[m].max() <= 1e-5
    assert "lora" not in (tmp_path / "model.safetensors").read_bytes()[:20000].decode("latin1")


def test_disabled_is_the_base_exactly_and_a_step_moves_only_adapters():
    model, base, _ = _adapted(window=True)
    inputs = fake_video_inputs([(2, 8, 8), (2, 6, 6)], side="right", seed=4)
    with lora.disabled(model):
        assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    assert not torch.equal(_logits(model, inputs), _logits(base, inputs))  # back on after the context
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    for _ in range(2):  # two steps: at the first, B = 0 gives A no gradient (only weight decay moves it)
        (-model(**inputs, labels=labels).sum()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == lora.is_adapter(n), n


def test_targets_vision_and_errors():
    model, _, names = _adapted(targets=("q_proj", "visual.qkv", "visual.mlp.0"))
    assert "visual.merger.mlp.0" in names and any(n.endswith("attn.qkv") for n in names)
    assert all(n.endswith("q_proj") for n in names if not n.startswith("visual."))
    assert not any(n.startswith("visual.") and n.endswith("gate_proj") for n in names)
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.add_adapters(VidEmo(tiny_config()), 4, 8.0, ("qkv_proj",))
    with pytest.raises(ValueError, match="lora_rank"):
        lora.add_adapters(VidEmo(tiny_config()), 0, 8.0)
    assert lora.matches("layers.0.mlp.up_proj", ("up_proj",)) and not lora.matches("visual.blocks.0.mlp.up_proj",
                                                                                     ("up_proj",))


def test_adapter_only_checkpoint_loads_merged(tmp_path):
    model, base, _ = _adapted(tied=False)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    lora.save_adapter(adapter_dir, model, str(base_dir), lora.DEFAULT_TARGETS)
    assert sorted(p.name for p in adapter_dir.iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    back = VidEmo.from_pretrained(adapter_dir)
    assert not lora.layers(back) and all(type(m) is nn.Linear for n, m in back.named_modules()
                                         if n.endswith("q_proj"))
    inputs = fake_video_inputs([(2, 8, 8)], seed=5)
    torch.testing.assert_close(_logits(back, inputs), _logits(model, inputs), rtol=1e-5, atol=1e-5)
    other = VidEmo(tiny_config(intermediate_size=96))  # a base of another shape: refused by name
    with pytest.raises(ValueError, match="adapters do not fit"):
        lora.load_adapter(other, adapter_dir)
