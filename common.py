"""The one small shared module: config overrides, distributed set-up, the lr schedule, checkpoint I/O, metric
logging.

Every script keeps its defaults as module-level globals at its top and calls `configure(globals())`, nanoGPT style:

    python train_sft.py config/sft_emosynth.py --batch_size=8 --lr=3e-4
"""
import ast
import atexit
import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------------
# config


class ConfigError(ValueError):
    """A wrong config key or value: reported as one line naming the key, exit code 2."""


class InputError(Exception):
    """A problem with what the user passed (a path, a checkpoint, a video): reported as one line, exit code 2."""


def check(rules):
    """Config validation: rules = [(key, value, ok, what it must be)]; the first that fails is a ConfigError."""
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"config key '{key}': must be {want}, got {value!r}")


def run(main):
    """Run a script's main(): a config or input error (or a diverged run) is one line on stderr and exit code 2,
    never a traceback."""
    try:
        main()
    except (InputError, ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a library error type that marks itself as the user's input (model.CheckpointError, ...)
        if not getattr(type(e), "input_error", False):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    # free the DDP / FSDP modules (reference cycles) while the interpreter is whole: the process group they hold must
    # not be torn down during interpreter shutdown, where gloo's worker threads can abort the process
    gc.collect()
    cleanup_distributed()


def first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _config_keys(g):
    return {k: v for k, v in g.items()  # UPPER_CASE names are the script's constants, not config
            if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def _coerce(key, value, default):
    """Cast an override to the default's type; a mismatch is an error that names the key."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        return str(value) if value is None else _fail(key, value, default)
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(default)(value)
        if isinstance(value, str) and all(isinstance(d, str) for d in default):  # --tasks=a,b for a tuple of names
            return type(default)(x.strip() for x in value.split(",") if x.strip())
    return _fail(key, value, default)


def _fail(key, value, default):
    raise ConfigError(f"config key '{key}': expected {type(default).__name__} (default {default!r}), got {value!r}")


def _parse_literal(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s  # a bare string such as --out_dir=out


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the globals dict `g` of the calling script.
    Returns the resulting config as a plain dict (what gets logged and saved with checkpoints)."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = _config_keys(g)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {os.path.basename(sys.argv[0])} [config/file.py] [--key=value ...]\n\nkeys (default):")
        for k, v in defaults.items():
            print(f"  --{k}={v!r}")
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            scope = {"__file__": os.path.abspath(arg)}  # a config may build on another one next to it
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), scope)
            except Exception as e:  # a syntax error, a NameError, a missing file it builds on: one line, its name
                raise ConfigError(f"config file {arg}: {type(e).__name__}: {first_line(e)}") from None
            for k, v in _config_keys(scope).items():
                if k not in defaults:
                    raise ConfigError(f"unknown config key '{k}' in {arg}")
                g[k] = _coerce(k, v, defaults[k])
        else:
            if "=" not in arg:
                # --flag alone means True for boolean keys
                key, val = arg[2:], True
            else:
                key, val = arg[2:].split("=", 1)
                val = _parse_literal(val)
            if key not in defaults:
                raise ConfigError(f"unknown config key '{key}' (see --help)")
            if "=" not in arg and not isinstance(defaults[key], bool):  # `--lr 3e-4`: the value became a file name
                raise ConfigError(f"config key '{key}': give its value as --{key}=VALUE (with '=', not a space)")
            g[key] = _coerce(key, val, defaults[key])
    return {k: g[k] for k in defaults}


# ----------------------------------------------------------------------------------------------------------------------
# distributed


def setup_distributed(device="auto"):
    """torchrun-aware set-up. Returns (rank, world_size, device). gloo on CPU, NCCL on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def rank():
    """This process's global rank (0 without torchrun); LOCAL_RANK only picks the GPU within a node."""
    return int(os.environ.get("RANK", 0))


def cleanup_distributed():
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            # gloo frees a finished barrier's tensors on its own thread, which needs the GIL; DDP's reducer, freed
            # when main() returns, joins that thread with the GIL held. Let the thread finish first, or both wait
            time.sleep(0.2)
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard_model(model, bf16):
    """FSDP2 over `model` (a VidEmo): each decoder block and the vision tower are their own units (one all-gather per
    block, the tower's many small tensors in one), the embeddings / norm / LM head form the root unit. bf16: compute
    in bf16 over fp32 shards, gradients reduced in fp32. The methods the trainers call outside forward run inside the
    root's hooks, so the root (not the tower) is the unit FSDP initialises first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise ConfigError("config key 'fsdp': FSDP2 needs a process group; launch with torchrun (one GPU too: "
                          "torchrun --standalone --nproc_per_node=1 ...)")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    fully_shard(model.visual, mp_policy=mp)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for name in ("generate", "encode_video"):
        register_fsdp_forward_method(model, name)
    return model


@contextlib.contextmanager
def unsharded(model):
    """Inside: every FSDP2 unit of `model` all-gathered once and kept whole (generation runs a forward per token: per
    block per token all-gathers would dominate it). Costs one full copy of the weights in the compute dtype for the
    duration. No-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not model:  # the root never reshards after forward anyway
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model, sharded):
    """The full model state dict on CPU: gathered from the shards under FSDP2 (a collective: every rank calls it;
    rank 0 gets the tensors), the module's own tensors otherwise."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(model, optimizer, sharded):
    """AdamW's state with full (unsharded) tensors, so that a checkpoint does not depend on the world size layout."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer_state(model, optimizer, sd, sharded):
    if not sharded:
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------------------------------
# learning-rate schedule


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warmup over `warmup` steps, then cosine from lr to min_lr at `total`; a pure function of the step, so
    a resumed run gets exactly the uninterrupted run's rates."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------------
# RNG state (for exact resume)


def rng_state():
    """Every RNG's state as tensors and plain values only (so resume loads it with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints: a directory = HF model + tokenizer + trainer_state.pt, written to a temporary name then renamed


def save_checkpoint(path, model_state_fn, tokenizer=None, trainer_state=None):
    """`model_state_fn(dir)` writes the HF-format model into dir. Atomic at the directory level: a crash at any point
    leaves either the previous checkpoint or the new one at `path`, never half of one."""
    path = os.path.abspath(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model_state_fn(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        if isinstance(trainer_state.get("config"), dict):  # readable without torch: eval.py / train_rl.py read it
            with open(os.path.join(tmp, "train_config.json"), "w") as f:
                json.dump(trainer_state["config"], f, indent=1, default=repr)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S"))
    _fsync_dir(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def trained_config(ckpt_dir):
    """The training config one of our checkpoints was written with (train_config.json, else its trainer_state.pt,
    memory-mapped so a large optimizer state is not read); {} for a checkpoint from elsewhere or an unreadable one."""
    try:
        with open(os.path.join(ckpt_dir, "train_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        try:
            cfg = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), map_location="cpu", weights_only=True,
                             mmap=True).get("config")
        except Exception:  # missing, foreign or damaged: treated as "not ours"
            cfg = None
    return cfg if isinstance(cfg, dict) else {}


def answer_format_of(ckpt_dir, answer_format, reasoning_tasks, default_tasks):
    """(answer_format, reasoning_tasks) with "auto" / () resolved as `ckpt_dir` was trained; a checkpoint from
    elsewhere answers "direct"."""
    cfg = trained_config(ckpt_dir) if answer_format == "auto" or not reasoning_tasks else {}
    if answer_format == "auto":
        answer_format = cfg.get("answer_format", "direct")
    if not reasoning_tasks:
        reasoning_tasks = tuple(cfg.get("reasoning_tasks") or default_tasks)
    return answer_format, tuple(reasoning_tasks)


def find_checkpoint(path):
    """The complete checkpoint at `path`, or the previous one left at `path.old` by a crash mid-swap, else None."""
    for p in (path, path + ".old"):
        if os.path.isfile(os.path.join(p, "COMPLETE")):
            return p
    return None


def resolve_checkpoint(path, what="init_from"):
    """The model directory a user means by `path`: our checkpoint (COMPLETE marker, or its .old twin after a crash
    mid-swap), a training out_dir holding ckpt/, or a plain Hugging Face Qwen2.5-VL directory (config.json).
    Raises InputError naming the config key."""
    path = str(path)
    if path and not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:  # a Hub repo id ("Qwen/Qwen2.5-VL-7B-Instruct"): only then touch the network (or the local HF cache)
            from huggingface_hub import snapshot_download
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
        except Exception as e:
            raise InputError(f"{what}={path!r}: not a local directory, and the Hub download failed "
                             f"({type(e).__name__}: {first_line(e)})") from None
    if not path or not os.path.isdir(path):
        raise InputError(f"{what}={path!r}: checkpoint directory not found")
    for cand in (path, os.path.join(path, "ckpt")):
        found = find_checkpoint(cand)
        if found:
            return found
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise InputError(f"{what}={path!r}: not a model directory (no config.json, no adapter_config.json, no "
                         f"complete checkpoint)")
    return path


def check_resume(saved, now, breaking, before=None):
    """Compare the config a checkpoint was written with to this run's: a change to a `breaking` key (model shape,
    data, batch layout, what is frozen) is an InputError naming it; other changes are printed as a note. A key the
    checkpoint's config lacks (written by an older version) counts as `before[key]`, the behaviour before the key
    existed; one not in `before` either is named in a note with the value used now."""
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    saved = {**{k: v for k, v in (before or {}).items() if k in now}, **saved}
    if unknown := sorted(k for k in now if k not in saved and k not in ("resume", "stop_at_step")):
        print0("--resume: the checkpoint's config does not record " + ", ".join(unknown) + " (an older version "
               "wrote it); continuing with " + "; ".join(f"{k}={now[k]!r}" for k in unknown))
    changed = {k: (saved[k], now[k]) for k in saved if k in now and norm(saved[k]) != norm(now[k])}
    bad = {k: v for k, v in changed.items() if k in breaking}
    if bad:
        raise InputError("--resume: the checkpoint was written with other settings that this run cannot continue "
                         "from: " + "; ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in bad.items()))
    notes = {k: v for k, v in changed.items() if k not in ("resume", "stop_at_step")}
    if notes:
        print0("--resume: continuing with changed settings: " +
               "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in notes.items()))


def load_trainer_state(ckpt_dir):
    """The resume state of one of our checkpoints. Loaded with weights_only=True: tensors and plain containers only,
    so a planted pickle is refused, never run."""
    path = os.path.join(ckpt_dir, "trainer_state.pt")
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing (not a checkpoint written by train_sft.py / train_rl.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a VidEmo trainer state, refused without unpickling it "
                         f"({type(e).__name__}: {first_line(e)[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise InputError(f"{path}: not a VidEmo trainer state (no integer 'step')")
    return state


def _fsync_dir(d):
    for root, _, files in os.walk(d):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------------
# preemption, output-folder locks, writable outputs


class Stopped(BaseException):
    """Raised by a StopSignal(interrupt=True) handler. A BaseException (like KeyboardInterrupt), so the `except
    Exception` that turns a bad record into a counted skip cannot swallow it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """SIGTERM / SIGUSR1 (a scheduler's preemption or time-limit warning, e.g. SLURM --signal=USR1@120) as a request
    to stop at the next safe point instead of dying mid-step or mid-write.

        stop = common.StopSignal()          # in the main thread, before the loop
        ...after each optimizer step:
        if stop.should_stop(dev):           # every rank gets the same answer
            save(...); stop.exit(f"python train_sft.py ... --resume=True")

    The handler only sets a flag (interrupt=True: raises Stopped at once, for work that is cheap to redo, e.g. an
    evaluation whose finished samples are on disk). `should_stop` is one all_reduce(MAX) of one int when a process
    group is up, so a signal that reached one rank stops every rank at the same step. `close()` (or leaving a `with`
    block) restores the previous handlers. DataLoader workers should ignore the signals (`worker_init_fn=
    common.StopSignal.worker_init`): a signal sent to the whole process group would otherwise kill them and the
    loader would raise in the main process, possibly during the checkpoint write."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, signals=SIGNALS, interrupt=False):
        self.signum, self.interrupt, self.previous = None, interrupt, {}
        for s in signals:  # signal.signal works only in the main thread: a clear error, not a silent no-op
            self.previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"received {signal.Signals(signum).name}: stopping at the next safe point", file=sys.stderr,
                  flush=True)
        if self.interrupt:
            raise Stopped(signum)

    @property
    def received(self):
        return self.signum is not None

    def should_stop(self, device=None):
        """True on every rank when any rank got a signal. A collective under torch.distributed: call it at the same
        point on every rank (once per optimizer step)."""
        flag = int(self.received)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([flag], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    @property
    def exit_code(self):
        """128 + the signal number (143 for SIGTERM, 138 for SIGUSR1), as a shell reports a process the signal
        killed: a preempted run is not a finished one (`train && eval` must not go on)."""
        return 128 + int(self.signum or signal.SIGTERM)

    def exit(self, resume_command=""):
        """Print how to resume (rank 0), leave the process group, exit with exit_code."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        print0(f"stopped by {name}" + (f"; resume with: {resume_command}" if resume_command else ""))
        self.close()
        gc.collect()
        cleanup_distributed()
        sys.exit(self.exit_code)

    def close(self):
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def worker_init(worker_id=None):
        """DataLoader worker_init_fn: the worker ignores SIGTERM / SIGUSR1; the main process decides when to stop and
        shuts its workers down itself (an orphaned worker exits on its own: DataLoader's watchdog)."""
        for s in StopSignal.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _proc_start(pid):
    """The kernel's start time of `pid` (clock ticks since boot; /proc/<pid>/stat field 22), or None: tells a live
    holder from an unrelated process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid, start=None):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return start is None or _proc_start(pid) in (None, start)


class DirLock:
    """What lock_dir / lock_file return: holds an flock on `path` until release() (or exit)."""

    def __init__(self, path, fd):
        self.path, self.fd = path, fd
        atexit.register(self.release)

    def release(self):
        if self.fd is None:
            return
        try:
            if os.path.exists(self.path) and os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                os.remove(self.path)  # removed while still locked: a waiting opener re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)


def _holder_text(info, path):
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0))) if info.get("time") else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {started} ({path})"


def lock_file(lock_path, what, target=None):
    """Take the lock `lock_path` for this process: an flock (the kernel drops it when the holder dies, however it
    dies) plus who holds it (pid, host, start time, command) written inside. A second run is refused at once with an
    InputError naming the holder; a lock file left by a run that was killed is taken over with a printed note. Where
    the filesystem has no flock, a holder on this host whose pid is gone counts as dead. Released at exit."""
    import errno
    import fcntl
    lock_path = os.path.abspath(lock_path)
    target = target or os.path.dirname(lock_path)  # what the lock guards, as the messages name it
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "pid_start": _proc_start(os.getpid()),
          "cmd": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}
    for _ in range(10):  # the lock file can be removed by its releasing holder between our open and flock: retry
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{what} {target}: cannot create the lock file {lock_path} "
                             f"({e.strerror})") from None
        try:
            old = os.read(fd, 4096).decode("utf-8", "replace")
            try:
                info = json.loads(old) if old.strip() else {}
                info = info if isinstance(info, dict) else {}
            except ValueError:
                info = {}
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise InputError(f"{what} {target} is in use by another run: "
                                 f"{_holder_text(info, lock_path)}; wait for it, stop it, or choose another "
                                 f"{what}") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                locked = False  # no flock on this filesystem: judge the holder by its pid
                if info and info.get("pid") != os.getpid():
                    if info.get("host") != me["host"]:
                        raise InputError(f"{what} {target} is locked by {_holder_text(info, lock_path)}"
                                         f" and this filesystem has no locks to tell whether it runs; delete "
                                         f"{lock_path} if it does not") from None
                    if _pid_alive(int(info.get("pid", 0)) or -1, info.get("pid_start")):
                        raise InputError(f"{what} {target} is in use by another run: "
                                         f"{_holder_text(info, lock_path)}; wait for it, stop it, or choose another "
                                         f"{what}") from None
            if locked:
                try:
                    if not os.path.samestat(os.stat(lock_path), os.fstat(fd)):
                        os.close(fd)
                        continue  # we locked a file its holder just removed; lock the current one
                except FileNotFoundError:
                    os.close(fd)
                    continue
            if info.get("pid"):
                print(f"{what}: taking over the lock left by a run that is no longer running: "
                      f"{_holder_text(info, lock_path)}", file=sys.stderr, flush=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            return DirLock(lock_path, fd)
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
    raise InputError(f"{what}: could not take the lock {lock_path} (it keeps changing)")


LOCK_NAME = ".videmo.lock"


def lock_dir(path, what="out_dir"):
    """Lock the output folder `path` (created if missing) for this run: see lock_file. One call per run, on the
    process that writes there (rank 0)."""
    check_writable(path, what)
    return lock_file(os.path.join(path, LOCK_NAME), what)


def check_writable(path, what="out_dir", need_bytes=0):
    """Fail before any work when the folder `path` cannot take our output: it is created if missing, a probe file is
    written, fsync'ed and removed there (a read-only mount, a path under /proc, a file where a folder should be, no
    permission, a full disk), and `need_bytes` (e.g. two checkpoints' worth) must be free. InputError naming the
    path otherwise."""
    path = os.path.abspath(path)
    probe = os.path.join(path, f".write_probe.{os.getpid()}")
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"{what} {path}: exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"videmo write probe\n" * 64)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(probe)
        raise InputError(f"{what} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    if need_bytes:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise InputError(f"{what} {path}: {free / 2**30:.2f} GiB free, the run needs about "
                             f"{need_bytes / 2**30:.2f} GiB (checkpoints)")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# GPU timing (bench.py, gpu_check.py)


def cuda_ms(fn, repeats=10):
    """Median milliseconds of fn over CUDA events, after 3 warm-up calls (which also run Triton's autotuning)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------------------
# logging


class MetricLog:
    """Appends one JSON object per line to out_dir/<name>; also to wandb when installed and enabled."""

    def __init__(self, path, wandb_project=None, config=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=config)
            except ImportError:
                print("wandb is not installed; logging to", path, "only")

    def log(self, **row):
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)
