"""Tree reasoning's structure-aware parts (inference.py): the rule-based verifier against EmoSynth's own trees, the
replaceable scorer function, per-level sampling settings and the cost counters, and their path through evaluate."""
import json
import os
import random
from pathlib import Path

import pytest
import torch

import data as D
import evaluation
import inference as I
from model import VidEmo, scratch_config
from reward import LEVELS

from tiny import build_emosynth

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = dict(num_train=64, num_val=8, num_test=8, workers=1, vocab_size=600)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(build_emosynth(tmp_path_factory.mktemp("emosynth") / "build", **TINY_DATA))


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    tok = D.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                     "<|video_pad|>", "<|im_end|>", "<|endoftext|>")}
    torch.manual_seed(random.randrange(10**6))
    model = VidEmo(scratch_config(len(tok), ids, 1, 32, 2, 1, 64, 1, 32, 2, 64, True)).eval()
    return model, tok


def _lines(think):
    return {lv: next(l for l in think.split("\n") if l.startswith(lv + ":")) for lv in LEVELS}


def test_verifier_accepts_true_trees_and_rejects_inconsistent_ones(tiny_data):
    """Every clip's true tree passes the verifier at each level given the true levels before it; an emotion line
    naming an emotion whose FACS prototype differs from the chosen AUs fails, and so do AU sets no emotion (or pair)
    explains."""
    rng = random.Random()
    trees = D.load_clip_trees(os.path.join(tiny_data, "meta.jsonl"))
    kinds = {m["video"]: m["kind"] for m in map(json.loads, open(os.path.join(tiny_data, "meta.jsonl")))}
    checked = 0
    for video, think in trees.items():
        if kinds[video] not in ("expr", "blend", "micro", "transition"):
            continue
        ln = _lines(think)
        chosen = {}
        for lv in LEVELS:
            assert I.verify_line(lv, ln[lv], chosen) == 1.0, (lv, think)
            chosen[lv] = ln[lv]
        emos = I.line_emotions(ln["emotion"])
        if kinds[video] in ("expr", "micro") and emos != ["neutral"]:
            other = rng.choice([e for e in I.EMOTION_AUS if I.EMOTION_AUS[e] != I.EMOTION_AUS[emos[0]]])
            assert I.verify_line("emotion", f"emotion: {other} (high intensity)", chosen) == 0.0
            checked += 1
        if kinds[video] == "transition":
            a, b = emos
            assert I.verify_line("emotion", f"emotion: {b} to {a}", chosen) == 0.0
    assert checked > 0
    assert I.verify_line("expression", "expression: AU6 cheek raiser; AU26 jaw drop", {}) == 0.0
    assert I.verify_line("expression", "expression: AU6 cheek raiser; AU12 lip corner puller", {}) == 1.0
    assert I.verify_line("attribute", "attribute: gender=male; gender=female", {}) == 0.0
    assert I.verify_line("emotion", "emotion:", {"expression": "expression: none"}) == 0.0
    assert I.verify_line("emotion", "emotion: neutral", {"expression": "expression: none"}) == 1.0
    # the verify scorer keeps the verified candidate even when a rejected one is more likely
    chosen = {"expression": "expression: AU6 cheek raiser; AU12 lip corner puller"}
    lines = ["emotion: sadness (high intensity)", "emotion: happiness (low intensity)"]
    assert I.pick_candidate(lines, [-0.1, -2.0], "verify", "emotion", chosen) == 1
    assert I.pick_candidate(lines, [-0.1, -2.0], "logprob", "emotion", chosen) == 0


def test_scorer_function_level_settings_and_cost(tiny_data, tiny_model):
    """A scorer of one's own is called once per level with the candidates and the levels chosen so far, and its pick
    is what the next level is conditioned on; per-level candidate counts and temperatures apply (temperature 0: one
    greedy line); the cost counters count every generated token and generate call."""
    model, tok = tiny_model
    rec = next(r for r in D.load_records(os.path.join(tiny_data, "test.jsonl")) if r["task"] == "emotion_fine")
    item = dict(D.encode_prompt(rec, tok), index=0)
    rng = random.Random()
    ks = (rng.randint(1, 3), rng.randint(2, 4), rng.randint(2, 4))
    calls = []

    def my_scorer(level, candidates, chosen):
        calls.append((level, [dict(c) for c in candidates], dict(chosen)))
        return len(candidates) - 1  # always the last one: never what logprob would pick by chance alone

    cost = I.new_cost()
    gen = torch.Generator().manual_seed(rng.randrange(10**6))
    text, cands = I.tree_reasoning(model, tok, item, K=9, scorer=my_scorer, temperature=1.0, level_max_tokens=6,
                                   max_new_tokens=5, generator=gen, return_candidates=True, level_samples=ks,
                                   level_temperatures=(0.0, 1.0, 1.5), cost=cost)
    assert [c[0] for c in calls] == list(LEVELS)
    assert [len(c[1]) for c in calls] == [1, ks[1], ks[2]]  # temperature 0 at the attribute level: one greedy line
    for j, (level, cs, chosen) in enumerate(calls):
        assert set(chosen) == set(LEVELS[:j])
        for prev in LEVELS[:j]:
            assert chosen[prev] == calls[LEVELS.index(prev)][1][-1]["line"]
        assert all(c["line"].startswith(level + ":") and c["n_tokens"] <= 6 for c in cs)
    body = text.split("\n")
    assert body[0] == "<think>" and body[4] == "</think>"
    for j, level in enumerate(LEVELS):
        assert body[1 + j] == calls[j][1][-1]["line"]
        assert [l for l, _ in cands[level]] == [c["line"] for c in calls[j][1]]
    # the greedy attribute line is the model's greedy continuation of "<think>\nattribute:"
    greedy, _ = I.tree_reasoning(model, tok, item, K=1, scorer="logprob", temperature=0.0, level_max_tokens=6,
                                 max_new_tokens=5, return_candidates=True)
    assert body[1] == greedy.split("\n")[1]
    n_level = sum(c["n_tokens"] for _, cs, _ in calls for c in cs)
    assert cost["calls"] == 4 and n_level < cost["tokens"] <= n_level + 5 and cost["seconds"] > 0
    with pytest.raises(ValueError):
        I.tree_reasoning(model, tok, item, scorer="nope")
    with pytest.raises(ValueError):
        I.tree_reasoning(model, tok, item, level_samples=(1, 2))


def test_evaluate_reports_cost_and_takes_a_scorer_function(tiny_data, tiny_model, tmp_path):
    model, tok = tiny_model
    recs = [r for r in D.load_records_as(os.path.join(tiny_data, "test.jsonl"), "reasoning")][:6]
    kw = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    plain = evaluation.evaluate(model, tok, recs, None, kw, batch_size=4, max_new_tokens=7, progress=False,
                                predictions_path=str(tmp_path / "p.jsonl"))
    rows = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
    toks = [r["cost"]["tokens"] for r in rows]
    assert all(1 <= t <= 7 for t in toks) and plain["cost"]["tokens"] == pytest.approx(sum(toks) / len(toks))
    assert plain["cost"]["n"] == len(recs)
    for t, v in plain["tasks"].items():
        mine = [r["cost"]["tokens"] for r in rows if r["task"] == t]
        assert v["tokens"] == pytest.approx(sum(mine) / len(mine))
    picked = []

    def first(level, candidates, chosen):
        picked.append(level)
        return 0

    tree = evaluation.evaluate(model, tok, recs, None, kw, max_new_tokens=7, progress=False, reasoning="tree",
                               samples=2, scorer=first, level_samples=(1, 2, 3), predictions_path=str(tmp_path / "t.jsonl"))
    assert picked == list(LEVELS) * len(recs)
    rows = [json.loads(l) for l in open(tmp_path / "t.jsonl")]
    assert all(r["tag"].startswith("tree-K2-first-k1,2,3|") for r in rows)
    assert tree["cost"]["tokens"] > plain["cost"]["tokens"]
    assert "generation:" in evaluation.format_table(tree)


def test_answers_behind_the_given_tree(tiny_data, tiny_model, tmp_path):
    """reasoning="given": a reasoning record's prompt goes on with its reference think block and "<answer>" — exactly
    the ids the training target starts with — and the response is that head plus what the model writes behind it,
    equal to generating from the extended prompt row by row; direct records answer as in plain decoding."""
    model, tok = tiny_model
    recs = D.load_records_as(os.path.join(tiny_data, "test.jsonl"), "reasoning")
    recs = [r for r in recs if r.get("answer_format") == "reasoning"][:4] + \
        [r for r in recs if r.get("answer_format") != "reasoning"][:3]
    kw = dict(fps=4.0, max_frames=8, min_pixels=56 * 56, max_pixels=112 * 112)
    rows = []
    evaluation.evaluate(model, tok, recs, None, kw, batch_size=3, max_new_tokens=6, progress=False, reasoning="given",
                        rows_out=rows)
    plain = []
    evaluation.evaluate(model, tok, recs, None, kw, batch_size=3, max_new_tokens=6, progress=False, rows_out=plain)
    assert all(r["tag"].startswith("given|") for r in rows)
    for rec, row, p in zip(recs, rows, plain):
        head = evaluation.given_head(rec)
        item = D.encode_prompt(rec, tok, None, kw)
        if rec.get("answer_format") != "reasoning":
            assert head == "" and row["response"] == p["response"]
            continue
        assert head == D.think_block(rec["tree"]) + "\n<answer>" and row["response"].startswith(head)
        forced = I.with_head(item, tok, head)
        full = D.encode_record(rec, tok, None, None, kw)["input_ids"]
        assert full[:len(forced["input_ids"])].tolist() == forced["input_ids"].tolist()
        assert forced["mm_token_type_ids"].tolist() == D.encode_record(rec, tok, None, None, kw)[
            "mm_token_type_ids"][:len(forced["input_ids"])].tolist()
        alone = I.generate_plain(model, tok, [dict(forced, index=0)], max_new_tokens=6)[0]
        assert row["response"] == head + alone
