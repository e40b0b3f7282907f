"""Plot training curves from metrics.jsonl files into a PNG (pillow only; no matplotlib dependency).

    python plot.py --metrics=out/rl_emosynth/metrics.jsonl --key=reward/tree/mean --out=assets/rl_tree_reward.png
    python plot.py --metrics=out/a/metrics.jsonl,out/b/metrics.jsonl --key=loss --smooth=50 --labels=a,b

Each file is one line: the running mean over `smooth` logged steps of `key` against `step`.
"""
import json

from PIL import Image, ImageDraw

import common

# ----------------------------------------------------------------------------------------------------------------------
# defaults (override with a config file or --key=value; `--help` lists them)
metrics = "out/rl_emosynth/metrics.jsonl"  # one metrics.jsonl, or several comma separated
key = "reward"  # the logged key to draw against "step"
out = "curve.png"
smooth = 25  # running mean over this many logged rows
labels = ""  # legend entries, comma separated (default: the file names)
title = ""  # default: the key and the smoothing
# ----------------------------------------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def read_curve(path, key):
    steps, values = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if key in row and "step" in row:
                steps.append(row["step"])
                values.append(float(row[key]))
    if not steps:
        raise ValueError(f"{path}: no rows with key {key!r}")
    return steps, values


def running_mean(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def nice_ticks(lo, hi, n=5):
    span = (hi - lo) or 1.0
    step = 10 ** int(f"{span / n:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    first = int(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 2) if lo <= first + i * step <= hi]


def plot(curves, labels, key, out, smooth=1, size=(720, 420), title=None):
    """curves: [(steps, values)] -> a PNG at `out` with axes, ticks and a legend."""
    W, H = size
    left, right, top, bottom = 64, 16, 34, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    curves = [(s, running_mean(v, smooth)) for s, v in curves]
    xs = [x for s, _ in curves for x in s]
    ys = [y for _, v in curves for y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.05 or 0.05
    y0, y1 = min(ys) - pad, max(ys) + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in nice_ticks(y0, y1):
        _, y = px(x0, t)
        d.line([left - 4, y, W - right, y], fill=(225, 225, 225))
        d.text((4, y - 6), f"{t:.3g}", fill="black")
    for t in nice_ticks(x0, x1):
        x, _ = px(t, y0)
        d.line([x, top, x, H - bottom + 4], fill=(225, 225, 225))
        d.text((x - 10, H - bottom + 8), f"{t:g}", fill="black")
    d.text((W // 2 - 12, H - 16), "step", fill="black")
    d.text((left, 10), title or f"{key} (running mean over {smooth} steps)", fill="black")
    for i, (s, v) in enumerate(curves):
        d.line([px(a, b) for a, b in zip(s, v)], fill=COLOURS[i % len(COLOURS)], width=2)
    # the legend goes in the right-hand corner the curves' ends stay away from
    ends = [y for _, v in curves for y in v[len(v) * 4 // 5:]]
    ly = top + 2 if sum(ends) / len(ends) < (y0 + y1) / 2 else H - bottom - 8 - 14 * len(curves)
    d.rectangle([W - right - 156, ly, W - right - 2, ly + 6 + 14 * len(curves)], fill="white", outline="gray")
    for i, label in enumerate(labels):
        c = COLOURS[i % len(COLOURS)]
        d.line([W - right - 150, ly + 10 + 14 * i, W - right - 130, ly + 10 + 14 * i], fill=c, width=2)
        d.text((W - right - 125, ly + 4 + 14 * i), label, fill="black")
    img.save(out)


def main():
    common.configure(globals())
    files = [f for f in metrics.split(",") if f]
    if not files:
        raise common.ConfigError("config key 'metrics': give at least one metrics.jsonl")
    if smooth < 1:
        raise common.ConfigError(f"config key 'smooth': must be >= 1, got {smooth}")
    names = labels.split(",") if labels else files
    if len(names) != len(files):
        raise common.ConfigError(f"config key 'labels': {len(names)} labels for {len(files)} files")
    try:
        curves = [read_curve(f, key) for f in files]
    except (OSError, ValueError) as e:
        raise common.InputError(str(e)) from None
    plot(curves, names, key, out, smooth=smooth, title=title or None)
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
