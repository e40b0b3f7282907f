"""The set-up both trainers share: resume with its config check, LoRA attach, AdamW, the non-finite guard and the
final evaluation. Each is one call from train_sft.py / train_rl.py; what differs between the stages stays there."""
import math
import os
import sys

import torch

import common
import data as D
import evaluation
import lora


def load_resume(ckpt_path, config, breaking, before=None):
    """--resume: (checkpoint dir, trainer state) of the last complete checkpoint under ckpt_path, after checking that
    every resume-breaking key of `config` matches what the checkpoint was written with (common.check_resume)."""
    found = common.find_checkpoint(ckpt_path)
    if found is None:
        raise common.InputError(f"--resume: no complete checkpoint at {ckpt_path} (rank {common.rank()}; on several "
                                f"nodes, out_dir must be on a filesystem they share)")
    state = common.load_trainer_state(found)
    common.check_resume(state.get("config", {}), config, breaking, before)
    return found, state


def attach_lora(model, rank, alpha, targets, use_bf16, state=None):
    """LoRA adapters on `targets` (the base frozen, bf16 on CUDA); a resumed run loads its adapters from `state`."""
    try:
        lora.add_adapters(model, rank, alpha, targets, base_dtype=torch.bfloat16 if use_bf16 else None)
    except ValueError as e:
        raise common.ConfigError(f"config key 'lora_targets': {e}") from None
    if state is not None:
        model.load_state_dict(state["adapters"], strict=False)


def adamw(params, lr, betas, weight_decay, device):
    """AdamW over the trainable params: weight decay on matrices only; the fused kernel where torch has one."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas,
                             fused=device.type == "cuda")


class NonFiniteGuard:
    """Never apply a NaN / inf update: `ok(step, loss, grad_norm, optimizer)` drops the gradients of a non-finite
    update and returns False; `limit` of them in a row stop the run writing nothing (weights that led there may be
    diverged even if finite and must not replace the last good checkpoint), naming that checkpoint."""

    def __init__(self, ckpt_path, last_saved=None, limit=3, hint="lower lr or check the data"):
        self.ckpt_path, self.last_saved, self.limit, self.hint, self.bad = ckpt_path, last_saved, limit, hint, 0

    def ok(self, step, loss, grad_norm, optimizer):
        if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
            self.bad = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.bad += 1
        common.print0(f"step {step}: non-finite loss {loss} / grad norm {float(grad_norm)}; update skipped")
        if self.bad >= self.limit:
            good = f"{self.ckpt_path} (step {self.last_saved})" if self.last_saved is not None else \
                "none (no checkpoint yet)"
            raise FloatingPointError(f"loss is NaN/inf for {self.bad} updates in a row at step {step}; nothing saved; "
                                     f"the last good checkpoint is {good}; {self.hint}")
        return False

    def saved(self, step):
        self.last_saved = step


def final_evaluation(model, tokenizer, test_path, out_dir, answer_format, reasoning_tasks, root, video_kwargs,
                     batch_size, max_new_tokens, device, video_prune_rate=0.0, max_records=0, html=False):
    """The test-split table and out_dir/eval.json (rank 0); html: also out_dir/report.html (report.py). Reasoning
    answers get at least 160 new tokens (EmoSynth's reasoning targets reach 114)."""
    if answer_format == "reasoning":
        max_new_tokens = max(max_new_tokens, 160)
    records = D.load_records_as(test_path, answer_format, reasoning_tasks)[:max_records or None]
    model.eval()
    evaluation.report(model, tokenizer, records, root, video_kwargs, out_dir, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, device=device, video_prune_rate=video_prune_rate,
                      html=os.path.join(out_dir, "report.html") if html else "")


def adapter_base(init_from, init_dir):
    """The base an adapter-only checkpoint records, as the user gave it: a hub id stays a hub id; a local path (an
    out_dir or a checkpoint) becomes the loadable directory it resolved to."""
    return init_dir if os.path.exists(init_from) else init_from


def claim_out_dir(out_dir, master):
    """Before any work: rank 0 takes out_dir's lock (a second run on it is refused at once, naming the holder; a
    killed run's lock is taken over) after a real write there (read-only, /proc, a file in the way, a full disk)."""
    if master:
        common.lock_dir(out_dir)
    common.barrier()


def resume_command():
    """How to continue this run: its own command line with --resume=True (torchrun: the same launcher line)."""
    args = " ".join(a for a in sys.argv[1:] if not a.startswith("--resume"))
    launcher = "torchrun ... " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "python "
    return f"{launcher}{os.path.basename(sys.argv[0])} {args} --resume=True".replace("  ", " ")
