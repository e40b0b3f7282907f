"""Inference helpers shared by sample.py, eval.py and the trainers' evaluations: load a checkpoint with its tokenizer,
batched greedy responses, and affective-tree reasoning.

    model, tokenizer, ckpt = load_model("out/rl_emosynth/ckpt")
    texts = generate_plain(model, tokenizer, [data.encode_prompt(record, tokenizer)])
    text = tree_reasoning(model, tokenizer, data.encode_prompt(record, tokenizer), K=4)

Tree reasoning (the paper's "emotion reasoning") walks the affective tree bottom-up: for each level (attribute ->
expression -> emotion) it samples K candidate lines for that level, keeps the best one by a scorer (mean token
log-prob, or self-consistency across the K), conditions the next level on the chosen lines, then writes the answer
greedily.
"""
import os

import torch

import common
import data as D
from model import VidEmo
from reward import LEVELS


def resolve_dtype(name, dev):
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise common.ConfigError(f"config key 'dtype': must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(init_from, tokenizer_dir="", device="cpu", dtype="auto"):
    """(model, tokenizer, checkpoint dir) ready for generation; any problem is an InputError naming the path."""
    ckpt = common.resolve_checkpoint(init_from)
    tok_dir = tokenizer_dir or ckpt
    if not os.path.isdir(tok_dir) or not any(os.path.isfile(os.path.join(tok_dir, f))
                                             for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise common.InputError(f"no tokenizer in {tok_dir} (pass --tokenizer_dir=DIR)")
    dev = torch.device(device)
    try:
        model = VidEmo.from_pretrained(ckpt, dtype=resolve_dtype(dtype, dev), device=dev)
    except Exception as e:  # corrupt/missing weights, wrong architecture: one line, not a traceback
        raise common.InputError(f"could not load the model from {ckpt}: {type(e).__name__}: "
                                f"{common.first_line(e)}") from None
    try:
        tokenizer = D.load_tokenizer(tok_dir)
    except Exception as e:
        raise common.InputError(f"could not load the tokenizer from {tok_dir}: {type(e).__name__}: "
                                f"{common.first_line(e)}") from None
    model.eval()
    return model, tokenizer, ckpt


def decode(tokenizer, ids, eos):
    """Text of generated ids up to the first EOS (padding after it and special tokens dropped)."""
    ids = list(ids)
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def generate_inputs(model, batch, video_prune_rate=0.0, encode_videos=False):
    """The generate() inputs of a collate_prompts batch on the model's device. With encode_videos (or pruning on) the
    videos are encoded here, once, for every generate call on the batch (video_embeds replace the raw pixels), and
    with pruning the EVS keep-mask is attached."""
    dev = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
            "pixel_values", "image_grid_thw")
    out = {k: batch[k].to(dev) if torch.is_tensor(batch[k]) else batch[k] for k in keys if batch.get(k) is not None}
    if (encode_videos or video_prune_rate > 0) and out.get("pixel_values_videos") is not None:
        pixels = out.pop("pixel_values_videos")
        out["video_embeds"] = model.encode_video(pixels.to(next(model.parameters()).dtype), out["video_grid_thw"])
        if video_prune_rate > 0:
            out["video_keep_mask"] = model.video_keep_mask(out["video_embeds"], out["video_grid_thw"],
                                                           rate=video_prune_rate)
    return out


@torch.no_grad()
def generate_plain(model, tokenizer, items, max_new_tokens=128, video_prune_rate=0.0):
    """Batched greedy responses for a list of data.encode_prompt items (left padded by data.collate_prompts)."""
    eos, pad = D.special_ids(tokenizer)
    inputs = generate_inputs(model, D.collate_prompts(items, pad), video_prune_rate)
    seqs, _ = model.generate(**inputs, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos,
                             pad_token_id=pad)  # [B, T_new]
    return [decode(tokenizer, s.tolist(), eos) for s in seqs]


_NEWLINE_IDS = {}


def newline_ids(tokenizer):
    """Ids of every token whose text holds a newline: extra stop tokens for a level line (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NEWLINE_IDS[key] = [i for i, t in enumerate(texts) if "\n" in t]
    return _NEWLINE_IDS[key]


def _cut_line(tokenizer, ids, eos):
    """How many of the sampled ids make up one level line: up to and including the token that writes a newline or
    closes </think>, or up to EOS. Returns (n_tokens, line text without the newline)."""
    text, n = "", 0
    for t, tok in enumerate(ids):
        if tok == eos:
            break
        n = t + 1
        text += tokenizer.decode([tok])
        if "\n" in text or "</think>" in text:
            break
    line = tokenizer.decode(ids[:n], skip_special_tokens=True)
    return n, line.split("\n")[0].split("</think>")[0].rstrip()


def _items(line):
    body = line.split(":", 1)[1] if ":" in line else line
    return {" ".join(x.lower().split()) for x in body.split(";") if x.strip()}


def pick_candidate(lines, logps, scorer="logprob"):
    """Index of the best level line. logprob: highest mean token log-prob. consistency: the line whose items agree
    most (summed Jaccard) with the other candidates, log-prob breaking ties. Empty lines lose to non-empty ones."""
    if scorer not in ("logprob", "consistency"):
        raise ValueError(f"scorer must be 'logprob' or 'consistency', got {scorer!r}")
    sets = [_items(l) for l in lines]

    def agreement(j):
        return sum(len(sets[j] & sets[i]) / max(1, len(sets[j] | sets[i])) for i in range(len(lines)) if i != j)

    def key(j):
        nonempty = bool(sets[j])
        return (nonempty, agreement(j), logps[j]) if scorer == "consistency" else (nonempty, logps[j])
    return max(range(len(lines)), key=key)


@torch.no_grad()
def tree_reasoning(model, tokenizer, prompt_inputs, K=4, scorer="logprob", temperature=0.9, level_max_tokens=64,
                   max_new_tokens=128, video_prune_rate=0.0, generator=None, return_candidates=False):
    """Affective-tree reasoning for one prompt (a data.encode_prompt item). Returns the full response text
    "<think>\\nattribute: ...\\nexpression: ...\\nemotion: ...\\n</think>\\n<answer>...</answer>"
    (and the per-level candidates with their scores when return_candidates)."""
    eos, pad = D.special_ids(tokenizer)
    dev = next(model.parameters()).device
    base = generate_inputs(model, D.collate_prompts([prompt_inputs], pad), video_prune_rate, encode_videos=True)
    prompt_ids = base["input_ids"]  # [1, L]
    assert prompt_ids.shape[0] == 1

    line_stops = [eos] + newline_ids(tokenizer)

    def run(prefix, n_new, n_seq, temp, stops):
        # the prompt (ending with the assistant header) + the reasoning written so far, re-tokenised as one string so
        # the token boundaries match what the model saw in training
        extra = tokenizer.encode(prefix, add_special_tokens=False)
        ids = torch.cat([prompt_ids, torch.tensor([extra], dtype=prompt_ids.dtype, device=dev)], dim=1)  # [1, L+E]
        kw = dict(base, input_ids=ids, attention_mask=torch.ones_like(ids))
        return model.generate(**kw, max_new_tokens=n_new, temperature=temp, eos_token_id=stops, pad_token_id=pad,
                              num_return_sequences=n_seq, return_logprobs=True, generator=generator)

    text = "<think>\n"
    candidates = {}
    for level in LEVELS:
        prefix = text + f"{level}:"
        seqs, logps = run(prefix, level_max_tokens, K, temperature, line_stops)  # [K, T], [K, T]
        lines, scores = [], []
        for j in range(seqs.shape[0]):
            ids = seqs[j].tolist()
            n, line = _cut_line(tokenizer, ids, eos)
            lines.append(line)
            scores.append(logps[j, :n].float().mean().item() if n > 0 else float("-inf"))
        best = pick_candidate(lines, scores, scorer)
        candidates[level] = [(f"{level}:{l}", s) for l, s in zip(lines, scores)]
        text = prefix + lines[best] + "\n"
    text += "</think>\n<answer>"
    seqs, _ = run(text, max_new_tokens, 1, 0.0, [eos])
    answer = decode(tokenizer, seqs[0].tolist(), eos).split("</answer>")[0].strip()
    text += answer + "</answer>"
    return (text, candidates) if return_candidates else text


def tree_lines(node, depth=0):
    """Indented lines of a reward.parse_tree Node (label + children)."""
    label = getattr(node, "label", str(node))
    out = ["  " * depth + (label if label else "(root)")]
    for child in getattr(node, "children", []) or []:
        out += tree_lines(child, depth + 1)
    return out
