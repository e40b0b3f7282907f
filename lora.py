"""LoRA: low-rank adapters on chosen linear layers, for training on one GPU (Hu et al., 2021).

    y = W x + b + (alpha / r) * B (A x)        W, b frozen (bf16 on CUDA); A [r, in], B [out, r] trained in fp32

B starts at zero, so an adapted model starts exactly at its base. A LoRALinear keeps the base layer's parameter
names (`weight`, `bias`), so every checkpoint name maps as before; the adapters add `lora_A` / `lora_B` beside them.
Targets name layers by their last component (q_proj, ..., down_proj: the decoder's); a target written `visual.X`
adapts the vision tower's layers named X instead (e.g. visual.qkv, visual.proj, visual.gate_proj, visual.mlp.0 for
the merger's first linear). Saving merges W + (alpha / r) B A into a plain checkpoint by default (train_sft /
train_rl `lora_save`), so anything that reads a Qwen2.5-VL directory serves it unchanged; `lora_save=adapter` writes
the adapters alone in peft's format (peft's PeftModel.from_pretrained on transformers'
Qwen2_5_VLForConditionalGeneration and vLLM's LoRA loader read it), and load_adapter reads peft's adapters back
(docs/ecosystem.md).
"""
import contextlib
import json
import math
import os
import re

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


# ----------------------------------------------------------------------------------------------------------------------
# adapter-only checkpoints in peft's format (what peft's PeftModel.from_pretrained and vLLM's LoRA loader read):
# adapter_model.safetensors holds base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r], the
# module paths those of transformers' Qwen2_5_VLForConditionalGeneration (model.language_model.layers.N...,
# model.visual.blocks.N...); adapter_config.json is a peft LoraConfig.

PEFT_PREFIX = "base_model.model."
# Hub / transformers module paths (transformers-5 first, then -4) -> ours; the same table as model.VidEmo's checkpoint
# names, repeated here so that lora.py imports no project module
_HF_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", ""), ("visual.", "visual."), ("model.", ""))
# peft config fields that change what the adapter computes in ways this file does not implement: any truthy value is
# refused by name (their tensors, if any, would be refused anyway as unknown keys)
UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "trainable_token_indices",
               "target_parameters", "alora_invocation_tokens", "layer_replication", "use_qalora", "use_bdlora",
               "megatron_config")


def peft_module(name):
    """Our module name -> its path in transformers-5's Qwen2_5_VLForConditionalGeneration."""
    return "model.visual." + name[len("visual."):] if name.startswith("visual.") else "model.language_model." + name


def our_module(path):
    """A transformers module path (transformers-4 or -5 naming) -> our module name, or None."""
    for prefix, new in _HF_PREFIXES:
        if path.startswith(prefix):
            return new + path[len(prefix):]
    return None


def target_regex(names):
    """peft's target_modules as one regex (peft full-matches a string against every module path) that selects exactly
    the adapted layers: a plain name list would also catch the vision tower's gate/up/down_proj."""
    pats = {re.sub(r"\\\.(layers|blocks)\\\.\d+\\\.", r"\\.\1\\.\\d+\\.", re.escape(peft_module(n))) for n in names}
    return "|".join(sorted(pats))


def save_adapter(path, model, base, targets=None):
    """adapter_model.safetensors + adapter_config.json in peft's format. `base` is recorded as the user gave it (a Hub
    id stays a Hub id, a path stays as passed: peft and our loader resolve it from the working directory).
    `targets` is unused (the regex names the adapted layers themselves); kept for the trainers' call."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    mods = layers(model)
    some = next(iter(mods.values()))
    tensors = {}
    for n, m in mods.items():
        key = PEFT_PREFIX + peft_module(n)
        tensors[key + ".lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()  # [r, in]
        tensors[key + ".lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()  # [out, r]
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    alpha = some.scaling * some.rank
    alpha = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha  # peft and vLLM write / expect ints
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "revision": None,
           "r": some.rank, "lora_alpha": alpha, "target_modules": target_regex(mods), "lora_dropout": 0.0,
           "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
           "layers_to_transform": None, "layers_pattern": None}
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


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
    """adapter_config.json at `path` -> (base as recorded, rank, scaling); anything this file cannot apply exactly is a
    ValueError naming the file and the field."""
    file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(file) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable adapter config ({type(e).__name__}: {e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    for field in UNSUPPORTED:
        if cfg.get(field):
            raise ValueError(f"{file}: {field}={cfg[field]!r} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={cfg['bias']!r} is not supported (only 'none')")
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{file}: base_model_name_or_path is not set (the base model to put the adapters on)")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: r and lora_alpha must be numbers ({type(e).__name__}: {e})") from None
    if rank < 1:
        raise ValueError(f"{file}: r={rank} must be >= 1")
    # rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r), plain LoRA by alpha / r
    return base, rank, alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def resolve_base(path):
    """The local directory of the base recorded in the adapter config at `path`: a directory as recorded (relative
    paths from the working directory, as peft reads them; our training out_dir / checkpoint layouts too), or a Hub id
    through common.resolve_checkpoint (the local HF cache, else the network)."""
    import common  # lazily: lora.py is also used where common's distributed helpers are not
    base = read_adapter_config(path)[0]
    try:
        return common.resolve_checkpoint(base, what=f"{os.path.join(path, ADAPTER_CONFIG)}: base_model_name_or_path")
    except common.InputError as e:
        raise ValueError(str(e)) from None


def read_adapter_weights(path):
    """{our module name: (lora_A [r, in], lora_B [out, r])} from adapter_model.safetensors in peft's key layout
    (transformers-5 or -4 module paths) or the older VidEmo layout (our names, `.lora_A` / `.lora_B`)."""
    from safetensors.torch import load_file
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read)")
    try:
        sd = load_file(file)
    except Exception as e:  # safetensors raises its own error types for unreadable files
        raise ValueError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None
    pairs = {}
    for key, t in sd.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.weight)?", key)
        name = None
        if m and key.startswith(PEFT_PREFIX) and key.endswith(".weight"):
            name = our_module(m.group(1)[len(PEFT_PREFIX):])
        elif m and not key.startswith(PEFT_PREFIX) and not key.endswith(".weight"):
            name = m.group(1)  # the older VidEmo layout
        if name is None or name == "lm_head" or name.endswith(".lm_head"):
            raise ValueError(f"{file}: tensor '{key}' is not a LoRA A/B matrix of a decoder or vision linear layer")
        pairs.setdefault(name, {})[m.group(2)] = t
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{file}: layer '{name}' has {sorted(ab)} but not both lora_A and lora_B")
    return {n: (ab["lora_A"], ab["lora_B"]) for n, ab in pairs.items()}


def load_adapter(model, path):
    """Wrap the layers named in the adapter saved at `path` (ours or peft's) and load A and B; `model` is the base.
    A layer the base lacks, or of another shape, is a ValueError naming the tensor. -> model"""
    base, rank, scaling = read_adapter_config(path)
    weights = read_adapter_weights(path)
    mods = dict(model.named_modules())
    file = os.path.join(path, ADAPTER_WEIGHTS)
    for n, (a, b) in weights.items():
        m = mods.get(n)
        if type(m) is not nn.Linear:
            raise ValueError(f"{file}: adapters do not fit the base model {base}: it has no linear layer '{n}'")
        if tuple(a.shape) != (rank, m.in_features) or tuple(b.shape) != (m.out_features, rank):
            raise ValueError(f"{file}: adapters do not fit the base model {base}: '{n}' has lora_A "
                             f"{list(a.shape)} / lora_B {list(b.shape)}, expected [{rank}, {m.in_features}] / "
                             f"[{m.out_features}, {rank}] (r={rank})")
    model.requires_grad_(False)
    for n, (a, b) in weights.items():
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = LoRALinear(getattr(owner, child), rank, 1.0)
        layer.scaling = scaling
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        setattr(owner, child, layer)
    return model
