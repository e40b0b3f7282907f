"""reward.py: Zhang-Shasha TED against zss, tree parse/format, every reward, score() per task, robustness."""
import math
import random
import time

import pytest
import zss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reward as R
from reward import Node

VOCAB_TREE = """<think>
attribute: gender=female; age=young; hair=long black; accessory=glasses
expression: AU6 cheek raiser; AU12 lip corner puller; mouth opens at 1.5s
emotion: happiness (high intensity)
</think>
<answer>happiness</answer>"""
CAPTION = ("A young female with long black hair and glasses, looking frontal. "
           "She smiles with raised cheeks and is happy.")


# ----------------------------------------------------------------------------------------------------------------------
# tree edit distance


def random_tree(rng, n, alphabet="abc"):
    """Random ordered labelled tree with n nodes, as (our Node, zss.Node)."""
    ours = [Node(rng.choice(alphabet))]
    theirs = [zss.Node(ours[0].label)]
    for _ in range(n - 1):
        p = rng.randrange(len(ours))
        label = rng.choice(alphabet)
        ours.append(Node(label))
        theirs.append(zss.Node(label))
        ours[p].children.append(ours[-1])
        theirs[p].addkid(theirs[-1])
    return ours[0], theirs[0]


def unit(a, b):
    return 0 if a == b else 1


def test_ted_matches_zss_on_random_trees():
    rng = random.Random(0)
    for _ in range(250):
        a, za = random_tree(rng, rng.randint(1, 30), rng.choice(["ab", "abc", "abcdef"]))
        b, zb = random_tree(rng, rng.randint(1, 30), rng.choice(["ab", "abc", "abcdef"]))
        want = zss.simple_distance(za, zb, label_dist=unit)
        assert R.tree_edit_distance(a, b) == want
        assert R.tree_edit_distance(b, a) == want


def test_ted_hand_cases():
    t = Node("r", [Node("a", [Node("b"), Node("c")]), Node("d")])
    same = Node("r", [Node("a", [Node("b"), Node("c")]), Node("d")])
    assert R.tree_edit_distance(t, same) == 0
    assert R.tree_edit_distance(None, t) == R.tree_edit_distance(t, None) == R.tree_size(t) == 5
    assert R.tree_edit_distance(None, None) == 0
    relabel = Node("r", [Node("a", [Node("b"), Node("x")]), Node("d")])
    assert R.tree_edit_distance(t, relabel) == 1
    deleted = Node("r", [Node("a", [Node("b"), Node("c")])])
    assert R.tree_edit_distance(t, deleted) == 1
    # deleting inner node "a" lifts its children: one operation
    lifted = Node("r", [Node("b"), Node("c"), Node("d")])
    assert R.tree_edit_distance(t, lifted) == 1
    swapped = Node("r", [Node("d"), Node("a", [Node("b"), Node("c")])])
    assert R.tree_edit_distance(t, swapped) == 2   # ordered trees: move = delete + insert of a leaf


def test_ted_and_helpers_are_iterative_on_deep_trees():
    chain = Node("x")
    for _ in range(5000):   # deeper than Python's recursion limit
        chain = Node("x", [chain])
    small = Node("x", [Node("x")])
    assert R.tree_edit_distance(chain, small) == 5001 - 2
    assert R.tree_size(chain) == 5001
    assert chain == chain and not chain == small
    assert R.tree_size(R.truncate_tree(chain, 10)) == 10


def test_truncate_tree_keeps_preorder_prefix():
    t = Node("r", [Node("a", [Node("b"), Node("c")]), Node("d")])
    assert R.truncate_tree(t, 3) == Node("r", [Node("a", [Node("b")])])
    assert R.truncate_tree(t, 100) == t


# ----------------------------------------------------------------------------------------------------------------------
# parse / format


def test_parse_vocab_example():
    t = R.parse_tree(VOCAB_TREE)
    assert t == Node("root", [
        Node("attribute", [Node("gender=female"), Node("age=young"), Node("hair=long black"),
                           Node("accessory=glasses")]),
        Node("expression", [Node("au6 cheek raiser"), Node("au12 lip corner puller"), Node("mouth opens at 1.5s")]),
        Node("emotion", [Node("happiness (high intensity)")]),
    ])
    assert R.tree_size(t) == 12
    # the same tree in a looser variant of the format, with markdown and odd spacing
    messy = "<think>\n**Attribute**:  gender=Female ;age=young;;\n- emotion: Happiness (high intensity).\n</think>"
    m = R.parse_tree(messy)
    assert [[g.label for g in c.children] for c in m.children] == [
        ["gender=female", "age=young"], [], ["happiness (high intensity)"]]


def test_format_round_trip():
    t = R.parse_tree(VOCAB_TREE)
    text = R.format_tree(t)
    assert R.parse_tree(text) == t
    assert text.endswith("<answer>happiness</answer>")
    assert R.format_reward(text) == 1.0
    empty = R.parse_tree("")
    assert R.parse_tree(R.format_tree(empty)) == empty
    with pytest.raises(ValueError, match="format_tree"):
        R.format_tree(Node("x", [Node("y")]))


def test_free_text_caption_to_canonical_items():
    t = R.parse_tree(CAPTION)
    items = {c.label: [g.label for g in c.children] for c in t.children}
    assert items == {
        "attribute": ["young", "female", "long hair", "black hair", "glasses", "frontal"],
        "expression": ["au12 lip corner puller", "au6 cheek raiser"],
        "emotion": ["happiness"],
    }
    # negation, AU codes, pronoun-expanded phrases
    neg = R.parse_tree("A bald man without glasses, not smiling; he shakes his head. AU4 and AU 26 visible, calm.")
    items = {c.label: [g.label for g in c.children] for c in neg.children}
    assert items == {"attribute": ["bald", "male", "head shake"],
                     "expression": ["au4 brow lowerer", "au26 jaw drop"], "emotion": ["neutral"]}
    # structured text read canonically
    can = R.parse_tree(VOCAB_TREE, canonical=True)
    assert [g.label for g in can.children[0].children] == [
        "female", "young", "long hair", "black hair", "glasses", "mouth open"]
    assert [g.label for g in can.children[2].children] == ["happiness", "high intensity"]


def test_lexicon_negation_and_clauses():
    assert R.extract_labels("He is not happy but sad") == ["sadness"]
    assert R.extract_labels("She isn't smiling; she frowns.") == ["au4 brow lowerer"]
    assert R.extract_labels("No glasses, a hat.") == ["hat"]
    assert R.extract_labels("A person, a young woman") == ["young", "female"]   # "person, a" is not "person a"
    assert R.extract_labels("Person A smiles") == ["person a", "au12 lip corner puller"]
    assert R.extract_labels("She opens her mouth and shakes the head") == ["mouth open", "head shake"]  # no pronouns


def test_extract_labels_and_normalize_label():
    assert R.extract_labels(CAPTION, level="emotion") == ["happiness"]
    assert R.extract_labels("raised eyebrows and a wide-eyed look", level="expression") == [
        "au1 inner brow raiser", "au2 outer brow raiser", "au5 upper lid raiser"]
    with pytest.raises(ValueError, match="level"):
        R.extract_labels("x", level="nope")
    for raw, want in [("Happy.", "happiness"), ("sad", "sadness"), ("ANGRY", "anger"), ("scared", "fear"),
                      ("afraid", "fear"), ("surprised", "surprise"), ("disgusted", "disgust"), ("calm", "neutral"),
                      ("smile", "au12 lip corner puller"), ("AU12", "au12 lip corner puller"),
                      ("au 12", "au12 lip corner puller"), ("AU12 Lip Corner Puller", "au12 lip corner puller"),
                      ("Person-C", "person c"), ("grey hair", "gray hair"), ("high", "high intensity"),
                      ("  Neutral  to   happiness!", "neutral to happiness"),
                      ("anger (high intensity).", "anger (high intensity)"), ("(high intensity)", "high intensity")]:
        assert R.normalize_label(raw) == want, raw


VOCAB_LABELS = (
    "neutral happiness sadness anger fear surprise disgust".split() +
    ["strongly positive", "positive", "negative", "strongly negative"] +
    ["glasses", "hat", "beard", "long hair", "short hair", "bald", "black hair", "brown hair", "blonde hair",
     "red hair", "gray hair", "young", "adult", "elderly", "male", "female"] +
    ["head nod", "head shake", "head turn left", "head turn right", "blink", "mouth open", "none"] +
    ["frontal", "turned left", "turned right", "tilted up", "tilted down"] +
    [f"person {c}" for c in "abcdefgh"])
VOCAB_AUS = ["AU1 inner brow raiser", "AU2 outer brow raiser", "AU4 brow lowerer", "AU5 upper lid raiser",
             "AU6 cheek raiser", "AU9 nose wrinkler", "AU12 lip corner puller", "AU15 lip corner depressor",
             "AU20 lip stretcher", "AU25 lips part", "AU26 jaw drop"]


def test_lexicon_knows_every_vocab_label():
    for label in VOCAB_LABELS:
        assert R.normalize_label(label) == label and label in R.CANONICAL, label
        assert R.extract_labels(label) == [label], label
    for au in VOCAB_AUS:
        code = au.split()[0].lower()
        assert R.normalize_label(au) == R.normalize_label(code) == au.lower()
    for c in R.CANONICAL:   # canonical terms are fixed points
        assert R.normalize_label(c) == c


# ----------------------------------------------------------------------------------------------------------------------
# rewards


def test_tree_reward_formula():
    ref = R.parse_tree(VOCAB_TREE)
    assert R.tree_reward(VOCAB_TREE, VOCAB_TREE) == 1.0
    assert R.tree_reward(VOCAB_TREE, ref) == 1.0
    # one relabelled item + one missing item: TED 2, |T_ref| 12
    pred = VOCAB_TREE.replace("age=young", "age=adult").replace("; mouth opens at 1.5s", "")
    assert R.tree_edit_distance(R.parse_tree(pred), ref) == 2
    assert R.tree_reward(pred, VOCAB_TREE) == pytest.approx(math.exp(-2 / 12))
    assert R.tree_reward(pred, VOCAB_TREE, lam=0.5) == pytest.approx(math.exp(-0.5 * 2 / 12))
    assert R.tree_reward(pred, VOCAB_TREE, lam=0.0) == 1.0
    with pytest.raises(ValueError, match="lam"):
        R.tree_reward(pred, VOCAB_TREE, lam=-1.0)
    # unparseable -> 0; free caption vs tree compares canonical terms
    for bad in ["", "lorem ipsum", "<think></think><answer></answer>", "<think>\nattribute:\n</think>"]:
        assert R.tree_reward(bad, VOCAB_TREE) == 0.0
    caption_vs_tree = R.tree_reward(CAPTION, VOCAB_TREE)
    want = math.exp(-R.tree_edit_distance(R.parse_tree(CAPTION), R.parse_tree(VOCAB_TREE, canonical=True)) /
                    R.tree_size(R.parse_tree(VOCAB_TREE, canonical=True)))
    assert caption_vs_tree == pytest.approx(want) and 0.3 < caption_vs_tree < 1.0
    assert R.tree_reward(CAPTION, CAPTION) == 1.0


def test_tree_reward_truncates_huge_trees():
    huge = "<think>\nemotion: " + "; ".join(f"item {i}" for i in range(5000)) + "\n</think>"
    t = R.parse_tree(huge)
    assert R.tree_size(t) == R.MAX_TREE_NODES
    assert 0.0 <= R.tree_reward(huge, VOCAB_TREE) < 1e-6


def test_accuracy_reward():
    for ans in ["happiness", "Happy", "The answer is happiness.", "<think>smiling</think><answer>happy</answer>",
                "Answer: Happiness", "The person smiles, so the answer is happiness."]:
        assert R.accuracy_reward(ans, ["happiness"]) == 1.0, ans
    for ans in ["sadness", "not happy", "happiness or sadness", "", "<answer></answer>", "positive"]:
        assert R.accuracy_reward(ans, ["happiness"]) == 0.0, ans
    assert R.accuracy_reward("anger (high intensity)", ["anger (high intensity)"]) == 1.0
    assert R.accuracy_reward("Anger, with high intensity", "anger (high intensity)") == 1.0
    assert R.accuracy_reward("anger", "anger (high intensity)") == 0.0
    assert R.accuracy_reward("angry (low intensity)", "anger (high intensity)") == 0.0
    assert R.accuracy_reward("From neutral to happy", ["neutral to happiness"]) == 1.0
    assert R.accuracy_reward("happiness to neutral", ["neutral to happiness"]) == 0.0
    assert R.accuracy_reward("strongly negative", ["strongly negative"]) == 1.0
    assert R.accuracy_reward("negative", ["strongly negative"]) == 0.0
    assert R.accuracy_reward("neutral", ["neutral"]) == 1.0
    assert R.accuracy_reward("none", ["none"]) == 1.0
    assert R.accuracy_reward("No micro-expression.", ["none"]) == 1.0
    assert R.accuracy_reward("Person C", ["person c"]) == 1.0
    assert R.accuracy_reward("person d", ["person c"]) == 0.0
    assert R.accuracy_reward("The head is turned left.", ["turned left"]) == 1.0
    assert R.accuracy_reward("some odd label", ["Some odd label"]) == 1.0   # outside the lexicon: text match
    assert R.accuracy_reward("happiness", []) == 0.0


def test_f1_reward():
    ref = ["AU6 cheek raiser", "AU12 lip corner puller"]
    assert R.f1_reward("AU6 cheek raiser, AU12 lip corner puller", ref) == 1.0
    assert R.f1_reward("<answer>au12, au6</answer>", ref) == 1.0
    assert R.f1_reward("AU6 cheek raiser", ref) == pytest.approx(2 / 3)    # P 1, R 1/2
    assert R.f1_reward("au6, au12, au4", ref) == pytest.approx(0.8)        # P 2/3, R 1
    assert R.f1_reward("au6, au4", ref) == pytest.approx(0.5)
    assert R.f1_reward("AU4 brow lowerer", ref) == 0.0
    assert R.f1_reward("", ref) == 0.0
    assert R.f1_reward("happy and surprised", ["happiness", "surprise"]) == 1.0
    assert R.f1_reward("female, long black hair", ["female", "long hair", "black hair", "glasses"]) == \
        pytest.approx(2 * 0.75 / 1.75)
    assert R.f1_reward("au6, au12, happiness", ref) == 1.0   # other categories neither help nor hurt
    assert R.f1_reward("foo, bar", ["foo", "baz"]) == pytest.approx(0.5)   # labels outside the lexicon


def test_caption_reward(monkeypatch):
    assert R.caption_reward(CAPTION, CAPTION) == pytest.approx(1.0)
    rec = {"messages": [{"role": "user", "content": "<video>Describe."}, {"role": "assistant", "content": CAPTION}]}
    assert R.caption_reward(CAPTION, rec) == pytest.approx(1.0)
    close = R.caption_reward("A young woman with long black hair and glasses smiles happily.", rec)
    far = R.caption_reward("An elderly bald man with a hat frowns angrily.", rec)
    assert 0.5 < close < 1.0 and 0.0 <= far < 0.2 and far < close
    # label overlap: same terms in other words score 0.7 + a clue part
    assert R.caption_reward("young female, long black hair, glasses, frontal, smile, cheek raiser, happiness",
                            rec) >= 0.7
    assert R.caption_reward("", rec) == 0.0
    assert R.caption_reward("lorem ipsum dolor", "sit amet") == 0.0
    monkeypatch.setattr(R, "CAPTION_SCORER", lambda pred, ref: 7.0 if "young" in pred else float("nan"))
    assert R.caption_reward("young", rec) == 1.0 and R.caption_reward("old", rec) == 0.0
    with pytest.raises(ValueError, match="messages"):
        R.caption_reward("x", {"task": "appearance_caption"})


def test_format_reward():
    assert R.format_reward("<think>a</think><answer>b</answer>") == 1.0
    assert R.format_reward("  <think>\nx\n</think>\n\n<answer> b </answer>\n") == 1.0
    for bad in ["", "happiness", "<think>a</think>", "<answer>b</answer>", "<think>a</think><answer> </answer>",
                "x<think>a</think><answer>b</answer>", "<think>a</think>x<answer>b</answer>",
                "<think>a</think><answer>b</answer>x", "<answer>b</answer><think>a</think>",
                "<think>a</think><answer>b</answer><answer>c</answer>", "<think><think>a</think><answer>b</answer>",
                "<think>a<answer>b</answer></think>", "<think>a</think><answer>b"]:
        assert R.format_reward(bad) == 0.0, bad


def test_extract_answer():
    assert R.extract_answer("<think>sad?</think><answer> happiness </answer>") == "happiness"
    assert R.extract_answer("<think>x</think> happiness") == "happiness"
    assert R.extract_answer("<answer>happiness") == "happiness"
    assert R.extract_answer("<answer>a</answer><answer>b</answer>") == "b"
    assert R.extract_answer("just text") == "just text"
    assert R.extract_answer(None) == ""


# ----------------------------------------------------------------------------------------------------------------------
# score()


BAD_TREE = ("<think>\nattribute: gender=male\nexpression: AU4 brow lowerer\nemotion: anger\n</think>\n"
            "<answer>anger</answer>")
CASES = {   # task: (labels, reference answer, good completion, bad completion)
    "appearance_recognition": (["female", "long hair", "glasses"], "female, long hair, glasses",
                               "female, long hair, glasses", "male, hat"),
    "appearance_caption": (None, "A young female with long black hair and glasses, looking frontal.",
                           "A young female with long black hair and glasses, looking frontal.",
                           "An elderly man with a beard and a hat."),
    "action_recognition": (["head nod", "blink"], "head nod, blink", "head nod, blink", "head shake"),
    "action_caption": (None, "The person nods the head and blinks.", "The person nods the head and blinks.",
                       "The person shakes the head."),
    "identity": (["person c"], "person c", "Person C", "person a"),
    "head_pose": (["turned left"], "turned left", "turned left", "tilted down"),
    "emotion_single": (["happiness"], "happiness", "happy", "sadness"),
    "emotion_multi": (["happiness", "surprise"], "happiness, surprise", "happiness and surprise", "fear"),
    "emotion_fine": (["anger (high intensity)"], "anger (high intensity)", "anger (high intensity)",
                     "anger (low intensity)"),
    "sentiment_single": (["positive"], "positive", "positive", "negative"),
    "sentiment_fine": (["strongly negative"], "strongly negative", "strongly negative", "negative"),
    "micro_expression": (["none"], "none", "none", "happiness"),
    "au_detection": (["AU6 cheek raiser", "AU12 lip corner puller"], "AU6 cheek raiser, AU12 lip corner puller",
                     "AU6 cheek raiser, AU12 lip corner puller", "AU4 brow lowerer"),
    "emotion_caption": (None, "The person smiles broadly and looks happy, with high intensity.",
                        "The person smiles broadly and looks happy, with high intensity.",
                        "The person frowns and looks angry."),
    "emotion_transition": (["neutral to happiness"], "neutral to happiness", "neutral to happiness",
                           "happiness to neutral"),
    "fine_grained_caption": (["happiness"], VOCAB_TREE, VOCAB_TREE, BAD_TREE),
}


def make_record(task, labels, reference, with_tree=False):
    rec = {"messages": [{"role": "user", "content": "<video>Question?"}, {"role": "assistant", "content": reference}],
           "videos": ["videos/000000.mp4"], "task": task, "level": R.TASK_LEVEL[task]}
    if labels is not None:
        rec["labels"] = labels
    if with_tree:
        rec["tree"] = reference
    return rec


def test_task_tables_cover_vocab():
    assert set(CASES) == set(R.TASK_METRIC) == set(R.TASK_LEVEL)
    assert set(R.TASK_METRIC.values()) == {"accuracy", "f1", "caption", "tree"}
    assert set(R.TASK_LEVEL.values()) == set(R.LEVELS)
    assert sum(v == "attribute" for v in R.TASK_LEVEL.values()) == 6
    assert sum(v == "expression" for v in R.TASK_LEVEL.values()) == 9


@pytest.mark.parametrize("task", sorted(CASES))
def test_score_every_task(task):
    labels, reference, good, bad = CASES[task]
    metric = R.TASK_METRIC[task]
    for with_tree in (False, True):
        rec = make_record(task, labels, reference, with_tree=with_tree and metric == "tree")
        g, b = R.score(good, rec), R.score(bad, rec)
        for out in (g, b):
            counted = {metric, "format"} if metric in R.FORMAT_METRICS else {metric}  # the terms in the total
            assert set(out) == counted | {"total"}
            assert all(0.0 <= out[k] <= 1.0 for k in counted)
            assert out["total"] == pytest.approx(sum(R.DEFAULT_WEIGHTS[k] * out[k] for k in counted))
        assert g[metric] == pytest.approx(1.0), (task, g)
        # a wrong tree still shares the root and level scaffold: exp(-8/12) here, hence the loose bound
        assert b[metric] < 0.6 and b[metric] < g[metric], (task, b)
    if metric == "tree":
        assert g["format"] == 1.0 and g["total"] == pytest.approx(1.1)
    out = R.score(good, rec, weights={metric: 2.0, "format": 0.0})
    assert out["total"] == pytest.approx(2.0 * out[metric])


def test_score_rejects_bad_input():
    rec = make_record("emotion_single", ["happiness"], "happiness")
    with pytest.raises(ValueError, match="task"):
        R.score("happy", dict(rec, task="nope"))
    with pytest.raises(ValueError, match="weight"):
        R.score("happy", rec, weights={"acc": 1.0})
    with pytest.raises(ValueError, match="messages"):
        R.score("happy", {"task": "emotion_single"})


# ----------------------------------------------------------------------------------------------------------------------
# robustness


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<", ">", "attribute:", "expression: ", "emotion:",
             "\n", ";", " ", "AU12", "au 6", "happy", "not", "long black hair", "(", ")", "=", "é", "\x00", "🙂",
             "ＡＵ１２", "İ", "ﷺ", "\u2028", "\r", "*", "-", "answer is", "person", "a"]
garbage = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=80).map("".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join),
)


def all_rewards(text):
    rec = make_record("fine_grained_caption", ["happiness"], VOCAB_TREE, with_tree=True)
    out = [R.tree_reward(text, VOCAB_TREE), R.tree_reward(VOCAB_TREE, text), R.tree_reward(text, text),
           R.accuracy_reward(text, ["happiness"]), R.accuracy_reward("happiness", [text]),
           R.f1_reward(text, ["au6 cheek raiser", "au12"]), R.f1_reward(text, [text]),
           R.caption_reward(text, CAPTION), R.caption_reward(CAPTION, text), R.format_reward(text)]
    for task in ("fine_grained_caption", "emotion_single", "au_detection", "emotion_caption"):
        s = R.score(text, dict(rec, task=task))
        out += [v for k, v in s.items() if k != "total"]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage)
def test_every_reward_bounded_on_arbitrary_text(text):
    for v in all_rewards(text):
        assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage)
def test_parse_format_round_trip_on_arbitrary_text(text):
    t = R.parse_tree(text)
    assert [c.label for c in t.children] == list(R.LEVELS)
    assert R.parse_tree(R.format_tree(t)) == t
    c = R.parse_tree(text, canonical=True)
    assert R.parse_tree(R.format_tree(c)) == c
    n = R.normalize_label(text)
    assert R.normalize_label(n) == n


@pytest.mark.parametrize("name", ["garbage_10mb", "nested_think", "nested_answer", "level_lines_10mb", "words",
                                  "unicode_10mb"])
def test_pathological_inputs_are_fast(name):
    rng = random.Random(0)
    text = {
        "garbage_10mb": "".join(rng.choice("ab <>/;:\n=()") for _ in range(100_000)) * 100,
        "nested_think": "<think>" * 10_000 + "emotion: happy" + "</think>" * 10_000,
        "nested_answer": "<answer>" * 10_000 + "happy" + "</answer>" * 5_000,
        "level_lines_10mb": ("attribute: " + "x; " * 1000 + "\n") * 3500,
        "words": " ".join(rng.choice(["happy", "smile", "no", "hair", "long", "au", "12", "person", "a"])
                          for _ in range(2_000_000)),
        "unicode_10mb": "\ufdfa\u0130\u2028\U0001f642" * 2_500_000,   # NFKC expands the first to 18 chars
    }[name]
    assert len(text) > 60_000
    rec = make_record("fine_grained_caption", ["happiness"], VOCAB_TREE, with_tree=True)
    calls = {
        "tree": lambda: R.tree_reward(text, VOCAB_TREE), "tree_ref": lambda: R.tree_reward(VOCAB_TREE, text),
        "tree_both": lambda: R.tree_reward(text, text), "accuracy": lambda: R.accuracy_reward(text, ["happiness"]),
        "f1": lambda: R.f1_reward(text, ["au6", "au12"]), "caption": lambda: R.caption_reward(text, CAPTION),
        "format": lambda: R.format_reward(text), "score": lambda: R.score(text, rec)["total"],
        "parse": lambda: R.tree_size(R.parse_tree(text)), "labels": lambda: len(R.extract_labels(text)),
    }
    for key, call in calls.items():
        t0 = time.perf_counter()
        v = call()
        dt = time.perf_counter() - t0
        # robustness bound (generous, not a benchmark): typical is < 0.1 s on 2 CPU cores
        assert dt < 2.0, (name, key, dt)
        assert math.isfinite(v) and v >= 0, (name, key, v)


# ----------------------------------------------------------------------------------------------------------------------
# one scoring path: what GRPO maximises for a record is what eval reports for it

MC = "<video>Which emotion does the person show? (A) happiness (B) sadness (C) anger. Answer with a letter."
RL_WEIGHTS = {"accuracy": 1.0, "f1": 1.0, "caption": 1.0, "tree": 1.0, "format": 0.1}  # train_rl.py's defaults


def _rec(task, question, answer, **kw):
    return dict({"task": task, "messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}, **kw)


SCORING_CASES = [  # (record, response, the metric value by hand)
    (_rec("emotion_single", MC, "B", labels="B"), "B", 1.0),
    (_rec("emotion_single", MC, "B", labels="B"), "(B) sadness", 1.0),
    (_rec("emotion_single", MC, "B", labels="B"), "<think>x</think><answer>B</answer>", 1.0),
    (_rec("emotion_single", MC, "B", labels="B"), "sadness", 1.0),
    (_rec("emotion_single", MC, "B", labels="B"), "A", 0.0),
    (_rec("emotion_single", MC, "sadness", labels="sadness"), "B.", 1.0),
    (_rec("emotion_single", MC, "sadness", labels=["sadness"]), "<answer>(B)</answer>", 1.0),
    (_rec("emotion_single", MC, "(B) sadness"), "B", 1.0),  # no labels: the reference answer, a letter + text
    (_rec("emotion_single", "<video>What emotion?", "anger"), "The answer is angry.", 1.0),
    (_rec("emotion_multi", "<video>Which emotions?", "x", labels="happiness, surprise"), "happiness and fear", 0.5),
    (_rec("emotion_multi", "<video>Which emotions?", "x", labels=["happiness", "surprise"]), "surprise, happy", 1.0),
    (_rec("au_detection", "<video>AUs?", "AU6 cheek raiser; AU12 lip corner puller"), "AU12", 2 / 3),
    (_rec("conversation_emotion", MC, "C"), "C", 1.0),  # a real Emo-CFG task scored like emotion_single
]


@pytest.mark.parametrize("record,response,want", SCORING_CASES)
def test_grpo_reward_equals_eval_metric(record, response, want):
    import evaluation
    metric = R.task_metric(record["task"])
    reported = evaluation.score_sample(response, record, record["task"])[metric]  # what eval.py reports
    optimised = R.score(response, record, RL_WEIGHTS, lam=1.0)  # train_rl.py's reward call
    assert reported == optimised[metric] == pytest.approx(want)
    assert optimised["total"] == pytest.approx(RL_WEIGHTS[metric] * want)


def test_emosynth_tasks_score_alike_in_both_paths():
    import evaluation
    tree = ("<think>\nattribute: gender=female; age=young\nexpression: AU12 lip corner puller\n"
            "emotion: happiness (high intensity)\n</think>\n<answer>happiness</answer>")
    recs = [_rec("fine_grained_caption", "<video>Analyse.", tree, labels=["happiness"], tree=tree),
            _rec("appearance_caption", "<video>Describe.", "A young woman with long black hair and glasses."),
            _rec("head_pose", "<video>Pose?", "frontal", labels=["frontal"])]
    for rec, resp in zip(recs, (tree.replace("young", "adult"), "a young woman, black hair", "facing the camera")):
        metric = R.task_metric(rec["task"])
        v = evaluation.score_sample(resp, rec, rec["task"])[metric]
        assert v == R.score(resp, rec, RL_WEIGHTS)[metric] and 0.0 < v <= 1.0


def test_multiple_choice_reward_that_used_to_differ():
    """Before the one scoring path, GRPO called the raw accuracy on the completion and the labels: a correct letter
    answer to a lettered question scored 0 for RL and 1 in eval. Now both are 1."""
    rec = _rec("emotion_single", MC, "B", labels=["sadness"])
    assert R.accuracy_reward("B", rec["labels"]) == 0.0  # the old RL reward
    assert R.score("B", rec)["accuracy"] == 1.0 and R.score("(A) happiness", rec)["accuracy"] == 0.0
