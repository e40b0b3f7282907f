"""The house rules, checked on the code itself: no entry script imports another (function bodies included), every name
a function uses exists, the README's layout table and import picture match the imports, every bench section runs at
toy sizes, and no pointer in code or docs leads outside the repository."""
import ast
import builtins
import os
import re
import subprocess
import symtable
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_sft", "train_rl", "eval", "sample", "bench", "plot", "prepare", "gpu_check"}  # entry scripts (module names)


def py_files():
    skip = {".venv", ".git", "out", ".assets", "build"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def imported_modules(path):
    """Every module a file imports anywhere (module level, function bodies, importlib / runpy calls on file paths)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("spec_from_file_location", "run_path", "import_module", "__import__")):
                for arg in ast.walk(node):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.add(os.path.splitext(os.path.basename(arg.value))[0])
    return found


def module_level_imports(path):
    """The project modules a file imports at module level (what the README's picture shows)."""
    tree = ast.parse(path.read_text(), str(path))
    local = {p.stem for p in ROOT.glob("*.py")} | {"kernels"}
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & local


def test_no_entry_script_imports_another():
    code = [p for p in py_files() if p.parts[len(ROOT.parts)] != "tests"]
    assert {p.stem for p in code} >= SCRIPTS
    bad = []
    for p in code:
        for mod in imported_modules(p) & SCRIPTS - {p.stem}:
            bad.append(f"{p.relative_to(ROOT)} imports the script {mod}")
        if p.stem not in SCRIPTS and imported_modules(p) & SCRIPTS:  # a library module never imports a script
            bad.append(f"{p.relative_to(ROOT)} (a module) imports {imported_modules(p) & SCRIPTS}")
    assert not bad, bad


def test_the_scan_catches_a_script_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from eval import evaluate\n    import importlib.util\n"
                 "    importlib.util.spec_from_file_location('m', 'train_sft.py')\n")
    assert imported_modules(f) >= {"eval", "train_sft"}


def undefined_globals(path):
    """Names a function reads as globals that the module never defines (a missing import, a typo): the NameError a
    GPU-only branch would only hit on a GPU."""
    src = path.read_text()
    top = symtable.symtable(src, str(path), "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()} | set(dir(builtins))
    defined |= {"__file__", "__name__", "__doc__"}
    missing = set()

    def walk(table):
        for child in table.get_children():
            if child.get_type() == "function":
                for s in child.get_symbols():
                    if s.is_referenced() and (s.is_global() or s.is_declared_global()) and s.get_name() not in defined:
                        missing.add(f"{child.get_name()}: {s.get_name()}")
            walk(child)
    walk(top)
    return missing


def test_every_name_a_function_uses_exists():
    bad = {str(p.relative_to(ROOT)): sorted(m) for p in py_files() if (m := undefined_globals(p))}
    assert not bad, bad


def test_the_name_check_catches_a_missing_import(tmp_path):
    f = tmp_path / "y.py"
    f.write_text("import torch\n\ndef median(x):\n    return statistics.median(x) + torch.zeros(1)\n")
    assert undefined_globals(f) == {"median: statistics"}


def readme():
    return (ROOT / "README.md").read_text()


def test_readme_layout_table_and_import_picture_match_the_code():
    text = readme()
    table = text[text.index("## Layout"):text.index("### Import picture")]
    listed = set(re.findall(r"^\| `([\w/.]+\.py)` \|", table, re.M))
    on_disk = {str(p.relative_to(ROOT)) for p in ROOT.glob("*.py")} | {"data/emosynth/prepare.py"}
    assert listed == on_disk
    picture = text[text.index("### Import picture"):]
    picture = picture[picture.index("```") + 3:]
    picture = picture[:picture.index("```")]
    drawn = {}
    for line in picture.strip().splitlines():
        name, _, deps = line.partition("->")
        drawn[name.strip()] = {d.strip() for d in deps.split(",") if d.strip()}
    actual = {p.stem: module_level_imports(p) for p in ROOT.glob("*.py")}
    actual["kernels"] = set().union(*(module_level_imports(p) for p in (ROOT / "kernels").glob("*.py"))) - {"kernels"}
    assert drawn == actual


def test_no_pointer_leads_outside_the_repository():
    """No DESIGN section numbers or reference notes that live outside the repository; every relative markdown link
    and every docs/ path named in code resolves."""
    texts = {p: p.read_text() for p in py_files()} | {p: p.read_text() for p in ROOT.rglob("*.md")
                                                     if ".venv" not in p.parts and ".assets" not in p.parts}
    for p, t in texts.items():
        if p.name == "test_house.py":
            continue
        assert not re.search(r"DESIGN §|reference/[\w-]+\.md|peer-notes|\.\./shared", t), p
        for link in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", t) if p.suffix == ".md" else []:
            assert (p.parent / link).exists(), (p, link)
        for ref in re.findall(r"docs/[\w.-]+\.md", t):
            assert (ROOT / ref).exists(), (p, ref)


# ----------------------------------------------------------------------------------------------------------------------
# bench.py: every section at toy sizes (a smoke test: a NameError, a wrong key or a missing import fails it)


def test_every_bench_section_runs_at_toy_sizes(tmp_path):
    import importlib.util

    import torch

    import data as D
    from model import VidEmo
    from tiny import tokenizer_config
    spec = importlib.util.spec_from_file_location("emosynth_prepare", ROOT / "data" / "emosynth" / "prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    build = prep.prepare(tmp_path / "build", num_train=8, num_val=2, num_test=8, workers=1, verbose=False)
    tok = D.load_tokenizer(build / "tokenizer")
    torch.manual_seed(0)
    model = VidEmo(tokenizer_config(tok))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    args = ["--section=all", "--repeats=1", "--threads=1", "--batch=2", "--frames=2", "--size=56", "--new_tokens=4",
            "--data_clips=1", "--data_passes=1", "--data_workers=(0,)", "--kernel_n=64", "--kernel_v=512",
            "--kernel_d=32", "--sft_batch=2", f"--init_from={ckpt}", f"--data_dir={build}",
            "--rl_overrides=--num_generations=2 --prompts_per_step=2 --grad_accum=1 --max_completion_length=4",
            "--peer_shapes=toy", "--peer_sft_batch=2", "--peer_gen_batch=2", "--peer_gen_tokens=4",
            "--peer_grpo_prompts=2", "--peer_G=2", "--peer_grpo_tokens=4", "--sp_sizes=(56,)", "--sp_frames=(2,)",
            "--sp_G=(2,)", "--sp_completion=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for needle in ("greedy outputs identical: True", "clips/s", "peak RSS added", "| tiny (EmoSynth default) |",
                   "| 0.5 |", "| whole step |", "rollout:", "| SFT step vs transformers |",
                   "greedy tokens identical: True", "loss transformers| = ", "| time / token ratio |",
                   "| decode time ratio | same tokens |"):
        assert needle in out, (needle, out[-3000:])
    assert re.search(r"\| 2 x 56² \| \d+ \| 2 \|.*\| yes \|", out), out[-3000:]  # kv_cache: grouped = copied tokens
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--section=gpu_only"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert r.returncode == 2 and "section" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["train_sft.py", "train_rl.py", "eval.py", "sample.py", "bench.py", "plot.py",
                                    "data/emosynth/prepare.py"])
def test_one_cli_convention(script):
    """Every script takes --key=value through common.configure: an unknown key is one line naming it, exit code 2
    (and --help lists the keys with their defaults)."""
    r = subprocess.run([sys.executable, str(ROOT / script), "--no_such_key=1"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "no_such_key" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    if script in ("plot.py", "data/emosynth/prepare.py"):  # the two that had their own parsers
        r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
        want = "--smooth=25" if script == "plot.py" else "--num_train=3000"
        assert r.returncode == 0 and "[--key=value ...]" in r.stdout and want in r.stdout, r.stdout
