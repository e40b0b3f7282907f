"""A whole GRPO step in process: train_rl.py's parts (rollout -> advantages -> reference pass -> update -> metrics)
called as functions on a tiny random VidEmo over a tiny EmoSynth build; the loss normalisation (grpo.Objective)
against its formulas; a reward term added in reward.py alone; the degenerate steps."""
import dataclasses
import math

import pytest
import torch

import common
import data as D
import grpo
import reward as R
import train_rl as RL

CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, policy state dict, train records, video kwargs) of a tiny EmoSynth build and a tiny random model."""
    from model import VidEmo
    from tiny import build_emosynth, tokenizer_config
    build = build_emosynth(tmp_path_factory.mktemp("step") / "build", num_train=8, num_val=2, num_test=2, workers=1)
    tok = D.load_tokenizer(build / "tokenizer")
    torch.manual_seed(0)
    model = VidEmo(tokenizer_config(tok, initializer_range=0.2))  # a large init: completions differ in length
    return tok, model, build


@pytest.fixture
def rl(setup):
    """train_rl configured for a tiny step (its globals restored afterwards)."""
    tok, model, build = setup
    g = vars(RL)
    saved = {k: g[k] for k in common._config_keys(g)}
    common.configure(g, [f"--data_dir={build}", "--num_generations=4", "--prompts_per_step=2", "--grad_accum=2",
                         "--max_completion_length=10", "--beta=0.0", "--tasks=('emotion_single',)", "--dynamic_sampling=False",
                         "--answer_format=direct"])  # main resolves "auto" from init_from; no checkpoint here
    yield RL
    g.update(saved)


def policy_of(setup):
    from model import VidEmo
    _, model, _ = setup
    p = VidEmo(model.config)
    p.load_state_dict(model.state_dict())
    return p.float()


def one_step(rl, setup, policy, optimizer, seed=0, steps=1, replay=None):
    """The loop body of train_rl.main for one process: rollout, advantages, reference pass, update, metrics."""
    tok, _, build = setup
    records = rl.load_task_records(build / "train.jsonl")
    stream = grpo.PromptStream(len(records), seed, 0, 1)
    video_kwargs = dict(fps=rl.fps, max_frames=rl.max_frames, min_pixels=rl.min_pixels, max_pixels=rl.max_pixels)
    gen = torch.Generator().manual_seed(seed)
    micro = []
    for _ in range(rl.grad_accum):
        prompts = rl.next_prompts(1, stream, records, tok, None, video_kwargs, None, {})
        micro.append(rl.rollout(policy, prompts, gen, tok, CPU, NO_AUTOCAST, reencode=True)[0])
    total_all, zero_std, bad = rl.advantages(micro, 0, 1, CPU)
    rl.reference_pass(micro, policy, None, True, NO_AUTOCAST)
    objective = grpo.Objective(rl.beta, rl.epsilon, rl.epsilon, rl.loss_type, rl.max_completion_length,
                               rl.grad_accum)
    kept = objective.begin(micro, CPU)
    params = [p for p in policy.parameters() if p.requires_grad]
    guard = RL.trainer.NonFiniteGuard("nowhere")
    net = grpo.GroupScorer(policy, rl.temperature, reencode=True, backend=rl.logprobs_backend)
    upd, grad_norm = rl.update(net, policy, params, optimizer, micro, objective, guard, 0,
                               rl.num_iterations if kept else 0, NO_AUTOCAST, 1, CPU, replay, D.intensity_id(tok))
    row = rl.step_metrics(1, rl.lr, micro, total_all, zero_std, bad, kept, upd, grad_norm,
                          {"t_generate": 1.0, "t_score": 0.0, "t_ref": 0.0, "t_update": 0.0}, objective, CPU)
    return micro, row


def surrogate(policy, micro, signs):
    """sum_i A_i * mean_t log pi(o_it) over the step's rows (grpo aggregation): what one PG step must raise."""
    with torch.no_grad():
        total = 0.0
        for mb in micro:
            logps, _ = grpo.completion_logps(policy, mb, RL.temperature, reencode=True)
            per_row = (logps * mb.cmask).sum(1) / mb.cmask.sum(1).clamp(min=1)
            total += float((signs * mb.adv * per_row).sum())
    return total


def test_a_step_in_process_climbs_its_objective(rl, setup, monkeypatch):
    """A reward on how often "a" is written: the step's rollout has spread, its update moves the weights, and the
    policy after it scores the step's own completions higher on sum_i A_i mean_t log pi(o_it)."""
    monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None: {"accuracy": c.count("a") / 10})
    policy = policy_of(setup)
    micro, row = one_step(rl, setup, policy, torch.optim.SGD(policy.parameters(), lr=0.05))
    assert row["grad_norm"] > 0 and row["frac_reward_zero_std"] < 1 and "skipped_update" not in row
    assert row["rollout_logp_diff"] < 1e-4  # the sampler and the training forward agree
    assert surrogate(policy, micro, 1.0) > surrogate(policy_of(setup), micro, 1.0)


def test_the_two_rewards_give_opposite_gradients(rl, setup, monkeypatch):
    """Same rollout, rewards r and -r: every parameter's gradient of the step flips sign exactly."""
    grads = {}
    for sign in (1.0, -1.0):
        monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None, s=sign: {"accuracy": s * c.count("a") / 10})
        policy = policy_of(setup)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # keep the gradients: lr 0, zero_grad replaced
        monkeypatch.setattr(opt, "zero_grad", lambda set_to_none=True: None)
        one_step(rl, setup, policy, opt)
        grads[sign] = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    assert grads[1.0].abs().sum() > 0
    torch.testing.assert_close(grads[-1.0], -grads[1.0], rtol=1e-4, atol=1e-7)


def replay_batch(rl, setup, n):
    tok, _, build = setup
    records = rl.load_replay_records(build / "train.jsonl")
    assert {r["task"] for r in records} <= set(rl.replay_tasks) and records
    video_kwargs = dict(fps=rl.fps, max_frames=rl.max_frames, min_pixels=rl.min_pixels, max_pixels=rl.max_pixels)
    stream = grpo.PromptStream(len(records), 1, 0, 1)
    return [rl.next_replay(n, stream, records, tok, None, video_kwargs, None, {}, CPU) for _ in range(rl.grad_accum)]


@pytest.mark.parametrize("weighted", [False, True])
def test_replay_adds_the_sft_cross_entropy_to_the_step(rl, setup, monkeypatch, weighted):
    """Same rollout with and without SFT replay: the step's gradient differs by exactly replay_coef x the gradient of
    the mean NLL of the replayed answer tokens, computed from the full logits with log_softmax (the formula), and the
    logged replay_nll is that mean. Weighted: a random replay_intensity_weight w on each target token followed by
    " intensity" (the intensity word of an emotion caption) makes it count w times in the sum, not in the count."""
    monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None: {"accuracy": c.count("a") / 10})
    coef = 0.7
    w = float(torch.empty(()).uniform_(2.0, 6.0)) if weighted else 1.0
    monkeypatch.setattr(rl, "replay_per_micro", 3)
    monkeypatch.setattr(rl, "replay_coef", coef)
    monkeypatch.setattr(rl, "replay_intensity_weight", w)
    if weighted:  # captions that state an intensity
        monkeypatch.setattr(rl, "replay_tasks", ("emotion_caption",))
    monkeypatch.setattr(rl, "grad_clip", 0.0)  # the raw gradients: clipping would scale the two sums apart
    replay = replay_batch(rl, setup, rl.replay_per_micro)  # 3 records beside each of the 2 micro-batches
    assert [b["labels"].shape[0] for b in replay] == [3, 3]
    grads, rows = {}, {}
    for with_replay in (False, True):
        policy = policy_of(setup)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        monkeypatch.setattr(opt, "zero_grad", lambda set_to_none=True: None)
        _, rows[with_replay] = one_step(rl, setup, policy, opt, replay=replay if with_replay else None)
        grads[with_replay] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                              for p in policy.parameters()]
    ref = policy_of(setup)
    tok = setup[0]
    key = tok.encode(" intensity", add_special_tokens=False)[0]
    token_lp, token_w, keyed = [], [], []
    for batch in replay:
        logits = ref(**{k: v for k, v in batch.items() if k != "labels"})  # [B, L, V]
        labels = batch["labels"][:, 1:]  # [B, L-1]: the token at position t is predicted at t - 1
        lp = torch.log_softmax(logits[:, :-1].float(), -1)  # the SFT loss: temperature 1, not the sampler's
        token_lp.append(lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][labels != -100])
        for row in labels.tolist():  # row-major, one weight per supervised target
            for t, y in enumerate(row):
                if y != -100:
                    is_key = t + 1 < len(row) and row[t + 1] == key
                    token_w.append(w if is_key else 1.0)
                    keyed += [tok.decode([y]).strip()] if is_key else []
    lp_all, w_all = torch.cat(token_lp), torch.tensor(token_w)
    nll = -(lp_all * w_all).sum() / len(token_w)  # one sum over every replayed token of the step, / their count
    if weighted:  # the weighted tokens are the intensity words, and there are some
        assert keyed and set(keyed) <= {"low", "medium", "high"}, keyed
    (coef * nll).backward()
    assert rows[True]["replay_nll"] == pytest.approx(nll.item(), rel=1e-5) and "replay_nll" not in rows[False]
    assert rows[True]["loss"] == pytest.approx(rows[False]["loss"], rel=1e-5)  # the logged loss stays the GRPO one
    for g1, g0, p in zip(grads[True], grads[False], ref.parameters()):
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g1 - g0, want, rtol=1e-3, atol=1e-6)
    assert sum(float(p.grad.abs().sum()) for p in ref.parameters() if p.grad is not None) > 0


def test_a_reward_term_added_in_reward_py_is_weighted_logged_and_optimised(rl, setup, monkeypatch):
    """A toy term (the share of vowels) added to reward.py's terms and weights only: score weights it into the
    total, the step logs reward/toy/*, and the update climbs it; grpo.py and train_rl.py are untouched."""
    real_terms = R.terms

    def with_toy(completion, record, lam=1.0, table=None):
        out = real_terms(completion, record, lam, table)
        out["toy"] = sum(ch in "aeiou" for ch in completion) / max(1, len(completion))
        return out

    monkeypatch.setattr(R, "terms", with_toy)
    monkeypatch.setitem(R.DEFAULT_WEIGHTS, "toy", 2.0)
    policy = policy_of(setup)
    micro, row = one_step(rl, setup, policy, torch.optim.SGD(policy.parameters(), lr=0.05))
    for mb in micro:
        for sc in mb.scores:
            assert sc["total"] == pytest.approx(sc["accuracy"] + 2.0 * sc["toy"])
    toys = [sc["toy"] for mb in micro for sc in mb.scores]
    assert row["reward/toy/mean"] == pytest.approx(sum(toys) / len(toys), rel=1e-6)
    assert "reward/toy/std" in row and row["grad_norm"] > 0
    assert surrogate(policy, micro, 1.0) > surrogate(policy_of(setup), micro, 1.0)
    with pytest.raises(common.ConfigError, match="w_nope"):  # a w_ key for a term reward.py does not have
        monkeypatch.setattr(RL, "w_nope", 1.0, raising=False)
        RL.check_config(1, CPU)


def test_split_advantage_credits_reasoning_and_answer_tokens_apart(rl, setup, monkeypatch):
    """split_advantage on reasoning records: a token before its completion's boundary carries the group-relative
    advantage of tree + format, one after it that of the answer's terms; with every boundary at 0 the step's gradient
    is that of the answer reward alone with one advantage per completion (the per-row path)."""
    monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None: {
        "accuracy": c.count("a") / 10, "tree": c.count("e") / 10, "format": c.count("o") / 10})
    common.configure(vars(RL), ["--answer_format=reasoning", "--reasoning_tasks=('emotion_single',)",
                                "--split_advantage=True"])
    cuts = {}
    monkeypatch.setattr(grpo, "think_boundary", lambda tok, seqs, lengths: cuts["fn"](lengths))
    cuts["fn"] = lambda lengths: torch.randint(0, int(lengths.max()) + 1, lengths.shape)
    micro, row = one_step(rl, setup, policy_of(setup), torch.optim.SGD(policy_of(setup).parameters(), lr=0.0))
    w = RL.config_weights()
    think = torch.tensor([[w["tree"] * s["tree"] + w["format"] * s["format"] for s in mb.scores] for mb in micro])
    answer = torch.tensor([[w["accuracy"] * s["accuracy"] for s in mb.scores] for mb in micro])
    a_think = grpo.grpo_advantages(think.flatten(), rl.num_generations).view_as(think)
    a_answer = grpo.grpo_advantages(answer.flatten(), rl.num_generations).view_as(answer)
    for m, mb in enumerate(micro):
        assert mb.adv.shape == mb.cmask.shape
        for i in range(mb.adv.shape[0]):
            b = int(mb.boundary[i])
            torch.testing.assert_close(mb.adv[i, :b], a_think[m, i].expand(b))
            torch.testing.assert_close(mb.adv[i, b:], a_answer[m, i].expand(mb.adv.shape[1] - b))
    assert row["grad_norm"] > 0
    grads = {}
    for split in (True, False):
        common.configure(vars(RL), [f"--split_advantage={split}"])
        cuts["fn"] = lambda lengths: torch.zeros_like(lengths)
        if not split:  # the per-row reference: the answer's terms are the whole reward
            monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None: {"accuracy": c.count("a") / 10})
        policy = policy_of(setup)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        monkeypatch.setattr(opt, "zero_grad", lambda set_to_none=True: None)
        one_step(rl, setup, policy, opt)
        grads[split] = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-7)


def test_degenerate_steps_complete_and_are_counted(rl, setup, monkeypatch):
    """Equal rewards everywhere: no update, skipped_update shown. Every reward NaN: counted, no update, nothing
    non-finite. Every completion truncated and masked: a finite loss over no token."""
    start = policy_of(setup)
    monkeypatch.setattr(RL, "dynamic_sampling", True)
    for reward, key in ((lambda c, r, lam=1.0, table=None: {"accuracy": 0.5}, "skipped_update"),
                        (lambda c, r, lam=1.0, table=None: {"accuracy": float("nan")}, "reward_nonfinite")):
        monkeypatch.setattr(R, "terms", reward)
        policy = policy_of(setup)
        _, row = one_step(rl, setup, policy, torch.optim.SGD(policy.parameters(), lr=0.05))
        assert key in row and row.get("skipped_update") == 1, row
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float) and not k.startswith("reward"))
        for p, q in zip(policy.parameters(), start.parameters()):
            assert torch.equal(p, q)
    assert row["reward_nonfinite"] == 8
    monkeypatch.setattr(R, "terms", lambda c, r, lam=1.0, table=None: {"accuracy": c.count("a") / 10})
    monkeypatch.setattr(RL, "max_completion_length", 1)
    monkeypatch.setattr(RL, "mask_truncated_completions", True)
    monkeypatch.setattr(RL, "dynamic_sampling", False)
    policy = policy_of(setup)
    micro, row = one_step(rl, setup, policy, torch.optim.SGD(policy.parameters(), lr=0.05))
    if row["frac_truncated"] == 1.0:  # (a one-token completion may be a stop: then it is not truncated)
        assert all(not mb.cmask.any() for mb in micro)
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


# ----------------------------------------------------------------------------------------------------------------------
# grpo.Objective: the whole normalisation of a step against the formulas


def _micro(n_groups, G, T, seed, use=None):
    g = torch.Generator().manual_seed(seed)
    N = n_groups * G
    cmask = torch.rand(N, T, generator=g) > 0.3
    cmask[0, 0] = True
    return grpo.Rollout(G=G, cmask=cmask, adv=torch.randn(N, generator=g), ref=torch.randn(N, T, generator=g) - 1,
                        prompt_grid=torch.ones(n_groups, 3, dtype=torch.long), prompt_tokens=[1] * n_groups,
                        use=use, valid=cmask.clone())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_objective_normalisation_matches_the_formulas(loss_type):
    """Two micro-batches (dynamic sampling keeps 1 of 2 groups in the first, both in the second): the sum of the
    backward losses equals the loss type's formula over the kept rows; dapo divides by the kept tokens of the whole
    rollout batch, the others by grad_accum per micro-batch."""
    G, T, beta, eps = 3, 5, 0.04, 0.2
    keep_first = torch.tensor([False] * G + [True] * G)
    micro = [_micro(2, G, T, 0, use=keep_first), _micro(2, G, T, 1, use=torch.ones(2 * G, dtype=torch.bool))]
    obj = grpo.Objective(beta, eps, eps, loss_type, max_completion_length=T + 2, grad_accum=2)
    assert obj.begin(micro, CPU) == 3 * G
    g = torch.Generator().manual_seed(9)
    got, want = 0.0, 0.0
    n_tok = sum(float(mb.cmask[mb.use].sum()) for mb in micro)
    for mb in micro:
        sub, weight = obj.batch(mb)
        assert weight == 1.0 and sub.cmask.shape[0] == int(mb.use.sum())
        logps = torch.randn(sub.cmask.shape, generator=g, dtype=torch.float64) - 1
        old = logps + 0.3 * torch.randn(sub.cmask.shape, generator=g, dtype=torch.float64)
        loss, _ = obj(logps, old, sub)
        got += float(loss)
        ratio = torch.exp(logps - old)
        a = sub.adv.double()[:, None]
        per = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        d = sub.ref.double() - logps
        per = per + beta * (torch.exp(d) - d - 1)
        m = sub.cmask.double()
        if loss_type == "grpo":
            want += float(((per * m).sum(1) / m.sum(1).clamp(min=1)).mean()) / 2
        elif loss_type == "bnpo":
            want += float((per * m).sum() / m.sum()) / 2
        elif loss_type == "dr_grpo":
            want += float((per * m).sum() / (m.shape[0] * (T + 2))) / 2
        else:
            want += float((per * m).sum() / n_tok)
    assert got == pytest.approx(want, rel=1e-6)
    assert obj.logged(got, num_iterations=1) == got


def test_objective_drops_empty_micro_batches_and_keeps_ddp_ranks_in_step():
    """No group kept: one process skips the micro-batch; under DDP it trains its first group with weight 0 (every
    rank must run a backward each micro-step). All rows kept without dynamic sampling: the batch as it is."""
    G = 2
    empty = _micro(3, G, 4, 0, use=torch.zeros(3 * G, dtype=torch.bool))
    assert grpo.Objective(0.0, 0.2, 0.2, "grpo", 4, 1, world=1).batch(empty) == (None, 0.0)
    sub, weight = grpo.Objective(0.0, 0.2, 0.2, "grpo", 4, 1, world=2).batch(empty)
    assert weight == 0.0 and sub.cmask.shape[0] == G and torch.equal(sub.cmask, empty.cmask[:G])
    plain = _micro(3, G, 4, 0)
    sub, weight = grpo.Objective(0.0, 0.2, 0.2, "grpo", 4, 1).batch(plain)
    assert sub is plain and weight == 1.0
    assert grpo.Objective(0.0, 0.2, 0.2, "grpo", 4, 1, world=2).logged(8.0, num_iterations=2) == 2.0


def test_rollout_select_slices_every_per_row_field():
    """Rollout.select follows each field's declared kind: a field added to the dataclass is sliced without a key
    list; video tokens and pixels follow their prompts."""
    G = 2
    counts, patches = [3, 1, 2], [4, 8, 4]
    mb = grpo.Rollout(G=G, targets=torch.arange(6)[:, None], texts=list("abcdef"), records=["p0", "p1", "p2"],
                      prompt_tokens=counts,
                      video_embeds=torch.cat([torch.full((c, 1), float(i)) for i, c in enumerate(counts)]),
                      prompt_grid=torch.tensor([[1, 2, 2], [2, 2, 2], [1, 2, 2]]),
                      pixels=torch.cat([torch.full((n, 1), float(i)) for i, n in enumerate(patches)]))
    rows = torch.tensor([False, False, True, True, True, True])
    sub = mb.select(rows)
    assert sub.targets.flatten().tolist() == [2, 3, 4, 5] and sub.texts == list("cdef") and sub.records == ["p1", "p2"]
    assert sub.prompt_tokens == [1, 2] and sub.video_embeds.flatten().tolist() == [1, 2, 2]
    assert sub.pixels.flatten().tolist() == [1.0] * 8 + [2.0] * 4 and sub.G == G
    assert sub.ref is None and sub.keep is None
    kinds = {f.metadata.get("per") for f in dataclasses.fields(grpo.Rollout)}
    assert kinds <= {"row", "prompt", "prompt_tokens", "prompt_video", "const"}  # every field declares its kind


# ----------------------------------------------------------------------------------------------------------------------
# guidance: the record's reference answer as a completion of a group that never reaches its reward


def test_answer_ids_are_the_labels_encode_record_trains_on(setup):
    """data.answer_ids(answer) == the ids encode_record labels (the answer and <|im_end|>), direct and reasoning."""
    tok, _, build = setup
    for fmt in ("direct", "reasoning"):
        for rec in D.load_records_as(build / "train.jsonl", fmt):
            enc = D.encode_record(rec, tok)
            target = enc["labels"][enc["labels"] != -100].tolist()
            assert D.answer_ids(R.reference_text(rec), tok) == target, (fmt, rec["task"])


def test_guide_groups_replaces_the_last_sample_of_a_failing_group_only():
    """Fresh random rewards: a group with no sample at its reference's reward gets the reference ids in its last row
    (padded, wider when the reference is longer, NaN sampler log-probs there); a group that reaches it, and a prompt
    without a reference, are left as sampled."""
    torch.manual_seed(1)
    G, T, pad = 3, 4, 0
    seqs = torch.randint(1, 50, (3 * G, T))
    logps = -torch.rand(3 * G, T)
    total = torch.rand(3 * G) * 0.9  # below 0.9 everywhere
    total[G + 1] = 1.0  # group 1 reaches its reference's reward
    refs = [[7, 8, 9, 10, 11, 12], [5, 6], [1, 2]]
    out, lp, guided = grpo.guide_groups(seqs, logps, total, [refs[0], refs[1], None], torch.tensor([1.0, 1.0, 1.0]),
                                        G, pad)
    assert guided.tolist() == [False, False, True] + [False] * 6
    assert out.shape == (3 * G, 6) and out[G - 1].tolist() == refs[0]
    keep = [i for i in range(3 * G) if i != G - 1]
    assert torch.equal(out[keep, :T], seqs[keep]) and (out[keep, T:] == pad).all()
    assert lp[G - 1].isnan().all() and torch.equal(lp[keep, :T], logps[keep])
    same = grpo.guide_groups(seqs, logps, total, [None, refs[1], None], torch.ones(3), G, pad)
    assert same[0] is seqs and not same[2].any()


def test_a_guided_step_raises_the_reference_answer(rl, setup, monkeypatch):
    """A tiny random policy never writes the emotion_single answer, so every group's G rewards are equal (no signal
    without guidance). With guide_tasks each group's last row is the record's reference (its ids, text and score),
    the only positive advantage of its group, and the step raises the reference's log-probability under the policy."""
    tok, _, _ = setup
    monkeypatch.setattr(RL, "guide_tasks", ("emotion_single",))
    monkeypatch.setattr(RL, "max_completion_length", 24)
    monkeypatch.setattr(RL, "dynamic_sampling", True)
    policy = policy_of(setup)
    micro, row = one_step(rl, setup, policy, torch.optim.SGD(policy.parameters(), lr=0.05))
    G = rl.num_generations
    assert row["frac_guided"] == 1.0 and row["groups_kept"] == len(micro) and math.isfinite(row["rollout_logp_diff"])
    for mb in micro:
        ref = R.reference_text(mb.records[0])
        ids = D.answer_ids(ref, tok)
        assert mb.guided.tolist() == [False] * (G - 1) + [True]
        assert mb.targets[G - 1, :len(ids)].tolist() == ids and mb.lengths[G - 1] == len(ids)
        assert mb.texts[G - 1] == ref and mb.total[G - 1] == R.score(ref, mb.records[0])["total"]
        assert mb.total[:G - 1].max() < mb.total[G - 1] and mb.adv[G - 1] > 0 and (mb.adv[:G - 1] < 0).all()

    def ref_logp(p):
        with torch.no_grad():
            return sum(float(grpo.completion_logps(p, mb, RL.temperature, reencode=True)[0][G - 1][mb.cmask[G - 1]]
                             .sum()) for mb in micro)
    assert ref_logp(policy) > ref_logp(policy_of(setup))


def test_a_task_named_twice_is_drawn_twice_as_often(rl, setup, monkeypatch):
    """prompt_pool: each record of a task named k times in `tasks` is in the pool k times, the others once."""
    _, _, build = setup
    monkeypatch.setattr(RL, "tasks", ("emotion_single", "fine_grained_caption", "fine_grained_caption"))
    records = rl.load_task_records(build / "train.jsonl")
    pool = rl.prompt_pool(records)
    for task, k in (("emotion_single", 1), ("fine_grained_caption", 2)):
        mine = [r for r in records if r["task"] == task]
        assert mine and [r for r in pool if r["task"] == task] == [r for r in mine for _ in range(k)]
    monkeypatch.setattr(RL, "tasks", ())
    assert rl.prompt_pool(records) == records
