"""One video in, affective tree + answer out.

    python sample.py --video=clip.mp4
    python sample.py --video=clip.mp4 --question="What emotion does the person show?" --reasoning=tree --samples=4
    python sample.py --video=clip.mp4 --init_from=/models/VidEmo-7B --fps=2.0 --max_frames=16 --max_pixels=401408

    python sample.py --video=clip.mp4 --reasoning=tree --json=True | jq .answer      # one JSON object, for scripts

Plain reasoning is one greedy response. Tree reasoning (the paper's "emotion reasoning", inference.tree_reasoning)
walks the affective tree bottom-up: for each level (attribute -> expression -> emotion) it samples K candidate lines,
keeps the best one by a scorer (mean token log-prob, or self-consistency across the K), conditions the next level on
the chosen lines, then writes the answer greedily.

--json=True prints one JSON object and nothing else on stdout: checkpoint, video, question, reasoning, response,
tree ({level: [items]}), answer, and for tree reasoning `levels`: per level the chosen line, its mean token log-prob
and every candidate with its mean token log-prob (null for plain reasoning, which has no per-level sampling).
"""
import json as jsonlib
import os

import torch

import common
import data as D
import inference
import reward

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with a config file or --key=value; `--help` lists them)
init_from = "out/sft_emosynth/ckpt"  # our checkpoint dir, a training out_dir, or any HF Qwen2.5-VL directory
tokenizer_dir = ""  # default: the checkpoint dir
video = ""
# EmoSynth's fine_grained_caption question: a model trained on it answers with the full affective tree
question = "Analyse the person's attributes, facial expression and emotion step by step, then give the emotion."
reasoning = "plain"  # plain | tree
samples = 4  # K candidates per level (tree reasoning)
scorer = "logprob"  # logprob | consistency | verify (inference.SCORERS)
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
json = False  # print one machine-readable JSON object instead of the text
# ----------------------------------------------------------------------------------------------------------------------


def main():
    common.configure(globals())
    common.check([
        ("reasoning", reasoning, reasoning in ("plain", "tree"), "plain or tree"),
        ("scorer", scorer, scorer in ("logprob", "consistency", "verify"), "logprob, consistency or verify"),
        ("samples", samples, samples >= 1, ">= 1"), ("temperature", temperature, temperature > 0, "> 0"),
        ("level_max_tokens", level_max_tokens, level_max_tokens >= 1, ">= 1"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("video_prune_rate", video_prune_rate, 0 <= video_prune_rate < 1, "in [0, 1)")])
    if not video or not os.path.isfile(video):
        raise common.InputError(f"video not found: {video!r}")
    torch.manual_seed(seed)
    dev = inference.resolve_device(device)
    model, tokenizer, ckpt = inference.load_model(init_from, tokenizer_dir, dev, dtype)
    record = {"messages": [{"role": "user", "content": "<video>" + question}], "videos": [os.path.abspath(video)]}
    video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        item = D.encode_prompt(record, tokenizer, "", video_kwargs)
    except D.SkipRecord as e:
        raise common.InputError(f"cannot use {video}: {common.first_line(e)}") from None
    item["index"] = 0
    cands = None
    if reasoning == "plain":
        text = inference.generate_plain(model, tokenizer, [item], max_new_tokens, video_prune_rate)[0]
    else:
        gen = torch.Generator(device=dev).manual_seed(seed)
        text, cands = inference.tree_reasoning(model, tokenizer, item, samples, scorer, temperature,
                                               level_max_tokens, max_new_tokens, video_prune_rate, gen,
                                               return_candidates=True)
    if json:
        print(jsonlib.dumps(result(ckpt, text, cands), ensure_ascii=False, indent=1))
        return
    for level, cs in (cands or {}).items():
        print(f"[{level}] {len(cs)} candidates ({scorer}):")
        for line, s in cs:
            print(f"   {s:8.3f}  {line.strip()}")
    print(f"checkpoint: {ckpt}\nvideo: {video}\nquestion: {question}\n")
    print("affective tree:")
    print("\n".join(inference.tree_lines(reward.parse_tree(text))))
    print("\nresponse:\n" + text.strip())
    print("\nanswer: " + reward.extract_answer(text))


def result(ckpt, text, cands):
    """The --json object. Log-probs are mean token log-probs of each level line (-inf, an empty line, as null)."""
    num = lambda x: x if x is not None and x == x and abs(x) != float("inf") else None  # noqa: E731
    tree = {lv.label: [c.label for c in lv.children] for lv in reward.parse_tree(text).children}
    levels = None
    if cands is not None:
        written = {ln.split(":", 1)[0]: ln for ln in text.split("\n") if ":" in ln}
        levels = {}
        for level, cs in cands.items():
            chosen = next((s for ln, s in cs if ln == written.get(level)), None)
            levels[level] = {"chosen": written.get(level), "logprob": num(chosen),
                             "candidates": [{"line": ln, "logprob": num(s)} for ln, s in cs]}
    return {"checkpoint": str(ckpt), "video": video, "question": question, "reasoning": reasoning,
            "scorer": scorer if reasoning == "tree" else None, "response": text.strip(), "tree": tree,
            "answer": reward.extract_answer(text), "levels": levels}


if __name__ == "__main__":
    common.run(main)
