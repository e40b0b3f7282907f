"""train_sft.py end to end on a tiny EmoSynth build: DDP and FSDP2 equal one process on the same global batch,
resume is exact, and a real recipe config runs from a tiny random Hugging Face checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import build_emosynth

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = dict(num_train=48, num_val=8, num_test=8, workers=1, vocab_size=600)
# a very small model so each torchrun launch is dominated by start-up
TINY_MODEL = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_inner=64", "--vision_depth=1",
              "--vision_embd=32", "--vision_heads=2", "--vision_inner=64"]
COMMON = ["--max_steps=4", "--log_every=1", "--eval_every=0", "--save_every=2", "--eval_at_end=False",
          "--num_workers=0", "--warmup_steps=1", "--lr=1e-2", "--min_lr=1e-3", "--replay=0.5"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(build_emosynth(tmp_path_factory.mktemp("emosynth") / "build", **TINY_DATA))


def launch(args, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train_sft.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_sft.py")]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train_sft failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def losses(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_distributed_and_resume_match_one_process(tiny_data, tmp_path):
    data = [f"--data_dir={tiny_data}"]
    ref = str(tmp_path / "ref")
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={ref}"])
    base = losses(ref)
    assert sorted(base) == [1, 2, 3, 4] and base[4] < base[1]  # it learns something

    # 2 processes x 2 samples = the same global batch of 4: same losses, DDP and FSDP2
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=True"])):
        out = str(tmp_path / name)
        launch(data + TINY_MODEL + COMMON + ["--batch_size=2", f"--out_dir={out}"] + extra, nproc=2)
        got = losses(out)
        assert sorted(got) == [1, 2, 3, 4]
        for s in base:
            assert abs(got[s] - base[s]) <= 1e-5, (name, s, got[s], base[s])

    # stop after step 2 (as if killed right after its checkpoint), then --resume: identical loss sequence
    out = str(tmp_path / "resumed")
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={out}", "--stop_at_step=2"])
    assert sorted(losses(out)) == [1, 2]
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={out}", "--resume=True"])
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for s in base:
        assert abs(got[s] - base[s]) <= 1e-6, (s, got[s], base[s])


def test_real_recipe_from_tiny_hf_checkpoint(tiny_data, tmp_path):
    """config/sft_qwen25vl_3b.py (frozen ViT + merger, the real recipe) from a tiny random transformers checkpoint."""
    import torch
    from transformers import AutoTokenizer
    from tiny import make_hf_model, tiny_config

    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_data, "tokenizer"))
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|endoftext|>"))}
    hf = make_hf_model(tiny_config(vocab_size=len(tok), **ids), seed=0)
    init = str(tmp_path / "hf_init")
    hf.save_pretrained(init)
    tok.save_pretrained(init)
    out = str(tmp_path / "recipe")
    launch([str(ROOT / "config/sft_qwen25vl_3b.py"), f"--init_from={init}", f"--train_file={tiny_data}/train.jsonl",
            f"--video_root={tiny_data}", "--fsdp=False", "--grad_checkpointing=True", "--dtype=auto",
            "--fps=4.0", "--max_frames=8", "--max_pixels=12544", "--batch_size=2", "--grad_accum=2",
            "--max_steps=2", "--save_every=2", "--num_workers=0", f"--out_dir={out}"])
    assert sorted(losses(out)) == [1, 2]
    # the ViT stayed frozen, the LLM moved, and the result loads back into transformers
    from transformers import Qwen2_5_VLForConditionalGeneration
    after = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(out, "ckpt"))
    sd0, sd1 = hf.state_dict(), after.state_dict()
    vis = [k for k in sd0 if ".visual." in k or k.startswith("visual.")]
    llm = [k for k in sd0 if "layers.0.mlp.up_proj" in k]
    assert vis and llm
    assert all(torch.equal(sd0[k], sd1[k]) for k in vis)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in llm)


def test_bad_config_and_missing_init(tmp_path):
    r = launch(["--bacth_size=3"], check=False)
    assert r.returncode != 0 and "bacth_size" in r.stderr
    r = launch([f"--init_from={tmp_path}/nope", f"--out_dir={tmp_path}/o", "--data_dir=/nonexistent"], check=False)
    assert r.returncode != 0 and "nope" in (r.stderr + r.stdout)


def test_lora_learns_saves_merged_or_adapter_and_resumes(tiny_data, tmp_path):
    """LoRA SFT from a checkpoint: the merged checkpoint is the base plus (alpha / r) B A in the
    adapted layers and the base elsewhere; an adapter-only checkpoint loads to the same weights; resume is exact."""
    import torch

    import lora
    from model import VidEmo
    data = [f"--data_dir={tiny_data}"]
    base = tmp_path / "base"
    launch(data + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={base}", "--max_steps=1"])
    kw = data + COMMON + ["--batch_size=4", f"--init_from={base}/ckpt", "--lora_rank=4", "--lora_alpha=8"]
    launch(kw + [f"--out_dir={tmp_path / 'a'}", "--lora_save=adapter"])
    straight = losses(tmp_path / "a")
    assert sorted(straight) == [1, 2, 3, 4]  # (that it learns: README, LoRA SFT on EmoSynth)
    launch(kw + [f"--out_dir={tmp_path / 'm'}", "--stop_at_step=2"])
    launch(kw + [f"--out_dir={tmp_path / 'm'}", "--resume=True"])
    resumed = losses(tmp_path / "m")
    for s in straight:
        assert abs(resumed[s] - straight[s]) <= 1e-6, (s, resumed[s], straight[s])
    adapter_ckpt, merged_ckpt = tmp_path / "a" / "ckpt", tmp_path / "m" / "ckpt"
    assert (adapter_ckpt / lora.ADAPTER_CONFIG).exists() and not (adapter_ckpt / "config.json").exists()
    a, m, b = (VidEmo.from_pretrained(d) for d in (adapter_ckpt, merged_ckpt, base / "ckpt"))
    state = torch.load(merged_ckpt / "trainer_state.pt", weights_only=True)
    adapted = {n.rsplit(".", 1)[0] for n in state["adapters"]}
    for (n, pa), (_, pm), (_, pb) in zip(a.named_parameters(), m.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pm, rtol=0, atol=1e-6, msg=n)
        owner = n.rsplit(".", 1)[0]
        if owner in adapted and n.endswith(".weight"):
            delta = 2.0 * state["adapters"][owner + ".lora_B"] @ state["adapters"][owner + ".lora_A"]
            torch.testing.assert_close(pm, pb + delta, rtol=0, atol=1e-6, msg=n)
            assert delta.abs().max() > 0, n
        else:
            assert torch.equal(pm, pb), n
    r = launch(kw[:-3] + ["--lora_rank=4", "--lora_save=adapter", f"--out_dir={tmp_path / 'x'}"], check=False)
    assert r.returncode == 2 and "init_from" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_two_nodes_equal_one_process(tiny_data, tmp_path):
    """Multi-node torchrun (2 "nodes" of 1 process each on this machine, c10d rendezvous): on node 1 LOCAL_RANK is 0
    but RANK is 1, so anything that mixed the two (device placement, who writes, the data shard) would show here.
    Same losses as one process on the same global batch; only global rank 0 writes the checkpoint."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [f"--data_dir={tiny_data}"] + TINY_MODEL + COMMON + ["--batch_size=2", f"--out_dir={tmp_path / 'nodes'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={n}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=videmo-test", str(ROOT / "train_sft.py")] + args, env=env, cwd=str(ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outs)
    ref = tmp_path / "one"
    launch([f"--data_dir={tiny_data}"] + TINY_MODEL + COMMON + ["--batch_size=4", f"--out_dir={ref}"])
    want, got = losses(ref), losses(tmp_path / "nodes")
    assert sorted(got) == [1, 2, 3, 4]
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    assert (tmp_path / "nodes" / "ckpt" / "COMPLETE").exists() and not (tmp_path / "nodes" / "ckpt.tmp").exists()


def test_mix_first_and_per_stage_lr(tiny_data, tmp_path):
    """--mix_first trains a shuffled warm-up stage first; --lr_schedule=stage gives every stage its own warmup + cosine
    (the logged rate restarts at each stage's first step and follows common.lr_at inside it)."""
    sys.path.insert(0, str(ROOT))
    import common

    out = str(tmp_path / "staged")
    lr, min_lr = 1e-2, 1e-3
    launch([f"--data_dir={tiny_data}"] + TINY_MODEL + ["--max_steps=0", "--log_every=1", "--eval_every=0",
           "--save_every=0", "--eval_at_end=False", "--num_workers=0", "--warmup_steps=2", f"--lr={lr}",
           f"--min_lr={min_lr}", "--replay=0.5", "--stage_epochs=(1.0,1.0,2.0)", "--mix_first=0.3",
           "--lr_schedule=stage", "--batch_size=4", f"--out_dir={out}"])
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    rows = sorted((r for r in rows if "lr" in r), key=lambda r: r["step"])
    names = [r["stage"] for r in rows]
    assert names[0] == "mix" and {"attribute", "expression"} <= set(names)
    starts = [i for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert [names[i] for i in starts] == sorted(set(names), key=["mix", "attribute", "expression", "emotion"].index)
    ends = starts[1:] + [len(rows)]
    for a, b in zip(starts, ends):
        for i in range(a, b):
            assert abs(rows[i]["lr"] - common.lr_at(i - a, b - a, lr, min_lr, 2)) < 1e-12, (i, names[i])
        assert rows[a]["lr"] == lr / 2  # warmup restarts at every stage


@pytest.mark.parametrize("loss_norm,floored,keyed", [("token", False, False), ("record", False, False),
                                                      ("token", True, False), ("token", False, True),
                                                      ("record", False, True)])
def test_forward_backward_loss_norm_matches_formula(loss_norm, floored, keyed):
    """train_sft.forward_backward over two micro-batches of random text rows (padding, random supervised spans,
    one row with none) against the formula on the full logits: "token" = summed NLL / supervised tokens,
    "record" = the mean over records (with a supervised token) of each record's mean NLL, "token" with a random
    loss_floor F = each record's mean NLL weighted by max(its tokens, F); keyed: a random intensity_weight on the
    target planted right before a key token (" intensity") in each supervised span, the normaliser unchanged;
    loss and gradient."""
    import contextlib
    import torch
    import common
    import train_sft as TS
    from model import VidEmo
    from tiny import pad_batch, text_ids, tiny_config
    seed = int(torch.randint(0, 10_000, ()))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    floor = int(torch.randint(4, 14, (), generator=gen)) if floored else 0  # between the spans' lengths
    iw = float(torch.empty(()).uniform_(2, 8, generator=gen)) if keyed else 1.0
    key_id = 500  # outside the random text ids [0, 500)
    model = VidEmo(tiny_config()).float()
    micro, planted = [], []
    for b in range(2):
        seqs, spans = [], []
        for r in range(3):
            n = int(torch.randint(6, 20, (), generator=gen))
            k = 0 if (b, r) == (1, 2) else int(torch.randint(1, n - 2, (), generator=gen))  # supervised tail
            s = text_ids(n, gen)
            if keyed and k >= 2:  # the key token inside the span, not its first token: the token before it weighs iw
                p = n - k + int(torch.randint(1, k, (), generator=gen))
                s[p] = key_id
                planted.append((b, r, p - 1))
            seqs.append(s); spans.append(k)
        ids, mask = pad_batch(seqs, side="right")
        labels = torch.full_like(ids, -100)
        for r, (s, k) in enumerate(zip(seqs, spans)):
            if k:
                labels[r, len(s) - k:len(s)] = ids[r, len(s) - k:len(s)]
        micro.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    # the formula, on full logits (log_softmax over the vocabulary)
    model.zero_grad()
    per_rec, toks = [], []
    for b, batch in enumerate(micro):
        logp = torch.log_softmax(model(batch["input_ids"], batch["attention_mask"]).float(), -1)[:, :-1]  # [B, L-1, V]
        tgt = batch["labels"][:, 1:]
        sel = tgt != -100
        lp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * sel  # [B, L-1]
        for bb, r, pos in planted:  # the target at input position pos is scored at logit row pos - 1
            if bb == b:
                lp[r, pos - 1] = lp[r, pos - 1] * iw
        for r in range(tgt.shape[0]):
            if sel[r].any():
                per_rec.append(-lp[r].sum() / sel[r].sum()); toks.append((-lp[r].sum(), int(sel[r].sum())))
    if loss_norm == "record":
        ref = torch.stack(per_rec).mean()
    elif floored:
        w = [max(n, floor) for _, n in toks]
        ref = sum(wi * t / n for wi, (t, n) in zip(w, toks)) / sum(w)
    else:
        ref = sum(t for t, _ in toks) / sum(n for _, n in toks)
    ref.backward()
    ref_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    g = vars(TS)
    saved = {k: g[k] for k in common._config_keys(g)}
    try:
        common.configure(g, [f"--loss_norm={loss_norm}", f"--loss_floor={floor}", f"--intensity_weight={iw}",
                             "--logprobs_backend=torch"])
        loss, _ = TS.forward_backward(model, model, micro, torch.device("cpu"), contextlib.nullcontext(), 1, key_id)
    finally:
        g.update(saved)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if n in ref_grad:
            torch.testing.assert_close(p.grad, ref_grad[n], rtol=1e-4, atol=1e-6, msg=f"{n} (seed {seed})")
    assert max(float(p.grad.abs().max()) for n, p in model.named_parameters() if n in ref_grad) > 0


def test_loss_norm_refuses_an_unknown_value(tmp_path):
    r = subprocess.run([sys.executable, "train_sft.py", "--loss_norm=sample", f"--out_dir={tmp_path}/o"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "loss_norm" in r.stderr and "token or record" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "train_sft.py", "--loss_norm=record", "--loss_floor=8",
                        f"--out_dir={tmp_path}/o"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "loss_floor" in r.stderr and "unless loss_norm=token" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "train_sft.py", "--intensity_weight=0", f"--out_dir={tmp_path}/o"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "intensity_weight" in r.stderr and "> 0" in r.stderr, r.stderr
