"""LoRA: low-rank adapters on chosen linear layers, for training on one GPU (Hu et al., 2021).

    y = W x + b + (alpha / r) * B (A x)        W, b frozen (bf16 on CUDA); A [r, in], B [out, r] trained in fp32

B starts at zero, so an adapted model starts exactly at its base. A LoRALinear keeps the base layer's parameter
names (`weight`, `bias`), so every checkpoint name maps as before; the adapters add `lora_A` / `lora_B` beside them.
Targets name layers by their last component (q_proj, ..., down_proj: the decoder's); a target written `visual.X`
adapts the vision tower's layers named X instead (e.g. visual.qkv, visual.proj, visual.gate_proj, visual.mlp.0 for
the merger's first linear). Saving merges W + (alpha / r) B A into a plain checkpoint by default (train_sft /
train_rl `lora_save`), so anything that reads a Qwen2.5-VL directory serves it unchanged.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update beside it; `enabled = False` gives the base layer back (the RL reference)."""

    def __init__(self, base, rank, alpha):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))  # [r, in] fp32
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))  # [out, r] fp32, 0: start = base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA paper's code
        self.rank, self.scaling, self.enabled = rank, alpha / rank, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # the adapters follow the activation dtype (bf16 base without autocast); grads still reach the fp32 params
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    def delta(self):
        """(alpha / r) B A in fp32: what merging adds to the weight. [out, in]"""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def matches(name, targets):
    """Does the linear layer at module path `name` match one of `targets` (see the module docstring)?"""
    in_vision = name.startswith("visual.")
    for t in targets:
        vision_target = t.startswith("visual.")
        t = t[len("visual."):] if vision_target else t
        if vision_target == in_vision and (name == t or name.endswith("." + t)):
            return True
    return False


def add_adapters(model, rank, alpha, targets=DEFAULT_TARGETS, base_dtype=None):
    """Replace every targeted nn.Linear of `model` by a LoRALinear, freeze everything else, and optionally cast the
    frozen base to base_dtype (bf16 on CUDA: half the memory; the adapters stay fp32). -> the adapted layer names.
    The LM head is never adapted: it is tied to the embedding in the small Qwen models."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1 (got {rank})")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head" and matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear})
        raise ValueError(f"lora_targets {tuple(targets)} match no linear layer of the model; its linear layers are "
                         f"named {linear} (prefix visual. for the vision tower's)")
    model.requires_grad_(False)
    if base_dtype is not None:
        model.to(base_dtype)
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha))  # new adapters: requires_grad True
    return names


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter(param_name):
    return param_name.endswith((".lora_A", ".lora_B"))


def adapter_state(model):
    """{name: fp32 CPU tensor} of the adapters only (what a resume needs besides the base)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if is_adapter(n)}


@contextlib.contextmanager
def disabled(model):
    """The base model inside (adapters off): GRPO's reference policy without a second copy of the weights."""
    mods = list(layers(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def merged_state_dict(model, dtype=None):
    """The plain (unadapted) state dict with W + (alpha / r) B A in every adapted layer, computed in fp32, on CPU, in
    `dtype` (default fp32). The adapter tensors themselves are left out."""
    mods = layers(model)
    out = {}
    for k, v in model.state_dict().items():
        if is_adapter(k):
            continue
        v = v.detach().cpu()
        owner = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and owner in mods:
            v = v.float() + mods[owner].delta().cpu()
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def merge_(model):
    """In place: every LoRALinear becomes a plain nn.Linear holding W + (alpha / r) B A (merged in fp32, stored in
    the base's dtype). -> model"""
    for n, m in layers(model).items():
        parent, _, child = n.rpartition(".")
        merged = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        merged.weight = nn.Parameter((m.weight.detach().float() + m.delta()).to(m.weight.dtype),
                                     requires_grad=m.weight.requires_grad)
        merged.bias = m.bias
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


def save_adapter(path, model, base, targets):
    """adapter_model.safetensors (our parameter names) + adapter_config.json (rank, alpha, targets, the base dir)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    mods = layers(model)
    some = next(iter(mods.values()))
    save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump({"base_model_name_or_path": os.path.abspath(base) if os.path.isdir(base) else base,
                   "r": some.rank, "lora_alpha": some.scaling * some.rank, "target_modules": list(targets),
                   "adapted_layers": sorted(mods)}, f, indent=2)


def checkpoint_writer(model, state, msd, dtype, mode, base, targets):
    """What a trainer's checkpoint writes -> a function of the directory; adds to `state` (trainer_state.pt) what an
    exact resume needs. An adapted model: the adapters go in `state` (the base comes from init_from again) and the
    directory gets the merged model in `dtype` (mode "merged") or the adapters alone ("adapter"). Full fine-tuning:
    `msd` (the full state dict, gathered under FSDP) in `dtype`, and the fp32 masters in `state` when dtype is not
    fp32."""
    if layers(model):
        state["adapters"] = adapter_state(model)
        if mode == "adapter":
            return lambda d: save_adapter(d, model, base, targets)
        return lambda d: model.save_pretrained(d, dtype=dtype, state_dict=merged_state_dict(model, dtype))
    if dtype != torch.float32:
        state["master_weights"] = msd
    return lambda d: model.save_pretrained(d, dtype=dtype, state_dict=msd)


def read_adapter_config(path):
    file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(file) as f:
            cfg = json.load(f)
        return cfg["base_model_name_or_path"], int(cfg["r"]), float(cfg["lora_alpha"]), tuple(cfg["target_modules"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a VidEmo adapter config ({type(e).__name__}: {e})") from None


def load_adapter(model, path):
    """Add the adapters saved at `path` (save_adapter) to `model` (its base) and load their weights."""
    from safetensors.torch import load_file
    _, rank, alpha, targets = read_adapter_config(path)
    add_adapters(model, rank, alpha, targets)
    sd = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    own = dict(model.named_parameters())
    missing = sorted(set(n for n in own if is_adapter(n)) - set(sd))
    unknown = sorted(set(sd) - set(own))
    shape = sorted(n for n in set(sd) & set(own) if sd[n].shape != own[n].shape)
    if missing or unknown or shape:
        raise ValueError(f"{path}: adapters do not fit the base model (missing {missing[:3]}, unknown {unknown[:3]}, "
                         f"other shape {shape[:3]})")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)
    return model
