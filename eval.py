"""Evaluation: the paper's face-perception tasks (attribute perception, expression analysis) and the fine-grained
emotion caption, with rule-based metrics (accuracy, per-sample micro-F1, caption overlap, affective-tree reward) and an
optional LLM judge for captions.

    python eval.py                                                  # out/sft_emosynth/ckpt on the EmoSynth test split
    python eval.py --init_from=out/rl_emosynth/ckpt --out=out/eval/rl.json
    python eval.py --init_from=/models/VidEmo-7B --test_file=/data/Emo-CFG/jsons/test --video_root=/data/Emo-CFG \\
                   --fps=2.0 --max_frames=16 --max_pixels=401408 --batch_size=8
    python eval.py --reasoning=given                                # the answer behind the reference tree
    python eval.py --predictions=infer_result.jsonl                 # score an ms-swift / VidEmo inference output
    python eval.py --report=out/eval/report.html --compare=out/eval/other.json   # + a self-contained HTML report
    python eval.py --export_official=out/official                   # + the official evaluation's files
    python eval.py --predictions=out/official                       # re-score such a folder: the same numbers

Each finished sample is appended (and flushed) to a predictions JSONL next to the result (<out>.predictions.jsonl),
so an interrupted run resumes where it stopped and never redoes a finished sample (evaluation.py). Every response is
scored by reward.score, the same call GRPO's reward makes. Bad records (missing fields, missing or undecodable video,
too long) are counted skips.

--predictions=FILE scores an existing file without a model. Lines hold `response`, `labels`, `messages`, `videos`
(ms-swift `swift infer` output; our own predictions files too). `labels` may be a list of canonical labels or the
reference answer as a string (multi-label answers comma separated). The task comes from the line's `task` field, else
from --task, else from the file name (official Emo-CFG test names such as MAFW_Multiple-Label-Emotion-Recognition.json,
or a name containing one of our task names such as emotion_multi.jsonl); lines with no known task are counted skips.
--predictions=DIR scores every .json / .jsonl file of a folder together (the layout --export_official writes).

--report=PATH.html writes one self-contained HTML file (report.py): the tables (beside --compare=OTHER.json's numbers),
per-task bars, a gallery of right and wrong answers with the frames the model saw, and the training curves of a
metrics.jsonl found beside the checkpoint. --export_official=DIR writes the predictions as the official VidEmo
evaluation reads them: DIR/<method>/<official file name>, JSONL lines with messages / videos / response / labels
(docs/ecosystem.md).
"""
import os
import re
import sys

import torch

import common
import data as D
import evaluation
import inference
import report as html_report

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with a config file or --key=value; `--help` lists them)
init_from = "out/sft_emosynth/ckpt"  # our checkpoint, a training out_dir, or any HF Qwen2.5-VL directory
tokenizer_dir = ""  # default: the checkpoint dir
test_file = "data/emosynth/build/test.jsonl"  # a JSON/JSONL file or a folder of them (Emo-CFG jsons/test)
video_root = ""  # default: the folder of each data file (Emo-CFG: pass the dataset root that holds videos/)
out = ""  # result JSON; default out/eval/<checkpoint>__<data>.json (predictions at <out>.predictions.jsonl)
predictions = ""  # score this existing predictions JSONL instead of running a model
task = ""  # task for records / prediction lines without a `task` field (default: from the file name)
max_records = 0  # evaluate only the first N records (0 = all)
only_tasks = ()  # evaluate only the records of these tasks (() = all), e.g. the emotion tasks for tree reasoning
batch_size = 16
max_new_tokens = 128
fps = 4.0
max_frames = 8
min_pixels = 56 * 56
max_pixels = 112 * 112
# direct | reasoning: the reasoning tasks' references carry the clip's affective tree (data.apply_answer_format, trees
# from the meta.jsonl beside test_file), so their <think> part is scored too. auto / (): as the checkpoint was trained
# (its train_config.json); direct for a checkpoint from elsewhere
answer_format = "auto"
reasoning_tasks = ()
reasoning = "plain"  # plain | tree (affective-tree reasoning, see inference.py) | given (the reference tree is
# written for the model, which answers behind it: does the answer read the tree? docs/method.md)
samples = 4  # K candidates per tree level
scorer = "logprob"  # logprob | consistency | verify (inference.SCORERS; a function of your own via evaluation.evaluate)
level_samples = ()  # () = `samples` at every level, or (attribute, expression, emotion) candidate counts
level_temperatures = ()  # () = `temperature` at every level, or one per level (0 = that level's greedy line)
level_max_tokens = 96  # longest level line sampled (EmoSynth's longest, a transition's expression line, is 67 tokens)
temperature = 0.9  # sampling temperature of the tree-level candidates
video_prune_rate = 0.0  # EVS video-token pruning (0 = keep all)
judge_url = ""  # OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) to judge captions; empty = off
judge_model = "gpt-4o-2024-08-06"
judge_api_key_env = "OPENAI_API_KEY"  # the environment variable holding the key (never the key itself)
judge_timeout = 60.0
dtype = "auto"
device = "auto"
seed = 0
progress = True
report = ""  # write a self-contained HTML report here (e.g. out/eval/report.html)
compare = ""  # another eval.json whose numbers the report's tables show beside these
export_official = ""  # write the predictions in the official VidEmo evaluation layout under this folder
method = ""  # the method folder name of export_official (default: from the checkpoint's name)
# ----------------------------------------------------------------------------------------------------------------------



def default_out(ckpt, data_path):
    name = lambda p: re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.normpath(p).strip("/.")) or "model"  # noqa: E731
    stem = os.path.splitext(os.path.basename(os.path.normpath(data_path)))[0]
    return os.path.join("out", "eval", f"{name(ckpt)}__{name(stem)}.json")


def redacted(cfg):
    """The config as written into eval.json: credentials inside the judge URL (user:key@, ?key=...) blanked."""
    url = re.sub(r"(?<=://)[^/@]+@", "***@", cfg["judge_url"])
    return dict(cfg, judge_url=re.sub(r"(?i)((?:api[_-]?)?key|token|secret|password)=[^&#]*", r"\1=***", url))


def check_writable(path, key="out", example="eval.json"):
    """Fail before any work when the result cannot be written (a directory in the way, no permission)."""
    if os.path.isdir(path):
        raise common.InputError(f"config key '{key}': {path} is a directory; give a file name such as "
                                f"{path}/{example}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w"):
            pass
        os.remove(path + ".tmp")
    except OSError as e:
        raise common.InputError(f"config key '{key}': cannot write {path} ({e.strerror})") from None


_running = {}  # what a stop signal should report


def main():
    cfg = common.configure(globals())
    common.check([
        ("reasoning", reasoning, reasoning in ("plain", "tree", "given"), "plain, tree or given"),
        ("answer_format", answer_format, answer_format in ("auto", "direct", "reasoning"), "auto, direct or reasoning"),
        ("scorer", scorer, scorer in ("logprob", "consistency", "verify"), "logprob, consistency or verify"),
        ("level_samples", level_samples, len(level_samples) in (0, 3) and all(k >= 1 for k in level_samples),
         "() or three counts >= 1 (attribute, expression, emotion)"),
        ("level_temperatures", level_temperatures, len(level_temperatures) in (0, 3) and
         all(t >= 0 for t in level_temperatures), "() or three temperatures >= 0 (attribute, expression, emotion)"),
        ("batch_size", batch_size, batch_size >= 1, ">= 1"), ("samples", samples, samples >= 1, ">= 1"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("level_max_tokens", level_max_tokens, level_max_tokens >= 1, ">= 1"),
        ("max_records", max_records, max_records >= 0, ">= 0 (0 = all)"),
        ("temperature", temperature, temperature > 0, "> 0"),
        ("video_prune_rate", video_prune_rate, 0 <= video_prune_rate < 1, "in [0, 1)"),
        ("fps", fps, fps > 0, "> 0"), ("max_frames", max_frames, max_frames >= 1, ">= 1"),
        ("min_pixels", min_pixels, min_pixels >= 28 * 28, ">= 784 (one 28x28 patch group)"),
        ("max_pixels", max_pixels, max_pixels >= max(min_pixels, 28 * 28), ">= min_pixels and >= 784"),
        ("judge_timeout", judge_timeout, judge_timeout > 0, "> 0")])
    if judge_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", judge_api_key_env):  # never echo it
        raise common.ConfigError("config key 'judge_api_key_env': must name the environment variable that holds the "
                                 "key (e.g. OPENAI_API_KEY), not the key itself")
    try:
        judge = evaluation.Judge(judge_url, judge_model, judge_api_key_env, judge_timeout) if judge_url else None
    except ValueError as e:
        raise common.ConfigError(f"config key 'judge_url': {e}") from None
    if export_official and predictions:
        raise common.ConfigError("config key 'export_official': needs a model run (it is written from this run's "
                                 "records and responses), not --predictions")
    if compare and not os.path.isfile(compare):
        raise common.InputError(f"config key 'compare': {compare} not found (give an eval.json)")
    if report:
        check_writable(report, "report", "report.html")
    # SIGTERM / SIGUSR1: stop at once; every finished sample is already on disk (appended + fsync'ed per batch)
    stop = common.StopSignal(interrupt=True)
    try:
        run_eval(cfg, judge)
    except common.Stopped as e:
        pred = _running.get("predictions")
        done = (f"{len(evaluation.read_predictions(pred))} finished samples are in {pred}; rerun the same command to "
                f"resume") if pred else "nothing written"
        print(f"eval stopped by {e}: {done}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    finally:
        stop.close()


def run_eval(cfg, judge):
    rows, records, video_kwargs, ckpt = [], [], None, None
    if predictions:
        path = out or os.path.splitext(os.path.normpath(predictions))[0] + ".result.json"  # a folder: beside it
        check_writable(path)
        try:
            result = evaluation.score_predictions_file(predictions, task, judge)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise common.InputError(str(e)) from None
    else:
        dev = inference.resolve_device(device)
        fmt, fmt_tasks = common.answer_format_of(common.resolve_checkpoint(init_from), answer_format, reasoning_tasks,
                                                 D.REASONING_TASKS)
        try:
            records = evaluation.load_eval_records(test_file, task, fmt, fmt_tasks)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise common.InputError(str(e)) from None
        if only_tasks:
            records = [r for r in records if r.get("task") in only_tasks]
            if not records:
                raise common.InputError(f"config key 'only_tasks': no records of {list(only_tasks)} in {test_file}")
        if max_records > 0:
            records = records[:max_records]
        path = out or default_out(common.resolve_checkpoint(init_from), test_file)
        check_writable(path)
        # two evals appending to one predictions file would mix their rows
        common.lock_file(path + ".lock", "out", os.path.abspath(path))
        model, tokenizer, ckpt = inference.load_model(init_from, tokenizer_dir, dev, dtype)
        pred_path = os.path.splitext(path)[0] + ".predictions.jsonl"
        _running["predictions"] = pred_path
        video_kwargs = dict(fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
        torch.manual_seed(seed)
        result = evaluation.evaluate(model, tokenizer, records, video_root or None, video_kwargs,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens, device=dev,
                                     predictions_path=pred_path,
                                     reasoning=reasoning, samples=samples, video_prune_rate=video_prune_rate,
                                     progress=progress, scorer=scorer, temperature=temperature, judge=judge,
                                     seed=seed, level_samples=tuple(level_samples),
                                     level_temperatures=tuple(level_temperatures),
                                     level_max_tokens=level_max_tokens, report_seconds=True, rows_out=rows)
        result["predictions"] = pred_path
    result["config"] = redacted(cfg)
    print(evaluation.format_table(result))
    evaluation.write_results(result, path)
    print(f"wrote {path}")
    if export_official:
        name = method or method_name(ckpt)
        written = evaluation.export_official(rows, records, export_official, name)
        print(f"wrote {sum(written.values())} predictions in {len(written)} files under "
              f"{os.path.join(export_official, name)}")
    if report:
        try:
            html_report.write(report, result, rows, records, video_root or None, video_kwargs,
                              metrics_path=html_report.find_metrics(ckpt) if ckpt else None,
                              compare=compare or None, title=ckpt or predictions or os.path.basename(path))
        except ValueError as e:  # an unreadable compare / metrics file, named in the message
            raise common.InputError(common.first_line(e)) from None
        print(f"wrote {report}")


def method_name(ckpt):
    """A folder name for the official layout from the checkpoint path: out/rl_emosynth/ckpt -> rl_emosynth."""
    p = os.path.normpath(str(ckpt))
    if os.path.basename(p) in ("ckpt", "ckpt.old"):
        p = os.path.dirname(p)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(p)) or "videmo"


if __name__ == "__main__":
    common.run(main)
