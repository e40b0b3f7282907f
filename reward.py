"""Affective tree (parse, serialise, edit distance), task metadata, and the one scoring function: `score` is both
the reward GRPO maximises (train_rl.py) and the metric eval.py reports, so the two can never drift apart.

The affective tree is root -> three level nodes (attribute, expression, emotion) -> one node per item. It is read
from the structured text the model writes (docs/design.md, "Formats"):

    <think>
    attribute: gender=female; age=young; hair=long black; accessory=glasses
    expression: AU6 cheek raiser; AU12 lip corner puller; mouth opens at 1.5s
    emotion: happiness (high intensity)
    </think>
    <answer>happiness</answer>

or from free text (an Emo-CFG style caption) through a lexicon of affective terms: every lexicon hit becomes a
canonical item under its level. Rewards, each a float in [0, 1]:

    tree_reward      exp(-lam * TED(T_pred, T_ref) / |T_ref|)      fine-grained captions (Zhang-Shasha TED)
    accuracy_reward  1 if the answer names exactly the reference label (synonyms allowed)    single-label QA
    f1_reward        micro F1 between predicted and reference canonical label sets         multi-label QA
    caption_reward   label overlap + clue overlap (rule-based stand-in for a caption reward model)
    format_reward    1 if the output is <think>...</think><answer>...</answer> and nothing else
    score            dispatches on record["task"]: resolves multiple-choice letters and splits string labels, then
                     returns every term plus the weighted total

Everything here must survive whatever a sampled model writes: inputs are clipped to MAX_CHARS characters, regexes
have bounded quantifiers, tree walks and TED are iterative, trees are capped at MAX_TREE_NODES nodes.
"""
import math
import os
import re
import unicodedata

LEVELS = ("attribute", "expression", "emotion")
MAX_CHARS = 65536        # only the first 64K characters of any model output are looked at
MAX_TREE_NODES = 256     # larger trees are cut (preorder) before TED, so TED time stays bounded (~0.2 s)
MAX_ITEM_CHARS = 200     # longest tree item label kept

# task -> metric and task -> curriculum level (data/emosynth/README.md); eval's tables are grouped with these
TASK_METRIC = {
    "appearance_recognition": "f1", "appearance_caption": "caption", "action_recognition": "f1",
    "action_caption": "caption", "identity": "accuracy", "head_pose": "accuracy",
    "emotion_single": "accuracy", "emotion_multi": "f1", "emotion_fine": "accuracy", "sentiment_single": "accuracy",
    "sentiment_fine": "accuracy", "micro_expression": "accuracy", "au_detection": "f1", "emotion_caption": "caption",
    "emotion_transition": "accuracy",
    "fine_grained_caption": "tree",
}
TASK_LEVEL = {
    "appearance_recognition": "attribute", "appearance_caption": "attribute", "action_recognition": "attribute",
    "action_caption": "attribute", "identity": "attribute", "head_pose": "attribute",
    "emotion_single": "expression", "emotion_multi": "expression", "emotion_fine": "expression",
    "sentiment_single": "expression", "sentiment_fine": "expression", "micro_expression": "expression",
    "au_detection": "expression", "emotion_caption": "expression", "emotion_transition": "expression",
    "fine_grained_caption": "emotion",
}
# real Emo-CFG tasks that EmoSynth does not have: (metric, level, the EmoSynth task they are scored like)
EXTRA_TASKS = {"conversation_emotion": ("accuracy", "expression", "emotion_single")}
# display order of eval's tables, grouped like the paper's; tasks not listed are appended to their level's group
GROUPS = (
    ("attribute", "Attribute perception",
     ("appearance_recognition", "appearance_caption", "action_recognition", "action_caption", "identity",
      "head_pose")),
    ("expression", "Expression analysis",
     ("emotion_single", "emotion_multi", "emotion_fine", "sentiment_single", "sentiment_fine", "micro_expression",
      "au_detection", "emotion_caption", "emotion_transition", "conversation_emotion")),
    ("emotion", "Fine-grained emotion caption", ("fine_grained_caption",)),
)
# official Emo-CFG test file names (lower case substrings) -> our task names; first match wins
FILE_TASKS = (
    ("appearance-recognition", "appearance_recognition"), ("appearance-caption", "appearance_caption"),
    ("action-recognition", "action_recognition"), ("action-caption", "action_caption"),
    ("head-pose", "head_pose"), ("mead_id", "identity"),
    ("multiple-label-emotion", "emotion_multi"), ("fine-grained-emotion", "emotion_fine"),
    ("conversational-emotion", "conversation_emotion"), ("single-label-emotion", "emotion_single"),
    ("fine-grained-sentiment", "sentiment_fine"), ("single-label-sentiment", "sentiment_single"),
    ("micro-expression", "micro_expression"), ("action_unit", "au_detection"),
    ("emotion-caption", "emotion_caption"), ("caption_test", "fine_grained_caption"),
)


def task_metric(task):
    """The metric of a task (ours or an EXTRA_TASKS one), or None when the task is unknown."""
    return TASK_METRIC.get(task) or (EXTRA_TASKS[task][0] if task in EXTRA_TASKS else None)


def task_level(task):
    return TASK_LEVEL.get(task) or (EXTRA_TASKS[task][1] if task in EXTRA_TASKS else None)


def task_from_name(path):
    """Our task name from a data/predictions file name, or None."""
    name = os.path.basename(str(path)).lower()
    for pattern, t in FILE_TASKS:
        if pattern in name:
            return t
    for t in sorted(TASK_METRIC, key=len, reverse=True):  # emotion_multi.jsonl, test_au_detection.json ...
        if t in name:
            return t
    return None


# Every reward term and its default weight: score() returns the terms that apply to a record and their weighted sum
# "total". To add a term: compute it in terms() and give it a weight here; train_rl.py then takes --w_<term> (any
# term without a w_ key keeps this weight) and logs it as reward/<term>/mean.
DEFAULT_WEIGHTS = {"accuracy": 1.0, "f1": 1.0, "caption": 1.0, "tree": 1.0, "format": 0.1, "agree": 1.0}
FORMAT_METRICS = ("tree",)
THINK_TERMS = ("tree", "format")  # the terms a reasoning answer's <think> block earns; the others are its answer's
CAPTION_LABEL_WEIGHT = 0.7   # caption_reward = 0.7 * label overlap + 0.3 * clue overlap
CAPTION_SCORER = None        # optional callable(pred_caption, ref_caption) -> float in [0, 1]; replaces the rule


def _clip(text):
    """Any model output -> a str of at most MAX_CHARS characters."""
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[:4 * MAX_CHARS]).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    return text[:MAX_CHARS]


# ----------------------------------------------------------------------------------------------------------------------
# lexicon: canonical term, category, surface forms. Matching is on whole lower-case words, longest surface first.
# "{p}" in a surface expands to nothing / his / her / their / the ("shakes her head").

_CATEGORY_LEVEL = {"appearance": "attribute", "action": "attribute", "head_pose": "attribute",
                   "identity": "attribute", "au": "expression",
                   "emotion": "emotion", "sentiment": "emotion", "intensity": "emotion"}

_LEXICON = [
    # emotions (7 basic)
    ("emotion", "neutral", "neutral|neutrality|calm|calmly|calmness|expressionless|composed|impassive"),
    ("emotion", "happiness", "happiness|happy|happily|joy|joyful|joyous|cheerful|delighted|glad|pleased|elated"),
    ("emotion", "sadness", "sadness|sad|sadly|unhappy|unhappiness|sorrow|sorrowful|grief|gloomy|melancholy|"
                           "tearful|downcast"),
    ("emotion", "anger", "anger|angry|angrily|furious|fury|rage|enraged|irritated|annoyed|annoyance|mad"),
    ("emotion", "fear", "fear|fearful|afraid|scared|frightened|terrified|fright|anxious|anxiety|panic|panicked"),
    ("emotion", "surprise", "surprise|surprised|astonished|astonishment|amazed|amazement|shocked|startled"),
    ("emotion", "disgust", "disgust|disgusted|disgusting|repulsed|revulsion|revolted|grossed out"),
    # sentiment ("neutral" is the emotion term above: the same canonical string)
    ("sentiment", "strongly positive", "strongly positive|very positive|extremely positive|highly positive"),
    ("sentiment", "positive", "positive|positively"),
    ("sentiment", "negative", "negative|negatively"),
    ("sentiment", "strongly negative", "strongly negative|very negative|extremely negative|highly negative"),
    # intensity
    ("intensity", "low intensity", "low intensity|intensity low|mild|mildly|slight|slightly|subtle|subtly|weak"),
    ("intensity", "medium intensity", "medium intensity|intensity medium|moderate|moderately"),
    ("intensity", "high intensity", "high intensity|intensity high|intense|intensely|strong|strongly|extreme|"
                                    "extremely"),
    # appearance attributes
    ("appearance", "glasses", "glasses|eyeglasses|spectacles|sunglasses|bespectacled"),
    ("appearance", "hat", "hat|hats|cap|beanie"),
    ("appearance", "beard", "beard|bearded|beards|facial hair"),
    ("appearance", "bald", "bald|balding|bald head"),
    ("appearance", "young", "young|youthful|young adult|teenager|teen|child|kid"),
    ("appearance", "adult", "adult|middle aged|grown up"),
    ("appearance", "elderly", "elderly|old|older|senior|aged person|elder"),
    ("appearance", "male", "male|man|men|boy|guy|gentleman|masculine"),
    ("appearance", "female", "female|woman|women|girl|lady|feminine"),
    # actions
    ("action", "head nod", "head nod|head nods|head nodding|nod|nods|nodding|nodded|nods {p} head|"
                           "nodding {p} head|nodded {p} head"),
    ("action", "head shake", "head shake|head shakes|head shaking|shakes {p} head|shaking {p} head|"
                             "shook {p} head"),
    ("action", "head turn left", "head turn left|head turns left|turns left|turning left|turns to the left|"
                                 "turning to the left|turns {p} head left|turning {p} head left|"
                                 "turns {p} head to the left|turning {p} head to the left"),
    ("action", "head turn right", "head turn right|head turns right|turns right|turning right|turns to the right|"
                                  "turning to the right|turns {p} head right|turning {p} head right|"
                                  "turns {p} head to the right|turning {p} head to the right"),
    ("action", "blink", "blink|blinks|blinking|blinked"),
    ("action", "mouth open", "mouth open|mouth opens|mouth opened|mouth opening|open mouth|opens {p} mouth|"
                             "opening {p} mouth|opened {p} mouth"),
    ("action", "none", "none|nothing|no action|no actions|no movement|no movements|no motion|no micro expression|"
                       "no micro expressions|no microexpression|no microexpressions"),
    # head pose
    ("head_pose", "frontal", "frontal|frontal view|front view|facing forward|facing front|facing the camera|"
                             "faces the camera|looking at the camera|looks at the camera|looking straight ahead|"
                             "looking forward"),
    ("head_pose", "turned left", "turned left|head turned left|turned to the left|facing left|faces left|"
                                 "looking left|looks left|looking to the left|looks to the left|left profile"),
    ("head_pose", "turned right", "turned right|head turned right|turned to the right|facing right|faces right|"
                                  "looking right|looks right|looking to the right|looks to the right|right profile"),
    ("head_pose", "tilted up", "tilted up|head tilted up|tilts up|tilting up|looking up|looks up|chin up|"
                               "chin raised|head up"),
    ("head_pose", "tilted down", "tilted down|head tilted down|tilts down|tilting down|looking down|looks down|"
                                 "chin down|chin lowered|head down"),
]
# action units: code, name, plain-language synonyms. The code alone ("au12"), the name alone and "code name" all
# map to the canonical "au12 lip corner puller".
_AUS = [
    (1, "inner brow raiser", "raised inner brows|inner brows raised|raises {p} inner brows|raising {p} inner brows"),
    (2, "outer brow raiser", "raised outer brows|outer brows raised|raises {p} outer brows|raising {p} outer brows"),
    (4, "brow lowerer", "lowered brows|lowered eyebrows|brows lowered|eyebrows lowered|lowers {p} brows|"
                        "lowers {p} eyebrows|furrowed brows|furrowed brow|furrowed eyebrows|furrows {p} brows|"
                        "furrowing {p} brows|knitted brows|frown|frowns|frowning|frowned"),
    (5, "upper lid raiser", "raised upper lids|upper lids raised|wide eyes|wide open eyes|eyes wide|eyes widen|"
                            "eyes widened|widened eyes|widens {p} eyes|wide eyed"),
    (6, "cheek raiser", "raised cheeks|cheeks raised|raises {p} cheeks|cheek raise|squint|squints|squinting"),
    (9, "nose wrinkler", "wrinkled nose|nose wrinkled|wrinkles {p} nose|wrinkling {p} nose|nose wrinkle|"
                         "nose wrinkles|nose wrinkling"),
    (12, "lip corner puller", "lip corners pulled|pulled lip corners|smile|smiles|smiling|smiled|grin|grins|"
                              "grinning"),
    (15, "lip corner depressor", "lip corners depressed|depressed lip corners|lip corners down|downturned mouth|"
                                 "downturned lips|mouth corners down|lip corners turned down"),
    (20, "lip stretcher", "stretched lips|lips stretched|stretches {p} lips|lip stretch"),
    (25, "lips part", "parted lips|lips parted|parts {p} lips|lips apart|parting {p} lips"),
    (26, "jaw drop", "dropped jaw|jaw dropped|jaw drops|drops {p} jaw|lowered jaw|jaw lowered"),
]
_HAIR_LENGTH = {"long": "long", "short": "short"}
_HAIR_COLOR = {"black": "black", "brown": "brown", "blonde": "blonde", "blond": "blonde", "red": "red",
               "gray": "gray", "grey": "gray", "white": "gray", "silver": "gray"}
_NEGATORS = {"no", "not", "without", "never", "neither", "nor", "t", "lacks", "lacking"}  # "t": isn't -> isn t
_CLAUSE_WORDS = {"but", "however", "although", "though", "yet", "whereas"}   # a negation does not reach past these
_WHOLE_ONLY = {"low": "low intensity", "medium": "medium intensity", "high": "high intensity"}  # only as a whole label
_WORD_RE = re.compile(r"[^\W_]+|[.!?;,:]")   # words, and the punctuation that ends a negation scope
_PUNCT = set(".!?;,:")


def _words(text):
    return [w for w in _WORD_RE.findall(text) if w not in _PUNCT]


def _build_lexicon():
    """-> {word tuple: ((canonical, category), ...)}, {canonical: (category, level)}."""
    phrases, canon = {}, {}

    def add(surface, outs):
        forms = [surface] if "{p}" not in surface else [surface.replace("{p}", p) for p in
                                                        ("", "his", "her", "their", "the")]
        for form in forms:
            key = tuple(_words(form))
            if key in phrases and phrases[key] != outs:
                raise ValueError(f"lexicon: surface {form!r} maps to both {phrases[key]} and {outs}")
            phrases[key] = outs
        for c, cat in outs:
            canon[c] = (cat, _CATEGORY_LEVEL[cat])

    for cat, c, surfaces in _LEXICON:
        for s in surfaces.split("|"):
            add(s, ((c, cat),))
    both = (("au1 inner brow raiser", "au"), ("au2 outer brow raiser", "au"))
    for s in ("raised eyebrows", "raised brows", "eyebrows raised", "brows raised", "raises {p} eyebrows",
              "raises {p} brows", "raising {p} eyebrows", "raise {p} eyebrows", "eyebrows raise", "brows raise"):
        add(s, both)
    for code, name, synonyms in _AUS:
        c = f"au{code} {name}"
        codes = (f"au{code}", f"au {code}", f"au{code:02d}", f"au {code:02d}", f"action unit {code}")
        for s in codes + (name,) + tuple(synonyms.split("|")) + tuple(f"{k} {name}" for k in codes):
            add(s, ((c, "au"),))
    # hair: "long black hair" -> long hair + black hair; "hair=long black" (tree key=value) likewise
    for ln, lc in _HAIR_LENGTH.items():
        add(f"{ln} hair", ((f"{lc} hair", "appearance"),))
        add(f"{ln} haired", ((f"{lc} hair", "appearance"),))
        add(f"hair {ln}", ((f"{lc} hair", "appearance"),))
    for cn, cc in _HAIR_COLOR.items():
        add(f"{cn} hair", ((f"{cc} hair", "appearance"),))
        add(f"{cn} haired", ((f"{cc} hair", "appearance"),))
        add(f"hair {cn}", ((f"{cc} hair", "appearance"),))
        for ln, lc in _HAIR_LENGTH.items():
            both_hair = ((f"{lc} hair", "appearance"), (f"{cc} hair", "appearance"))
            for s in (f"{ln} {cn} hair", f"{ln} and {cn} hair", f"hair {ln} {cn}", f"{ln} {cn} haired"):
                add(s, both_hair)
            add(f"{cn} {ln} hair", both_hair[::-1])
            add(f"hair {cn} {ln}", both_hair[::-1])
    for s, c in (("blonde", "blonde hair"), ("blond", "blonde hair"), ("redhead", "red hair"),
                 ("brunette", "brown hair")):
        add(s, ((c, "appearance"),))
    for letter in "abcdefgh":
        for s in (f"person {letter}", f"identity {letter}"):
            add(s, ((f"person {letter}", "identity"),))
    return phrases, canon


_PHRASES, CANONICAL = _build_lexicon()   # CANONICAL: canonical term -> (category, level)
_FIRST = {k[0] for k in _PHRASES}
_MAXLEN = max(len(k) for k in _PHRASES)


def _terms(text):
    """Lexicon hits in written order (duplicates kept): [(canonical, category)]. A surface does not span
    punctuation; a hit with a negator ("no", "not", "without", ...) among the 3 words before it in the same clause
    (punctuation and "but" end a clause) is skipped."""
    text = unicodedata.normalize("NFKC", _clip(text))[:MAX_CHARS].lower()   # NFKC can expand ("ﷺ": 18 chars)
    words, clause, c = [], [], 0
    for w in _WORD_RE.findall(text):
        if w in _PUNCT or w in _CLAUSE_WORDS:
            c += 1
        if w not in _PUNCT:
            words.append(w)
            clause.append(c)
    out, i, n = [], 0, len(words)
    while i < n:
        hit = None
        if words[i] in _FIRST:
            for size in range(min(_MAXLEN, n - i), 0, -1):
                hit = _PHRASES.get(tuple(words[i:i + size])) if clause[i + size - 1] == clause[i] else None
                if hit:
                    break
        if not hit:
            i += 1
            continue
        if not any(words[k] in _NEGATORS and clause[k] == clause[i] for k in range(max(0, i - 3), i)):
            out.extend(hit)
        i += size
    return out


def extract_labels(text, level=None):
    """Canonical affective terms mentioned in `text`, in written order, each once; optionally only one level's."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"extract_labels: level must be one of {LEVELS}, got {level!r}")
    out = []
    for c, cat in _terms(text):
        if (level is None or _CATEGORY_LEVEL[cat] == level) and c not in out:
            out.append(c)
    return out


def _is_punct(ch):
    return unicodedata.category(ch)[0] == "P" or ch in "`~|<>^=+"


def _norm_text(text):
    """Lower case, NFKC, collapsed whitespace, punctuation stripped at both ends (a closing bracket that closes an
    opening one inside is kept: "anger (high intensity)")."""
    s = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", _clip(text))[:MAX_CHARS].lower())
    s = " ".join(s.split())
    i, j = 0, len(s)
    while i < j and (_is_punct(s[i]) or s[i].isspace()):
        i += 1
    p = s.rfind("(", i, j)
    while j > i and (_is_punct(s[j - 1]) or s[j - 1].isspace()):
        if s[j - 1] == ")" and i <= p < j - 1:
            break
        j -= 1
        if j <= p:
            p = s.rfind("(", i, j)
    return s[i:j].strip()


def normalize_label(text):
    """A label as written -> its canonical form: synonyms and AU codes map to the canonical term ("Happy." ->
    "happiness", "AU12" -> "au12 lip corner puller"); anything else -> normalised text."""
    s = _norm_text(text)
    if s in _WHOLE_ONLY:
        return _WHOLE_ONLY[s]
    words = _words(s)
    hit = _PHRASES.get(tuple(words)) if 0 < len(words) <= _MAXLEN else None
    return hit[0][0] if hit and len(hit) == 1 else s


# ----------------------------------------------------------------------------------------------------------------------
# the affective tree


class Node:
    """Ordered labelled tree node."""
    __slots__ = ("label", "children")

    def __init__(self, label, children=None):
        self.label = label
        self.children = list(children) if children else []

    def __eq__(self, other):  # iterative: no recursion limit on deep trees
        if not isinstance(other, Node):
            return NotImplemented
        stack = [(self, other)]
        while stack:
            a, b = stack.pop()
            if a.label != b.label or len(a.children) != len(b.children):
                return False
            stack.extend(zip(a.children, b.children))
        return True

    __hash__ = None

    def __repr__(self):
        return f"Node({self.label!r}, {self.children!r})" if self.children else f"Node({self.label!r})"


def tree_size(tree):
    if tree is None:
        return 0
    n, stack = 0, [tree]
    while stack:
        node = stack.pop()
        n += 1
        stack.extend(node.children)
    return n


def truncate_tree(tree, max_nodes=MAX_TREE_NODES):
    """Copy of `tree` keeping its first `max_nodes` nodes in preorder (always a connected tree)."""
    root = Node(tree.label)
    kept, stack = 1, [(child, root) for child in reversed(tree.children)]
    while stack and kept < max_nodes:
        src, parent = stack.pop()
        copy = Node(src.label)
        parent.children.append(copy)
        kept += 1
        stack.extend((child, copy) for child in reversed(src.children))
    return root


_LEVEL_RE = re.compile(r"[ \t*#>\-]{0,8}(attribute|expression|emotion)s?(?:[ \t]{0,3}level)?[ \t*]{0,4}:", re.I)
_TAG_RE = re.compile(r"<[^<>\n]{0,32}>")


def _clean_item(text):
    s = _TAG_RE.sub(" ", text).replace("<", " ").replace(">", " ")
    return _norm_text(_norm_text(s)[:MAX_ITEM_CHARS])


def _level_lines(text):
    """Items of the "<level>: item; item" lines, read from the <think> block (else the whole text);
    None when there is no level line at all. Items past the tree-size cap are not read."""
    text = _clip(text)
    regions = []
    start = text.find("<think>")
    if start >= 0:
        end = text.find("</think>", start)
        regions.append(text[start + 7:end if end >= 0 else len(text)])
    regions.append(text)
    for region in regions:
        levels, found, budget = {lvl: [] for lvl in LEVELS}, False, MAX_TREE_NODES - 1 - len(LEVELS)
        for line in region.split("\n"):
            m = _LEVEL_RE.match(line)
            if not m:
                continue
            found = True
            items = levels[m.group(1).lower()]
            for raw in line[m.end():].split(";", budget)[:budget]:
                item = _clean_item(raw)
                if item and budget > 0:
                    items.append(item)
                    budget -= 1
        if found:
            return levels
    return None


def _build_tree(levels):
    root, budget = Node("root"), MAX_TREE_NODES - 1 - len(LEVELS)
    for lvl in LEVELS:
        items = levels.get(lvl, [])[:max(budget, 0)]
        budget -= len(items)
        root.children.append(Node(lvl, [Node(x) for x in items]))
    return root


def parse_tree(text, canonical=False):
    """Text -> affective tree (root -> attribute, expression, emotion -> items).

    Level lines ("emotion: happiness (high intensity)") give one item per ";"-separated entry, label = normalised
    text. Text without level lines (a free caption), or any text with canonical=True, is read through the lexicon:
    every affective term becomes its canonical item under its level (each once, in written order). Never raises;
    what does not parse is a tree with empty levels."""
    text = _clip(text)
    levels = None if canonical else _level_lines(text)
    if levels is None:
        levels = {lvl: [] for lvl in LEVELS}
        for c, cat in _terms(text):
            items = levels[_CATEGORY_LEVEL[cat]]
            if c not in items:
                items.append(c)
    return _build_tree(levels)


def _level_items(tree):
    if tree.label != "root" or [c.label for c in tree.children] != list(LEVELS) or \
            any(g.children for c in tree.children for g in c.children):
        raise ValueError("format_tree: expected root -> attribute, expression, emotion -> items, got " +
                         repr(tree)[:200])
    return {c.label: [g.label for g in c.children] for c in tree.children}


def format_tree(tree, answer=None):
    """Affective tree -> its text form; parse_tree(format_tree(t)) == t for every tree parse_tree returns.
    The answer defaults to the first emotion named at the emotion level."""
    levels = _level_items(tree)
    if answer is None:
        answer = next((c for c, cat in _terms("; ".join(levels["emotion"])) if cat == "emotion"), "")
    lines = [f"{lvl}: " + "; ".join(levels[lvl]) if levels[lvl] else f"{lvl}:" for lvl in LEVELS]
    return "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>" + answer + "</answer>"


def _postorder(tree):
    """-> (labels, leftmost-leaf index) of every node, in postorder."""
    labels, lml = [], []
    stack = [[tree, 0, -1]]  # node, next child, leftmost leaf of the first child
    while stack:
        frame = stack[-1]
        node, k = frame[0], frame[1]
        if k < len(node.children):
            frame[1] += 1
            stack.append([node.children[k], 0, -1])
            continue
        stack.pop()
        idx = len(labels)
        labels.append(node.label)
        lml.append(frame[2] if frame[2] >= 0 else idx)
        if stack and stack[-1][2] < 0:
            stack[-1][2] = lml[idx]
    return labels, lml


def _keyroots(lml):
    last = {}
    for i, leaf in enumerate(lml):
        last[leaf] = i   # the highest node with this leftmost leaf
    return sorted(last.values())


def tree_edit_distance(a, b):
    """Zhang-Shasha ordered tree edit distance with unit insert, delete and relabel costs. None is the empty tree.
    O(|a|·|b|) memory, O(|a|·|b|·min(depth, leaves)^2) time."""
    if a is None or b is None:
        return tree_size(a) + tree_size(b)
    la, l1 = _postorder(a)
    lb, l2 = _postorder(b)
    n, m = len(la), len(lb)
    td = [[0] * m for _ in range(n)]   # td[i][j]: distance between the subtrees rooted at i and j
    for i in _keyroots(l1):
        li = l1[i]
        for j in _keyroots(l2):
            lj = l2[j]
            cols = j - lj + 2
            # fd[x][y]: distance between forests l1[i]..li+x-1 and l2[j]..lj+y-1 (x, y nodes; 0 = empty)
            fd = [list(range(cols))]
            for x in range(1, i - li + 2):
                i1 = li + x - 1
                li1, lab1, td1 = l1[i1], la[i1], td[i1]
                prev, cur = fd[x - 1], [x] + [0] * (cols - 1)
                for y in range(1, cols):
                    j1 = lj + y - 1
                    best = min(prev[y], cur[y - 1]) + 1
                    if li1 == li and l2[j1] == lj:   # both forests are whole trees: relabel the roots
                        v = min(best, prev[y - 1] + (lab1 != lb[j1]))
                        td1[j1] = v
                    else:                            # match the subtrees at i1, j1 as wholes
                        v = min(best, fd[li1 - li][l2[j1] - lj] + td1[j1])
                    cur[y] = v
                fd.append(cur)
    return td[n - 1][m - 1]


def _n_items(tree):
    return sum(len(c.children) for c in tree.children)


def _structured_tree(x):
    """Node as is; text with level lines -> its tree; else None (free text)."""
    if isinstance(x, Node):
        return x
    levels = _level_lines(x)
    return None if levels is None else _build_tree(levels)


def _canonical_tree(x):
    return parse_tree(format_tree(x) if isinstance(x, Node) else x, canonical=True)


def tree_reward(pred, ref, lam=1.0, canonical=None):
    """exp(-lam · TED(T_pred, T_ref) / |T_ref|) in [0, 1]; 0 when the prediction yields no item.

    pred, ref: text or Node. canonical=None compares the trees as written when both sides use level lines, and
    through the lexicon (canonical terms) when either side is free text, so a caption and a tree score alike.
    The predicted tree is truncated to MAX_TREE_NODES nodes first."""
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"tree_reward: lam must be finite and >= 0, got {lam!r}")
    pt = rt = None
    if not canonical:
        pt, rt = _structured_tree(pred), _structured_tree(ref)
    if pt is None or rt is None:
        if canonical is False:
            pt, rt = parse_tree(pred) if pt is None else pt, parse_tree(ref) if rt is None else rt
        else:
            pt, rt = _canonical_tree(pred), _canonical_tree(ref)
    if _n_items(pt) == 0 or _n_items(rt) == 0:
        return 0.0
    pt = truncate_tree(pt, MAX_TREE_NODES)
    d = 0 if pt == rt else tree_edit_distance(pt, rt)
    return min(1.0, max(0.0, math.exp(-lam * d / tree_size(rt))))


# ----------------------------------------------------------------------------------------------------------------------
# answers and rewards

_ANSWER_PREFIXES = ("the correct answer is", "the final answer is", "the answer is", "final answer", "my answer is",
                    "answer is", "answer")


def extract_answer(text):
    """The answer part of a completion: inside the last <answer>...</answer> (or after an unclosed <answer>); else
    what follows </think>; else the whole text. Stray tags are removed."""
    t = _clip(text)
    end = t.rfind("</answer>")
    start = t.rfind("<answer>", 0, end) if end >= 0 else t.rfind("<answer>")
    if start >= 0:
        ans = t[start + 8:end] if end >= 0 else t[start + 8:]
    else:
        if end >= 0:
            t = t[:end]
        k = t.rfind("</think>")
        ans = t[k + 8:] if k >= 0 else t
    return _TAG_RE.sub(" ", ans).strip()


def _strip_prefix(s):
    for p in _ANSWER_PREFIXES:
        if s.startswith(p) and not s[len(p):len(p) + 1].isalnum():
            return _norm_text(s[len(p):])
    return s


def _as_list(labels):
    if labels is None:
        return []
    return [labels] if isinstance(labels, str) else [str(x) for x in labels]


def _label_terms(label):
    """Canonical terms of a reference label; a bare word that only names a term as a whole label ("high") too."""
    terms = _terms(label)
    if not terms:
        c = normalize_label(label)
        if c in CANONICAL:
            terms = [(c, CANONICAL[c][0])]
    return terms


def _collapse(seq):
    return [x for k, x in enumerate(seq) if k == 0 or seq[k - 1] != x]


def accuracy_reward(completion, labels):
    """1.0 if the answer names one of `labels`, else 0.0. A match is the same normalised text or canonical label,
    or the same sequence of canonical terms of the label's categories ("The answer is happy." matches "happiness";
    "anger, high intensity" matches "anger (high intensity)"; "happiness to neutral" does not match "neutral to
    happiness"; hedging between several labels does not match)."""
    ans = extract_answer(completion)
    a_norm = _strip_prefix(_norm_text(ans))
    if not a_norm:
        return 0.0
    a_canon, a_terms = normalize_label(a_norm), _terms(ans)
    for label in _as_list(labels):
        l_norm = _norm_text(label)
        if l_norm and (a_norm == l_norm or a_canon == normalize_label(l_norm)):
            return 1.0
        l_terms = _label_terms(label)
        if not l_terms:
            continue
        cats = {cat for _, cat in l_terms}
        if _collapse([c for c, cat in a_terms if cat in cats]) == _collapse([c for c, _ in l_terms]):
            return 1.0
    return 0.0


def _f1(pred, ref):
    tp = len(pred & ref)
    if tp == 0:
        return 0.0
    p, r = tp / len(pred), tp / len(ref)
    return 2 * p * r / (p + r)


_SPLIT_RE = re.compile(r"[,;\n]|\band\b")


def f1_reward(completion, labels):
    """Per-sample micro F1 between the canonical label sets of the answer and of `labels`. Predicted terms count
    only in the categories the reference uses (an emotion named in an AU answer is neither right nor wrong).
    Labels unknown to the lexicon match comma/"and"-separated answer items by normalised text."""
    ans = extract_answer(completion)
    ref, unknown, cats = set(), set(), set()
    for label in _as_list(labels):
        terms = _label_terms(label)
        if terms:
            ref.update(c for c, _ in terms)
            cats.update(cat for _, cat in terms)
        else:
            s = normalize_label(label)
            if s:
                ref.add(s)
                unknown.add(s)
    if not ref or not ans:
        return 0.0
    pred = {c for c, cat in _terms(ans) if cat in cats}
    if unknown:
        pieces = {normalize_label(_strip_prefix(_norm_text(p))) for p in _SPLIT_RE.split(ans)} - {""}
        pred |= pieces if not cats else pieces & unknown
    return _f1(pred, ref)


_STOPWORDS = set("""a an the and or but of to in on at by for with from as is are was were be been being it its this
that these those he she they them his her their him who whom which what when where while there here has have had
do does did not no so very also than then just into onto over under up down out about person face video shows
show showing appears appear seems seem looks look looking""".split())


def _content_words(text):
    return {w for w in _words(unicodedata.normalize("NFKC", _clip(text))[:MAX_CHARS].lower()) if w not in _STOPWORDS}


def reference_text(record, missing=None):
    """The reference answer: a plain string, or a record's last assistant turn. When there is none: `missing` if
    given (e.g. "" for display), else ValueError naming what is missing."""
    if isinstance(record, str):
        return record
    msgs = record.get("messages")
    for msg in reversed(msgs if isinstance(msgs, list) else []):
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            content = msg.get("content", "")
            if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else str(content)
    if missing is not None:
        return missing
    if not isinstance(msgs, list):
        raise ValueError("record has no 'messages' list to take the reference answer from")
    raise ValueError("record 'messages' has no assistant turn to take the reference answer from")


def caption_reward(completion, record):
    """Rule-based caption score in [0, 1]: 0.7 · label overlap (F1 of the canonical affective terms, per level,
    pooled) + 0.3 · clue overlap (F1 of content-word sets); clue overlap alone when the reference names no term.
    `record` is a record (reference = last assistant turn) or the reference caption. When CAPTION_SCORER is set,
    it is called as CAPTION_SCORER(pred, ref) instead (a learned caption reward model)."""
    ref = reference_text(record)
    pred = extract_answer(completion)
    if not pred:
        return 0.0
    if CAPTION_SCORER is not None:
        v = float(CAPTION_SCORER(pred, ref))
        return min(1.0, max(0.0, v)) if math.isfinite(v) else 0.0
    levels = lambda t: {(CANONICAL[c][1], c) for c in extract_labels(t)}  # noqa: E731
    ref_terms = levels(ref)
    clue = _f1(_content_words(pred), _content_words(ref))
    if not ref_terms:
        return clue
    return CAPTION_LABEL_WEIGHT * _f1(levels(pred), ref_terms) + (1 - CAPTION_LABEL_WEIGHT) * clue


def format_reward(completion):
    """1.0 if the completion is exactly <think>...</think> then <answer>...</answer> (each tag once, a non-empty
    answer, only whitespace outside), else 0.0. No partial credit. Longer than MAX_CHARS is 0."""
    t = completion if isinstance(completion, str) else _clip(completion)
    if len(t) > MAX_CHARS:
        return 0.0
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(t.count(tag) != 1 for tag in tags):
        return 0.0
    a, b, c, d = (t.find(tag) for tag in tags)
    if not (a < b < c < d):
        return 0.0
    if t[:a].strip() or t[b + 8:c].strip() or t[d + 9:].strip() or not t[c + 8:d].strip():
        return 0.0
    return 1.0


# ----------------------------------------------------------------------------------------------------------------------
# multiple-choice questions and reference labels


def question_text(record):
    """The first user turn's text ("" when there is none)."""
    for m in record.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def parse_options(question):
    """{letter: option text} for a question that lists options as "(A) x (B) y" or as "A. x" lines."""
    marks = list(re.finditer(r"\(([A-H])\)\s*", question))
    if len(marks) < 2:
        marks = list(re.finditer(r"(?m)^\s*([A-H])[.:)]\s+", question))
    if len(marks) < 2 or [m.group(1) for m in marks] != [chr(65 + i) for i in range(len(marks))]:
        return {}
    opts = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        text = question[m.end(): nxt.start() if nxt else len(question)]
        if nxt is None:  # the last option ends at the line / sentence end ("(C) fear. Answer with a letter.")
            text = re.split(r"\n|[.?!](?:\s|$)", text)[0]
        opts[m.group(1)] = text.strip().strip(",;").strip()
    return opts


def resolve_options(response, question):
    """Replace an option letter answer ("B", "(B)", "B.", "(B) sadness", inside <answer> tags or not) by the option's
    text when the question lists options; anything else is returned unchanged for the answer extraction."""
    opts = parse_options(question)
    if not opts:
        return response
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", response, re.S)
    ans = (m.group(1) if m else response).strip()
    m = re.match(r"^(?:option\s+|answer\s*:?\s*)?\(?([A-H])(?:\)|[.:]|$|\s*$)", ans, re.I)
    if m and m.group(1).upper() in opts:
        return opts[m.group(1).upper()]
    return response


def as_label_list(labels, metric):
    """Reference labels as a list: lists pass through; a string answer is one label, or comma/semicolon separated
    items for multi-label (F1) tasks. None stays None."""
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)):
        return [str(x) for x in labels]
    s = str(labels)
    if metric == "f1":
        return [x.strip() for x in re.split(r"[,;\n]", s) if x.strip()]
    return [s.strip()]


def emotion_key(text):
    """The emotion line of a tree ("sadness (high intensity)"; items joined by "; "), normalised; None when the text
    has no level lines or an empty emotion line."""
    levels = _level_lines(text)
    return "; ".join(levels["emotion"]) if levels and levels["emotion"] else None


def answer_table(records):
    """{task: {emotion line of the reference tree: answer}} over the reasoning records of accuracy tasks: the answer
    the data gives behind each emotion line. A line the data answers two ways is left out (no answer follows from it)."""
    seen = {}
    for r in records:
        if r.get("answer_format") != "reasoning" or not r.get("tree") or task_metric(r.get("task")) != "accuracy":
            continue
        key = emotion_key(r["tree"])
        labels = as_label_list(r.get("labels"), "accuracy") or [extract_answer(reference_text(r))]
        if key is not None and labels and labels[0]:
            seen.setdefault(r["task"], {}).setdefault(key, set()).add(_norm_text(labels[0]))
    return {t: {k: next(iter(v)) for k, v in d.items() if len(v) == 1} for t, d in seen.items()}


def terms(completion, record, lam=1.0, table=None):
    """The reward terms that apply to one completion of an Emo-CFG record, {name: value in [0, 1]}: the task's metric
    (metric = task_metric(record["task"])); for FORMAT_METRICS tasks the format term; for records marked
    answer_format="reasoning" (data.apply_answer_format) the tree reward of the completion's <think> block against
    record["tree"] and the format term, so GRPO rewards answer and tree together. For accuracy / F1 tasks an
    option-letter answer ("B", "(B) sadness") becomes its option's text when the question lists options, and so do
    letter labels; string labels are split for F1; without labels the reference answer is the last assistant turn.
    table (answer_table's): reasoning records of its tasks also get "agree", 1 when the answer is the one the data
    gives behind the completion's own emotion line (right or wrong): a reward for answer and tree agreeing."""
    task = record.get("task")
    metric = task_metric(task)
    if metric is None:
        raise ValueError(f"record 'task' {task!r} is not one of {sorted(TASK_METRIC) + sorted(EXTRA_TASKS)}")
    reasoning = record.get("answer_format") == "reasoning"
    if metric in ("accuracy", "f1"):
        question = question_text(record)
        answer = resolve_options(_clip(completion), question)
        ref = reference_text(record) if not record.get("labels") else None
        if ref is not None and reasoning:  # the reference answer is inside the target's <answer> tags
            ref = extract_answer(ref)
        labels = as_label_list(record.get("labels"), metric) or as_label_list(ref, metric)
        labels = [resolve_options(label, question) for label in labels]
        value = (accuracy_reward if metric == "accuracy" else f1_reward)(answer, labels)
    elif metric == "caption":
        value = caption_reward(completion, extract_answer(reference_text(record)) if reasoning else record)
    else:
        value = tree_reward(completion, record.get("tree") or reference_text(record), lam=lam)
    out = {metric: value}
    if metric not in FORMAT_METRICS and reasoning and record.get("tree"):
        out["tree"] = tree_reward(completion, record["tree"], lam=lam)
    if metric in FORMAT_METRICS or "tree" in out:
        out["format"] = format_reward(completion)
    if table and reasoning and task in table:
        implied = table[task].get(emotion_key(completion))
        out["agree"] = accuracy_reward(answer, [implied]) if implied else 0.0
    return out


def score(completion, record, weights=None, lam=1.0, table=None):
    """All rewards of one completion for one Emo-CFG record: terms() plus "total", their weighted sum. The one
    scoring path: GRPO's reward and eval's metric are this call. weights override DEFAULT_WEIGHTS key by key."""
    w = _weights(weights)
    out = terms(completion, record, lam, table)
    out["total"] = sum(w[k] * v for k, v in out.items())
    return out


def _weights(weights):
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (weights or {}).items():
        if k not in w:
            raise ValueError(f"score: unknown weight key {k!r}; known: {sorted(w)}")
        w[k] = float(v)
    return w


def split_total(scores, record, weights=None):
    """score's dict for one completion of `record` -> (reasoning, answer) rewards that sum to its total: a reasoning
    answer (a QA record scored with a tree) splits into its THINK_TERMS and the rest; any other completion is one
    piece, (total, total)."""
    if "tree" not in scores or task_metric(record.get("task")) in FORMAT_METRICS:
        return scores["total"], scores["total"]
    w = _weights(weights)
    think = sum(w[k] * scores[k] for k in THINK_TERMS if k in scores)
    return think, scores["total"] - think
