"""Config overrides and atomic checkpoints (common.py)."""
import os
import subprocess
import sys
import textwrap

import pytest

import common


def defaults():
    return {"batch_size": 16, "lr": 1e-3, "name": "out", "flag": False, "epochs": (1.0, 1.0), "opt": None}


def test_overrides_and_types(tmp_path):
    g = defaults()
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 4\nlr = 2e-4\n")
    cfg = common.configure(g, [str(cfg_file), "--lr=3e-4", "--flag=True", "--epochs=(2, 0.5)", "--name=run1",
                               "--opt=7"])
    assert cfg == {"batch_size": 4, "lr": 3e-4, "name": "run1", "flag": True, "epochs": (2, 0.5), "opt": 7}
    assert g["lr"] == 3e-4  # the script's globals are updated
    assert isinstance(common.configure(defaults(), ["--lr=1"])["lr"], float)  # int literal is fine for a float


@pytest.mark.parametrize("argv,needle", [
    (["--bacth_size=4"], "bacth_size"),  # typo: unknown key named
    (["--batch_size=0.5"], "batch_size"),  # wrong type named
    (["--flag=maybe"], "flag"),
    (["--epochs=3"], "epochs"),
    (["no_such_file.py"], "no_such_file.py"),
])
def test_bad_overrides_name_the_key(argv, needle):
    with pytest.raises(common.ConfigError, match=needle):
        common.configure(defaults(), argv)


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("learning_rate = 1.0\n")
    with pytest.raises(common.ConfigError, match="learning_rate"):
        common.configure(defaults(), [str(f)])


def test_help_lists_keys(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(os.path.dirname(common.__file__))!r})
        import common
        batch_size = 16
        lr = 1e-3
        common.configure(globals())
    """))
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--batch_size=16" in out and "--lr=0.001" in out


def write_files(n):
    def fn(d):
        for i in range(n):
            with open(os.path.join(d, f"f{i}.txt"), "w") as f:
                f.write(str(i))
    return fn


def test_checkpoint_atomic_swap(tmp_path):
    path = str(tmp_path / "ckpt")
    common.save_checkpoint(path, write_files(2), trainer_state={"step": 1})
    assert common.find_checkpoint(path) == path
    assert common.load_trainer_state(path)["step"] == 1
    common.save_checkpoint(path, write_files(3), trainer_state={"step": 2})
    assert common.load_trainer_state(path)["step"] == 2
    assert not os.path.exists(path + ".tmp") and not os.path.exists(path + ".old")


def test_trained_config_and_answer_format_of(tmp_path):
    """A checkpoint records its training config as JSON; "auto" / () resolve to it, to the trainer state when the JSON
    is gone, and to direct for a directory that is not ours; explicit values pass through."""
    import random
    rng = random.Random()
    fmt = rng.choice(["direct", "reasoning"])
    tasks = tuple(rng.sample(["emotion_single", "emotion_fine", "sentiment_single", "emotion_multi"], 2))
    path = str(tmp_path / "ckpt")
    common.save_checkpoint(path, write_files(1), trainer_state={"step": 3, "config": {"answer_format": fmt,
                                                                                       "reasoning_tasks": tasks}})
    assert common.trained_config(path) == {"answer_format": fmt, "reasoning_tasks": list(tasks)}
    assert common.answer_format_of(path, "auto", (), ("x",)) == (fmt, tasks)
    assert common.answer_format_of(path, "direct", ("y",), ("x",)) == ("direct", ("y",))
    os.remove(os.path.join(path, "train_config.json"))  # an older checkpoint: read from trainer_state.pt
    assert common.answer_format_of(path, "auto", (), ("x",)) == (fmt, tasks)
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "trainer_state.pt").write_bytes(b"not a torch file")
    assert common.trained_config(str(foreign)) == {}
    assert common.answer_format_of(str(foreign), "auto", (), ("x",)) == ("direct", ("x",))


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """A process killed in the middle of writing a checkpoint leaves the previous one complete and loadable."""
    path = str(tmp_path / "ckpt")
    common.save_checkpoint(path, write_files(1), trainer_state={"step": 5})
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys; sys.path.insert(0, {str(os.path.dirname(common.__file__))!r})
        import common
        def half_written(d):
            open(os.path.join(d, "model.safetensors"), "w").write("partial")
            os._exit(9)  # killed mid-write
        common.save_checkpoint({path!r}, half_written, trainer_state={{"step": 6}})
    """))
    r = subprocess.run([sys.executable, str(script)])
    assert r.returncode == 9
    found = common.find_checkpoint(path)
    assert found == path and common.load_trainer_state(found)["step"] == 5
    # and the next save still works
    common.save_checkpoint(path, write_files(1), trainer_state={"step": 7})
    assert common.load_trainer_state(common.find_checkpoint(path))["step"] == 7


@pytest.mark.parametrize("script,config", [("train_sft", "sft_emosynth.py"), ("train_rl", "rl_emosynth.py")])
def test_emosynth_config_files_list_the_embedded_defaults(script, config):
    """config/{sft,rl}_emosynth.py say they are what the script runs with no arguments: every value they set must be
    the script's own default (a stale copy would silently disagree with the README's numbers)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"fresh_{script}", os.path.join(root, f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)  # a fresh copy: other tests may have run (and reconfigured) it
    spec.loader.exec_module(mod)
    values = {}
    exec(open(os.path.join(root, "config", config)).read(), {}, values)
    assert values
    for key, value in values.items():
        assert hasattr(mod, key), f"{config}: {key} is not a {script} key"
        assert getattr(mod, key) == value, f"{config}: {key} = {value!r}, {script} default {getattr(mod, key)!r}"


CONFIGS = sorted(f for f in os.listdir(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "config")) if f.endswith(".py"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_recipe_is_a_valid_config_of_its_script(config):
    """Every config/ recipe loads through its script's own configure(): known keys, right types; an RL recipe's
    prompts split into whole groups per rank at the world size its header names (torchrun --nproc_per_node=N)."""
    import importlib.util
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = "train_sft" if config.startswith("sft_") else "train_rl"
    spec = importlib.util.spec_from_file_location(f"fresh_{script}_{config}", os.path.join(root, f"{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = os.path.join(root, "config", config)
    cfg = common.configure(vars(mod), [path])
    header = open(path).read()
    m = re.search(r"--nproc_per_node=(\d+)", header)
    world = int(m.group(1)) if m else 1
    assert f"{script}.py config/{config}" in header  # the header's command runs this very file
    if script == "train_rl":
        assert cfg["prompts_per_step"] % (world * cfg["grad_accum"]) == 0, (world, cfg["grad_accum"])
    assert not (cfg["fsdp"] and cfg["lora_rank"])


def test_tuple_keys_take_comma_lists():
    g = {"tasks": ("a",), "stage_epochs": (1.0, 2.0)}
    common.configure(g, ["--tasks=x, y,z"])
    assert g["tasks"] == ("x", "y", "z")
    with pytest.raises(common.ConfigError, match="stage_epochs"):
        common.configure(g, ["--stage_epochs=fast,slow"])
