"""One video in, affective tree + answer out.

    python sample.py --video=clip.mp4
    python sample.py --video=clip.mp4 --question="What emotion does the person show?" --reasoning=tree --samples=4
    python sample.py --video=clip.mp4 --init_from=/models/VidEmo-7B --fps=2.0 --max_frames=16 --max_pixels=401408

Plain reasoning is one greedy response. Tree reasoning (DESIGN §1, the paper's "emotion reasoning") walks the
affective tree bottom-up: for each level (attribute -> expression -> emotion) it samples K candidate lines for that
level, keeps the best one by a scorer (mean token log-prob, or self-consistency across the K), conditions the next
level on the chosen lines, then writes the answer greedily. `tree_reasoning` and `generate_plain` are imported by
eval.py.
"""
import os
import re
import sys

import torch

import common

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with a config file or --key=value; `--help` lists them)
init_from = "out/sft_emosynth/ckpt"  # our checkpoint dir, a training out_dir, or any HF Qwen2.5-VL directory
tokenizer_dir = ""  # default: the checkpoint dir
video = ""
# EmoSynth's fine_grained_caption question: a model trained on it answers with the full affective tree
question = "Analyse the person's attributes, facial expression and emotion step by step, then give the emotion."
reasoning = "plain"  # plain | tree
samples = 4  # K candidates per level (tree reasoning)
scorer = "logprob"  # logprob | consistency
temperature = 0.9  # sampling temperature of the level candidates
level_max_tokens = 64  # per level line
max_new_tokens = 256  # the plain response / the final answer
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
video_prune_rate = 0.0  # EVS token compression (0 = keep every video token)
dtype = "auto"  # auto = bf16 on CUDA, fp32 on CPU
device = "auto"
seed = 0
# ----------------------------------------------------------------------------------------------------------------------

LEVELS = ("attribute", "expression", "emotion")


class InputError(Exception):
    """A problem with what the user passed (path, checkpoint, video): reported as one line, exit code 2."""


def resolve_dtype(name, dev):
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise InputError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def resolve_checkpoint(path):
    """A model directory from what the user passed: our checkpoint (COMPLETE marker, or its .old twin after a crash
    mid-swap), a training out_dir holding ckpt/, or a plain HF Qwen2.5-VL directory."""
    if not path or not os.path.isdir(path):
        raise InputError(f"checkpoint directory not found: {path!r}")
    for cand in (path, os.path.join(path, "ckpt")):
        found = common.find_checkpoint(cand)
        if found:
            return found
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"not a model directory (no config.json, no complete checkpoint): {path}")
    return path


def load_model(init_from, tokenizer_dir="", device="cpu", dtype="auto"):
    """(model, tokenizer, checkpoint dir) ready for generation; any problem is an InputError naming the path."""
    import data as D
    from model import VidEmo

    ckpt = resolve_checkpoint(init_from)
    tok_dir = tokenizer_dir or ckpt
    if not os.path.isdir(tok_dir) or not any(os.path.isfile(os.path.join(tok_dir, f))
                                             for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise InputError(f"no tokenizer in {tok_dir} (pass --tokenizer_dir=DIR)")
    dev = torch.device(device)
    try:
        model = VidEmo.from_pretrained(ckpt, dtype=resolve_dtype(dtype, dev), device=dev)
    except InputError:
        raise
    except Exception as e:  # corrupt/missing weights, wrong architecture: one line, not a traceback
        raise InputError(f"could not load the model from {ckpt}: {type(e).__name__}: {first_line(e)}") from None
    try:
        tokenizer = D.load_tokenizer(tok_dir)
    except Exception as e:
        raise InputError(f"could not load the tokenizer from {tok_dir}: {type(e).__name__}: {first_line(e)}") from None
    model.eval()
    return model, tokenizer, ckpt


def first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def special_ids(tokenizer):
    """(eos, pad): generation stops on <|im_end|>; pads with the tokenizer's pad token (else <|endoftext|>)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return eos, pad


def decode(tokenizer, ids, eos):
    """Text of generated ids up to the first EOS (padding after it and special tokens dropped)."""
    ids = list(ids)
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------------
# generation helpers shared with eval.py


def model_inputs(batch, dev):
    """The generate() inputs of a collate_prompts batch, on the model's device."""
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
            "pixel_values", "image_grid_thw")
    return {k: batch[k].to(dev) if torch.is_tensor(batch[k]) else batch[k] for k in keys if batch.get(k) is not None}


def encode_video_once(model, inputs, video_prune_rate=0.0):
    """Encode the videos once (reused by every generate call on this batch) and, with pruning on, attach the EVS
    keep-mask. Returns generate() inputs with video_embeds in place of raw pixels."""
    if inputs.get("pixel_values_videos") is None:
        return inputs
    out = dict(inputs)
    pixels = out.pop("pixel_values_videos")
    out["video_embeds"] = model.encode_video(pixels.to(next(model.parameters()).dtype), out["video_grid_thw"])
    if video_prune_rate > 0:
        from kernels.token_compress import video_keep_mask
        out["video_keep_mask"] = video_keep_mask(out["video_embeds"], out["video_grid_thw"], rate=video_prune_rate)
    return out


@torch.no_grad()
def generate_plain(model, tokenizer, items, max_new_tokens=128, video_prune_rate=0.0):
    """Batched greedy responses for a list of data.encode_prompt items (left padded by data.collate_prompts)."""
    import data as D
    eos, pad = special_ids(tokenizer)
    dev = next(model.parameters()).device
    inputs = model_inputs(D.collate_prompts(items, pad), dev)
    if video_prune_rate > 0:
        inputs = encode_video_once(model, inputs, video_prune_rate)
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
    import data as D
    eos, pad = special_ids(tokenizer)
    dev = next(model.parameters()).device
    base = encode_video_once(model, model_inputs(D.collate_prompts([prompt_inputs], pad), dev), video_prune_rate)
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


# ----------------------------------------------------------------------------------------------------------------------
# printing


def tree_lines(node, depth=0):
    """Indented lines of a reward.parse_tree Node (label + children)."""
    label = getattr(node, "label", str(node))
    out = ["  " * depth + (label if label else "(root)")]
    for child in getattr(node, "children", []) or []:
        out += tree_lines(child, depth + 1)
    return out


def answer_of(text):
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", text, re.S)
    return (m.group(1) if m else text).strip()


def main(argv=None):
    common.configure(globals(), argv)
    if reasoning not in ("plain", "tree"):
        raise InputError(f"reasoning must be 'plain' or 'tree', got {reasoning!r}")
    if not video or not os.path.isfile(video):
        raise InputError(f"video not found: {video!r}")
    import data as D
    import reward
    torch.manual_seed(seed)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, tokenizer, ckpt = load_model(init_from, tokenizer_dir, dev, dtype)
    record = {"messages": [{"role": "user", "content": "<video>" + question}], "videos": [os.path.abspath(video)]}
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        item = D.encode_prompt(record, tokenizer, "", video_kwargs)
    except D.SkipRecord as e:
        raise InputError(f"cannot use {video}: {first_line(e)}") from None
    item["index"] = 0
    if reasoning == "plain":
        text = generate_plain(model, tokenizer, [item], max_new_tokens, video_prune_rate)[0]
    else:
        gen = torch.Generator(device=dev).manual_seed(seed)
        text, cands = tree_reasoning(model, tokenizer, item, samples, scorer, temperature, level_max_tokens,
                                     max_new_tokens, video_prune_rate, gen, return_candidates=True)
        for level, cs in cands.items():
            print(f"[{level}] {len(cs)} candidates ({scorer}):")
            for line, s in cs:
                print(f"   {s:8.3f}  {line.strip()}")
    print(f"checkpoint: {ckpt}\nvideo: {video}\nquestion: {question}\n")
    print("affective tree:")
    print("\n".join(tree_lines(reward.parse_tree(text))))
    print("\nresponse:\n" + text.strip())
    print("\nanswer: " + answer_of(text))
    return text


if __name__ == "__main__":
    try:
        main()
    except (InputError, common.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
