"""Evaluation, shared by eval.py and both trainers: generate a response per record, score it with reward.score (the
same call GRPO's reward makes), and summarise per task and per level like the paper's tables.

    result = evaluate(model, tokenizer, records, video_root, video_kwargs, predictions_path="out/x.predictions.jsonl")
    print(format_table(result))

Each finished sample is appended (and flushed) to the predictions JSONL, keyed by a stable record id (index in the
data + hash of its messages/videos) and a run tag (weights fingerprint + reasoning mode), so an interrupted run resumes
where it stopped and never redoes a finished sample; the result is always computed from that file. Bad records
(missing fields, missing or undecodable video, too long) are counted skips. score_predictions_file scores an existing
ms-swift / vLLM prediction file without a model.
"""
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import torch
from tqdm import tqdm

import data as D
import inference
import report as html_report
import reward
from reward import GROUPS, task_level, task_metric


def score_sample(response, record, task, judge=None):
    """Scores of one response: reward.score's dict (the metric key, format, total) plus `judge` (0..1, or None when
    the call failed) for caption tasks when a judge is configured."""
    record = dict(record, task=task)
    scores = {k: float(v) for k, v in reward.score(response, record).items()}
    if task_metric(task) not in ("accuracy", "f1") and judge is not None:
        scores["judge"] = judge(reward.question_text(record), record.get("tree") or
                                reward.reference_text(record, missing="") or str(record.get("labels", "")), response)
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# records, keys, options


def load_eval_records(path, default_task="", answer_format="direct", reasoning_tasks=D.REASONING_TASKS):
    """Records of one file or a folder (data.load_records); a record without `task` gets default_task or the task its
    file name implies. Entries that are not JSON objects become {"_broken": reason} placeholders (after the good
    records), counted as skips by evaluate. answer_format="reasoning": records of reasoning_tasks get the clip's
    affective tree as their reference (data.apply_answer_format, trees from the meta.jsonl beside `path`), so the
    response's <think> part is scored with the tree reward beside the answer's metric."""
    bad = []
    records = D.load_records(path, skipped=bad)
    if not records and not bad:
        raise FileNotFoundError(f"no records in {path}")
    for r in records:
        task = default_task or reward.task_from_name(r["_src"].rsplit(":", 1)[0])
        if not r.get("task") and task:
            r["task"] = task
    if answer_format != "direct":
        records, n_conv, n_missing = D.apply_answer_format(records, answer_format, reasoning_tasks,
                                                           D.load_clip_trees(D.meta_path_for(path)))
        print(f"answer_format={answer_format}: {n_conv} records answer through the affective tree"
              + (f", {n_missing} of the reasoning tasks have no tree" if n_missing else ""), file=sys.stderr)
    return records + [{"_broken": b.split(": ", 1)[-1], "_src": b.split(": ", 1)[0]} for b in bad]


def record_key(index, record):
    """Stable id of a record: its index in the data + a hash of its messages and videos."""
    body = {"messages": record.get("messages"), "videos": record.get("videos")} if isinstance(record, dict) else record
    h = hashlib.sha1(json.dumps(body, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{index}:{h}"


# ----------------------------------------------------------------------------------------------------------------------
# scoring


class _Tracked:
    """urllib handlers that remember the sockets they open, so a timer can shut them at a request's deadline
    (a socket timeout is per read: a server that trickles a byte at a time never trips it)."""

    @staticmethod
    def opener(conns):
        import http.client

        def tracked(cls):
            class Conn(cls):
                def connect(self):
                    super().connect()
                    conns.append(self.sock)  # the socket itself: urllib drops conn.sock once the headers are read
            return Conn

        class H(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(tracked(http.client.HTTPConnection), req)

        class S(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(tracked(http.client.HTTPSConnection), req, context=self._context)

        return urllib.request.build_opener(H, S)


class Judge:
    """An OpenAI-compatible chat endpoint that rates a caption against the reference, 0-10 -> [0, 1]. urllib only.
    `timeout` is a wall deadline per request (connect, headers and body together); a reply that is not JSON (an HTML
    error page from a proxy), over MAX_REPLY bytes, or without a score is a counted failure whose reason is printed
    once, naming the URL."""

    MAX_REPLY = 1 << 20
    PROMPT = ("Rate how well a model's description of a person in a video matches the reference description.\n"
              "Consider the emotional states named (label overlap) and the supporting cues: facial attributes, "
              "actions, facial expressions and their timing (clue overlap). Ignore wording and style.\n\n"
              "Question: {question}\n\nReference: {reference}\n\nModel response: {response}\n\n"
              "Reply with a single integer score from 0 (unrelated or wrong) to 10 (same content), "
              "formatted as 'Score: N'.")

    def __init__(self, url, model, api_key_env="OPENAI_API_KEY", timeout=60.0, retries=2, give_up_after=3):
        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise ValueError(f"{url!r} is not an http:// or https:// URL (e.g. http://localhost:8000/v1)")
        url = url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
        self.url, self.model, self.timeout, self.retries = url, model, timeout, retries
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.failures, self.in_a_row, self.give_up_after, self.gave_up = 0, 0, give_up_after, False
        self.last_error, self.reported = None, set()

    def shown_url(self):
        return re.sub(r"(?<=://)[^/@]+@", "***@", self.url.split("?")[0])  # never print credentials

    def _post(self, body, headers):
        """One request under a wall deadline -> the parsed JSON reply. Raises OSError / ValueError saying why."""
        import threading
        conns = []
        timer = threading.Timer(self.timeout, lambda: [_shut(c) for c in list(conns)])
        timer.daemon = True
        timer.start()
        t0 = time.monotonic()
        try:
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            with _Tracked.opener(conns).open(req, timeout=self.timeout) as f:
                ctype = f.headers.get_content_type()
                blob = f.read(self.MAX_REPLY + 1)
        except Exception as e:  # HTTPException (bad status line, cut reply), URLError, socket errors
            if time.monotonic() - t0 >= self.timeout * 0.99:
                raise TimeoutError(f"no complete reply within the {self.timeout:g} s deadline") from None
            raise OSError(f"{type(e).__name__}: {first_line(e)}") from None
        finally:
            timer.cancel()
        if time.monotonic() - t0 >= self.timeout * 0.99:  # the timer cut the reply short
            raise TimeoutError(f"no complete reply within the {self.timeout:g} s deadline")
        if len(blob) > self.MAX_REPLY:
            raise ValueError(f"reply over {self.MAX_REPLY >> 20} MB")
        try:
            return json.loads(blob.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            head = re.sub(r"\s+", " ", blob[:80].decode("utf-8", "replace"))
            raise ValueError(f"answered 200 with {ctype}, not JSON (starts {head!r})") from None

    def _failed(self, why):
        self.last_error = why
        if why not in self.reported and len(self.reported) < 5:  # each distinct reason once
            self.reported.add(why)
            print(f"judge {self.shown_url()}: {why}", file=sys.stderr, flush=True)

    def __call__(self, question, reference, response):
        if self.gave_up:  # an unresponsive judge must not stall the evaluation: rule-based scores only from here
            self.failures += 1
            return None
        body = {"model": self.model, "temperature": 0.0, "max_tokens": 32,
                "messages": [{"role": "user", "content": self.PROMPT.format(
                    question=question.replace("<video>", "").strip(), reference=reference, response=response)}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                reply = self._post(body, headers)
                s = parse_judge_score(reply["choices"][0]["message"]["content"])
                if s is not None:
                    self.in_a_row = 0
                    return s / 10.0
                self._failed("reply has no 0-10 score")
            except (OSError, ValueError) as e:
                self._failed(str(e))
            except (KeyError, IndexError, TypeError):
                self._failed("reply is not a chat completion (no choices[0].message.content)")
            if attempt < self.retries:
                time.sleep(0.5 * (attempt + 1))
        self.failures += 1
        self.in_a_row += 1
        if self.in_a_row >= self.give_up_after:
            self.gave_up = True
            print(f"judge {self.shown_url()}: {self.in_a_row} calls in a row failed (last: {self.last_error}); giving "
                  f"up on the judge, the rule-based scores stay", file=sys.stderr, flush=True)
        return None  # counted as 0 in the average, like the official judge's failed calls


def _shut(sock):
    """Shut a socket from another thread: a read blocked on it returns at once."""
    import socket
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def parse_judge_score(text):
    """A 0-10 score from a judge's reply: 'Score: 7', '7/10', '**8**', '7.5', 'I would give it a 6.' -> float."""
    if not isinstance(text, str):
        return None
    for pat in (r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", r"(\d+(?:\.\d+)?)\s*/\s*10\b", r"(?<![\d.])(\d+(?:\.\d+)?)"):
        for m in re.finditer(pat, text, re.I):
            v = float(m.group(1))
            if 0.0 <= v <= 10.0:
                return v
    return None


def summarize(rows, seconds=False):
    """The result dict from prediction rows (one per record; skip rows carry `skip`). Rows that carry a generation
    `cost` add the mean tokens generated per record (per task and overall, in `cost`); with `seconds` also the mean
    wall seconds (not reproducible from run to run, so off unless asked for)."""
    per_task, judged, skipped, trees, costs = {}, {}, Counter(), {}, {}
    for r in rows:
        if r.get("skip"):
            skipped[r["skip"]] += 1
            continue
        t, metric = r["task"], task_metric(r["task"])
        per_task.setdefault(t, []).append(float(r["scores"].get(metric, 0.0)))
        if isinstance(r.get("cost"), dict):  # generation cost of the row (evaluate): tokens and seconds
            costs.setdefault(t, []).append(r["cost"])
        if metric != "tree" and "tree" in r["scores"]:  # a reasoning-format record: its <think> tree is scored too
            trees.setdefault(t, []).append(float(r["scores"]["tree"]))
        if "judge" in r["scores"]:
            judged.setdefault(t, []).append(r["scores"]["judge"])
    tasks = {}
    for t, vals in per_task.items():
        tasks[t] = {"metric": task_metric(t), "score": sum(vals) / len(vals), "n": len(vals)}
        if t in trees:
            tasks[t]["tree"] = sum(trees[t]) / len(trees[t])
        if t in costs:
            tasks[t]["tokens"] = sum(float(c.get("tokens", 0.0)) for c in costs[t]) / len(costs[t])
            if seconds:
                tasks[t]["seconds"] = sum(float(c.get("seconds", 0.0)) for c in costs[t]) / len(costs[t])
        if t in judged:
            js = judged[t]
            tasks[t]["judge"] = sum(j or 0.0 for j in js) / len(js)
            tasks[t]["judge_failed"] = sum(j is None for j in js)
    groups = {}
    for g, _, _ in GROUPS:
        s = [v["score"] for t, v in tasks.items() if task_level(t) == g]
        if s:
            groups[g] = sum(s) / len(s)
    out = {"tasks": tasks, "groups": groups, "skipped": dict(skipped), "n": len(rows)}
    allc = [c for cs in costs.values() for c in cs]
    if allc:  # mean generated tokens and seconds per scored record
        out["cost"] = {"tokens": sum(float(c.get("tokens", 0.0)) for c in allc) / len(allc), "n": len(allc)}
        if seconds:
            out["cost"]["seconds"] = sum(float(c.get("seconds", 0.0)) for c in allc) / len(allc)
    return out


def format_table(result):
    """Markdown tables grouped like the paper (scores x100), each closed by its group average."""
    tasks, out = result["tasks"], []
    for g, title, order in GROUPS:
        names = [t for t in order if t in tasks] + sorted(t for t in tasks if task_level(t) == g and t not in order)
        if not names:
            continue
        out += [f"| {title} | metric | score | n |", "|---|---|---:|---:|"]
        for t in names:
            v = tasks[t]
            judge = ""
            if "judge" in v:
                failed = f", {v['judge_failed']} of {v['n']} judge calls failed" if v.get("judge_failed") else ""
                judge = f" (judge {100 * v['judge']:.1f}{failed})"
            tree = f" (tree {100 * v['tree']:.1f})" if "tree" in v else ""
            out.append(f"| {t} | {v['metric']} | {100 * v['score']:.1f}{judge}{tree} | {v['n']} |")
        out += [f"| **average** | | **{100 * result['groups'][g]:.1f}** | |", ""]
    other = sorted(t for t in tasks if task_level(t) not in {g for g, _, _ in GROUPS})
    if other:
        out += ["| Other | metric | score | n |", "|---|---|---:|---:|"]
        out += [f"| {t} | {tasks[t]['metric']} | {100 * tasks[t]['score']:.1f} | {tasks[t]['n']} |" for t in other]
        out.append("")
    if result.get("cost"):
        c = result["cost"]
        secs = f" and {c['seconds']:.3f} s" if "seconds" in c else ""
        out.append(f"generation: {c['tokens']:.1f} tokens{secs} per record ({c['n']} records generated by this tag)")
    if result.get("skipped"):
        out.append("skipped: " + ", ".join(f"{k} x{v}" for k, v in sorted(result["skipped"].items())))
    if not tasks:
        out.append("(no scored samples)")
    return "\n".join(out).rstrip() + "\n"


def write_results(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# the predictions file: append-only JSONL, one line per finished record


def read_predictions(path):
    """Rows of a predictions JSONL (a torn last line from a crash is ignored)."""
    if not path or not os.path.exists(path):
        return []
    return html_report.read_metrics(path)  # the same JSONL reader: one object per line, torn lines passed over


class PredictionWriter:
    def __init__(self, path):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path):  # drop a torn last line so the next append starts on a fresh line
                with open(path, "rb+") as f:
                    blob = f.read()
                    if blob and not blob.endswith(b"\n"):
                        f.truncate(blob.rfind(b"\n") + 1)

    def write(self, rows):
        if not self.path or not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def record_task(record, default_task=""):
    """The record's task, or raise ValueError with the skip reason."""
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    if record.get("_broken"):
        raise ValueError("malformed entry: " + str(record["_broken"]))
    t = record.get("task") or default_task
    if not t:
        raise ValueError("missing task")
    if task_metric(t) is None:
        raise ValueError(f"unknown task {t}")
    labels = record.get("labels")
    if not (labels is None or isinstance(labels, str) or
            (isinstance(labels, list) and all(isinstance(x, str) for x in labels))):
        raise ValueError(f"labels must be a string or a list of strings, got {type(labels).__name__}")
    if not (record.get("labels") or record.get("tree") or reward.reference_text(record, missing="").strip()):
        raise ValueError("no reference answer")
    return t


def skip_reason(e):
    """A short, countable reason: file paths, numbers and parenthesised details (which vary per record) removed,
    e.g. "video videos/1.mp4: /data/videos/1.mp4: no such file" -> "video: no such file"."""
    s = str(e).strip() or type(e).__name__
    s = re.sub(r"\s*\(.*", "", s)  # "(JSONDecodeError: ...)" and the like
    s = re.sub(r"(?<![^\s:'\"])(?:/[^\s:'\"]+|[^\s:'\"]+\.(?:mp4|mov|avi|mkv|webm|gif|jpe?g|png|jsonl?))", "", s,
               flags=re.I)
    s = re.sub(r"\d+", "N", s)
    s = re.sub(r"\s*:(?:\s*:)*\s*", ": ", s)
    s = re.sub(r"\s+", " ", s).strip(" :")
    return s[:100] or type(e).__name__


def weights_fingerprint(model):
    """A short hash of a strided sample of every parameter: predictions made by other weights are never reused."""
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        k = min(64, flat.numel())  # integer strides: a float linspace rounds past the end of tensors > 2^24
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def given_head(record):
    """What reasoning="given" writes for the model before it answers: a reasoning-format reference's think block and
    "<answer>"; "" for every other record (it answers as in plain decoding). The answer behind the reference tree,
    against the answer behind the model's own (plain), shows how far the answer reads the tree at all."""
    if record.get("answer_format") != "reasoning":
        return ""
    think = D.think_block(record.get("tree"))
    return f"{think}\n<answer>" if think else ""


def run_tag(model, reasoning="plain", samples=4, scorer="logprob", video_prune_rate=0.0, tag="", level_samples=(),
            level_temperatures=()):
    """What a prediction row must match to be reused: the weights, the reasoning mode, pruning, the caller's tag."""
    name = scorer if isinstance(scorer, str) else getattr(scorer, "__name__", "custom")
    mode = reasoning if reasoning in ("plain", "given") else f"tree-K{samples}-{name}"
    if reasoning == "tree" and level_samples:
        mode += "-k" + ",".join(str(k) for k in level_samples)
    if reasoning == "tree" and level_temperatures:
        mode += "-t" + ",".join(f"{t:g}" for t in level_temperatures)
    if video_prune_rate > 0:
        mode += f"-prune{video_prune_rate:g}"
    return "|".join(x for x in (tag, mode, "w" + weights_fingerprint(model)) if x)


@torch.no_grad()
def evaluate(model, tokenizer, records, video_root, video_kwargs, batch_size=16, max_new_tokens=128, device=None,
             predictions_path=None, reasoning="plain", samples=4, video_prune_rate=0.0, progress=True,
             scorer="logprob", temperature=0.9, judge=None, tag="", default_task="", seed=0, level_samples=(),
             level_temperatures=(), level_max_tokens=64, report_seconds=False, video_cache=None, rows_out=None,
             max_seq_len=None):
    """Generate a response for every record, score it, and return the result dict
    {"tasks": {task: {"metric", "score", "n"}}, "groups": {level: mean task score}, "skipped": {reason: count}, "n"}.
    With predictions_path, finished samples are appended there and reused by the next call with the same weights,
    reasoning mode and `tag`; the result is computed from the file. video_cache: a data.VideoCache to decode into
    (default: one for this call; EmoSynth asks ~4 tasks of each clip). rows_out: a list that gets the prediction rows
    the result is computed from (for export_official and report.write). max_seq_len: longer prompts are counted
    skips (default: the model's max_position_embeddings less max_new_tokens)."""
    raw = getattr(model, "module", model)  # DDP-wrapped models generate through the bare module
    if device is not None and next(raw.parameters()).device != torch.device(device):
        raw.to(device)
    if reasoning not in ("plain", "tree", "given"):
        raise ValueError(f"reasoning must be 'plain', 'tree' or 'given', got {reasoning!r}")
    tag = run_tag(raw, reasoning, samples, scorer, video_prune_rate, tag, level_samples, level_temperatures)
    keys = [record_key(i, r) for i, r in enumerate(records)]
    wanted = set(keys)
    writer = PredictionWriter(predictions_path)  # first: it cuts a torn last line, which must not count as done
    done = {r["key"] for r in read_predictions(predictions_path) if r.get("tag") == tag and r.get("key") in wanted}
    todo = [i for i, k in enumerate(keys) if k not in done]
    if max_seq_len is None:  # a prompt past the model's positions (a pasted transcript) would stall the whole batch
        cfg = getattr(raw, "config", None) or {}
        limit = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
        max_seq_len = max(1, int(limit) - max_new_tokens) if limit else None
    video_cache = D.VideoCache(512) if video_cache is None else video_cache
    memory = []  # rows of this call (the result without a predictions file)
    gen = torch.Generator(device=next(raw.parameters()).device).manual_seed(seed)
    was_training = raw.training
    raw.eval()
    bar = tqdm(total=len(records), initial=len(records) - len(todo), disable=not progress, desc="eval",
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            chunk, rows, items = todo[start:start + batch_size], [], []
            for i in chunk:
                rec = records[i]
                try:
                    t = record_task(rec, default_task)
                    item = D.encode_prompt(rec, tokenizer, video_root, video_kwargs, max_seq_len=max_seq_len,
                                           cache=video_cache)
                    item["index"] = i
                    items.append((i, t, item))
                except Exception as e:  # SkipRecord, broken fields: a counted skip, the run goes on
                    rows.append({"key": keys[i], "index": i, "tag": tag, "skip": skip_reason(e),
                                 "detail": str(e)[:500]})
            if items:
                if reasoning in ("plain", "given"):
                    # given: the reference's own tree is written for the model, which writes the answer behind it
                    heads = [given_head(records[i]) if reasoning == "given" else "" for i, _, _ in items]
                    c = inference.new_cost()
                    texts = inference.generate_plain(
                        raw, tokenizer, [inference.with_head(it, tokenizer, h) for (_, _, it), h in zip(items, heads)],
                        max_new_tokens, video_prune_rate, cost=c)
                    texts = [h + t for h, t in zip(heads, texts)]
                    costs = [{"tokens": n, "seconds": c["seconds"] / len(items)} for n in c["per_row"]]
                else:
                    # one seed per record: a resumed run samples exactly what the uninterrupted one would have
                    texts, costs = [], []
                    for i, _, it in items:
                        c = inference.new_cost()
                        texts.append(inference.tree_reasoning(
                            raw, tokenizer, it, samples, scorer, temperature, max_new_tokens=max_new_tokens,
                            video_prune_rate=video_prune_rate, generator=gen.manual_seed(seed * 1_000_003 + i),
                            level_samples=level_samples or None, level_temperatures=level_temperatures or None,
                            level_max_tokens=level_max_tokens, cost=c))
                        costs.append({"tokens": c["tokens"], "seconds": c["seconds"]})
                for (i, t, _), text, cost in zip(items, texts, costs):
                    rec = records[i]
                    row = {"key": keys[i], "index": i, "tag": tag, "task": t, "level": task_level(t),
                           "response": text, "labels": rec.get("labels"), "messages": rec.get("messages"),
                           "videos": rec.get("videos"), "cost": cost}
                    try:
                        row["scores"] = score_sample(text, rec, t, judge)
                    except Exception as e:  # a reference reward.py cannot read: counted, the response kept
                        row.update(skip="unscorable: " + skip_reason(e), detail=str(e)[:500])
                    rows.append(row)
            writer.write(rows)
            memory += rows
            bar.update(len(chunk))
    finally:
        bar.close()
        raw.train(was_training)
    if predictions_path:
        latest = {}
        for r in read_predictions(predictions_path):
            if r.get("tag") == tag and r.get("key") in wanted:
                latest[r["key"]] = r
        rows = [latest[k] for k in keys if k in latest]
    else:
        rows = memory
    if rows_out is not None:
        rows_out.extend(rows)
    return summarize(rows, seconds=report_seconds)


def report(model, tokenizer, records, video_root, video_kwargs, out_dir, html="", **kw):
    """A trainer's final evaluation: evaluate (predictions in out_dir/eval_predictions.jsonl, so a rerun resumes),
    write out_dir/eval.json and print the tables; html: also write this self-contained HTML report (report.py, with
    the training curves of out_dir/metrics.jsonl). kw: evaluate's options."""
    rows = []
    result = evaluate(model, tokenizer, records, video_root, video_kwargs,
                      predictions_path=os.path.join(out_dir, "eval_predictions.jsonl"), rows_out=rows, **kw)
    write_results(result, os.path.join(out_dir, "eval.json"))
    print(format_table(result))
    if html:
        html_report.write(html, result, rows, records, video_root, video_kwargs,
                          metrics_path=html_report.find_metrics(out_dir),
                          title=os.path.basename(os.path.normpath(out_dir)))
        print(f"wrote {html}")
    return result


def score_predictions_file(path, default_task="", judge=None):
    """Score an existing predictions JSONL (ms-swift `swift infer` output or ours) without a model; `path` may also be
    a directory of them (score_predictions_dir)."""
    if os.path.isdir(path):
        return score_predictions_dir(path, default_task, judge)
    return summarize(_file_rows(path, default_task, judge))


def score_predictions_dir(path, default_task="", judge=None):
    """Score every .json / .jsonl file under `path` together, each file's task from its lines or its name: the
    official layout that export_official writes (DIR/<method>/<file>), or one method's folder of it."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".json", ".jsonl")))
    if not files:
        raise FileNotFoundError(f"no .json / .jsonl prediction files under {path}")
    folders = sorted({os.path.dirname(f) for f in files})
    if len(folders) > 1:
        raise ValueError(f"{path}: prediction files in {len(folders)} folders ({', '.join(folders[:3])}); pass one "
                         f"method's folder")
    return summarize([r for f in files for r in _file_rows(f, default_task, judge)])


def _file_rows(path, default_task="", judge=None):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictions file not found: {path}")
    file_task = default_task or reward.task_from_name(path)
    rows = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        text = f.read()
    try:  # a JSON list instead of JSONL
        obj = json.loads(text)
        items = list(enumerate(obj if isinstance(obj, list) else [obj], 1))
    except (ValueError, RecursionError):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except (ValueError, RecursionError):
                    items.append((n, None))
    for n, r in items:
        try:
            rows.append(dict(_score_line(r, file_task, judge), index=n))
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a bad line is a counted skip, never fatal
            rows.append({"index": n, "skip": "bad line: " + skip_reason(e), "detail": f"{path}:{n}: {e}"[:500]})
    return rows


def _score_line(r, file_task, judge):
    """One prediction line -> a summarize row; raises ValueError / TypeError naming what is wrong with the line."""
    if not isinstance(r, dict) or "response" not in r:
        raise ValueError("not a JSON object with a response")
    if r.get("skip"):  # our own skip rows
        return {"skip": str(r["skip"])}
    t = r.get("task") or file_task
    if not isinstance(t, str):
        raise TypeError(f"task must be a string, got {type(t).__name__}")
    if not t or task_metric(t) is None:
        return {"skip": f"unknown task {t}" if t else "missing task"}
    labels = r.get("labels")
    if not (labels is None or isinstance(labels, str) or
            (isinstance(labels, list) and all(isinstance(x, str) for x in labels))):
        raise TypeError(f"labels must be a string or a list of strings, got {type(labels).__name__}")
    msgs = [m for m in (r.get("messages") or []) if isinstance(m, dict)]
    if not msgs or msgs[-1].get("role") != "assistant":  # swift moves the reference into `labels`
        ref = labels if isinstance(labels, str) else ", ".join(labels or [])
        msgs = msgs + [{"role": "assistant", "content": ref}]
    rec = {k: v for k, v in r.items() if k not in ("response", "scores", "messages")}
    rec["messages"] = msgs
    if isinstance(labels, str) and "<think>" in labels and not rec.get("tree"):
        rec["tree"] = labels
    return {"task": t, "scores": score_sample(str(r["response"] or ""), rec, t, judge)}




# ----------------------------------------------------------------------------------------------------------------------
# the official VidEmo evaluation layout: DIR/<method>/<file>, one JSONL file per test set (named .json), each line
# {"response", "labels", "messages": [{"role": "user", "content": question}], "videos"} as ms-swift's `swift infer`
# writes it. File names and order are the official evaluation's task list; the task each is scored as is ours.

OFFICIAL_FILES = (
    ("RAVDESS_Fine-grained-Emotion-Recognition.json", "emotion_fine"),
    ("PERR_Single-Label-Conversational-Emotion-Recognition.json", "conversation_emotion"),
    ("MOSI_Single-Label-Sentiment-Recognition.json", "sentiment_single"),
    ("MOSEI_Single-Label-Sentiment-Recognition.json", "sentiment_single"),
    ("MER2023_Single-Label-Emotion-Recognition.json", "emotion_single"),
    ("MELD_Single-Label-Conversational-Emotion-Recognition_new.json", "conversation_emotion"),
    ("MEAD_Fine-grained-Emotion-Recognition.json", "emotion_fine"),
    ("MEAD_ID.json", "identity"),
    ("MEAD_Head-Pose.json", "head_pose"),
    ("MAFW_Single-Label-Emotion-Recognition.json", "emotion_single"),
    ("DFEW_Single-Label-Emotion-Recognition.json", "emotion_single"),
    ("CHSIMIv1_Fine-grained-Sentiment-Recognition.json", "sentiment_fine"),
    ("CelebV-Text_Emotion-Caption.json", "emotion_caption"),
    ("CelebV-Text_Appearance-Caption.json", "appearance_caption"),
    ("CelebV-Text_Action-Caption.json", "action_caption"),
    ("CAS_Single-Label-Micro-Expression-Recognition.json", "micro_expression"),
    ("MAFW_Multiple-Label-Emotion-Recognition.json", "emotion_multi"),
    ("AffWild2_Action_Unit_Detection.json", "au_detection"),
    ("CelebV-HQ_Appearance-Recognition.json", "appearance_recognition"),
    ("CelebV-HQ_Action-Recognition.json", "action_recognition"),
    ("caption_test_sampling_v2_all_example.json", "fine_grained_caption"),
    ("QA_test_sampling_all.json", None),  # open attribute QA, judged per attribute: no task of ours scores it
)
# tasks without an official file: a name the official script never reads and reward.task_from_name maps back
EXTRA_FILES = {"emotion_transition": "EmoSynth_emotion_transition.json"}
SKIPPED_FILE = "videmo_skipped.jsonl"  # our counted skips, so that re-scoring the folder gives the same eval.json


def official_file(task, source=""):
    """The official file name for a record of `task`: its own source file's name when that is an official one of
    the same task (real Emo-CFG test sets keep their split, e.g. MELD vs PERR), else the first official file of the
    task."""
    name = os.path.basename(str(source).rsplit(":", 1)[0]) if source else ""
    official = dict(OFFICIAL_FILES)
    if name in official and official[name] in (task, None):
        return name
    for fn, t in OFFICIAL_FILES:
        if t == task:
            return fn
    return EXTRA_FILES.get(task, f"{task}.json")


def official_line(row, record):
    """One prediction row (evaluate's) and its record -> the official JSONL line. `labels` is the reference our
    scorer reads, as a string (comma separated for F1 tasks; a list only when a string cannot carry it exactly).
    Extra keys the official script ignores keep what re-scoring needs: task, and for reasoning-format records
    answer_format and tree."""
    t = row["task"]
    metric = task_metric(t)
    reasoning = record.get("answer_format") == "reasoning"
    ref = reward.reference_text(record, missing="")
    if metric in ("accuracy", "f1"):
        if record.get("labels"):
            items = reward.as_label_list(record["labels"], metric)
        else:
            items = reward.as_label_list(reward.extract_answer(ref) if reasoning else ref, metric)
        if metric == "f1" and not any(re.search(r"[,;\n]", x) or x != x.strip() for x in items):
            labels = ",".join(items)  # no spaces: the official F1 splits on "," without stripping
        elif metric == "accuracy" and len(items) == 1 and items[0] == items[0].strip():
            labels = items[0]
        else:
            labels = items
    elif metric == "caption":
        labels = reward.extract_answer(ref) if reasoning else ref
    else:
        labels = ref
    question = reward.question_text(record).replace("<video>", "").strip()
    line = {"response": row["response"], "labels": labels, "logprobs": None,
            "messages": [{"role": "user", "content": question}], "videos": list(record.get("videos") or []),
            "task": t}
    if reasoning:
        line.update(answer_format="reasoning", tree=record.get("tree"))
    return line


def export_official(rows, records, out_dir, method):
    """Write the rows of one evaluation (evaluate's rows_out) in the official layout out_dir/<method>/<file>;
    -> {file name: lines written}. Rows are matched to their records by index and key."""
    folder = os.path.join(out_dir, method)
    os.makedirs(folder, exist_ok=True)
    files, skipped = {}, []
    for row in rows:
        i = row.get("index")
        rec = records[i] if isinstance(i, int) and 0 <= i < len(records) else None
        if rec is None or row.get("key") != record_key(i, rec):
            raise ValueError(f"prediction row {row.get('key')} does not belong to these records")
        if row.get("skip"):
            skipped.append({"response": None, "skip": row["skip"], "task": row.get("task"), "index": i})
            continue
        fn = official_file(row["task"], rec.get("_src", ""))
        files.setdefault(fn, []).append(official_line(row, rec))
    if skipped:
        files[SKIPPED_FILE] = skipped
    for fn, lines in files.items():
        tmp = os.path.join(folder, fn + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(folder, fn))
    return {fn: len(lines) for fn, lines in files.items()}
