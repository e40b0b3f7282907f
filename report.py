"""One self-contained HTML report of an evaluation: the group and task tables (beside a comparison run's numbers),
per-task bars, a gallery of right and wrong answers per task (the frames the model saw, the affective tree and
answer it wrote, the reference, the reward terms) and the training curves of a metrics.jsonl.

    report.write("out/eval/report.html", result, rows, records, video_root, video_kwargs,
                 metrics_path="out/sft_emosynth/metrics.jsonl", compare="out/eval/base.json")

Everything is inside the one file: inline CSS, inline SVG, frames as base64 JPEG data: URIs (pillow); no script, no
network reference of any kind, so it opens offline and can be mailed. Frames are decoded by data.record_frames, the
model's own video path (same sampling and resize).
"""
import base64
import html
import io
import json
import math
import os

import data as D
import reward

PER_TASK = 3  # gallery entries per task and kind (right / wrong)
THUMB_HEIGHT = 72  # px of a frame thumbnail
MAX_FRAMES = 8  # frames shown per strip (evenly spaced over what the model saw)
MAX_CURVES = 9  # training-curve panels
CURVE_KEYS = ("loss", "val_loss", "reward", "reward_std", "kl", "lr", "grad_norm")  # shown first when present

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1150px;
color:#1d2430;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dde6;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6575;font-size:12px}table{border-collapse:collapse;margin:6px 0 12px}
th,td{padding:3px 10px;border-bottom:1px solid #e6e9ef;text-align:left;vertical-align:top}
th{background:#f3f5f9;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.avg td{font-weight:700;background:#fafbfd}.up{color:#137333}.down{color:#b3261e}
.bar{background:#e9edf3;width:160px;height:10px;border-radius:2px;position:relative}
.bar span{position:absolute;left:0;top:0;bottom:0;background:#3b6fd8;border-radius:2px}
.bar i{position:absolute;top:-2px;bottom:-2px;width:2px;background:#e07a1f}
.card{border:1px solid #dde2ea;border-radius:6px;padding:8px 10px;margin:8px 0;background:#fff}
.card.right{border-left:4px solid #2e9d57}.card.wrong{border-left:4px solid #c9463d}
.strip{display:flex;gap:2px;overflow-x:auto;margin:4px 0}.strip img{height:72px;border-radius:2px}
.kv{display:grid;grid-template-columns:110px 1fr;gap:2px 10px;font-size:13px}.kv b{color:#5b6575;font-weight:600}
pre{margin:0;white-space:pre-wrap;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
.curves{display:flex;flex-wrap:wrap;gap:10px}.curves figure{margin:0}
figcaption{font-size:12px;color:#5b6575;text-align:center}.legend span{margin-right:14px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
"""


def find_metrics(ckpt):
    """A metrics.jsonl beside a checkpoint directory, or in its parent (a training out_dir holding ckpt/), or None."""
    p = os.path.normpath(str(ckpt))
    for d in (p, os.path.dirname(p)):
        f = os.path.join(d, "metrics.jsonl")
        if os.path.isfile(f):
            return f
    return None


def read_metrics(path):
    """Rows of a JSONL file such as metrics.jsonl or a predictions file (lines that are not JSON objects are passed
    over: a torn last line)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):  # torn, or hostile (nesting, >4300-digit integers)
                continue
            if isinstance(r, dict):
                rows.append(r)
    return rows


def load_result(path):
    """An eval.json -> its dict; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable eval.json ({type(e).__name__}: {e})") from None
    if not isinstance(r, dict) or not isinstance(r.get("tasks"), dict):
        raise ValueError(f"{path}: not an eval.json (no 'tasks' table)")
    return r


def _e(x):
    return html.escape(str(x), quote=True)


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def _delta(v, w):
    if v is None or w is None:
        return "<td></td>"
    d = 100 * (v - w)
    cls = "up" if d > 0.05 else "down" if d < -0.05 else ""
    return f'<td class="num {cls}">{d:+.1f}</td>'


def _bar(v, w=None):
    """A CSS bar of score v in [0, 1], with a tick at the comparison run's score w."""
    v = min(max(v or 0.0, 0.0), 1.0)
    tick = f'<i style="left:{100 * min(max(w, 0.0), 1.0):.1f}%"></i>' if w is not None else ""
    return f'<div class="bar"><span style="width:{100 * v:.1f}%"></span>{tick}</div>'


def _tables(result, other):
    tasks, cmp_tasks = result.get("tasks", {}), (other or {}).get("tasks", {})
    head = "<th>score</th>" + ("<th>compare</th><th>&Delta;</th>" if other else "")
    out = ["<h2>Groups</h2>", f"<table><tr><th>group</th>{head}</tr>"]
    for g, title, _ in reward.GROUPS:
        if g in result.get("groups", {}):
            v, w = result["groups"][g], (other or {}).get("groups", {}).get(g)
            extra = f'<td class="num">{_pct(w)}</td>{_delta(v, w)}' if other else ""
            out.append(f'<tr class="avg"><td>{_e(title)}</td><td class="num">{_pct(v)}</td>{extra}</tr>')
    out.append("</table><h2>Tasks</h2>")
    out.append(f"<table><tr><th>task</th><th>metric</th><th>n</th>{head}<th></th></tr>")
    for name in ordered_tasks(tasks):
        t = tasks[name]
        w = cmp_tasks.get(name, {}).get("score")
        extra = f'<td class="num">{_pct(w)}</td>{_delta(t["score"], w)}' if other else ""
        out.append(f'<tr><td>{_e(name)}</td><td>{_e(t.get("metric", ""))}</td><td class="num">{t.get("n", "")}</td>'
                   f'<td class="num">{_pct(t["score"])}</td>{extra}<td>{_bar(t["score"], w)}</td></tr>')
    out.append("</table>")
    if result.get("skipped"):
        out.append('<p class="meta">skipped: ' + ", ".join(f"{_e(k)} &times;{v}" for k, v in
                                                           sorted(result["skipped"].items())) + "</p>")
    return out


def ordered_tasks(tasks):
    """Task names in the paper's table order (reward.GROUPS), then any others."""
    order = [t for _, _, names in reward.GROUPS for t in names if t in tasks]
    return order + sorted(t for t in tasks if t not in order)


def _svg_bars(result, other):
    """Horizontal bars per task (x100), the comparison run's as a second, lighter bar."""
    tasks = ordered_tasks(result.get("tasks", {}))
    if not tasks:
        return []
    cmp_tasks = (other or {}).get("tasks", {})
    row, lw, bw = 22 if other else 16, 190, 520
    h = 24 + row * len(tasks)
    out = [f'<svg width="{lw + bw + 60}" height="{h}" role="img" '
           f'aria-label="task scores">']
    for x in range(0, 101, 25):
        px = lw + bw * x / 100
        out.append(f'<line x1="{px}" y1="14" x2="{px}" y2="{h}" stroke="#e3e7ee"/>'
                   f'<text x="{px}" y="10" font-size="10" text-anchor="middle" fill="#6b7482">{x}</text>')
    for i, t in enumerate(tasks):
        y = 18 + i * row
        v = min(max(result["tasks"][t]["score"], 0.0), 1.0)
        out.append(f'<text x="{lw - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_e(t)}</text>'
                   f'<rect x="{lw}" y="{y + 2}" width="{bw * v:.1f}" height="10" fill="#3b6fd8"/>'
                   f'<text x="{lw + bw * v + 4:.1f}" y="{y + 11}" font-size="10">{100 * v:.1f}</text>')
        w = cmp_tasks.get(t, {}).get("score")
        if other and w is not None:
            w = min(max(w, 0.0), 1.0)
            out.append(f'<rect x="{lw}" y="{y + 13}" width="{bw * w:.1f}" height="6" fill="#e0a15c"/>')
    out.append("</svg>")
    legend = ('<p class="legend"><span><i class="sw" style="background:#3b6fd8"></i>this run</span>'
              '<span><i class="sw" style="background:#e0a15c"></i>compare</span></p>') if other else ""
    return ["<h2>Per-task scores</h2>", "".join(out), legend]


def _curve(rows, key, width=360, height=170):
    """One SVG line chart of `key` against `step` (row order when there is no step)."""
    pts = [(float(r.get("step", i)), float(r[key])) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    L, R, T, B = 46, 8, 8, 22  # margins
    sx = lambda x: L + (width - L - R) * (x - x0) / (x1 - x0)  # noqa: E731
    sy = lambda y: T + (height - T - B) * (1 - (y - y0) / (y1 - y0))  # noqa: E731
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    out = [f'<svg width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(key)}"><rect width="{width}" height="{height}" fill="#fbfcfe"/>']
    for k in range(3):
        yv = y0 + (y1 - y0) * k / 2
        out.append(f'<line x1="{L}" y1="{sy(yv):.1f}" x2="{width - R}" y2="{sy(yv):.1f}" stroke="#e3e7ee"/>'
                   f'<text x="{L - 4}" y="{sy(yv) + 3:.1f}" font-size="10" text-anchor="end" '
                   f'fill="#6b7482">{yv:.3g}</text>')
    for xv, anchor in ((x0, "start"), (x1, "end")):  # inside the panel at both ends
        out.append(f'<text x="{sx(xv):.1f}" y="{height - 6}" font-size="10" text-anchor="{anchor}" '
                   f'fill="#6b7482">{xv:.0f}</text>')
    out.append(f'<polyline points="{path}" fill="none" stroke="#3b6fd8" stroke-width="1.5"/></svg>')
    return f"<figure>{''.join(out)}<figcaption>{_e(key)} vs step</figcaption></figure>"


def _curves(metrics_path):
    if not metrics_path:
        return []
    rows = read_metrics(metrics_path)
    numeric = []
    for r in rows:
        for k, v in r.items():
            if k not in numeric and k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                numeric.append(k)
    keys = [k for k in CURVE_KEYS if k in numeric] + [k for k in numeric if k.startswith("val") and
                                                       k not in CURVE_KEYS]
    figs = [f for f in (_curve(rows, k) for k in keys) if f][:MAX_CURVES]
    if not figs:
        return []
    return ["<h2>Training curves</h2>", f'<p class="meta">{_e(os.path.basename(metrics_path))}: {len(rows)} rows</p>',
            '<div class="curves">' + "".join(figs) + "</div>"]


def frame_strip(record, video_root=None, video_kwargs=None):
    """The frames the model saw (data.record_frames), at most MAX_FRAMES evenly spaced, as base64 JPEG thumbnails;
    a video that cannot be decoded gives ([], reason)."""
    from PIL import Image
    try:
        clips = D.record_frames(record, video_root, video_kwargs)
    except (D.VideoError, OSError, ValueError) as e:
        return [], str(e).splitlines()[0][:200]
    out = []
    for frames in clips:  # uint8 [T, H, W, 3]
        T = frames.shape[0]
        idx = sorted({round(i * (T - 1) / max(MAX_FRAMES - 1, 1)) for i in range(min(T, MAX_FRAMES))})
        for i in idx:
            im = Image.fromarray(frames[i].numpy())
            w = max(1, round(im.width * THUMB_HEIGHT / im.height))
            buf = io.BytesIO()
            im.resize((w, THUMB_HEIGHT), Image.BICUBIC).save(buf, format="JPEG", quality=80)
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out, ""


def _tree_text(text):
    """The affective tree a response wrote, one line per level ("" when it wrote none)."""
    if "<think>" not in text and not any(f"{lvl}:" in text for lvl in reward.LEVELS):
        return ""
    root = reward.parse_tree(text)
    lines = [f"{lv.label}: " + "; ".join(c.label for c in lv.children) for lv in root.children if lv.children]
    return "\n".join(lines)


def _card(row, record, video_root, video_kwargs, right):
    frames, why = frame_strip(record, video_root, video_kwargs) if record is not None else ([], "no record")
    strip = "".join(f'<img alt="frame" src="data:image/jpeg;base64,{b}">' for b in frames)
    strip = f'<div class="strip">{strip}</div>' if frames else f'<p class="meta">frames: {_e(why)}</p>'
    response = str(row.get("response") or "")
    src = record if record is not None else row
    ref = reward.reference_text(src, missing="") or (", ".join(row["labels"]) if isinstance(row.get("labels"), list)
                                                     else str(row.get("labels") or ""))
    scores = " &middot; ".join(f"{_e(k)} {v:.3f}" if isinstance(v, (int, float)) else f"{_e(k)} {_e(v)}"
                               for k, v in (row.get("scores") or {}).items())
    tree = _tree_text(response)
    parts = [f'<div class="card {"right" if right else "wrong"}">', strip, '<div class="kv">',
             f"<b>question</b><div>{_e(reward.question_text(src).replace('<video>', '').strip())}</div>",
             f"<b>tree</b><pre>{_e(tree)}</pre>" if tree else "",
             f"<b>answer</b><div>{_e(reward.extract_answer(response)) or '&mdash;'}</div>",
             f"<b>reference</b><pre>{_e(ref)}</pre>", f"<b>reward</b><div>{scores}</div>",
             f"<b>record</b><div class=\"meta\">#{_e(row.get('index', ''))} "
             f"{_e(', '.join(map(str, (src.get('videos') or []))))}</div>", "</div></div>"]
    return "".join(parts)


def _gallery(rows, records, video_root, video_kwargs, per_task):
    by_task = {}
    for r in rows:
        if not r.get("skip") and isinstance(r.get("scores"), dict) and r.get("task"):
            by_task.setdefault(r["task"], []).append(r)
    if not by_task:
        return []
    out = ["<h2>Gallery</h2>", '<p class="meta">Per task, the best-scored right answers (task metric &ge; 0.5) and '
           "the worst-scored wrong ones, with the frames the model saw.</p>"]
    for t in ordered_tasks(by_task):
        metric = reward.task_metric(t)
        val = lambda r: float(r["scores"].get(metric, 0.0))  # noqa: E731
        rs = by_task[t]
        right = sorted((r for r in rs if val(r) >= 0.5), key=lambda r: (-val(r), r.get("index", 0)))[:per_task]
        wrong = sorted((r for r in rs if val(r) < 0.5), key=lambda r: (val(r), r.get("index", 0)))[:per_task]
        out.append(f"<h3>{_e(t)} <span class=\"meta\">({_e(metric)}; {len(rs)} records, "
                   f"{sum(val(r) >= 0.5 for r in rs)} right)</span></h3>")
        for r, ok in [(r, True) for r in right] + [(r, False) for r in wrong]:
            i = r.get("index")
            rec = records[i] if records is not None and isinstance(i, int) and 0 <= i < len(records) else None
            out.append(_card(r, rec, video_root, video_kwargs, ok))
    return out


def _short(path):
    """The last two parts of a path (out/sft_emosynth/eval.json -> sft_emosynth/eval.json): which run, not just
    which file name."""
    parts = os.path.normpath(str(path)).split(os.sep)
    return os.path.join(*parts[-2:])


def write(path, result, rows=(), records=None, video_root=None, video_kwargs=None, metrics_path=None, compare=None,
          per_task=PER_TASK, title=""):
    """Write the report to `path`. result: evaluate's dict (an eval.json); rows: the prediction rows it was computed
    from (evaluate's rows_out; () = no gallery); records: the evaluated records (rows point at them by index) for
    the frame strips; compare: another eval.json (path or dict) shown beside; metrics_path: a metrics.jsonl for the
    training curves. -> path"""
    other = load_result(compare) if isinstance(compare, (str, os.PathLike)) else compare
    body = [f"<h1>VidEmo evaluation{': ' + _e(title) if title else ''}</h1>",
            f'<p class="meta">{result.get("n", 0)} records, {len(result.get("tasks", {}))} tasks'
            + (f"; compared with {_e(_short(compare))}" if isinstance(compare, (str, os.PathLike))
               else "") + "</p>"]
    body += _tables(result, other)
    body += _svg_bars(result, other)
    body += _curves(metrics_path)
    body += _gallery(list(rows or ()), records, video_root, video_kwargs, per_task)
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>VidEmo evaluation{' - ' + _e(title) if title else ''}</title>"
           f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = str(path) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc)
    os.replace(tmp, path)
    return path
