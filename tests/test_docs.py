"""The docs against the code: every backticked `module.name` in README.md and docs/*.md names something that exists,
every backticked `--key` of a script is one of its config keys, the README stays a front door (<= 250 lines), and no
page tells the story of how it was written instead of what the code does."""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_sft", "train_rl", "eval", "sample", "bench", "gpu_check", "plot")  # parsed, never imported
SCRIPT_FILES = {s: ROOT / f"{s}.py" for s in SCRIPTS} | {"prepare": ROOT / "data" / "emosynth" / "prepare.py"}
MODULES = sorted({p.stem for p in ROOT.glob("*.py")} | {"kernels", "kernels.logprobs", "kernels.token_compress"})
# what a backticked file name ends with: `eval.json`, `model.safetensors`, `train_sft.py` are files, not attributes
FILE_ENDINGS = {"py", "json", "jsonl", "md", "safetensors", "pt", "png", "html", "txt", "mp4", "jinja", "old", "tmp",
                "index", "yaml", "csv"}
NARRATIVE = [r"\bissue\s*#?\d+", r"\bthis session\b", r"\bshort by\b", r"\bno GPU (?:was|has been) lent",
             r"\b(?:pre|post)-\s*(?:and post-)?refactor", r"\bsession \d", r"\bthis branch\b", r"\bby me\b"]
MAX_README_LINES = 250
# flags of other programs that appear in our commands
FOREIGN_FLAGS = {"standalone", "nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id",
                 "help", "key", "flag", "signal", "durations"}  # torchrun's; --help; the placeholders `--key=value`,
# `--flag`; Slurm's sbatch --signal; pytest's --durations


def doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_spans(text):
    """(line number, content) of every inline `code` span (may wrap lines) and every line of a fenced block."""
    spans, fenced = [], False
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            spans.append((i, line))
    prose = re.sub(r"^\s*```.*?^\s*```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    for m in re.finditer(r"`([^`]+)`", prose):
        spans.append((prose.count("\n", 0, m.start()) + 1, m.group(1)))
    return spans


# ----------------------------------------------------------------------------------------------------------------------
# `module.name` references


def _ast_names(tree_body):
    """Names bound at one level of a module or class body: def, class, assignment, import."""
    names = {}
    for node in tree_body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # names bound inside a module-level if / try
            for body in ("body", "orelse", "finalbody"):
                names.update(_ast_names(getattr(node, body, [])))
    return names


def _class_attrs(cls):
    """A class's attributes as the source shows them: its body's names and every `self.X = ...` in its methods."""
    names = set(_ast_names(cls.body))
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self":
                    names.add(n.attr)
    for base in cls.bases:  # nn.Module / dataclass machinery is not ours: accept what the base class gives
        names.add(f"<base {ast.unparse(base)}>")
    return names


def _module_path(module):
    parts = module.split(".")
    return ROOT.joinpath(*parts[:-1], parts[-1] + ".py") if len(parts) > 1 or module != "kernels" \
        else ROOT / "kernels" / "__init__.py"


def resolve(module, attrs):
    """None if module.attrs exists, else why not. Library modules are imported (what a reader gets); entry scripts
    are parsed (importing them would be running them); attributes of a class are looked up in its source too
    (instance attributes set in methods)."""
    path = _module_path(module)
    if not path.exists():
        return f"no module {module}"
    if not attrs:
        return None
    tree = ast.parse(path.read_text(), str(path))
    names = _ast_names(tree.body)
    if module not in SCRIPTS:
        obj = importlib.import_module(module)
        try:
            for i, a in enumerate(attrs):
                obj = getattr(obj, a)
            return None
        except AttributeError:
            pass  # an instance attribute, perhaps: the source decides
    node = names.get(attrs[0])
    if node is None:
        return f"{module} has no top-level {attrs[0]}"
    for a in attrs[1:]:
        if not isinstance(node, ast.ClassDef):
            return f"{module}.{attrs[0]} is not a class, so .{a} cannot be checked"
        if a not in _class_attrs(node):
            return f"class {module}.{node.name} has no attribute {a}"
        node = {**_ast_names(node.body)}.get(a)
    return None


REF = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?", re.S)


def references(text):
    """(line, dotted name) of every backticked `module.attr[.attr]` (optionally called: `lr_at(...)`) whose first
    part is one of the repository's modules; file names (`eval.json`) are not references."""
    out = []
    for line, span in code_spans(text):
        m = REF.fullmatch(span.strip())
        if not m:
            continue
        parts = m.group(1).split(".")
        if parts[-1] in FILE_ENDINGS:
            continue
        module = ".".join(parts[:2]) if ".".join(parts[:2]) in MODULES else parts[0]
        if module not in MODULES:
            continue
        attrs = parts[len(module.split(".")):]
        if len(attrs) > 2:  # a path inside something else (a transformers module name), not ours
            continue
        out.append((line, module, attrs))
    return out


def broken_references(text):
    return [f"line {line}: `{'.'.join([module, *attrs])}`: {why}" for line, module, attrs in references(text)
            if (why := resolve(module, attrs))]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_module_references_resolve(doc):
    bad = broken_references(doc.read_text())
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_docs_reference_check_catches_made_up_names():
    text = ("`grpo.Objective` and `grpo.Objective.begin` and `reward.terms(completion, record)` and "
            "`train_rl.rollout` and `kernels.logprobs.token_logprobs` and `grpo.Rollout.select` and `eval.json`\n"
            "`grpo.subset`\n`train_rl.train`\n`grpo.Rollout.no_such_field`\n`kernels.nope.f`\n`reward.REWARD_X`\n"
            "```\nx = `not code`\n```\n`trainer.NonFiniteGuard.ok`\n`grpo.PromptStream.pos`\n")
    assert len(references(text)) == 13  # `eval.json` is a file; `kernels.nope.f` is not a module: not a reference
    bad = broken_references(text)
    assert [b.split(":")[0] for b in bad] == ["line 2", "line 3", "line 4", "line 5", "line 6"], bad
    assert "grpo.subset" in bad[0] and "train_rl.train" in bad[1] and "no_such_field" in bad[2]


# ----------------------------------------------------------------------------------------------------------------------
# `--key` of a script


def script_keys(name):
    """The config keys of a script, read the way common.configure reads them: `configure(globals())` takes the
    module-level names; `configure(dict(DEFAULTS, k=...))` the dict's keys and the keywords."""
    path = SCRIPT_FILES[name]
    tree = ast.parse(path.read_text(), str(path))
    top = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
           if isinstance(t, ast.Name)}
    keys = set()

    def dict_keys(expr):
        if isinstance(expr, ast.Call) and ast.unparse(expr.func) == "dict":
            out = {k.arg for k in expr.keywords if k.arg}
            for a in expr.args:
                out |= dict_keys(top.get(a.id) if isinstance(a, ast.Name) else a)
            return out
        if isinstance(expr, ast.Dict):
            return {k.value for k in expr.keys if isinstance(k, ast.Constant)}
        return set()

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("configure") and node.args:
            arg = node.args[0]
            if ast.unparse(arg) == "globals()":
                keys |= {k for k in top if not k.isupper() and not k.startswith("_")}
            else:
                keys |= dict_keys(arg)
    assert keys, f"{path.name}: no common.configure call found"
    return keys


KEY = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)(?=[=\s`\"'),]|$)")
SCRIPT_NAME = re.compile(r"\b(train_sft|train_rl|eval|sample|bench|gpu_check|plot|prepare)\.py\b")


def bad_keys(text):
    """Every `--key` in a code span: a key of the script the span (or else its line) names, or when neither names
    one, a key of some script."""
    keys = {s: script_keys(s) for s in SCRIPT_FILES}
    every = set().union(*keys.values()) | FOREIGN_FLAGS
    lines = text.split("\n")
    bad = []
    for line, span in code_spans(text):
        named = set(SCRIPT_NAME.findall(span)) or set(SCRIPT_NAME.findall(lines[line - 1]))
        allowed = set().union(*(keys[s] for s in named)) | FOREIGN_FLAGS if named else every
        for k in KEY.findall(span):
            if k not in allowed:
                bad.append(f"line {line}: --{k} is not a key of {', '.join(sorted(named)) or 'any script'}")
    return bad


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_script_keys_exist(doc):
    bad = bad_keys(doc.read_text())
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_docs_key_check_catches_made_up_keys():
    text = ("`python train_rl.py --num_generations=4 --no_such_key=1`\n"
            "In `train_sft.py`, `--beta=0.1` is not a key (it is train_rl's).\n"
            "```bash\ntorchrun --standalone --nproc_per_node=8 train_sft.py --lr=1e-4 --typo_key=2\n```\n"
            "`--never_a_key` anywhere\n`--w_<term>` is a pattern, not a key\n")
    assert bad_keys(text) == ["line 4: --typo_key is not a key of train_sft", "line 1: --no_such_key is not a key "
                              "of train_rl", "line 2: --beta is not a key of train_sft",
                              "line 6: --never_a_key is not a key of any script"]
    assert {"num_train", "difficulty", "out_dir", "force"} <= script_keys("prepare")
    assert {"num_generations", "w_tree", "beta"} <= script_keys("train_rl") and "RESUME_BREAKING" not in \
        script_keys("train_rl")


# ----------------------------------------------------------------------------------------------------------------------
# the README is a front door; the docs describe the code, not its history


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"
    assert "python -m pytest -q tests" in text  # .ci/run runs the README's test command
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", text):
        assert (ROOT / link).exists(), link
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text))
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}, "every docs/ page is linked from the README"


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_anchors(path, text):
    """Every [..](file.md#anchor) / [..](#anchor) link whose heading does not exist in its target file."""
    bad = []
    for target, anchor in re.findall(r"\]\(([^)#:\s]*)#([^)\s]+)\)", text):
        dest = (path.parent / target) if target else path
        if dest.suffix != ".md" or not dest.exists():
            continue  # test_house checks that the file exists
        heads = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
        if anchor not in heads:
            bad.append(f"{target or path.name}#{anchor}")
    return bad


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_anchors_resolve(doc):
    assert not broken_anchors(doc, doc.read_text()), broken_anchors(doc, doc.read_text())


def test_docs_anchor_check_catches_a_missing_heading():
    assert slug("3d. The curriculum, studied") == "3d-the-curriculum-studied"
    assert slug("Stage 2: the default (`python train_rl.py`)") == "stage-2-the-default-python-train_rlpy"
    text = "[a](README.md#layout) [b](README.md#no-such-heading) [c](docs/method.md#4-tests)"
    assert broken_anchors(ROOT / "x.md", text) == ["README.md#no-such-heading"]


def narrative(text):
    return [m.group(0) for pat in NARRATIVE for m in re.finditer(pat, text, re.I)]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_code_not_its_history(doc):
    found = narrative(doc.read_text())
    assert not found, f"{doc.relative_to(ROOT)}: {found}"


def test_docs_narrative_check_catches_phrases():
    assert narrative("Fixed in issue 15; measured in this session, short by 0.1") == \
        ["issue 15", "this session", "short by"]
    assert narrative("the issue of padding; a session of training") == []
