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
import re
import time

import torch

import common
import data as D
from model import VidEmo
from reward import LEVELS, extract_labels


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_model(init_from, tokenizer_dir="", device="cpu", dtype="auto"):
    """(model, tokenizer, checkpoint dir) ready for generation; any problem is an InputError naming the path."""
    ckpt = common.resolve_checkpoint(init_from)
    tok_dir = tokenizer_dir or ckpt
    has_tok = lambda d: any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES)  # noqa: E731
    if not tokenizer_dir and not has_tok(ckpt) and os.path.isfile(os.path.join(ckpt, "adapter_config.json")):
        import lora  # an adapter directory (peft's carry no tokenizer): its base's tokenizer
        try:
            tok_dir = lora.resolve_base(ckpt)
        except ValueError as e:
            raise common.InputError(common.first_line(e)) from None
    if not os.path.isdir(tok_dir) or not has_tok(tok_dir):
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


def with_head(item, tokenizer, text):
    """An encode_prompt item whose prompt goes on with `text` (the start of the answer, written for the model)."""
    if not text:
        return item
    extra = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    out = dict(item, input_ids=torch.cat([item["input_ids"], extra]))
    if item.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = torch.cat([item["mm_token_type_ids"], torch.zeros_like(extra)])
    return out


@torch.no_grad()
def generate_plain(model, tokenizer, items, max_new_tokens=128, video_prune_rate=0.0, cost=None):
    """Batched greedy responses for a list of data.encode_prompt items (left padded by data.collate_prompts).
    `cost` (new_cost()) accumulates the tokens generated (up to and including each EOS), calls and seconds."""
    t0 = time.time()
    eos, pad = D.special_ids(tokenizer)
    inputs = generate_inputs(model, D.collate_prompts(items, pad), video_prune_rate)
    seqs, _ = model.generate(**inputs, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos,
                             pad_token_id=pad)  # [B, T_new]
    rows = [s.tolist() for s in seqs]
    if cost is not None:
        counts = [(r.index(eos) + 1) if eos in r else len(r) for r in rows]
        cost["tokens"] += sum(counts)
        cost.setdefault("per_row", []).extend(counts)  # each response's own token count
        cost["calls"] += 1
        cost["seconds"] += time.time() - t0
    return [decode(tokenizer, r, eos) for r in rows]


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


# ----------------------------------------------------------------------------------------------------------------------
# candidate scorers: a scorer is a plain function (level, candidates, chosen) -> index of the kept candidate, where
# candidates is a list of {"line": "expression: AU6 cheek raiser; ...", "logp": mean token log-prob, "n_tokens": int}
# and chosen is {level: line} of the levels already decided. Pass any such function as tree_reasoning(scorer=...).

# FACS prototypes of the basic emotions (EmoSynth draws exactly these; EMFACS-style sets) for the rule-based verifier
EMOTION_AUS = {"neutral": frozenset(), "happiness": frozenset({6, 12}), "sadness": frozenset({1, 4, 15}),
               "anger": frozenset({4, 5, 20}), "fear": frozenset({1, 2, 4, 5, 20, 25}),
               "surprise": frozenset({1, 2, 5, 26}), "disgust": frozenset({9, 15})}
_AU_RE = re.compile(r"\bau\s?0?(\d{1,2})\b", re.I)
_SPLIT_RE = re.compile(r"\bsecond half\b", re.I)   # "first half AU6 ...; second half AU1 ..." (a transition)


def au_segments(line):
    """The AU code sets of an expression line, one per segment (a transition's "second half" splits it)."""
    body = line.split(":", 1)[1] if ":" in line else line
    return [{int(c) for c in _AU_RE.findall(seg)} for seg in _SPLIT_RE.split(body)]


def line_emotions(line):
    """The basic emotions an emotion line names, in order ("none" / "neutral" -> ["neutral"])."""
    body = line.split(":", 1)[1] if ":" in line else line
    out = [e for e in extract_labels(body, "emotion") if e in EMOTION_AUS]
    return out or (["neutral"] if re.search(r"\bnone\b", body, re.I) else [])


def _explained(aus, emotions=None):
    """True if an AU set is one emotion's prototype or the union of two (a blend); with `emotions`, of those."""
    protos = {e: p for e, p in EMOTION_AUS.items() if emotions is None or e in emotions}
    if emotions is not None:
        union = frozenset().union(*protos.values()) if protos else None
        return union is not None and aus == union and len(protos) == len(set(emotions))
    return any(aus == p for p in protos.values()) or any(aus == a | b for a in protos.values()
                                                          for b in protos.values())


def verify_line(level, line, chosen):
    """A small rule-based verifier: 1.0 if a level line is consistent with the rules and the levels chosen before it,
    else 0.0. attribute: each single-valued key (gender, age, hair, pose) at most once. expression: every AU segment
    is an emotion prototype or a blend of two. emotion: the emotions named are exactly explained by the chosen AUs
    (a transition: one emotion per segment, in order; a micro-expression flash or a single / blended emotion: the
    union of their prototypes equals the AU set; neutral: no AU)."""
    body = line.split(":", 1)[1] if ":" in line else line
    if not body.strip():
        return 0.0
    if level == "attribute":
        keys = [x.split("=", 1)[0].strip().lower() for x in body.split(";") if "=" in x]
        return float(all(keys.count(k) <= 1 for k in ("gender", "age", "hair", "pose")))
    if level == "expression":
        segs = au_segments(line)
        return float(all(not s or _explained(frozenset(s)) for s in segs))
    segs = au_segments(chosen.get("expression", ""))
    emos = line_emotions(line)
    if not emos:
        return 0.0
    if len(segs) == 2:  # a transition: "a to b"
        return float(len(emos) == 2 and all(frozenset(s) == EMOTION_AUS[e] for s, e in zip(segs, emos)))
    aus = frozenset(segs[0]) if segs else frozenset()
    return float(_explained(aus, emos))


def score_logprob(level, candidates, chosen):
    """The highest mean token log-prob; empty lines lose to non-empty ones."""
    return max(range(len(candidates)), key=lambda j: (bool(_items(candidates[j]["line"])), candidates[j]["logp"]))


def _agreement(candidates, j):
    sets = [_items(c["line"]) for c in candidates]
    return sum(len(sets[j] & sets[i]) / max(1, len(sets[j] | sets[i])) for i in range(len(candidates)) if i != j)


def score_consistency(level, candidates, chosen):
    """Self-consistency: the line whose items agree most (summed Jaccard) with the other candidates; log-prob breaks
    ties; empty lines lose."""
    return max(range(len(candidates)), key=lambda j: (bool(_items(candidates[j]["line"])),
                                                      _agreement(candidates, j), candidates[j]["logp"]))


def score_verify(level, candidates, chosen):
    """Lines that pass verify_line first (the chosen AUs must explain the emotion), then self-consistency, then
    log-prob: structure decides, the model's confidence breaks ties."""
    return max(range(len(candidates)), key=lambda j: (verify_line(level, candidates[j]["line"], chosen),
                                                      bool(_items(candidates[j]["line"])),
                                                      _agreement(candidates, j), candidates[j]["logp"]))


SCORERS = {"logprob": score_logprob, "consistency": score_consistency, "verify": score_verify}


def resolve_scorer(scorer):
    """A scorer name (SCORERS) or a callable -> the callable."""
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} or a function, got {scorer!r}")
    return SCORERS[scorer]


def pick_candidate(lines, logps, scorer="logprob", level="emotion", chosen=None):
    """Index of the best level line by a scorer (name or function); see SCORERS."""
    cands = [{"line": l, "logp": s, "n_tokens": 0} for l, s in zip(lines, logps)]
    return resolve_scorer(scorer)(level, cands, chosen or {})


def _per_level(value, default, name):
    """A per-level setting: a number for every level, or a sequence of three (attribute, expression, emotion)."""
    if value is None or value == () or value == []:
        return {lv: default for lv in LEVELS}
    if isinstance(value, dict):
        return {lv: value.get(lv, default) for lv in LEVELS}
    if isinstance(value, (list, tuple)):
        if len(value) != len(LEVELS):
            raise ValueError(f"{name}: give one value per level {LEVELS}, got {value!r}")
        return dict(zip(LEVELS, value))
    return {lv: value for lv in LEVELS}


def new_cost():
    """Cost counters tree_reasoning / generate_plain add to: generated tokens, generate calls, seconds."""
    return {"tokens": 0, "calls": 0, "seconds": 0.0}


@torch.no_grad()
def tree_reasoning(model, tokenizer, prompt_inputs, K=4, scorer="logprob", temperature=0.9, level_max_tokens=64,
                   max_new_tokens=128, video_prune_rate=0.0, generator=None, return_candidates=False,
                   level_samples=None, level_temperatures=None, cost=None):
    """Affective-tree reasoning for one prompt (a data.encode_prompt item). Returns the full response text
    "<think>\nattribute: ...\nexpression: ...\nemotion: ...\n</think>\n<answer>...</answer>"
    (and the per-level candidates with their scores when return_candidates).

    Per level: sample level_samples[level] (default K) candidate lines at level_temperatures[level] (default
    `temperature`; 0 = one greedy line), keep the one `scorer` picks (a SCORERS name or a function
    (level, candidates, chosen) -> index), condition the next level on it; then the answer greedily. level_samples /
    level_temperatures: a number, a (attribute, expression, emotion) triple or a {level: value} dict. `cost`
    (new_cost()) accumulates the tokens generated, generate calls and seconds."""
    t_start = time.time()
    pick = resolve_scorer(scorer)
    ks = _per_level(level_samples, K, "level_samples")
    temps = _per_level(level_temperatures, temperature, "level_temperatures")
    eos, pad = D.special_ids(tokenizer)
    dev = next(model.parameters()).device
    base = generate_inputs(model, D.collate_prompts([prompt_inputs], pad), video_prune_rate, encode_videos=True)
    prompt_ids = base["input_ids"]  # [1, L]
    assert prompt_ids.shape[0] == 1
    calls, tokens = 0, 0

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
    candidates, chosen = {}, {}
    for level in LEVELS:
        prefix = text + f"{level}:"
        temp = float(temps[level])
        k = 1 if temp <= 0 else max(1, int(ks[level]))
        seqs, logps = run(prefix, level_max_tokens, k, max(temp, 0.0), line_stops)  # [k, T], [k, T]
        calls += 1
        cands = []
        for j in range(seqs.shape[0]):
            ids = seqs[j].tolist()
            n, line = _cut_line(tokenizer, ids, eos)
            tokens += n
            cands.append({"line": f"{level}:{line}", "logp": logps[j, :n].float().mean().item() if n > 0
                          else float("-inf"), "n_tokens": n})
        best = int(pick(level, cands, dict(chosen)))
        candidates[level] = [(c["line"], c["logp"]) for c in cands]
        chosen[level] = cands[best]["line"]
        text = prefix + cands[best]["line"][len(level) + 1:] + "\n"
    text += "</think>\n<answer>"
    seqs, _ = run(text, max_new_tokens, 1, 0.0, [eos])
    calls += 1
    ids = seqs[0].tolist()
    tokens += (ids.index(eos) + 1) if eos in ids else len(ids)
    answer = decode(tokenizer, ids, eos).split("</answer>")[0].strip()
    text += answer + "</answer>"
    if cost is not None:
        cost["tokens"] += tokens
        cost["calls"] += calls
        cost["seconds"] += time.time() - t_start
    return (text, candidates) if return_candidates else text


def tree_lines(node, depth=0):
    """Indented lines of a reward.parse_tree Node (label + children)."""
    label = getattr(node, "label", str(node))
    out = ["  " * depth + (label if label else "(root)")]
    for child in getattr(node, "children", []) or []:
        out += tree_lines(child, depth + 1)
    return out
