"""The reasoning answer format (data.apply_answer_format): EmoSynth's clip trees, the format round trip, scoring of
direct and reasoning answers with reward.score / evaluation.summarize, and a tiny SFT run on the reasoning format."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import data as D
import evaluation
import reward as R

from tiny import build_emosynth

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = dict(num_train=64, num_val=8, num_test=8, workers=1, vocab_size=600)
TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_inner=64", "--vision_depth=1",
              "--vision_embd=32", "--vision_heads=2", "--vision_inner=64"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(build_emosynth(tmp_path_factory.mktemp("emosynth") / "build", **TINY_DATA))


def _meta(path):
    return {m["video"]: m for m in map(json.loads, open(os.path.join(path, "meta.jsonl")))}


def test_clip_trees_match_the_dataset(tiny_data):
    """The tree of a single-emotion clip is its fine_grained_caption reference; every clip kind's tree parses into
    the three levels, and its levels agree with the clip's labels (AUs, emotion, transition, micro-expression)."""
    trees = D.load_clip_trees(os.path.join(tiny_data, "meta.jsonl"))
    meta = _meta(tiny_data)
    assert set(trees) == set(meta)
    recs = D.load_records(os.path.join(tiny_data, "train.jsonl"))
    fgc = [r for r in recs if r["task"] == "fine_grained_caption"]
    assert fgc
    for r in fgc:
        assert trees[r["videos"][0]] == D.think_block(r["tree"])
    kinds = set()
    for r in recs:
        if r["task"] not in D.TREE_TASKS:
            continue
        think = trees[r["videos"][0]]
        kinds.add(meta[r["videos"][0]]["kind"])
        tree = R.parse_tree(think)
        assert [c.label for c in tree.children] == list(R.LEVELS)
        expr = R.extract_labels(think.split("expression:")[1].split("\n")[0], "expression")
        m = meta[r["videos"][0]]
        assert expr == [f"au{c} {D._AU_NAMES[c]}" for c in D._AU_ORDER if c in m["aus"]]
        emo_line = think.split("emotion:")[1].split("\n")[0]
        if r["task"] == "emotion_transition":
            assert emo_line.strip() == r["labels"][0]
        elif r["task"] == "micro_expression":
            assert (r["labels"][0] == "none") == (emo_line.strip() == "neutral")
            assert r["labels"][0] == "none" or r["labels"][0] in emo_line
        elif r["task"] in ("emotion_single", "emotion_multi"):
            for lab in r["labels"]:
                assert lab in emo_line
        elif r["task"] == "emotion_fine":
            assert emo_line.strip() == r["labels"][0]
    assert {"expr", "micro", "transition"} <= kinds


def _random_record(rng, task):
    words = ["happiness", "anger (high intensity)", "strongly negative", "fear to sadness", "none", "au4, au5"]
    think = ("<think>\nattribute: gender=" + rng.choice(["male", "female"]) + f"; age={rng.choice(['young', 'adult'])}"
             f"\nexpression: AU{rng.choice([1, 4, 6])} x; AU{rng.choice([9, 12])} y\nemotion: {rng.choice(words)}\n"
             "</think>")
    ans = rng.choice(words) + ("" if rng.random() < 0.5 else f" {rng.randint(0, 99)}")
    rec = {"messages": [{"role": "user", "content": "<video>q?"}, {"role": "assistant", "content": ans}],
           "videos": [f"videos/{rng.randint(0, 10**6):06d}.mp4"], "task": task, "labels": [ans]}
    return rec, think, ans


def test_format_round_trip():
    rng = random.Random()
    tasks = sorted(R.TASK_METRIC)
    recs, trees, thinks = [], {}, []
    for _ in range(200):
        rec, think, ans = _random_record(rng, rng.choice(tasks))
        if rng.random() < 0.8:
            trees[rec["videos"][0]] = think
        recs.append(rec)
        thinks.append((think, ans))
        t2, a2 = D.split_reasoning(D.reasoning_answer(think, ans))
        assert (t2, a2) == (think, ans)
        assert D.split_reasoning(ans) == (None, ans)
    same, n0, m0 = D.apply_answer_format(recs, "direct", D.REASONING_TASKS, trees)
    assert same is recs and n0 == m0 == 0
    before = json.dumps(recs, sort_keys=True)
    out, n, missing = D.apply_answer_format(recs, "reasoning", D.REASONING_TASKS, trees)
    assert json.dumps(recs, sort_keys=True) == before  # the input records are not modified
    want_conv = sum(r["task"] in D.REASONING_TASKS and r["videos"][0] in trees for r in recs)
    want_missing = sum(r["task"] in D.REASONING_TASKS and r["videos"][0] not in trees for r in recs)
    assert (n, missing) == (want_conv, want_missing) and n > 0
    for r, o, (think, ans) in zip(recs, out, thinks):
        if r["task"] in D.REASONING_TASKS and r["videos"][0] in trees:
            target = o["messages"][-1]["content"]
            assert o["answer_format"] == "reasoning" and o["tree"] == target
            assert D.split_reasoning(target) == (think, ans)
            assert R.format_reward(target) == 1.0
            assert R.extract_answer(target) == ans
        else:
            assert o == r
    # a record's own tree (Emo-CFG rationale data) wins over the clip table; converting twice changes nothing
    rec, think, ans = _random_record(rng, "emotion_fine")
    own = think.replace("emotion:", "emotion: own")
    out, n, _ = D.apply_answer_format([dict(rec, tree=own + "\n<answer>x</answer>")], "reasoning",
                                      D.REASONING_TASKS, {rec["videos"][0]: think})
    assert n == 1 and D.split_reasoning(out[0]["messages"][-1]["content"]) == (own, ans)
    again, n2, _ = D.apply_answer_format(out, "reasoning", D.REASONING_TASKS, {rec["videos"][0]: think})
    assert n2 == 0 and again == out
    with pytest.raises(ValueError):
        D.apply_answer_format(recs, "rationale")


def test_scoring_both_forms(tiny_data):
    """On reasoning records, reward.score gives the answer's metric from the <answer> part and the tree reward of the
    <think> part; direct records keep their old scores; evaluation.summarize reports both."""
    rng = random.Random()
    recs = D.load_records_as(os.path.join(tiny_data, "test.jsonl"), "reasoning")
    direct = {json.dumps(r["videos"]) + r["task"]: r for r in D.load_records(os.path.join(tiny_data, "test.jsonl"))}
    rows = []
    seen = 0
    for r in recs:
        d = direct[json.dumps(r["videos"]) + r["task"]]
        metric = R.task_metric(r["task"])
        if r.get("answer_format") != "reasoning":
            assert r["task"] not in D.REASONING_TASKS
            continue
        seen += 1
        think, ans = D.split_reasoning(r["messages"][-1]["content"])
        assert ans == d["messages"][-1]["content"]
        full = R.score(r["messages"][-1]["content"], r)
        assert full[metric] == 1.0 and full["tree"] == 1.0 and full["format"] == 1.0
        assert full["total"] == pytest.approx(1.0 + 1.0 + 0.1)
        # the same answer written directly: same metric, no tree credit, no format credit
        bare = R.score(ans, r)
        assert bare[metric] == 1.0 and bare["format"] == 0.0 and bare["tree"] < 1.0
        assert R.score(ans, d) == {metric: 1.0, "total": 1.0}  # the direct record: its metric alone
        # a right tree with a wrong answer, and a wrong tree with the right answer
        wrong = "xyzzy" if metric == "accuracy" else "AU26 jaw drop"
        wa = R.score(D.reasoning_answer(think, wrong), r)
        assert wa[metric] < 1.0 and wa["tree"] == 1.0
        lines = think.split("\n")
        lines[1] = "attribute: gender=" + rng.choice(["robot", "alien"]) + "; age=ancient"
        wt = R.score(D.reasoning_answer("\n".join(lines), ans), r)
        assert wt[metric] == 1.0 and 0.0 < wt["tree"] < 1.0
        assert wt["total"] == pytest.approx(1.0 + wt["tree"] + 0.1)
        # without labels the reference answer comes from inside the target's <answer> tags
        nolab = {k: v for k, v in r.items() if k != "labels"}
        assert R.score(D.reasoning_answer(think, ans), nolab)[metric] == 1.0
        # weights: the tree term follows w["tree"]
        assert R.score(r["messages"][-1]["content"], r, weights={"tree": 0.0})["total"] == pytest.approx(1.1)
        rows.append({"task": r["task"], "scores": wa})
    assert seen > 0
    res = evaluation.summarize(rows)
    for t, v in res["tasks"].items():
        mine = [row["scores"] for row in rows if row["task"] == t]
        assert v["tree"] == pytest.approx(sum(s["tree"] for s in mine) / len(mine)) == 1.0
        assert v["score"] == pytest.approx(sum(s[R.task_metric(t)] for s in mine) / len(mine))
    assert "(tree 100.0)" in evaluation.format_table(res)


def test_agree_rewards_the_answer_its_own_tree_implies(tiny_data):
    """reward.answer_table maps each reference emotion line to the answer the data gives behind it; with the table,
    "agree" is 1 exactly when the answer is the one implied by the completion's own emotion line (whatever the label),
    a line the data answers two ways implies nothing, and without a table (eval) no record gets the term."""
    rng = random.Random()
    recs = D.load_records_as(os.path.join(tiny_data, "train.jsonl"), "reasoning")
    table = R.answer_table(recs)
    reasoning = [r for r in recs if r.get("answer_format") == "reasoning"]
    assert set(table) == {t for t in D.REASONING_TASKS if R.task_metric(t) == "accuracy"} and reasoning
    for r in reasoning:  # EmoSynth's answers are a function of the emotion line
        assert table[r["task"]][R.emotion_key(r["tree"])] == r["labels"][0]
    direct = [r for r in recs if r.get("answer_format") != "reasoning" and R.task_metric(r["task"]) == "accuracy"]
    assert "agree" not in R.score(direct[0]["messages"][-1]["content"], direct[0], table=table)
    checked = 0
    for _ in range(200):
        a, b = rng.sample(reasoning, 2)
        if a["task"] != b["task"] or a["labels"] == b["labels"]:
            continue
        tree_a, ans_a = D.split_reasoning(a["messages"][-1]["content"])
        tree_b, ans_b = D.split_reasoning(b["messages"][-1]["content"])
        own = R.score(a["messages"][-1]["content"], a, table=table)
        assert own["agree"] == own["accuracy"] == 1.0 and own["total"] == pytest.approx(1 + 1 + 0.1 + 1)
        assert R.score(a["messages"][-1]["content"], a, weights={"agree": 0.5}, table=table)["total"] == \
            pytest.approx(2.6)
        # b's tree and b's answer on a's record: a wrong answer, but the one its tree implies
        follow = R.score(D.reasoning_answer(tree_b, ans_b), a, table=table)
        assert follow["agree"] == 1.0 and follow["accuracy"] == 0.0
        # a's (right) tree with b's answer: implied answer not given
        contra = R.score(D.reasoning_answer(tree_a, ans_b), a, table=table)
        assert contra["agree"] == 0.0 and contra["accuracy"] == 0.0 and contra["tree"] == 1.0
        assert "agree" not in R.score(a["messages"][-1]["content"], a)  # no table: eval's scores are unchanged
        checked += 1
    assert checked > 10
    # a line the data answers two ways is left out: its records get agree 0 whatever they answer
    r = rng.choice(reasoning)
    other = next(x for x in reasoning if x["task"] == r["task"] and x["labels"] != r["labels"])
    clash = dict(r, labels=other["labels"])
    table2 = R.answer_table(recs + [clash])
    assert R.emotion_key(r["tree"]) not in table2[r["task"]]
    assert R.score(r["messages"][-1]["content"], r, table=table2)["agree"] == 0.0


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_split_advantage_parts_and_boundary(tiny_data, qwen_tokenizer_dir, which):
    """split_advantage's two inputs: reward.split_total splits a reasoning answer's total into its <think> terms and
    the rest (they sum to the total; any other completion is one piece, (total, total)), and grpo.think_boundary finds the first k
    completion tokens whose decoding holds "</think>" (the decode of every prefix is the reference)."""
    import torch
    import grpo
    rng = random.Random()
    from transformers import AutoTokenizer
    tok = D.load_tokenizer(os.path.join(tiny_data, "tokenizer")) if which == "tiny" else \
        AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))  # the real Qwen2.5 byte-level BPE
    recs = D.load_records_as(os.path.join(tiny_data, "train.jsonl"), "reasoning")
    w = {"tree": rng.uniform(0.5, 2), "format": rng.uniform(0, 1), "accuracy": rng.uniform(0.5, 2)}
    seqs, lengths, wants, n_split = [], [], [], 0
    splits = [r.get("answer_format") == "reasoning" and R.task_metric(r["task"]) != "tree" for r in recs]
    split = [r for r, k in zip(recs, splits) if k]
    rest = [r for r, k in zip(recs, splits) if not k]
    for r in rng.sample(split, min(12, len(split))) + rng.sample(rest, 12):  # both kinds on every draw
        text = r["messages"][-1]["content"]
        cut = text[:rng.randint(0, len(text))] if rng.random() < 0.4 else text  # truncated completions too
        sc = R.score(cut, r, weights=w)
        think, answer = R.split_total(sc, r, w)
        if r.get("answer_format") == "reasoning" and R.task_metric(r["task"]) != "tree":
            n_split += 1
            assert think == pytest.approx(w["tree"] * sc["tree"] + w["format"] * sc["format"])
            assert think + answer == pytest.approx(sc["total"])
        else:
            assert (think, answer) == (sc["total"], sc["total"])
        ids = tok(cut, add_special_tokens=False)["input_ids"]
        k = next((k for k in range(1, len(ids) + 1) if "</think>" in tok.decode(ids[:k])), len(ids))
        seqs.append(ids), lengths.append(len(ids)), wants.append(k)
    assert n_split > 3 and any(k < n for k, n in zip(wants, lengths))
    T = max(lengths) + 3
    padded = torch.tensor([ids + [tok.pad_token_id or 0] * (T - len(ids)) for ids in seqs])  # [N, T]
    assert grpo.think_boundary(tok, padded, torch.tensor(lengths)).tolist() == wants


def test_reasoning_targets_are_supervised(tiny_data):
    """encode_record on a reasoning record supervises exactly the tree + answer (+ <|im_end|>), and the prompt is the
    direct record's prompt (the model is asked the same question)."""
    tok = D.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    path = os.path.join(tiny_data, "train.jsonl")
    recs = [r for r in D.load_records_as(path, "reasoning") if r.get("answer_format") == "reasoning"]
    direct = {json.dumps(r["videos"]) + r["task"]: r for r in D.load_records(path)}
    for r in random.Random().sample(recs, 3):
        item = D.encode_record(r, tok)
        sup = item["labels"][item["labels"] != D.IGNORE_INDEX].tolist()
        assert tok.decode(sup) == r["messages"][-1]["content"] + "<|im_end|>"
        d = direct[json.dumps(r["videos"]) + r["task"]]
        assert D.encode_prompt(r, tok)["input_ids"].tolist() == D.encode_prompt(d, tok)["input_ids"].tolist()


def test_swapped_trees_train_the_answer_behind_them(tiny_data):
    """swap_trees: in each chosen reasoning task, round(rate x n) records (a random seed's choice) keep their question
    (and video, unless text_only) but answer with the tree + answer of another record of the task whose answer
    differs, marked think_unscored; the rest, the other tasks and every direct record are untouched; the same seed gives the same list. encode_record
    supervises exactly what follows the borrowed tree ("\\n<answer>...</answer><|im_end|>") on the same input ids;
    a mutation that trains the borrowed tree, or swaps across tasks or to an equal answer, fails it."""
    path = os.path.join(tiny_data, "train.jsonl")
    recs = D.load_records_as(path, "reasoning")
    rate, seed, text_only = random.choice([0.25, 0.5, 0.75]), random.randrange(10 ** 6), random.random() < 0.5
    tasks = set(random.sample(D.REASONING_TASKS, random.randint(1, len(D.REASONING_TASKS))))
    out = D.swap_trees(recs, rate, seed, text_only, tasks)
    assert [json.dumps(r, sort_keys=True) for r in D.swap_trees(recs, rate, seed, text_only, tasks)] == \
        [json.dumps(r, sort_keys=True) for r in out]
    assert D.swap_trees(recs, 0.0, seed) == recs
    answer = lambda r: D.split_reasoning(r["tree"])[1]  # noqa: E731
    for task in D.REASONING_TASKS:
        mine = [(a, b) for a, b in zip(recs, out) if a["task"] == task and a.get("answer_format") == "reasoning"]
        swapped = [(a, b) for a, b in mine if b is not a]
        if task not in tasks:
            assert not swapped, task
        elif len({answer(a) for a, _ in mine}) > 1:
            assert len(swapped) == round(rate * len(mine)), task
        trees = {a["tree"] for a, _ in mine}
        for a, b in swapped:
            question = a["messages"][0]["content"].replace("<video>", "") if text_only else a["messages"][0]["content"]
            assert b["think_unscored"] and b["videos"] == ([] if text_only else a["videos"])
            assert b["messages"][0]["content"] == question
            assert b["tree"] in trees and b["messages"][-1]["content"] == b["tree"] and answer(b) != answer(a)
    for a, b in zip(recs, out):
        if a.get("answer_format") != "reasoning":
            assert b is a
    tok = D.load_tokenizer(os.path.join(tiny_data, "tokenizer"))
    swapped_all = [b for b in out if b.get("think_unscored")]  # one small chosen task can have fewer than 3
    for b in random.Random(seed).sample(swapped_all, min(3, len(swapped_all))):
        item, whole = D.encode_record(b, tok), D.encode_record(dict(b, think_unscored=False), tok)
        assert item["input_ids"].tolist() == whole["input_ids"].tolist()
        sup = item["labels"][item["labels"] != D.IGNORE_INDEX].tolist()
        full = whole["labels"][whole["labels"] != D.IGNORE_INDEX].tolist()
        assert full[len(full) - len(sup):] == sup and len(sup) < len(full)
        assert tok.decode(sup) == b["tree"][b["tree"].index("</think>") + len("</think>"):] + "<|im_end|>"


@pytest.mark.parametrize("arg,needle", [("--tree_swap=1.0", "config key 'tree_swap': must be in [0, 1)"),
                                        ("--tree_swap_tasks=('emotion_transition',)", "config key 'tree_swap_tasks'")])
def test_bad_tree_swap_settings_are_named(tmp_path, arg, needle):
    """A swap rate outside [0, 1) or a swap task that is not answered through the tree: exit 2 naming the key,
    before any data is read or output written."""
    r = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), arg, f"--data_dir={tmp_path / 'none'}",
                        f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and needle in r.stderr + r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_tiny_sft_on_the_reasoning_format(tiny_data, tmp_path):
    """train_sft.py --answer_format=reasoning trains (loss falls; half the reasoning records behind a swapped tree,
    without their video, in the same batches as the rest), records the format in its checkpoint config, and its final
    evaluation scores the reasoning tasks' trees beside their answers."""
    out = str(tmp_path / "sft")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train_sft.py"), f"--data_dir={tiny_data}", f"--out_dir={out}",
           "--answer_format=reasoning", "--max_steps=6", "--batch_size=4", "--log_every=1", "--eval_every=0",
           "--num_workers=0", "--warmup_steps=1", "--lr=1e-2", "--min_lr=1e-3", "--replay=0.5",
           "--eval_max_new_tokens=8", "--tree_swap=0.5", "--tree_swap_video=False"] + TINY_MODEL
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    loss = [x["loss"] for x in rows if "loss" in x]
    assert len(loss) == 6 and loss[-1] < loss[0]
    res = json.load(open(os.path.join(out, "eval.json")))
    for t, v in res["tasks"].items():
        assert ("tree" in v) == (t in D.REASONING_TASKS), t
    preds = [json.loads(line) for line in open(os.path.join(out, "eval_predictions.jsonl"))]
    assert max(len(p["response"]) for p in preds) > 0
    import torch
    state = torch.load(os.path.join(out, "ckpt", "trainer_state.pt"), weights_only=True)
    assert state["config"]["answer_format"] == "reasoning"
    # a resume with the other format is refused by name
    r = subprocess.run(cmd + ["--answer_format=direct", "--resume=True", "--max_steps=7"], capture_output=True,
                       text=True, env=env, cwd=str(ROOT), timeout=600)
    assert r.returncode != 0 and "answer_format" in (r.stdout + r.stderr)

    assert json.load(open(os.path.join(out, "ckpt", "train_config.json")))["answer_format"] == "reasoning"

    # GRPO from it on emotion_single alone: under the reasoning format (the default "auto" reads it from the SFT
    # checkpoint) its reward carries the tree term, the format term and (w_agree > 0) the agree term, under direct none
    for fmt in ("auto", "direct"):
        rl = str(tmp_path / f"rl_{fmt}")
        r = subprocess.run([sys.executable, str(ROOT / "train_rl.py"), f"--init_from={out}/ckpt",
                            f"--data_dir={tiny_data}", f"--out_dir={rl}", f"--answer_format={fmt}",
                            "--tasks=('emotion_single',)", "--num_generations=4", "--prompts_per_step=2",
                            "--grad_accum=1", "--max_completion_length=8", "--max_steps=1", "--eval_every=0",
                            "--eval_at_end=False", "--dynamic_sampling=False", "--w_agree=1.0"],
                           capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        row = [json.loads(line) for line in open(os.path.join(rl, "metrics.jsonl"))][0]
        assert "reward/accuracy/mean" in row
        assert ("reward/tree/mean" in row) == ("reward/format/mean" in row) == ("reward/agree/mean" in row) == \
            (fmt == "auto"), row
        saved = json.load(open(os.path.join(rl, "ckpt", "train_config.json")))
        assert saved["answer_format"] == ("reasoning" if fmt == "auto" else "direct")
        assert tuple(saved["reasoning_tasks"]) == D.REASONING_TASKS
