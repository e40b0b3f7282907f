"""
EmoSynth: the embedded default dataset (the "shakespeare_char" of VidEmo).

Draws procedural cartoon face videos with numpy, writes them as mp4 with PyAV, and writes Emo-CFG records
(train/val/test JSONL) for every evaluation task, with ground truth on all three levels of the affective tree:
attributes (hair, glasses, hat, beard, age, gender, head pose, head/eye/mouth actions), expressions (FACS-style
action units with onset/apex/offset, micro-expressions) and emotions (7 basic emotions, intensity, sentiment,
transitions, blends). Also trains a small byte-level BPE tokenizer with the Qwen special tokens and chat template.

Everything is deterministic from --seed, down to the bytes: two builds with the same arguments are identical file by
file whatever the worker count, and on any machine by construction (done.json records a digest of them). Every cue is
drawn big and dark enough to be seen in a 14-pixel patch (thin features and random colours kept a tiny model at
chance; docs/design.md, "EmoSynth").

    python data/emosynth/prepare.py [--out_dir=data/emosynth/build] [--num_train=3000] [--num_val=150]
                                    [--num_test=400] [--seed=0] [--size=112] [--frames=8] [--fps=4]
                                    [--workers=2] [--difficulty=0] [--vocab_size=1536] [--force=False]

--num_* count clips; each clip serves one to eight task records. Files: videos/NNNNNN.mp4, {train,val,test}.jsonl,
meta.jsonl (full per-clip ground truth, for debugging only), tokenizer/, done.json (written last).
"""
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for common.py
import common  # noqa: E402

VERSION = 2  # bump when the output changes, so old builds are not reused
DRAW = 1  # seeds the plan and record streams: the clips and records drawn for a --seed stay put across VERSIONs
DEFAULT_OUT = Path(__file__).resolve().parent / "build"
DEFAULTS = dict(num_train=3000, num_val=150, num_test=400, seed=0, size=112, frames=8, fps=4.0, workers=2,
                difficulty=0, vocab_size=1536)

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary : canonical lower-case label strings

EMOTIONS = ["neutral", "happiness", "sadness", "anger", "fear", "surprise", "disgust"]
INTENSITIES = ["low", "medium", "high"]
INTENSITY_AMP = {"low": 0.5, "medium": 0.75, "high": 1.0}  # AU amplitude at apex
SENTIMENTS3 = ["positive", "neutral", "negative"]
SENTIMENTS5 = ["strongly positive", "positive", "neutral", "negative", "strongly negative"]
VALENCE = {"neutral": "neutral", "happiness": "positive", "surprise": "positive", "sadness": "negative",
           "anger": "negative", "fear": "negative", "disgust": "negative"}
AU_NAMES = {1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
            6: "cheek raiser", 9: "nose wrinkler", 12: "lip corner puller", 15: "lip corner depressor",
            20: "lip stretcher", 25: "lips part", 26: "jaw drop"}
AU_CODES = list(AU_NAMES)
EMOTION_AUS = {"neutral": [], "happiness": [6, 12], "sadness": [1, 4, 15], "anger": [4, 5, 20],
               "fear": [1, 2, 4, 5, 20, 25], "surprise": [1, 2, 5, 26], "disgust": [9, 15]}
APPEARANCE = ["glasses", "hat", "beard", "long hair", "short hair", "bald", "black hair", "brown hair",
              "blonde hair", "red hair", "gray hair", "young", "adult", "elderly", "male", "female"]
HAIR_LENGTHS = ["long", "short", "bald"]
HAIR_COLOURS = ["black", "brown", "blonde", "red", "gray"]
AGES = ["young", "adult", "elderly"]
GENDERS = ["male", "female"]
HEAD_MOTIONS = ["none", "head nod", "head shake", "head turn left", "head turn right"]
ACTIONS = ["head nod", "head shake", "head turn left", "head turn right", "blink", "mouth open", "none"]
POSES = ["frontal", "turned left", "turned right", "tilted up", "tilted down"]
FACE_SHAPES = ["round", "oval", "square"]
# 8 fixed identities, each a fixed combination of face shape, skin tone, hair, age, gender and beard
_ID_KEYS = ("face", "skin", "hair_len", "hair_colour", "age", "gender", "beard")
IDENTITIES = {name: dict(zip(_ID_KEYS, row)) for name, row in [
    ("person a", ("oval", 0, "long", "black", "young", "female", False)),
    ("person b", ("square", 1, "short", "brown", "adult", "male", True)),
    ("person c", ("round", 2, "short", "gray", "elderly", "female", False)),
    ("person d", ("round", 0, "short", "blonde", "young", "male", False)),
    ("person e", ("square", 3, "long", "red", "adult", "female", False)),
    ("person f", ("oval", 3, "bald", "gray", "elderly", "male", True)),
    ("person g", ("round", 1, "long", "blonde", "young", "female", False)),
    ("person h", ("oval", 2, "short", "black", "adult", "male", False)),
]}

# task -> (level, metric), the task table of data/emosynth/README.md
TASKS = {
    "appearance_recognition": ("attribute", "f1"), "appearance_caption": ("attribute", "caption"),
    "action_recognition": ("attribute", "f1"), "action_caption": ("attribute", "caption"),
    "identity": ("attribute", "accuracy"), "head_pose": ("attribute", "accuracy"),
    "emotion_single": ("expression", "accuracy"), "emotion_multi": ("expression", "f1"),
    "emotion_fine": ("expression", "accuracy"), "sentiment_single": ("expression", "accuracy"),
    "sentiment_fine": ("expression", "accuracy"), "micro_expression": ("expression", "accuracy"),
    "au_detection": ("expression", "f1"), "emotion_caption": ("expression", "caption"),
    "emotion_transition": ("expression", "accuracy"), "fine_grained_caption": ("emotion", "tree"),
}

# A few paraphrases per task, picked at random independently of the label; none names a label.
QUESTIONS = {
    "appearance_recognition": ["Which appearance attributes does the person have? List them, separated by commas.",
                               "List the visible appearance attributes of the person (hair, accessories, age, "
                               "gender), comma separated."],
    "appearance_caption": ["Describe the person's appearance in one sentence.",
                           "Give a short description of how the person looks."],
    "action_recognition": ["Which actions does the person perform in the video? List them, separated by commas.",
                           "What head and face movements happen in this clip? List them, comma separated."],
    "action_caption": ["Describe what the person does in the video in one sentence.",
                       "Give a short description of the person's movements."],
    "identity": ["Who is shown in the video? Answer with the identity name.",
                 "Which of the eight known identities is this? Give the name."],
    "head_pose": ["What is the head pose of the person?", "How is the person's head oriented?"],
    "emotion_single": ["What emotion does the person show? Answer with one word.",
                       "Which basic emotion is expressed in the video?"],
    "emotion_multi": ["Which emotions does the person show? List all that apply, separated by commas.",
                      "Name every emotion expressed in the video, comma separated."],
    "emotion_fine": ["What emotion does the person show, and at what intensity?",
                     "Name the expressed emotion and its intensity."],
    "sentiment_single": ["What is the sentiment polarity of the person's expression?",
                         "Judge the sentiment conveyed by the person's face."],
    "sentiment_fine": ["Rate the sentiment of the person's expression on the five-level scale.",
                       "Give the fine-grained sentiment of the person's face."],
    "micro_expression": ["Does a brief micro-expression flash across the face? Name its emotion, if any.",
                         "Which emotion appears in a very short flash on the face, if any?"],
    "au_detection": ["Which facial action units are active in the video? List them, separated by commas.",
                     "Detect the facial action units that the person shows, comma separated."],
    "emotion_caption": ["Describe the person's facial expression and emotion in one sentence.",
                        "Give a short description of the person's expression."],
    "emotion_transition": ["How does the person's emotion change during the video? "
                           "Answer in the form 'first to second'.",
                           "Describe the change of emotion over the clip as 'first to second'."],
    "fine_grained_caption": ["Analyse the person's attributes, facial expression and emotion step by step, "
                             "then give the emotion.",
                             "Reason from appearance to facial movements to emotion, then answer with the emotion."],
}
SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# Qwen2-VL style: default system prompt, plain-string content (or parts with type text/image/video)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Fraction of clips of each kind (each kind feeds its own tasks)
KIND_FRACTIONS = {"attr": 0.30, "identity": 0.07, "expr": 0.37, "blend": 0.08, "micro": 0.09, "transition": 0.09}


def au_label(code):
    return f"AU{code} {AU_NAMES[code]}"


def emotion_fine_label(emotion, intensity):
    return emotion if emotion == "neutral" else f"{emotion} ({intensity} intensity)"


def sentiment_fine_label(emotion, intensity):
    v = VALENCE[emotion]
    return f"strongly {v}" if v != "neutral" and intensity == "high" else v


def blend_pairs():
    """Emotion pairs whose AU union identifies them: not equal to another pair's or a single emotion's AU set, and
    never AU12 with AU15 (they cancel on the lip corners)."""
    singles = {frozenset(v) for v in EMOTION_AUS.values()}
    pairs = [(a, b) for i, a in enumerate(EMOTIONS[1:]) for b in EMOTIONS[i + 2:]]
    unions = {p: frozenset(EMOTION_AUS[p[0]]) | frozenset(EMOTION_AUS[p[1]]) for p in pairs}
    keep = []
    for p, u in unions.items():
        if u in singles or sum(u == v for v in unions.values()) > 1 or {12, 15} <= u:
            continue
        keep.append(p)
    return keep


BLEND_PAIRS = blend_pairs()

# ----------------------------------------------------------------------------------------------------------------------
# Planning: every random choice is made here, in one process, from the seed; rendering is a pure function of a spec


def balanced(rng, values, n, weights=None):
    """n values with counts proportional to weights (largest remainder, so exact), in random order."""
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=float)
    raw = w / w.sum() * n
    cnt = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    out = [v for v, c in zip(values, cnt) for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def allocate(n, fractions):
    """Split n clips into kinds (largest remainder; every kind gets one clip when n allows)."""
    kinds = list(fractions)
    raw = np.array([fractions[k] for k in kinds]) * n
    cnt = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    if n >= len(kinds):
        for i in range(len(kinds)):
            while cnt[i] == 0:
                j = int(np.argmax(cnt))
                cnt[j] -= 1
                cnt[i] += 1
    return dict(zip(kinds, cnt.tolist()))


def random_appearance(rng):
    gender = str(rng.choice(GENDERS))
    hair_len = str(rng.choice(HAIR_LENGTHS))
    return dict(face=str(rng.choice(FACE_SHAPES)), skin=int(rng.integers(4)), hair_len=hair_len,
                hair_colour=str(rng.choice(HAIR_COLOURS)), age=str(rng.choice(AGES)), gender=gender,
                beard=bool(gender == "male" and rng.random() < 0.5), glasses=bool(rng.random() < 0.4),
                hat=bool(rng.random() < 0.3))


def envelope(rng, T, difficulty):
    """Expression amplitude over frames: onset -> apex -> offset. Difficulty 0 keeps the apex on almost every
    frame (a tiny model learns that quickly); higher difficulty moves the onset later and adds offsets."""
    env = np.ones(T)
    if difficulty <= 0:
        env[0] = 0.5
        env[-1] = float(rng.choice([1.0, 0.6]))
    else:
        onset = int(rng.integers(0, 3))
        env[:onset] = 0.0
        env[onset] = 0.5
        if rng.random() < 0.5:
            env[-1] = 0.4
    return env


def motion_offsets(motion, T):
    """Feature offsets (dx, dy) per frame in 112-pixel units. Oscillations flip every 2 frames so that each
    Qwen temporal patch (2 frames) sees one side."""
    dx, dy = np.zeros(T), np.zeros(T)
    square = np.array([1.0 if (t // 2) % 2 == 0 else -1.0 for t in range(T)])
    if motion == "head nod":
        dy = 5.0 * square
    elif motion == "head shake":
        dx = 7.0 * square
    elif motion == "head turn left":
        dx = np.linspace(0.0, -10.0, T)
    elif motion == "head turn right":
        dx = np.linspace(0.0, 10.0, T)
    return dx, dy


POSE_OFFSET = {"frontal": (0.0, 0.0), "turned left": (-9.0, 0.0), "turned right": (9.0, 0.0),
               "tilted up": (0.0, -7.0), "tilted down": (0.0, 7.0)}


def make_clip(rng, kind, T, difficulty, app, pose="frontal", motion="none", blink=False, mouth=False,
              emotion="neutral", intensity="medium", emotions=None, micro=None, transition=None, identity=None):
    """One clip spec with its full per-frame ground truth (AU amplitudes, offsets, blink, mouth action)."""
    au = np.zeros((T, len(AU_CODES)))  # [T, 11] AU amplitude per frame
    col = {c: i for i, c in enumerate(AU_CODES)}
    if micro is not None:  # neutral face, one 2-frame flash at full intensity (1 frame at difficulty >= 2)
        k = int(rng.integers(1, max(2, T // 2 - 1)))
        flash = [2 * k] if difficulty >= 2 else [2 * k, 2 * k + 1]
        if micro != "none":
            for c in EMOTION_AUS[micro]:
                au[flash, col[c]] = 1.0
    elif transition is not None:  # first half one emotion, second half another
        half = T // 2
        for (lo, hi), e in zip([(0, half), (half, T)], transition):
            for c in EMOTION_AUS[e]:
                au[lo:hi, col[c]] = 1.0
    else:
        env = envelope(rng, T, difficulty) * INTENSITY_AMP[intensity]
        for e in (emotions or [emotion]):
            for c in EMOTION_AUS[e]:
                au[:, col[c]] = np.maximum(au[:, col[c]], env)
    pdx, pdy = POSE_OFFSET[pose]
    mdx, mdy = motion_offsets(motion, T)
    blinks = np.zeros(T, dtype=bool)
    if blink:
        k = int(rng.integers(1, max(2, T // 2 - 1)))
        blinks[2 * k: 2 * k + 2] = True
    mouth_act = np.zeros(T)
    mouth_from = None
    if mouth:
        mouth_from = 2 * int(rng.integers(1, max(2, T // 2 - 1)))
        mouth_act[mouth_from:] = 1.0
    jitter = [0.0, 0.0, 1.0]  # dx, dy, scale of the whole face
    if difficulty >= 1:
        jitter = rng.uniform(-3, 3, size=2).tolist() + [float(rng.uniform(0.94, 1.06))]
    bg = int(rng.integers(6)) if difficulty >= 1 else -1
    spec = dict(kind=kind, appearance=app, identity=identity, pose=pose, head_motion=motion, blink=bool(blink),
                mouth_open_from=mouth_from, emotion=emotion, intensity=intensity, emotions=emotions, micro=micro,
                transition=transition, jitter=jitter, background=bg, noise=8.0 if difficulty >= 2 else 0.0,
                noise_seed=int(rng.integers(2**31)),
                frames=dict(au=np.round(au, 4).tolist(), fx=np.round(pdx + mdx, 3).tolist(),
                            fy=np.round(pdy + mdy, 3).tolist(), blink=blinks.tolist(), mouth_act=mouth_act.tolist()))
    spec["actions"] = clip_actions(spec)
    spec["aus"] = [c for c in AU_CODES if au[:, col[c]].max() > 0]
    return spec


def clip_actions(spec):
    """Action labels from what is rendered: the mouth counts as open when lips part on any frame, whatever the
    cause (action or AU25/AU26)."""
    acts = [spec["head_motion"]] if spec["head_motion"] != "none" else []
    if spec["blink"]:
        acts.append("blink")
    au = np.array(spec["frames"]["au"])
    opening = au[:, AU_CODES.index(25)] + au[:, AU_CODES.index(26)] + np.array(spec["frames"]["mouth_act"])
    if opening.max() > 0:
        acts.append("mouth open")
    return [a for a in ACTIONS if a in acts] or ["none"]


def appearance_labels(app):
    labs = {k for k in ("glasses", "hat", "beard") if app[k]}
    labs.add("bald" if app["hair_len"] == "bald" else f"{app['hair_len']} hair")
    if app["hair_len"] != "bald":
        labs.add(f"{app['hair_colour']} hair")
    labs |= {app["age"], app["gender"]}
    return [a for a in APPEARANCE if a in labs]


def plan_split(rng, n, T, difficulty):
    """Clip specs for one split, with exactly balanced classes for each kind's main task."""
    cnt = allocate(n, KIND_FRACTIONS)
    specs = []
    # attributes and actions: balanced appearance marginals, motions, poses
    k = cnt["attr"]
    cols = {key: balanced(rng, vals, k) for key, vals in
            [("face", FACE_SHAPES), ("skin", [0, 1, 2, 3]), ("hair_len", HAIR_LENGTHS), ("hair_colour", HAIR_COLOURS),
             ("age", AGES), ("gender", GENDERS)]}
    glasses = balanced(rng, [True, False], k, [0.4, 0.6])
    hats = balanced(rng, [True, False], k, [0.3, 0.7])
    motions = balanced(rng, HEAD_MOTIONS, k, [2, 1, 1, 1, 1])
    blinks = balanced(rng, [True, False], k, [0.35, 0.65])
    mouths = balanced(rng, [True, False], k, [0.35, 0.65])
    poses = iter(balanced(rng, POSES, sum(m == "none" for m in motions)))
    for i in range(k):
        app = {key: cols[key][i] for key in cols}
        app.update(glasses=glasses[i], hat=hats[i], beard=bool(app["gender"] == "male" and rng.random() < 0.5))
        pose = next(poses) if motions[i] == "none" else "frontal"
        specs.append(make_clip(rng, "attr", T, difficulty, app, pose=pose, motion=motions[i], blink=blinks[i],
                               mouth=mouths[i]))
    # identities: fixed faces; glasses, hat, pose and a medium expression vary
    for name in balanced(rng, list(IDENTITIES), cnt["identity"]):
        app = dict(IDENTITIES[name], glasses=bool(rng.random() < 0.3), hat=bool(rng.random() < 0.2))
        specs.append(make_clip(rng, "identity", T, difficulty, app, pose=str(rng.choice(POSES)),
                               blink=bool(rng.random() < 0.3), emotion=str(rng.choice(EMOTIONS)), identity=name))
    # single emotions: balanced over 7 emotions, intensities balanced within each emotion
    emos = balanced(rng, EMOTIONS, cnt["expr"])
    ints = {e: iter(balanced(rng, INTENSITIES, emos.count(e))) for e in EMOTIONS}
    for e in emos:
        pose, motion = "frontal", "none"
        if difficulty >= 1:
            pose = str(rng.choice(POSES))
            motion = str(rng.choice(["none", "head nod", "head shake"], p=[0.6, 0.2, 0.2]))
        specs.append(make_clip(rng, "expr", T, difficulty, random_appearance(rng), pose=pose, motion=motion,
                               blink=bool(rng.random() < 0.2), emotion=e, intensity=next(ints[e])))
    # blends: two emotions' AUs together, medium or high
    for pair in balanced(rng, BLEND_PAIRS, cnt["blend"]):
        specs.append(make_clip(rng, "blend", T, difficulty, random_appearance(rng), emotions=list(pair),
                               intensity=str(rng.choice(["medium", "high"]))))
    for m in balanced(rng, EMOTIONS[1:] + ["none"], cnt["micro"]):
        specs.append(make_clip(rng, "micro", T, difficulty, random_appearance(rng), micro=m))
    trans = [(a, b) for a in EMOTIONS for b in EMOTIONS if a != b]
    for pair in balanced(rng, trans, cnt["transition"]):
        specs.append(make_clip(rng, "transition", T, difficulty, random_appearance(rng), transition=list(pair)))
    return specs


# ----------------------------------------------------------------------------------------------------------------------
# Text: captions, affective trees, records

def appearance_caption(app, pose):
    words = [app["age"], "bald" if app["hair_len"] == "bald" else None, app["gender"]]
    s = " ".join(w for w in words if w)
    s = ("An " if s[0] in "aeiou" else "A ") + s
    if app["hair_len"] != "bald":
        s += f" with {app['hair_len']} {app['hair_colour']} hair"
    if app["beard"]:
        s += " and a beard" if app["hair_len"] != "bald" else " with a beard"
    wear = [w for w, on in (("glasses", app["glasses"]), ("a hat", app["hat"])) if on]
    if wear:
        s += ", wearing " + " and ".join(wear)
    if pose is not None:
        s += ", facing frontal" if pose == "frontal" else f", with the head {pose}"
    return s + "."


def action_caption(actions):
    if actions == ["none"]:
        return "The person stays still, with no action (none)."
    phrases = [("with the mouth open" if a == "mouth open" else f"a {a}") for a in actions]
    moves = [p for p in phrases if not p.startswith("with")]
    s = "The person makes " + " and ".join(moves) if moves else "The person stays still"
    if "mouth open" in actions:
        s += ", with the mouth open"
    return s + "."


def emotion_caption(emotion, intensity, aus):
    if emotion == "neutral":
        return "The person shows a neutral expression with no facial action units."
    names = [au_label(c) for c in aus]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The person shows {emotion} of {intensity} intensity, with {listed}."


def affective_tree(spec):
    """The reference tree text (the affective-tree format of docs/design.md) for a single-emotion clip."""
    app = spec["appearance"]
    attr = [f"gender={app['gender']}", f"age={app['age']}",
            "hair=bald" if app["hair_len"] == "bald" else f"hair={app['hair_len']} {app['hair_colour']}"]
    if app["beard"]:
        attr.append("facial hair=beard")
    attr += [f"accessory={a}" for a in ("glasses", "hat") if app[a]]
    attr.append(f"pose={spec['pose']}")
    attr += [f"action={a}" for a in spec["actions"] if a != "none"]
    expr = [au_label(c) for c in spec["aus"]] or ["none"]
    emo = emotion_fine_label(spec["emotion"], spec["intensity"])
    return ("<think>\n"
            f"attribute: {'; '.join(attr)}\n"
            f"expression: {'; '.join(expr)}\n"
            f"emotion: {emo}\n"
            "</think>\n"
            f"<answer>{spec['emotion']}</answer>")


def make_record(rng, video, task, answer, labels, tree=None):
    q = QUESTIONS[task][int(rng.integers(len(QUESTIONS[task])))]
    rec = {"messages": [{"role": "user", "content": "<video>" + q}, {"role": "assistant", "content": answer}],
           "videos": [video], "task": task, "level": TASKS[task][0], "labels": list(labels)}
    if tree is not None:
        rec["tree"] = tree
    return rec


def pick_balanced(rng, items, key, classes):
    """Subsample items so that every class present gets the same count (the smallest non-zero count)."""
    groups = {c: [it for it in items if key(it) == c] for c in classes}
    m = min((len(g) for g in groups.values() if g), default=0)
    out = []
    for c in classes:
        g = groups[c]
        out += [g[i] for i in sorted(rng.permutation(len(g))[:m])]
    return out


def split_records(rng, specs, videos):
    """All task records of one split. Several tasks share a clip; each task's classes are balanced."""
    recs = []

    def add(i, task, answer, labels, tree=None):
        recs.append(make_record(rng, videos[i], task, answer, labels, tree))

    expr = [i for i, s in enumerate(specs) if s["kind"] == "expr"]
    blend = [i for i, s in enumerate(specs) if s["kind"] == "blend"]
    for i, s in enumerate(specs):
        app = s["appearance"]
        if s["kind"] == "attr":
            labs = appearance_labels(app)
            static = s["head_motion"] in ("none", "head nod", "head shake")
            add(i, "appearance_recognition", ", ".join(labs), labs)
            add(i, "appearance_caption", appearance_caption(app, s["pose"] if static else None),
                labs + ([s["pose"]] if static else []))
            add(i, "action_recognition", ", ".join(s["actions"]), s["actions"])
            add(i, "action_caption", action_caption(s["actions"]), s["actions"])
            if s["head_motion"] == "none":
                add(i, "head_pose", s["pose"], [s["pose"]])
        elif s["kind"] == "identity":
            add(i, "identity", s["identity"], [s["identity"]])
        elif s["kind"] == "expr":
            e, it = s["emotion"], s["intensity"]
            aus = [au_label(c) for c in s["aus"]]
            add(i, "emotion_single", e, [e])
            add(i, "emotion_caption", emotion_caption(e, it, s["aus"]), [e] + ([it] if e != "neutral" else []) + aus)
            tree = affective_tree(s)
            add(i, "fine_grained_caption", tree, [e], tree)
            if aus:
                add(i, "au_detection", ", ".join(aus), aus)
        elif s["kind"] == "blend":
            emos = [e for e in EMOTIONS if e in s["emotions"]]
            aus = [au_label(c) for c in s["aus"]]
            add(i, "emotion_multi", ", ".join(emos), emos)
            add(i, "au_detection", ", ".join(aus), aus)
        elif s["kind"] == "micro":
            add(i, "micro_expression", s["micro"], [s["micro"]])
        elif s["kind"] == "transition":
            lab = f"{s['transition'][0]} to {s['transition'][1]}"
            add(i, "emotion_transition", lab, [lab])
    # tasks that reuse single-emotion clips with their own class balance
    fine_classes = ["neutral"] + [emotion_fine_label(e, it) for e in EMOTIONS[1:] for it in INTENSITIES]
    fine_key = lambda i: emotion_fine_label(specs[i]["emotion"], specs[i]["intensity"])
    for i in pick_balanced(rng, expr, fine_key, fine_classes):
        add(i, "emotion_fine", fine_key(i), [fine_key(i)])
    for i in pick_balanced(rng, expr, lambda i: VALENCE[specs[i]["emotion"]], SENTIMENTS3):
        v = VALENCE[specs[i]["emotion"]]
        add(i, "sentiment_single", v, [v])
    s5_key = lambda i: sentiment_fine_label(specs[i]["emotion"], specs[i]["intensity"])
    for i in pick_balanced(rng, expr, s5_key, SENTIMENTS5):
        add(i, "sentiment_fine", s5_key(i), [s5_key(i)])
    # single-label examples for emotion_multi: as many as blends, balanced over emotions
    groups = [[i for i in expr if specs[i]["emotion"] == e] for e in EMOTIONS]
    groups = [[g[j] for j in rng.permutation(len(g))] for g in groups]
    round_robin = [g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)]
    for i in round_robin[: max(1, len(blend))]:
        add(i, "emotion_multi", specs[i]["emotion"], [specs[i]["emotion"]])
    return [recs[j] for j in rng.permutation(len(recs))]


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: numpy rasteriser in 112-pixel units, scaled to `size`

SKINS = [(250, 222, 196), (232, 186, 146), (192, 136, 96), (152, 102, 70)]
HAIR_RGB = {"black": (30, 28, 28), "brown": (116, 70, 34), "blonde": (240, 206, 100), "red": (206, 70, 34),
            "gray": (140, 140, 146)}
BACKGROUND = (205, 225, 240)
BACKGROUNDS = [(205, 225, 240), (235, 230, 205), (215, 240, 215), (240, 215, 225), (225, 225, 225), (200, 205, 240)]
DARK = (28, 22, 20)
HAT_RGB, BRIM_RGB = (40, 125, 70), (25, 90, 50)
GLASSES_RGB = (20, 20, 24)
CHEEK_RGB = (240, 112, 128)
LIP_RGB = {"female": (214, 30, 62), "male": (112, 42, 40)}
MOUTH_IN, TEETH = (52, 14, 20), (250, 250, 250)
HEAD_AB = {"round": (38.0, 44.0), "oval": (33.0, 47.0), "square": (37.0, 44.0)}


class Painter:
    """Paints filled shapes on an HxWx3 uint8 image, each only inside its bounding box (fast for small shapes).
    Coordinates are 112-pixel units; `clip` restricts painting to a full-frame boolean mask."""

    def __init__(self, img, unit):
        self.img, self.u = img, unit
        self.S = img.shape[0]

    def _box(self, x0, y0, x1, y1):
        u, S = self.u, self.S
        c0, c1 = max(0, int(math.floor(x0 * u))), min(S, int(math.ceil(x1 * u)) + 1)
        r0, r1 = max(0, int(math.floor(y0 * u))), min(S, int(math.ceil(y1 * u)) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        X = ((np.arange(c0, c1) + 0.5) / u)[None, :]  # [1, w] pixel centres in 112-units
        Y = ((np.arange(r0, r1) + 0.5) / u)[:, None]  # [h, 1]
        return (slice(r0, r1), slice(c0, c1)), X, Y

    def paint(self, box, mask_fn, colour, clip=None):
        b = self._box(*box)
        if b is None:
            return
        sl, X, Y = b
        m = np.broadcast_to(mask_fn(X, Y), (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
        if clip is not None:
            m = m & clip[sl]
        self.img[sl][m] = colour

    def ellipse(self, cx, cy, a, b, colour, clip=None, p=2.0):
        self.paint((cx - a, cy - b, cx + a, cy + b),
                   lambda X, Y: np.abs((X - cx) / a) ** p + np.abs((Y - cy) / b) ** p <= 1.0, colour, clip)

    def ring(self, cx, cy, a, b, t, colour):
        def m(X, Y):
            outer = ((X - cx) / (a + t / 2)) ** 2 + ((Y - cy) / (b + t / 2)) ** 2 <= 1.0
            inner = ((X - cx) / (a - t / 2)) ** 2 + ((Y - cy) / (b - t / 2)) ** 2 < 1.0
            return outer & ~inner
        self.paint((cx - a - t, cy - b - t, cx + a + t, cy + b + t), m, colour)

    def rect(self, x0, y0, x1, y1, colour, clip=None):
        self.paint((x0, y0, x1, y1), lambda X, Y: (X >= x0) & (X <= x1) & (Y >= y0) & (Y <= y1), colour, clip)

    def segment(self, x0, y0, x1, y1, r, colour, clip=None):
        """Thick line (a capsule of radius r)."""
        dx, dy = x1 - x0, y1 - y0
        L2 = max(dx * dx + dy * dy, 1e-9)

        def m(X, Y):
            t = np.clip(((X - x0) * dx + (Y - y0) * dy) / L2, 0.0, 1.0)
            return (X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2 <= r * r
        self.paint((min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r), m, colour, clip)


def shade(rgb, f):
    return tuple(int(min(255, max(0, c * f))) for c in rgb)


def render_frame(spec, t, size):
    """Frame t of a clip as uint8 [size, size, 3]."""
    app, fr = spec["appearance"], spec["frames"]
    au = dict(zip(AU_CODES, fr["au"][t]))
    fx, fy, blink, mouth_act = fr["fx"][t], fr["fy"][t], fr["blink"][t], fr["mouth_act"][t]
    jx, jy, js = spec["jitter"]
    bg = BACKGROUND if spec["background"] < 0 else BACKGROUNDS[spec["background"]]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    P = Painter(img, size / 112.0)
    skin = SKINS[app["skin"]]
    line = shade(skin, 0.55)
    hair = HAIR_RGB[app["hair_colour"]]
    a, b = HEAD_AB[app["face"]]
    a, b = a * js, b * js
    p = 4.0 if app["face"] == "square" else 2.0
    cx, cy = 56.0 + jx, 62.0 + jy
    hcx, hcy = cx + 0.3 * fx, cy + 0.3 * fy        # the head outline follows the pose a little
    fcx, fcy = cx + fx, cy + fy                    # the features follow it fully
    eye_y, brow_y, nose_y, mouth_y = fcy - 2, fcy - 17, fcy + 10, fcy + 25
    hairline = cy - b + 13 + fy

    # head (neck, long hair behind, face) and a full-frame head mask to keep skin marks on the face
    P.rect(hcx - 13, hcy + 0.6 * b, hcx + 13, 200, shade(skin, 0.85))
    if app["hair_len"] == "long":
        P.paint((hcx - a - 9, hcy - b - 6, hcx + a + 9, hcy + 30),
                lambda X, Y: (((X - hcx) / (a + 9)) ** 2 + ((Y - hcy + 4) / (b + 2)) ** 2 <= 1) & (Y <= hcy + 30),
                hair)
    X = ((np.arange(size) + 0.5) / P.u)[None, :]
    Y = ((np.arange(size) + 0.5) / P.u)[:, None]
    head = np.abs((X - hcx) / a) ** p + np.abs((Y - hcy) / b) ** p <= 1.0  # [S, S]
    img[head] = skin

    # skin marks: cheeks (AU6), age lines
    if au[6] > 0:
        for s in (-1, 1):
            P.ellipse(fcx + s * 21, eye_y + 14, 3 + 4.5 * au[6], 3 + 4.5 * au[6], CHEEK_RGB, clip=head)
    wrinkle = shade(skin, 0.42)
    if app["age"] in ("adult", "elderly"):  # nasolabial folds
        for s in (-1, 1):
            P.segment(fcx + s * 9.5, nose_y + 3, fcx + s * 17.5, mouth_y + 2, 1.6, wrinkle, clip=head)
    if app["age"] == "adult":  # one forehead line
        P.segment(fcx - 12, hairline + 6, fcx + 12, hairline + 6, 1.6, wrinkle, clip=head)
    if app["age"] == "elderly":  # two forehead lines, crow's feet, jowl lines
        for yy in (hairline + 4.5, hairline + 9):
            P.segment(fcx - 15, yy, fcx + 15, yy, 1.6, wrinkle, clip=head)
        for s in (-1, 1):
            for k in (-1, 0, 1):
                P.segment(fcx + s * 28, eye_y + 3 * k, fcx + s * 34, eye_y + 5 * k, 1.3, wrinkle, clip=head)
            P.segment(fcx + s * 15, mouth_y + 4, fcx + s * 17, mouth_y + 12, 1.4, wrinkle, clip=head)
    if app["beard"]:
        beard_rgb = shade(hair if app["hair_len"] != "bald" else HAIR_RGB["gray"], 0.8)
        lo = mouth_y + 5 + 6 * au[26]
        P.paint((hcx - a, eye_y + 8, hcx + a, hcy + b),
                lambda X, Y: (Y >= lo) | ((np.abs(X - hcx) >= 0.74 * a) & (Y >= eye_y + 8)), beard_rgb, clip=head)
    # hair on top (short or long) and short sideburns
    if app["hair_len"] != "bald":
        P.paint((hcx - a - 4, hcy - b - 6, hcx + a + 4, hairline + 8),  # a cap with some volume on top
                lambda X, Y: (((X - hcx) / (a + 3)) ** p + ((Y - hcy + 2) / (b + 4)) ** p <= 1)
                & (Y <= hairline + 6 * ((X - fcx) / a) ** 2), hair)
        if app["hair_len"] == "short":  # sideburns: hair colour stays visible under a hat
            for s in (-1, 1):
                x_out = hcx + s * (a + 1)
                P.paint((min(x_out, hcx + s * (a - 7)), hairline, max(x_out, hcx + s * (a - 7)), eye_y + 4),
                        lambda X, Y: np.abs(X - hcx) >= a - 7, hair, clip=head)
    # nose (points the way the head turns) and AU9 wrinkles
    ndx = 0.5 * fx
    P.segment(fcx, eye_y + 3, fcx + ndx, nose_y - 2, 1.3, line)
    P.ellipse(fcx + ndx, nose_y, 4.5 + 3 * au[9], 2.8, line)
    if au[9] > 0:
        half = 3 + 3 * au[9]
        for yy in (eye_y + 4, eye_y + 7.5):
            P.segment(fcx - half, yy, fcx + half, yy, 1.2, DARK)
    # eyes: white with a black pupil; AU5 opens them wide, AU6 squints, blink closes them
    for s in (-1, 1):
        ex = fcx + s * 16
        if blink:
            P.segment(ex - 8, eye_y, ex + 8, eye_y, 1.6, DARK)
            top = eye_y
        else:
            h = max(1.5, 4.0 + 5.0 * au[5] - 2.5 * au[6])
            P.ellipse(ex, eye_y, 8.5, h + 1.2, DARK)
            P.ellipse(ex, eye_y, 7.5, h, (255, 255, 255))
            r = min(3.8, h)
            P.ellipse(ex, eye_y, r, r, DARK)
            top = eye_y - h - 1
        if app["gender"] == "female":  # long lashes
            for k in range(3):
                P.segment(ex + s * (1.5 + 3 * k), top, ex + s * (3.5 + 4 * k), top - 4.5, 1.1, DARK)
    # brows: AU1 lifts the inner ends, AU2 the outer ends, AU4 lowers and pulls them together (+ furrow lines)
    for s in (-1, 1):
        xi, yi = fcx + s * (7 - 3 * au[4]), brow_y - 9 * au[1] + 6 * au[4]
        xo, yo = fcx + s * 23, brow_y - 9 * au[2] + 1.5 * au[4]
        P.segment(xi, yi, xo, yo, 2.6, DARK)
    if au[4] > 0:
        for s in (-1, 1):
            P.segment(fcx + s * 2.2, brow_y + 1, fcx + s * 2.2, brow_y + 4 + 5 * au[4], 1.1, DARK)
    # mouth: AU12/AU15 move the corners, AU20 widens, AU25/AU26 (or the mouth-open action) open it
    w = 12 + 8 * au[20] + 2 * au[12]
    c = -7 * au[12] + 7 * au[15]
    opening = max(min(14.0, 5 * au[25] + 12 * au[26]), 10.0 * mouth_act)
    my = mouth_y + 3 * au[26]
    th = 2.0  # half lip thickness

    def lips(X, Y):
        q = ((X - fcx) / w) ** 2
        yc = my + c * q
        ho = opening / 2 * np.sqrt(np.clip(1 - q, 0, 1))
        return (q <= 1) & (Y >= yc - ho - th) & (Y <= yc + ho + th)

    if app["beard"]:  # moustache, under the lips so an opening mouth stays visible
        P.segment(fcx - 9, mouth_y - 6.5, fcx + 9, mouth_y - 6.5, 2.2, beard_rgb)
    P.paint((fcx - w, my - abs(c) - opening / 2 - th, fcx + w, my + abs(c) + opening / 2 + th), lips,
            LIP_RGB[app["gender"]])
    if opening > 1.0:
        def inside(X, Y):
            q = ((X - fcx) / w) ** 2
            ho = opening / 2 * np.sqrt(np.clip(1 - q, 0, 1)) - 0.8
            return (q <= 1) & (np.abs(Y - my - c * q) < ho)

        def teeth(X, Y):
            q = ((X - fcx) / w) ** 2
            ho = opening / 2 * np.sqrt(np.clip(1 - q, 0, 1)) - 0.8
            yc = my + c * q
            return (q <= 0.8) & (np.abs(Y - yc) < ho) & (Y < yc - ho + 2.5)
        box = (fcx - w, my - abs(c) - opening / 2, fcx + w, my + abs(c) + opening / 2)
        P.paint(box, inside, MOUTH_IN)
        P.paint(box, teeth, TEETH)
    # glasses: thick frames around the eyes
    if app["glasses"]:
        for s in (-1, 1):
            ex = fcx + s * 16
            P.ring(ex, eye_y, 12.0, 10.5, 3.0, GLASSES_RGB)
            P.segment(ex + s * 12, eye_y - 2, hcx + s * (a - 1), eye_y - 4, 1.4, GLASSES_RGB, clip=head)
        P.segment(fcx - 4.5, eye_y - 3, fcx + 4.5, eye_y - 3, 1.5, GLASSES_RGB)
    # hat: a big block above the hairline
    if app["hat"]:
        P.rect(hcx - a + 6, hairline - 28, hcx + a - 6, hairline - 6, HAT_RGB)
        P.rect(hcx - a - 9, hairline - 8, hcx + a + 9, hairline - 1, BRIM_RGB)
    return img


def render_clip(spec, size):
    """uint8 [T, size, size, 3]; identical frame states are drawn once."""
    T = len(spec["frames"]["au"])
    out, cache = [], {}
    fr = spec["frames"]
    for t in range(T):
        key = (tuple(fr["au"][t]), fr["fx"][t], fr["fy"][t], fr["blink"][t], fr["mouth_act"][t])
        if key not in cache:
            cache[key] = render_frame(spec, t, size)
        out.append(cache[key])
    video = np.stack(out)
    if spec["noise"] > 0:
        rng = np.random.default_rng(spec["noise_seed"])
        video = np.clip(video + rng.normal(0, spec["noise"], video.shape), 0, 255).astype(np.uint8)
    return video


def rgb_to_yuv420p(frame):
    """uint8 [H, W, 3] RGB -> uint8 [H * 3 // 2, W] planar YUV 4:2:0 (BT.601, limited range), in exact integer
    arithmetic: swscale's own conversion takes CPU-dependent SIMD paths, so its bytes vary from machine to machine."""
    H, W, _ = frame.shape
    if H % 2 or W % 2:
        raise ValueError(f"rgb_to_yuv420p: {H}x{W} frame; 4:2:0 needs even sides")
    x = frame.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16  # [H, W]
    q = x.reshape(H // 2, 2, W // 2, 2, 3).sum(axis=(1, 3))  # [H/2, W/2, 3]: 2x2 sums (4x the mean)
    r, g, b = q[..., 0], q[..., 1], q[..., 2]
    u = ((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128  # the mean's rounding folded into one shift
    v = ((112 * r - 94 * g - 18 * b + 512) >> 10) + 128
    flat = np.concatenate([y.ravel(), u.ravel(), v.ravel()])  # the Y, U, V planes back to back (PyAV's layout)
    return np.clip(flat, 0, 255).astype(np.uint8).reshape(H * 3 // 2, W)


def write_mp4(path, frames, fps, codec=None):
    """frames uint8 [T, H, W, 3] -> H.264 (libx264 when PyAV's ffmpeg has it, else MPEG-4 part 2), yuv420p.
    Byte-identical for any machine and worker count: our own integer RGB->YUV, one encoder thread, x264's
    cpu-independent mode (no CPU-specific algorithm choices) and bit-exact muxing."""
    import av
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    tmp = str(path) + ".tmp"
    with av.open(tmp, "w", format="mp4", options={"fflags": "+bitexact"}) as c:
        st = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        st.codec_context.flags |= av.codec.context.Flags.bitexact
        if codec == "libx264":
            st.options = {"crf": "18", "preset": "fast", "threads": "1",
                          "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:cpu-independent=1"}
        else:
            st.options = {"qscale": "3", "threads": "1"}
            st.codec_context.qscale = 3
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")
            vf.pts = i
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    os.replace(tmp, path)


def _render_jobs(jobs, size, fps):
    for spec, path in jobs:
        write_mp4(path, render_clip(spec, size), fps)


def render_all(jobs, size, fps, workers):
    """Render and encode clips in `workers` forked processes (fork: nothing is pickled, so this works when the
    module was loaded from a file path). Serial where fork is unavailable."""
    if workers <= 1 or "fork" not in mp.get_all_start_methods() or len(jobs) < 2 * workers:
        _render_jobs(jobs, size, fps)
        return
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_render_jobs, args=(jobs[w::workers], size, fps)) for w in range(workers)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    bad = [pr.exitcode for pr in procs if pr.exitcode != 0]
    if bad:
        raise RuntimeError(f"EmoSynth: a render worker failed (exit codes {bad})")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE on the records' text (lossless round trip), Qwen special tokens and chat template

def train_tokenizer(texts, out_dir, vocab_size):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    special = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIAL[1:])
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=None, unk_token=None, add_bos_token=False,
                  add_prefix_space=False, clean_up_tokenization_spaces=False, split_special_tokens=False,
                  model_max_length=4096, errors="replace", chat_template=CHAT_TEMPLATE, **special)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tok.get_vocab_size()


# ----------------------------------------------------------------------------------------------------------------------

def digest(out_dir):
    """sha256 over every file a build writes (names and bytes, sorted), done.json and the marker aside."""
    import hashlib
    h = hashlib.sha256()
    root = Path(out_dir)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("done.json", ".emosynth"):
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def prepare(out_dir=DEFAULT_OUT, force=False, verbose=True, **kwargs):
    """Build EmoSynth into out_dir (a no-op when done.json there matches these arguments). Returns out_dir."""
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"prepare(): unknown argument(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    try:
        args = {k: type(v)(kwargs.get(k, v)) for k, v in DEFAULTS.items()}
    except (TypeError, ValueError) as e:
        raise TypeError(f"prepare(): bad argument value ({e})") from None
    T, size, fps = int(args["frames"]), int(args["size"]), float(args["fps"])
    if T < 4 or T % 2:
        raise ValueError(f"frames={T}: need an even number >= 4 (Qwen temporal patches are 2 frames)")
    if size < 28 or size % 2:
        raise ValueError(f"size={size}: need an even number >= 28 (the videos are YUV 4:2:0)")
    out_dir = Path(out_dir)
    done = out_dir / "done.json"
    want = dict(args, version=VERSION)
    want.pop("workers")  # the worker count does not change the output
    if done.is_file() and not force:
        try:
            if json.loads(done.read_text()).get("args") == want:
                if verbose:
                    print(f"EmoSynth already built in {out_dir}")
                return out_dir
        except json.JSONDecodeError:
            pass
    t0 = time.time()
    marker = out_dir / ".emosynth"  # only ever delete what an EmoSynth build wrote
    if (out_dir / "videos").exists() and not marker.exists():
        raise FileExistsError(f"{out_dir}: has a videos/ folder that EmoSynth did not write; refusing to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if done.exists():
        done.unlink()
    for name in ("videos", "tokenizer"):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)

    # plan every split (one RNG stream per split and purpose), then records, then render in parallel
    ss = np.random.SeedSequence([int(args["seed"]), DRAW])
    plan_seq, rec_seq = ss.spawn(2)
    splits = {"train": int(args["num_train"]), "val": int(args["num_val"]), "test": int(args["num_test"])}
    jobs, records, meta, idx = [], {}, [], 0
    for (split, n), pseq, rseq in zip(splits.items(), plan_seq.spawn(3), rec_seq.spawn(3)):
        specs = plan_split(np.random.default_rng(pseq), n, T, int(args["difficulty"]))
        videos = []
        for s in specs:
            rel = f"videos/{idx:06d}.mp4"
            videos.append(rel)
            jobs.append((s, out_dir / rel))
            meta.append(dict(video=rel, split=split, **s))
            idx += 1
        records[split] = split_records(np.random.default_rng(rseq), specs, videos)
    t1 = time.time()
    render_all(jobs, size, fps, int(args["workers"]))
    t2 = time.time()
    for split, recs in records.items():
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    with open(out_dir / "meta.jsonl", "w") as f:
        for m in meta:
            f.write(json.dumps(m) + "\n")
    texts = [SYSTEM_PROMPT, "system\nuser\nassistant\n"] + [", ".join(APPEARANCE + ACTIONS + POSES + EMOTIONS)]
    texts += [m["content"] for r in records["train"] for m in r["messages"]]
    vocab = train_tokenizer(texts, out_dir / "tokenizer", int(args["vocab_size"]))
    counts = {split: {task: sum(r["task"] == task for r in recs) for task in TASKS} for split, recs in records.items()}
    info = dict(args=want, clips=splits, records={s: len(r) for s, r in records.items()}, per_task=counts,
                vocab_size=vocab, digest=digest(out_dir))  # no timings: two builds are the same bytes, done.json too
    done.write_text(json.dumps(info, indent=2) + "\n")  # last: marks the build complete
    if verbose:
        print(f"EmoSynth: {idx} clips ({t2 - t1:.1f}s render), records {info['records']}, vocab {vocab}, "
              f"{time.time() - t0:.1f}s total -> {out_dir}")
        for task in TASKS:
            print(f"  {task:24s} " + " ".join(f"{s}={counts[s][task]:5d}" for s in splits))
    return out_dir


def main():
    # the same --key=value convention (and --help) as every VidEmo script: the keys are DEFAULTS + out_dir + force
    cfg = common.configure(dict(DEFAULTS, out_dir=str(DEFAULT_OUT), force=False))
    prepare(cfg.pop("out_dir"), force=cfg.pop("force"), **cfg)


if __name__ == "__main__":
    common.run(main)
