"""Tiny random Qwen2.5-VL models and fake vision inputs for tests.

Tiny configs use a 512-token vocabulary. Ids 0..499 are "text"; the special ids mirror the real Qwen order
(<|endoftext|>=151643, <|im_start|>=151644, <|im_end|>=151645, <|vision_start|>=151652, <|vision_end|>=151653,
<|image_pad|>=151655, <|video_pad|>=151656) moved down to:

    PAD / <|endoftext|> = 500   IM_START = 501   IM_END (eos) = 502
    VISION_START = 503   VISION_END = 504   IMAGE_PAD = 505   VIDEO_PAD = 506

Configs are in the transformers-4 layout (text keys at top level, vision_config nested), the layout of the Hub
checkpoints; `to_v5_layout` gives the same config in the transformers-5 layout (text_config nested).
"""

import copy

import torch

PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 500, 501, 502, 503, 504, 505, 506
N_TEXT = 500  # random text ids are drawn from [0, N_TEXT)
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch


def tiny_config(tied=True, window=False, vocab_size=512, **overrides):
    """A tiny HF Qwen2.5-VL config dict.
    tied=True: lm_head tied to embed_tokens. window=True: vision depth 4 with window attention (window_size=56,
    i.e. 2x2 merged tokens per window, so a 112-px frame has 4 windows and an 84-px one has uneven windows),
    full attention in blocks 1 and 3, and GQA in the decoder (4 query heads, 2 key/value heads).
    window=False: window_size=448, bigger than any test frame, so every block sees the whole frame.
    overrides: top-level keys; `vision_config={...}` updates the nested dict."""
    cfg = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2 if window else 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "tie_word_embeddings": tied,
        "bos_token_id": PAD,
        "eos_token_id": IM_END,
        "pad_token_id": PAD,
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "torch_dtype": "float32",
        "vision_config": {
            "depth": 4 if window else 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 56 if window else 448,
            "fullatt_block_indexes": [1, 3] if window else [1],
            "out_hidden_size": 64,
            "initializer_range": 0.02,
        },
    }
    for k, v in overrides.items():
        if k == "vision_config":
            cfg["vision_config"].update(v)
        else:
            cfg[k] = v
    if "hidden_size" in overrides and "out_hidden_size" not in overrides.get("vision_config", {}):
        cfg["vision_config"]["out_hidden_size"] = cfg["hidden_size"]
    return cfg


def tokenizer_config(tok, **overrides):
    """tiny_config sized for a real tokenizer (the EmoSynth or Qwen one): its vocabulary and its special-token ids."""
    tid = tok.convert_tokens_to_ids
    return tiny_config(vocab_size=len(tok), bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
                       pad_token_id=tid("<|endoftext|>"), image_token_id=tid("<|image_pad|>"),
                       video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                       vision_end_token_id=tid("<|vision_end|>"), **overrides)


TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
             "max_position_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")


def to_v5_layout(cfg):
    """The same config in the transformers-5 layout: text settings under text_config, rope_parameters."""
    cfg = copy.deepcopy(cfg)
    text = {k: cfg.pop(k) for k in TEXT_KEYS if k in cfg}
    rope = dict(text.pop("rope_scaling"), rope_theta=text.pop("rope_theta"), rope_type="default")
    rope.pop("type", None)
    text.update(rope_parameters=rope, model_type="qwen2_5_vl_text")
    cfg["text_config"] = text
    return cfg


def make_hf_model(cfg, seed=0, attn="sdpa"):
    """transformers' Qwen2_5_VLForConditionalGeneration from a config dict: deterministic random init, fp32,
    eval mode. Norm weights and biases (zeros / ones after HF's init) are perturbed too, so that a bug in how
    they are applied cannot hide."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig.from_dict(copy.deepcopy(cfg))
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                            dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def text_ids(n, gen):
    return torch.randint(0, N_TEXT, (n,), generator=gen).tolist()


def vision_run(grid, pad_id, merge=2):
    """<|vision_start|> + one placeholder per merged token + <|vision_end|>."""
    t, h, w = grid
    return [VISION_START] + [pad_id] * (t * h * w // merge ** 2) + [VISION_END]


def pad_batch(seqs, side="left", pad_id=PAD):
    """List of id lists -> input_ids [B, L], attention_mask [B, L] (1 real, 0 pad)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def fake_video_inputs(grids, side="left", seed=0, n_before=3, n_after=5, seconds=None, image=False):
    """One sample per grid (t, h, w in patches; 112 px = 8 patches): text + vision run + text, sample i with
    i extra leading text tokens so that a batch needs padding. Random pixels [N, 1176].
    -> dict with input_ids, attention_mask and pixel_values_videos / video_grid_thw / second_per_grid_ts
    (or pixel_values / image_grid_thw when image=True)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [text_ids(n_before + i, gen) + vision_run(g, IMAGE_PAD if image else VIDEO_PAD) + text_ids(n_after, gen)
            for i, g in enumerate(grids)]
    input_ids, attention_mask = pad_batch(seqs, side)
    n_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n_patches, PATCH_DIM, generator=gen)
    grid = torch.tensor(grids, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if image:
        out.update(pixel_values=pixels, image_grid_thw=grid)
    else:
        sec = torch.tensor(seconds if seconds is not None else [1.0] * len(grids), dtype=torch.float32)
        out.update(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=sec)
    return out


def hf_inputs(inputs):
    """Our input dict -> the kwargs transformers needs (it takes the modality of each token from
    mm_token_type_ids: 0 text, 1 image, 2 video)."""
    out = dict(inputs)
    ids = out["input_ids"]
    out["mm_token_type_ids"] = (ids == IMAGE_PAD).long() + 2 * (ids == VIDEO_PAD).long()
    return out


# Qwen2.5-VL-Instruct's chat template (its chat_template.json on the Hub): string content, or content parts of type
# text / image / video, each image or video rendered as its placeholder run.
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def build_emosynth(out_dir, **kw):
    """A small EmoSynth build by data/emosynth/prepare.py (a script: loaded from its file, not imported) -> its path."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("emosynth_prepare",
                                                  Path(__file__).resolve().parents[1] / "data/emosynth/prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.prepare(out_dir, verbose=False, **kw)


def one_line_error(r, *needles):
    """A finished subprocess that failed as a config/input error should: exit 2, no traceback, one last line
    "error: ..." holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
