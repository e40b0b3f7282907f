"""VidEmo data: video -> Qwen2.5-VL pixel patches, Emo-CFG records -> token ids + labels, curriculum sampler.

    frames, ts = load_video("clip.mp4")                       # uint8 [T, H, W, 3], seconds [T]  (2 fps, <=16 frames)
    pv, grid, spg = patchify_video(frames, fps=2.0)           # [N, 1176] float32, [[t, h, w]], [2/fps]
    tok = load_tokenizer("path/to/Qwen2.5-VL-3B-Instruct")
    item = encode_record(record, tok, video_root, max_seq_len=4096, video_kwargs={})
    loader = DataLoader(EmoDataset(records, tok, root, 4096, {}), batch_sampler=CurriculumSampler(levels, 8),
                        collate_fn=functools.partial(collate, pad_token_id=tok.pad_token_id), num_workers=2)

Frame sampling and resizing follow qwen_vl_utils (what VidEmo's ms-swift inference uses): n = duration * fps frames,
clamped to [min_frames, max_frames] and the clip's frame count, floored to a multiple of 2, spread evenly over the
clip (by presentation time, so variable-frame-rate clips sample evenly in seconds); frames are resized with bicubic +
antialias to `smart_resize` (sides multiples of 28, area within [min_pixels, max_pixels], aspect kept). Patch layout
is exactly transformers' Qwen2-VL image/video processor's.
"""
import bisect
import collections
import glob
import json
import math
import os
import random
import re
import struct
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with DataLoader workers instead

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import vision_token_counts  # noqa: E402
from reward import LEVELS  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# constants (Qwen2.5-VL vision front end)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2  # Qwen2.5-VL's spatial_merge_size: frame sides are multiples of PATCH_SIZE * MERGE_SIZE
TEMPORAL_PATCH_SIZE = 2  # qwen_vl_utils' FRAME_FACTOR
IGNORE_INDEX = -100
MAX_DECODE_PIXELS = 50_000_000  # a frame or image larger than this (8K x 6K) is refused before it is decoded
# video_kwargs defaults: VidEmo's inference recipe (2 fps, <=16 frames, <=128*28*28 pixels per frame)
VIDEO_DEFAULTS = dict(fps=2.0, max_frames=16, min_frames=4, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>", "<|im_start|>", "<|im_end|>")
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IM_END = "<|im_end|>"
THINK_END = "</think>"


class VideoError(ValueError):
    """A video (or image) that is missing, empty, truncated or not decodable. The message names the path."""


class SettingError(ValueError):
    """A setting a library function cannot work with (e.g. a negative seed), named by its config key; common.run
    prints it as one line (input_error)."""
    input_error = True


class SkipRecord(Exception):
    """A record that cannot be used (missing field, bad video, too long). Counted and logged, never fatal."""


# ----------------------------------------------------------------------------------------------------------------------
# video / image -> uint8 frames


def smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28):
    """Qwen2.5-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"bad frame size {height}x{width} (empty, or aspect ratio above 200)")
    h = round(height / factor) * factor  # Python's round (half to even), as Qwen's reference
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _resize(frame, h, w):
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3]: bicubic with antialias, rounded back to uint8 (torchvision's tensor
    resize, which qwen_vl_utils uses for videos)."""
    if frame.shape[1] == h and frame.shape[2] == w:
        return frame
    x = frame.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _check_file(path):
    if not os.path.isfile(path):  # also keeps FIFOs/devices (which could block) away from ffmpeg
        raise VideoError(f"{path}: " + ("no such file" if not os.path.exists(path) else "not a regular file"))
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")


def _packet_times(container, stream):
    """Presentation times (stream ticks, sorted) of the frames the file shows, from the demuxer alone (cheap: no
    decoding). Edit-list-discarded packets (pts before the start, e.g. encoder priming) are left out. Also returns
    the last frame's duration in ticks (0 if unknown)."""
    pts, last, last_dur = [], None, 0
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0 or packet.is_discard:
            continue
        pts.append(packet.pts)
        if last is None or packet.pts >= last:
            last, last_dur = packet.pts, packet.duration or 0
    pts.sort()
    return pts, last_dur


def _plan(times, last_dur, fps, min_frames, max_frames):
    """Pick n frame times evenly over the clip (qwen_vl_utils' smart_nframes, in seconds). times: sorted seconds,
    relative to the first frame. Returns (target times [n], sampling fps)."""
    num = len(times)
    if last_dur <= 0:  # unknown: the typical frame interval
        last_dur = float(np.median(np.diff(times))) if num > 1 else 1.0 / 25
    duration = times[-1] + last_dur  # = frames / fps for a constant frame rate
    f = TEMPORAL_PATCH_SIZE
    lo = math.ceil(min_frames / f) * f
    hi = math.floor(max_frames / f) * f
    n = min(max(duration * fps, lo), hi, num)
    n = math.floor(n / f) * f
    if n < f:  # a one-frame clip: keep it (padded to 2 later)
        n = min(num, f)
    return np.linspace(0.0, times[-1], n), n / duration


def _display_transform(frame):
    """The flips and quarter turns a player applies to show `frame` upright, from its display matrix (phones store
    portrait video landscape plus a rotation): a list of "vflip" / "hflip" / "cw" / "ccw", in order (FFmpeg's
    autorotate rules)."""
    m = next((sd for sd in frame.side_data if getattr(sd.type, "name", "") == "DISPLAYMATRIX"), None)
    if m is None:
        return []
    a = struct.unpack("<9i", bytes(m)[:36])  # 3x3, row-major, 16.16 fixed point
    theta = -round(frame.rotation or 0.0)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)  # -> [0, 360)
    ops = []
    if abs(theta - 90) < 1:
        ops = (["vflip"] if a[3] > 0 else []) + ["cw"]
    elif abs(theta - 180) < 1:
        ops = (["hflip"] if a[0] < 0 else []) + (["vflip"] if a[4] < 0 else [])
    elif abs(theta - 270) < 1:
        ops = (["vflip"] if a[3] < 0 else []) + ["ccw"]
    elif abs(theta) < 1 and a[4] < 0:
        ops = ["vflip"]
    return ops


def _upright(rgb, ops):
    """numpy [H, W, 3] -> the frame as a player shows it (see _display_transform)."""
    for op in ops:
        rgb = {"vflip": lambda x: x[::-1], "hflip": lambda x: x[:, ::-1], "cw": lambda x: np.rot90(x, -1),
               "ccw": lambda x: np.rot90(x, 1)}[op](rgb)
    return np.ascontiguousarray(rgb)


def _pick_nearest(frames, targets, time_of, max_decoded):
    """Stream decoded frames (presentation order) and keep, for each sorted target time, the nearest frame.
    Returns [(time, av.VideoFrame)] per target; the last frame fills targets past the end. Bounded work."""
    picked, prev, prev_t, j = [], None, None, 0
    for k, frame in enumerate(frames):
        t = time_of(frame, k)
        while j < len(targets) and t >= targets[j]:
            near_prev = prev is not None and targets[j] - prev_t <= t - targets[j]
            picked.append((prev_t, prev) if near_prev else (t, frame))
            j += 1
        if j == len(targets):
            break
        if k >= max_decoded:
            raise VideoError(f"decoded {k} frames without reaching {targets[j]:.3f}s")
        prev, prev_t = frame, t
    if prev is not None:
        picked += [(prev_t, prev)] * (len(targets) - j)
    return picked


def _frames(container, stream, keep_pts):
    """Decoded frames in presentation order, never decoding disposable packets (frames no other frame references,
    flagged by the container, e.g. phone HEVC) unless they are wanted: up to ~2x less work on such files."""
    for packet in container.demux(stream):
        if keep_pts is not None and packet.is_disposable and packet.pts not in keep_pts:
            continue
        yield from packet.decode()


def _decode(path, fps, max_frames, min_frames, min_pixels, max_pixels, seek_over=3000):
    """Returns (uint8 [T, H, W, 3], seconds [T] float64, sampling fps). Raises VideoError naming the path."""
    _check_file(path)
    try:
        # pass 1: demux only, for the frame times
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if w * h > MAX_DECODE_PIXELS:  # refuse before decoding a frame of that size
                raise VideoError(f"declared frame size {w}x{h} is above the {MAX_DECODE_PIXELS / 1e6:.0f} Mpx decode "
                                 f"limit (data.MAX_DECODE_PIXELS)")
            tb = float(stream.time_base) if stream.time_base else 1.0
            rate = float(stream.average_rate or 25)
            ticks, last_dur = _packet_times(container, stream)
        # a frame's time: its pts, or (no timestamps, e.g. raw streams) its index over the average rate
        abs_time = lambda frame, k: frame.pts * tb if frame.pts is not None else k / rate  # noqa: E731
        if not ticks:  # no packet timestamps: one extra decode pass to count the frames
            with av.open(path, metadata_errors="ignore") as container:
                times_abs = [abs_time(fr, k) for k, fr in enumerate(container.decode(video=0))]
            if not times_abs:
                raise VideoError("no video frames")
            t0, times, last_dur = times_abs[0], np.array(times_abs) - times_abs[0], 1.0 / rate
        else:
            t0 = ticks[0] * tb
            times, last_dur = np.array(ticks, dtype=np.float64) * tb - t0, last_dur * tb
        targets, sample_fps = _plan(times, last_dur, fps, min_frames, max_frames)
        time_of = lambda frame, k: abs_time(frame, k) - t0  # noqa: E731
        if len(times) > 1:  # index of the frame nearest each target, to know which disposable packets to skip
            right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
            nearest = np.where(targets - times[right - 1] <= times[right] - targets, right - 1, right)
        else:
            nearest = [0] * len(targets)
        keep = {ticks[i] for i in nearest} if ticks else None  # None: no timestamps, decode everything
        # pass 2: decode, converting only the picked frames
        with av.open(path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            if len(times) <= seek_over:  # short clip: one sequential pass
                picked = _pick_nearest(_frames(container, stream, keep), targets, time_of, 4 * len(times) + 100)
            else:  # long clip: seek to the keyframe before each target, decode forward to it
                picked = []
                for target in targets:
                    container.seek(int((target + t0) / tb), stream=stream, backward=True)
                    picked += _pick_nearest(_frames(container, stream, keep), [target], time_of, 2000)
            if not picked:
                raise VideoError("no decodable video frames")
            size, out, ts, rgb_of = None, [], [], {}
            for t, frame in picked:
                if id(frame) not in rgb_of:  # one frame can be nearest to two targets (variable frame rate)
                    arr = frame.to_ndarray(format="rgb24")  # [H, W, 3] as stored
                    ops = _display_transform(frame)
                    rgb = torch.from_numpy(_upright(arr, ops) if ops else arr)[None]  # [1, H, W, 3] as displayed
                    if size is None:
                        size = smart_resize(rgb.shape[1], rgb.shape[2], PATCH_SIZE * MERGE_SIZE, min_pixels,
                                            max_pixels)
                    rgb_of[id(frame)] = _resize(rgb, *size)  # resize at once: never hold many full-size frames
                out.append(rgb_of[id(frame)])
                ts.append(t)
    except VideoError as e:
        raise VideoError(f"{path}: {e}") from None
    except Exception as e:  # whatever FFmpeg/PyAV raises on a broken file becomes a VideoError naming it
        raise VideoError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None
    frames = torch.cat(out)  # [T, h, w, 3]
    ts = torch.tensor(ts, dtype=torch.float64)
    if len(frames) % TEMPORAL_PATCH_SIZE:  # very short clips: repeat the last frame so T is even (>= 2)
        pad = TEMPORAL_PATCH_SIZE - len(frames) % TEMPORAL_PATCH_SIZE
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        ts = torch.cat([ts, ts[-1:].expand(pad)])
    return frames, ts, sample_fps


def load_video(path, fps=2.0, max_frames=16, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28, min_frames=4,
               seek_over=3000):
    """Decode `path` with PyAV, sampling ~`fps` frames per second (at most `max_frames`, even count >= 2), resized to
    Qwen2.5-VL's smart_resize. Returns (frames uint8 [T, H, W, 3], timestamps_sec float64 [T], seconds from the first
    frame). Clips with more than `seek_over` frames are read by seeking (bounded work). Raises VideoError."""
    frames, ts, _ = _decode(str(path), fps, max_frames, min_frames, min_pixels, max_pixels, seek_over)
    return frames, ts


def load_image(path, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28):
    """A still image -> uint8 [H, W, 3] at smart_resize size (PIL bicubic, as qwen_vl_utils and the HF processor;
    transparency composited on white). Raises VideoError naming the path."""
    from PIL import Image
    path = str(path)
    _check_file(path)
    try:
        with Image.open(path) as im:  # lazy: only the header is read here
            if im.width * im.height > MAX_DECODE_PIXELS:
                im.draft("RGB", (im.width // 8, im.height // 8))  # JPEG decodes at 1/2..1/8 scale; others no-op
            if im.width * im.height > MAX_DECODE_PIXELS:
                raise VideoError(f"{im.width}x{im.height} = {im.width * im.height / 1e6:.0f} Mpx, above the "
                                 f"{MAX_DECODE_PIXELS / 1e6:.0f} Mpx decode limit (data.MAX_DECODE_PIXELS)")
            im.load()
            if im.mode != "RGB":
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            h, w = smart_resize(im.height, im.width, PATCH_SIZE * MERGE_SIZE, min_pixels, max_pixels)
            if (h, w) != (im.height, im.width):
                im = im.resize((w, h), resample=Image.Resampling.BICUBIC)
            return torch.from_numpy(np.array(im, dtype=np.uint8))
    except VideoError as e:
        raise VideoError(f"{path}: {e}") from None
    except Exception as e:
        raise VideoError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------------
# uint8 frames -> Qwen2.5-VL patches


def _patchify(frames, temporal_patch_size, patch_size, merge_size, mean, std):
    """uint8 [T, H, W, 3] -> float32 [t*h*w, 3*tp*p*p] in transformers' Qwen2-VL order, and (t, h, w)."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()  # [T, C, H, W]
    x = (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if pad := -x.shape[0] % temporal_patch_size:  # repeat the last frame up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    T, C, H, W = x.shape
    if H % (patch_size * merge_size) or W % (patch_size * merge_size):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {patch_size * merge_size} (smart_resize first)")
    t, h, w = T // temporal_patch_size, H // patch_size, W // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = x.view(t, tp, C, h // m, m, p, w // m, m, p)
    # -> (t, h/m, w/m, m, m | C, tp, p, p): the 2x2 patches a merger fuses are adjacent rows
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * tp * p * p).contiguous(), (t, h, w)


def patchify_video(frames, fps=2.0, temporal_patch_size=2, patch_size=14, merge_size=2, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 frames [T, H, W, 3] (sides multiples of 28) sampled at `fps` ->
    (pixel_values_videos float32 [N, 1176], video_grid_thw long [1, 3], second_per_grid_ts float32 [1])."""
    pv, thw = _patchify(frames, temporal_patch_size, patch_size, merge_size, mean, std)
    return pv, torch.tensor([thw], dtype=torch.long), torch.tensor([temporal_patch_size / fps], dtype=torch.float32)


def patchify_image(image, temporal_patch_size=2, patch_size=14, merge_size=2, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 image [H, W, 3] -> (pixel_values float32 [N, 1176], image_grid_thw long [1, 3] with t = 1)."""
    img = torch.as_tensor(image)
    pv, thw = _patchify(img[None].expand(temporal_patch_size, -1, -1, -1), temporal_patch_size, patch_size,
                        merge_size, mean, std)
    return pv, torch.tensor([thw], dtype=torch.long)


class VideoCache:
    """LRU of decoded uint8 frames per (file, mtime, size, kwargs), bounded in bytes. Per process (each DataLoader
    worker has its own); pickles empty. Worth it when many records share a clip (EmoSynth: ~15 tasks per clip)."""

    def __init__(self, max_mb=256):
        self.max_bytes = int(max_mb * 2**20)
        self.items, self.nbytes, self.hits, self.misses = collections.OrderedDict(), 0, 0, 0

    def __getstate__(self):
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"] / 2**20)

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        value = make()
        size = value[0].numel()
        if size <= self.max_bytes:
            self.items[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.nbytes -= old[0].numel()
        return value


def video_inputs(path, video_kwargs=None, cache=None):
    """A video file -> dict(pixel_values_videos, video_grid_thw, second_per_grid_ts) ready for the model, with
    second_per_grid_ts from the actual sampling rate (frames / duration), as qwen_vl_utils reports it."""
    kw = {**VIDEO_DEFAULTS, **(video_kwargs or {})}
    if unknown := set(kw) - set(VIDEO_DEFAULTS) - {"seek_over"}:
        raise ValueError(f"unknown video_kwargs {sorted(unknown)}; known: {sorted(VIDEO_DEFAULTS)} + seek_over")
    path = str(path)
    make = lambda: _decode(path, **kw)  # noqa: E731
    if cache is None:
        frames, _, sample_fps = make()
    else:
        _check_file(path)
        st = os.stat(path)
        frames, _, sample_fps = cache.get((os.path.realpath(path), st.st_mtime_ns, st.st_size,
                                           tuple(sorted(kw.items()))), make)
    pv, grid, spg = patchify_video(frames, fps=sample_fps)
    return {"pixel_values_videos": pv, "video_grid_thw": grid, "second_per_grid_ts": spg}


def record_frames(record, video_root=None, video_kwargs=None):
    """The frames the model sees for each video of a record (uint8 [T, H, W, 3] per video), decoded exactly as
    video_inputs does: the same path resolution, sampling and smart-resize (report.py's frame strips)."""
    kw = {**VIDEO_DEFAULTS, **(video_kwargs or {})}
    videos = record.get("videos") or []
    return [_decode(_resolve(str(p), record, video_root), **kw)[0] for p in videos]


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer and records


_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")  # precedence order


def _default_template(value):
    """A chat_template entry: a string, a {name: template} dict or a [{name, template}] list -> the default one."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value.strip() else None


def _chat_templates(path, tok):
    """[(file, template)] in precedence order: chat_template.jinja (newer Hub uploads; what transformers 5 saves),
    chat_template.json (key "chat_template": what Qwen2.5-VL's processor reads), tokenizer_config.json's entry."""
    found = []
    for fn in _CHAT_TEMPLATE_FILES:
        full = os.path.join(path, fn)
        if not os.path.isfile(full):
            continue
        try:
            with open(full, encoding="utf-8") as f:
                value = f.read() if fn.endswith(".jinja") else json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{full}: cannot read the chat template ({type(e).__name__}: {e})") from None
        if (template := _default_template(value)) is not None:
            found.append((full, template))
    if not found and _default_template(getattr(tok, "chat_template", None)):  # e.g. a chat_templates/ folder
        found.append((path, _default_template(tok.chat_template)))
    return found


def _has_vision_template(template):
    """True when a chat template renders video content itself (Qwen2-VL / 2.5-VL: a {"type": "video"} part ->
    <|vision_start|><|video_pad|><|vision_end|>), as serving stacks that send content lists need."""
    return "<|vision_start|>" in template and "video" in template


def load_tokenizer(path, require_vision=True):
    """Any Hugging Face tokenizer directory that has Qwen's chat tokens and vision tokens. The chat template is
    chosen explicitly: the first of chat_template.jinja > chat_template.json > tokenizer_config.json that has vision
    handling (a Hub repo often carries a text-only template in tokenizer_config.json beside the VL one that
    transformers' processor uses). No template with vision handling is a ValueError naming the files, unless
    require_vision=False (a text-only ChatML template also works for our string content, where <video> is
    already expanded to the placeholder run; then the first file in that order wins)."""
    from transformers import AutoTokenizer
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None
    missing = [t for t in VISION_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)
               or len(tok.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise ValueError(f"tokenizer {path} lacks Qwen special tokens {missing}")
    templates = _chat_templates(path, tok)
    if not templates:
        raise ValueError(f"tokenizer {path} has no chat_template (looked in {' / '.join(_CHAT_TEMPLATE_FILES)})")
    vision = [t for t in templates if _has_vision_template(t[1])]
    if require_vision and not vision:
        names = ", ".join(os.path.basename(f) for f, _ in templates)
        raise ValueError(f"{templates[0][0]}: the chat template has no vision handling (no '<|vision_start|>' / "
                         f"video part; checked {names}): a text-only template cannot render video content for "
                         "serving; add the Qwen2.5-VL template as chat_template.json or chat_template.jinja")
    tok.chat_template = (vision or templates)[0][1]
    if tok.pad_token_id is None:
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else IM_END
    return tok


def curriculum_level(record):
    """A record's curriculum stage: its `level` with case and spaces ignored (missing = "emotion"), or None when it
    names none of LEVELS (such records are left out of the curriculum, and counted)."""
    level = record.get("level", "emotion") if isinstance(record, dict) else None
    level = level.strip().lower() if isinstance(level, str) else None
    return level if level in LEVELS else None


def special_ids(tokenizer):
    """(eos, pad) ids of a load_tokenizer tokenizer: generation and completions end on <|im_end|>; padding is the pad
    token load_tokenizer guarantees."""
    return tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id


def intensity_id(tokenizer):
    """The first token of " intensity": the target token before it states an intensity ("sadness (high intensity)")."""
    return tokenizer.encode(" intensity", add_special_tokens=False)[0]


def token_weights(labels, key_id, weight):
    """[B, L] labels -> [n] loss weight of each supervised target (row-major, the order in which the forward returns
    their log-probs): `weight` where the next target token is key_id (the token that states an intensity), else 1."""
    tgt = labels[:, 1:]  # [B, L-1] the targets the forward scores
    key = torch.zeros_like(tgt, dtype=torch.bool)
    key[:, :-1] = tgt[:, 1:] == key_id
    return torch.where(key, float(weight), 1.0)[tgt != -100]


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _read_text(path):
    """A record file's text: UTF-8 (a BOM dropped), or UTF-16 when it starts with a UTF-16 BOM (Windows "Unicode");
    bytes that are not UTF-8 become lone surrogates (_NOT_UTF8), so the records holding them are skipped by name
    instead of silently altered."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace")
    return raw.decode("utf-8-sig", errors="surrogateescape")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _media_path(v):
    """A media entry as a path: a string, or a {"path" | "video" | "image" | "url" | "image_url": ...} dict (the chat
    formats' content parts); file:// URLs become paths. Anything else is returned as is (and refused later)."""
    if isinstance(v, dict):
        v = next((v[k] for k in ("path", "video", "image", "url", "video_url", "image_url") if v.get(k)), v)
        if isinstance(v, dict):  # {"image_url": {"url": ...}}
            v = v.get("url", v)
    if isinstance(v, str) and v.startswith("file://"):
        from urllib.parse import unquote
        v = unquote(v[len("file://"):])
    return v


def normalize_record(record):
    """In place: the shapes other chat formats give a record, as ours. `videos` / `images` as one path or a list of
    paths or {"path": ...} dicts -> a list of paths; a message whose content is a list of typed parts (OpenAI /
    transformers: {"type": "text", "text": ...}, {"type": "video"[, "video" | "path": ...]}, {"type": "image"...})
    -> one string with <video> / <image> tags where the parts were; media paths carried by the parts fill `videos` /
    `images` when the record has none. Raises SkipRecord for a part it cannot read. Returns the record."""
    for key in ("videos", "images"):
        v = record.get(key)
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            record[key] = [_media_path(x) for x in v]
    msgs = record.get("messages")
    if not isinstance(msgs, list):
        return record
    carried = {"videos": [], "images": []}
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        text = []
        for j, part in enumerate(m["content"]):
            kind = part.get("type") if isinstance(part, dict) else ("text" if isinstance(part, str) else None)
            if isinstance(part, dict) and kind is None:  # untyped parts: {"text": ...} / {"video": ...}
                kind = next((k for k in ("text", "video", "image") if k in part), None)
            if kind == "text":
                t = part if isinstance(part, str) else part.get("text")
                if not isinstance(t, str):
                    raise SkipRecord(f"messages[{i}].content[{j}]: text part without a string 'text'")
                text.append(t)
            elif kind in ("video", "video_url", "image", "image_url"):
                media = "videos" if kind.startswith("video") else "images"
                text.append("<video>" if media == "videos" else "<image>")
                path = _media_path(part)
                if isinstance(path, str):
                    carried[media].append(path)
            else:
                raise SkipRecord(f"messages[{i}].content[{j}]: a content part of type {kind!r} (text, video and "
                                 f"image are read)")
        out.append(dict(m, content="".join(text)))
    record["messages"] = out
    for key, paths in carried.items():
        if paths and not record.get(key):
            record[key] = paths
    return record


def load_records(path, skipped=None):
    """Emo-CFG records from a JSON list or JSON lines file (told apart by content, not extension), or every .json /
    .jsonl file under a folder (sorted, recursive).
    Malformed lines/entries are skipped with 'file:line: reason', appended to `skipped` if given, else summarised on
    stderr. Each record gets `_src` = 'file:line' (video paths resolve against that file's folder by default)."""
    path = str(path)
    if os.path.isdir(path):
        files = sorted(f for ext in ("json", "jsonl") for f in glob.glob(os.path.join(path, "**", f"*.{ext}"),
                                                                        recursive=True)
                       if not f.endswith(".predictions.jsonl"))  # eval's outputs beside the data are not data
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"records path {path} does not exist")
    records, bad = [], []

    def add(obj, where, check_utf8=False):
        if not isinstance(obj, dict):
            bad.append(f"{where}: not a JSON object")
        elif check_utf8 and _NOT_UTF8.search(json.dumps(obj, ensure_ascii=False)):
            bad.append(f"{where}: not UTF-8 text (save the file as UTF-8)")
        else:
            obj["_src"] = where
            try:
                normalize_record(obj)
            except SkipRecord:
                pass  # left as written: encoding skips it with the reason
            records.append(obj)

    for f in files:
        text = _read_text(f)
        not_utf8 = _NOT_UTF8.search(text) is not None  # bytes that are not UTF-8 (latin-1, cp1252, binary junk)
        head = text.lstrip()[:1]
        if head == "[" or (head == "{" and f.endswith(".json")):  # a JSON list (or object) whatever the extension
            try:
                obj = json.loads(text)
                for i, r in enumerate(obj if isinstance(obj, list) else [obj]):
                    add(r, f"{f}:[{i}]", not_utf8)
                continue
            except (ValueError, RecursionError):
                pass  # JSON lines saved as .json: read line by line
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                add(json.loads(line), f"{f}:{n}", not_utf8)
            except (ValueError, RecursionError) as e:  # also nesting too deep, integers of >4300 digits
                why = getattr(e, "msg", None) or f"{type(e).__name__}: {str(e)[:60]}"
                bad.append(f"{f}:{n}: bad JSON ({why})")
    if skipped is not None:
        skipped.extend(bad)
    elif bad:
        print(f"load_records: skipped {len(bad)} malformed entries in {path} (first: {bad[0]})", file=sys.stderr)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# answer formats: "direct" (the record's answer as written) | "reasoning" (<think>affective tree</think><answer>...)

ANSWER_FORMATS = ("direct", "reasoning")
# the emotion QA tasks whose clips have an affective tree to answer through (fine_grained_caption's answer is a tree
# already; attribute tasks and AU / caption answers stay direct)
TREE_TASKS = ("emotion_single", "emotion_multi", "emotion_fine", "sentiment_single", "sentiment_fine",
              "micro_expression", "emotion_transition")
# the ones answered through the tree under answer_format="reasoning" by default, chosen on val (docs/method.md):
# blends, micro-expressions and transitions answer directly (through the tree their answers copy its emotion line)
REASONING_TASKS = ("emotion_single", "emotion_fine", "sentiment_single", "sentiment_fine")
# EmoSynth's FACS names (data/emosynth/prepare.py writes the same strings into its records)
_AU_NAMES = {1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
             6: "cheek raiser", 9: "nose wrinkler", 12: "lip corner puller", 15: "lip corner depressor",
             20: "lip stretcher", 25: "lips part", 26: "jaw drop"}
_AU_ORDER = list(_AU_NAMES)


def _au_items(codes):
    return [f"AU{c} {_AU_NAMES[c]}" for c in _AU_ORDER if c in codes]


def _active(frames_au, lo, hi):
    """AU codes with amplitude > 0 on any frame in [lo, hi) of a per-frame amplitude table [T][11]."""
    return {c for k, c in enumerate(_AU_ORDER) if any(row[k] > 0 for row in frames_au[lo:hi])}


def tree_from_meta(meta, fps=4.0):
    """The affective tree of one EmoSynth clip, from its meta.jsonl ground truth, as the <think> block:
    "<think>\\nattribute: ...\\nexpression: ...\\nemotion: ...\\n</think>". For a single-emotion clip it is the think
    block of the clip's own fine_grained_caption tree (tests/test_reasoning.py checks this); blends name both emotions,
    micro-expressions the flash's AUs and time, transitions the AUs of each half ("first half ...; second half ...")."""
    app = meta["appearance"]
    attr = [f"gender={app['gender']}", f"age={app['age']}",
            "hair=bald" if app["hair_len"] == "bald" else f"hair={app['hair_len']} {app['hair_colour']}"]
    if app.get("beard"):
        attr.append("facial hair=beard")
    attr += [f"accessory={a}" for a in ("glasses", "hat") if app.get(a)]
    attr.append(f"pose={meta['pose']}")
    attr += [f"action={a}" for a in meta.get("actions", []) if a != "none"]
    au = meta["frames"]["au"]
    T = len(au)
    kind, intensity = meta.get("kind"), meta.get("intensity", "medium")
    fine = lambda e: e if e == "neutral" else f"{e} ({intensity} intensity)"  # noqa: E731
    if kind == "micro":
        flash = [t for t, row in enumerate(au) if any(v > 0 for v in row)]
        expr = _au_items(set(meta["aus"])) + ([f"flash at {flash[0] / fps:.1f}s"] if flash else [])
        emo = [f"{meta['micro']} (micro-expression)" if meta.get("micro") not in (None, "none") else "neutral"]
    elif kind == "transition":  # each half named first, so the AUs are read in time order (a neutral half: none)
        half = T // 2
        first, second = _au_items(_active(au, 0, half)) or ["none"], _au_items(_active(au, half, T)) or ["none"]
        expr = [f"first half {first[0]}"] + first[1:] + [f"second half {second[0]}"] + second[1:]
        emo = [f"{meta['transition'][0]} to {meta['transition'][1]}"]
    elif kind == "blend":
        expr = _au_items(set(meta["aus"]))
        emo = [fine(e) for e in meta["emotions"]]
    else:
        expr = _au_items(set(meta["aus"]))
        emo = [fine(meta["emotion"])]
    return ("<think>\n"
            f"attribute: {'; '.join(attr)}\n"
            f"expression: {'; '.join(expr) or 'none'}\n"
            f"emotion: {'; '.join(emo)}\n"
            "</think>")


def load_clip_trees(path):
    """{video path as records write it: think block} from an EmoSynth meta.jsonl; {} when the file is missing."""
    trees = {}
    if not path or not os.path.isfile(path):
        return trees
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                m = json.loads(line)
                trees[m["video"]] = tree_from_meta(m)
    return trees


def think_block(tree):
    """The "<think>...</think>" part of a tree text (a fine_grained_caption `tree` holds an <answer> too); None if
    the text has no complete think block."""
    if not isinstance(tree, str):
        return None
    a = tree.find("<think>")
    b = tree.find("</think>", a + 1) if a >= 0 else -1
    return tree[a:b + len("</think>")] if a >= 0 and b >= 0 else None


def reasoning_answer(think, answer):
    """The reasoning-format target: the affective tree, then the direct answer inside <answer> tags."""
    return f"{think}\n<answer>{answer}</answer>"


def split_reasoning(text):
    """(think block or None, answer) of a reasoning-format text; a direct answer comes back as (None, text)."""
    think = think_block(text)
    if think is None:
        return None, text
    rest = text[text.find(think) + len(think):].strip()
    if rest.startswith("<answer>") and rest.endswith("</answer>"):
        rest = rest[len("<answer>"):-len("</answer>")]
    return think, rest


def meta_path_for(records_path):
    """Where EmoSynth keeps the clips' ground truth for a records file or folder: meta.jsonl beside it."""
    p = str(records_path)
    return os.path.join(p if os.path.isdir(p) else os.path.dirname(p), "meta.jsonl")


def apply_answer_format(records, answer_format="direct", tasks=REASONING_TASKS, trees=None):
    """Records in the chosen answer format. "direct" returns them unchanged. "reasoning" rewrites the last assistant
    turn of every record of `tasks` as reasoning_answer(tree, answer) and marks it (answer_format="reasoning", `tree`
    = the whole target, so reward.score adds the tree reward of the <think> part to the answer's metric). The tree is
    the record's own `tree` when it has a think block (real Emo-CFG rationale data), else trees[record's first video]
    (load_clip_trees). Returns (records, n_converted, n_without_tree); records without a tree stay direct."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if answer_format == "direct":
        return records, 0, 0
    out, n_conv, n_missing = [], 0, 0
    for r in records:
        if not isinstance(r, dict) or r.get("task") not in tasks or r.get("answer_format") == "reasoning":
            out.append(r)
            continue
        msgs = r.get("messages")
        last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None) if isinstance(msgs, list) else None
        videos = r.get("videos") or []
        think = think_block(r.get("tree")) or (trees or {}).get(videos[0] if videos else None)
        if last is None or think is None or not isinstance(msgs[last].get("content"), str):
            n_missing += 1
            out.append(r)
            continue
        target = reasoning_answer(think, msgs[last]["content"])
        new_msgs = list(msgs)
        new_msgs[last] = dict(msgs[last], content=target)
        out.append(dict(r, messages=new_msgs, tree=target, answer_format="reasoning"))
        n_conv += 1
    return out, n_conv, n_missing


def swap_trees(records, rate, seed=0, text_only=False, tasks=None):
    """Counterfactual reasoning records for training (an ablation; docs/method.md): in each task of `tasks` (None =
    all), a `rate` fraction of the reasoning-format records (chosen by `seed`) answer with the tree and answer of
    another record of the same task whose answer differs, and carry think_unscored=True (encode_record trains their
    answer only, never the borrowed tree): behind a tree that contradicts the video, only reading the tree predicts
    the answer. text_only: such a record also loses its video (the question alone). Returns a new list, same order."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    rng = random.Random(seed)
    by_task = collections.defaultdict(list)
    for i, r in enumerate(records):
        if isinstance(r, dict) and r.get("answer_format") == "reasoning" and isinstance(r.get("tree"), str) and (
                tasks is None or r.get("task") in tasks):
            by_task[r.get("task")].append(i)
    out = list(records)
    for task in sorted(by_task, key=str):
        idx = by_task[task]
        answer = {j: split_reasoning(records[j]["tree"])[1] for j in idx}  # `tree`: the whole reasoning target
        for i in sorted(rng.sample(idx, int(round(rate * len(idx))))):
            others = [j for j in idx if answer[j] != answer[i]]
            if not others:
                continue
            r, p = records[i], records[rng.choice(others)]
            msgs = list(r["messages"])
            last = max(k for k, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant")
            msgs[last] = dict(msgs[last], content=p["tree"])
            new = dict(r, messages=msgs, tree=p["tree"], labels=p.get("labels"), think_unscored=True)
            if text_only:
                new.update(videos=[], messages=[dict(m, content=m["content"].replace("<video>", ""))
                                                if m.get("role") == "user" else m for m in msgs])
            out[i] = new
    return out


def load_records_as(path, answer_format="direct", tasks=REASONING_TASKS, skipped=None):
    """load_records + apply_answer_format with the trees of the meta.jsonl beside `path` (EmoSynth); prints how many
    records were converted and how many had no tree."""
    records = load_records(path, skipped=skipped)
    if answer_format == "direct":
        return records
    records, n, missing = apply_answer_format(records, answer_format, tasks, load_clip_trees(meta_path_for(path)))
    print(f"answer_format=reasoning: {n} records of {len(records)} in {path} answer through the affective tree"
          + (f"; {missing} of the reasoning tasks have no tree and stay direct" if missing else ""), file=sys.stderr)
    return records


def _messages(record):
    """Validated chat messages [{'role', 'content': str}] with `<video>`/`<image>` replaced by vision placeholders,
    and the video/image path lists."""
    if not isinstance(record, dict):
        raise SkipRecord("record is not a JSON object")
    record = normalize_record(dict(record))
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise SkipRecord("missing field 'messages' (a non-empty list)")
    media = {}
    for key in ("videos", "images"):
        v = record.get(key) or []
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
            raise SkipRecord(f"field '{key}' must be a list of paths")
        media[key] = v
    out = []
    if isinstance(record.get("system"), str) and msgs[0].get("role") != "system":
        out.append({"role": "system", "content": record["system"]})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise SkipRecord(f"messages[{i}] needs role system/user/assistant")
        if not isinstance(m.get("content"), str):
            raise SkipRecord(f"messages[{i}] lacks string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    for tag, key in (("<video>", "videos"), ("<image>", "images")):
        count = sum(m["content"].count(tag) for m in out)
        if count == 0 and media[key]:  # ms-swift's convention: untagged media go first in the first user turn
            first = next((m for m in out if m["role"] == "user"), None)
            if first is None:
                raise SkipRecord("no user turn")
            first["content"] = tag * len(media[key]) + first["content"]
        elif count != len(media[key]):
            raise SkipRecord(f"{count} {tag} tags but {len(media[key])} {key}")
    for m in out:
        if m["role"] == "assistant" and ("<video>" in m["content"] or "<image>" in m["content"]):
            raise SkipRecord("an assistant turn holds a <video>/<image> tag")
        if any(t in m["content"] for t in VISION_TOKENS):
            raise SkipRecord(f"a {m['role']} turn holds a raw special token")
        m["content"] = m["content"].replace("<video>", VIDEO_PLACEHOLDER).replace("<image>", IMAGE_PLACEHOLDER)
    return out, media["videos"], media["images"]


def _render(tokenizer, messages, add_generation_prompt):
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise SkipRecord(f"chat template failed: {type(e).__name__}: {e}") from None
    return text


def _pieces(tokenizer, messages, add_generation_prompt):
    """The rendered chat as [(text, is_target)]: each assistant turn's content + its <|im_end|> is a target piece.
    The boundaries come from rendering the prefix before each assistant turn with the generation prompt, so the
    prompt pieces are byte-identical to what generation sees, whatever the template (Qwen2.5-VL, Qwen3, ...)."""
    full = _render(tokenizer, messages, add_generation_prompt)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise SkipRecord("conversation starts with an assistant turn")
        prefix = _render(tokenizer, messages[:i], True)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise SkipRecord(f"chat template is not prefix-consistent at assistant turn {i}")
        end = full.find(IM_END, len(prefix))
        if end < 0:
            raise SkipRecord(f"assistant turn {i} is not closed by {IM_END}")
        end += len(IM_END)
        pieces += [(full[pos:len(prefix)], False), (full[len(prefix):end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(t, target) for t, target in pieces if t]


def _resolve(path, record, video_root):
    if os.path.isabs(path):
        return path
    root = video_root or os.path.dirname(str(record.get("_src", "")).rsplit(":", 1)[0])
    return os.path.join(root, path)


def _think_len(tokenizer, text, ids):
    """How many of `ids` (the tokens of `text`) lie inside its leading <think>...</think> block: the longest prefix of
    ids that the block's own tokens share (a merge across the block's end stays a target)."""
    end = text.find(THINK_END)
    if end < 0:
        return 0
    head = tokenizer.encode(text[:end + len(THINK_END)], add_special_tokens=False)
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return n


def _encode(record, tokenizer, video_root, max_seq_len, video_kwargs, cache, prompt_only):
    messages, videos, images = _messages(record)
    answer = None
    if prompt_only:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None:
            answer = messages[last]["content"]
            messages = messages[:last]
        if not any(m["role"] == "user" for m in messages):
            raise SkipRecord("no user turn before the answer")
    elif not any(m["role"] == "assistant" for m in messages):
        raise SkipRecord("no assistant turn to learn from")
    # vision first: its token counts decide the length
    out = {}
    vids = []
    for p in videos + images:
        if _URL.match(p):  # never fetched: no network use from the data path
            raise SkipRecord(f"{'video' if p in videos else 'image'} {p}: remote URL, not fetched (media are read from "
                             f"local files; download it and give its path)")
    for p in videos:
        try:
            vids.append(video_inputs(_resolve(p, record, video_root), video_kwargs, cache))
        except VideoError as e:
            raise SkipRecord(f"video {p}: {e}") from None
    if vids:
        out["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in vids])  # [N, 1176]
        out["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in vids])  # [nv, 3]
        out["second_per_grid_ts"] = torch.cat([v["second_per_grid_ts"] for v in vids])  # [nv]
    ims = []
    for p in images:
        kw = {k: v for k, v in (video_kwargs or {}).items() if k in ("min_pixels", "max_pixels")}
        try:
            ims.append(patchify_image(load_image(_resolve(p, record, video_root), **kw)))
        except VideoError as e:
            raise SkipRecord(f"image {p}: {e}") from None
    if ims:
        out["pixel_values"] = torch.cat([pv for pv, _ in ims])
        out["image_grid_thw"] = torch.cat([g for _, g in ims])
    # text: tokenize piecewise (targets separately, so prompt ids equal generation's), then expand vision pads
    ids, labels = [], []
    pieces = _pieces(tokenizer, messages, add_generation_prompt=prompt_only)
    last_target = max((k for k, (_, target) in enumerate(pieces) if target), default=None)
    for k, (text, target) in enumerate(pieces):
        t = tokenizer.encode(text, add_special_tokens=False)
        ids += t
        n_off = len(t) if not target else _think_len(tokenizer, text, t) if (
            k == last_target and record.get("think_unscored")) else 0  # swap_trees: the borrowed tree is not a target
        labels += [IGNORE_INDEX] * n_off + t[n_off:]
    ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.tensor(labels, dtype=torch.long)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    repeats = torch.ones_like(ids)
    for pad_id, grids, name in ((video_id, out.get("video_grid_thw"), "video"),
                                (image_id, out.get("image_grid_thw"), "image")):
        where = (ids == pad_id).nonzero().flatten()
        n = 0 if grids is None else len(grids)
        if len(where) != n:
            raise SkipRecord(f"{len(where)} {name} placeholders in the tokens but {n} {name}s")
        if n:
            repeats[where] = vision_token_counts(grids, MERGE_SIZE)  # one placeholder per merged token
    if (labels[(ids == video_id) | (ids == image_id)] != IGNORE_INDEX).any():
        raise SkipRecord("a vision placeholder fell inside an assistant target")
    ids, labels = ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
    if max_seq_len and len(ids) > max_seq_len:
        raise SkipRecord(f"{len(ids)} tokens > max_seq_len {max_seq_len}")
    mm = torch.zeros_like(ids)  # 0 text, 1 image, 2 video: transformers' Qwen2.5-VL processor convention
    mm[ids == image_id] = 1
    mm[ids == video_id] = 2
    out.update(input_ids=ids, mm_token_type_ids=mm)
    if prompt_only:
        out["answer"] = answer
    else:
        out["labels"] = labels
    return out


def encode_record(record, tokenizer, video_root=None, max_seq_len=None, video_kwargs=None, cache=None):
    """An Emo-CFG record -> dict(input_ids [L], labels [L] (-100 except assistant content + its <|im_end|>),
    mm_token_type_ids [L], and for records with videos pixel_values_videos [N, 1176], video_grid_thw [nv, 3],
    second_per_grid_ts [nv]; with images pixel_values, image_grid_thw). Relative media paths resolve against
    `video_root` (default: the folder of the record's source file). Raises SkipRecord(reason)."""
    return _encode(record, tokenizer, video_root, max_seq_len, video_kwargs, cache, prompt_only=False)


def answer_ids(answer, tokenizer):
    """The target ids of an assistant answer as encode_record's labels hold them: its text and <|im_end|>."""
    return tokenizer.encode(answer + IM_END, add_special_tokens=False)


def encode_prompt(record, tokenizer, video_root=None, video_kwargs=None, max_seq_len=None, cache=None):
    """The prompt for generation: everything before the final assistant turn plus the generation prompt
    ('<|im_start|>assistant\\n'); its ids equal the first ids of encode_record's. Returns the same dict without
    labels, plus 'answer' (the final assistant turn's text, None if the record has none)."""
    return _encode(record, tokenizer, video_root, max_seq_len, video_kwargs, cache, prompt_only=True)


# ----------------------------------------------------------------------------------------------------------------------
# dataset and collate


class EmoDataset(torch.utils.data.Dataset):
    """Encodes records on the fly (decoding in DataLoader workers). A bad record yields {'skip': reason, 'index': i},
    which collate drops and reports; prompt_only=True gives generation prompts (for eval / RL)."""

    def __init__(self, records, tokenizer, video_root=None, max_seq_len=None, video_kwargs=None, prompt_only=False,
                 cache_mb=256):
        self.records, self.tokenizer, self.video_root = records, tokenizer, video_root
        self.max_seq_len, self.video_kwargs, self.prompt_only = max_seq_len, dict(video_kwargs or {}), prompt_only
        self.cache = VideoCache(cache_mb) if cache_mb else None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        try:
            if self.prompt_only:
                item = encode_prompt(rec, self.tokenizer, self.video_root, self.video_kwargs, self.max_seq_len,
                                     self.cache)
            else:
                item = encode_record(rec, self.tokenizer, self.video_root, self.max_seq_len, self.video_kwargs,
                                     self.cache)
        except SkipRecord as e:
            src = rec.get("_src", f"record {i}") if isinstance(rec, dict) else f"record {i}"
            return {"skip": f"{src}: {e}", "index": i}
        meta = rec if isinstance(rec, dict) else {}
        item.update(index=i, task=meta.get("task"), level=meta.get("level"))
        return item


def _cat(items, key):
    xs = [it[key] for it in items if key in it]
    return torch.cat(xs) if xs else None


def _collate(batch, pad_token_id, left):
    items = [b for b in batch if "skip" not in b]
    B, L = len(items), max((len(it["input_ids"]) for it in items), default=0)
    out = {
        "input_ids": torch.full((B, L), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, L, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(B, L, dtype=torch.long),
    }
    if not left:
        out["labels"] = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(L - n, L) if left else slice(0, n)
        out["input_ids"][b, sl] = it["input_ids"]
        out["attention_mask"][b, sl] = 1
        out["mm_token_type_ids"][b, sl] = it["mm_token_type_ids"]
        if not left:
            out["labels"][b, sl] = it["labels"]
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw"):
        out[key] = _cat(items, key)  # None when no item in the batch has that modality
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["task"] = [it.get("task") for it in items]
    out["level"] = [it.get("level") for it in items]
    if left:
        out["answer"] = [it.get("answer") for it in items]
    out["skipped"] = [b["skip"] for b in batch if "skip" in b]
    return out


def collate(batch, pad_token_id):
    """Right-pad a list of EmoDataset items into a batch. Skipped items are dropped and their reasons returned in
    batch['skipped'] (the main process counts and logs them); B may be 0 if every item was skipped."""
    return _collate(batch, pad_token_id, left=False)


def collate_prompts(batch, pad_token_id):
    """Left-pad prompts (encode_prompt items) for batched generation; adds batch['answer']."""
    return _collate(batch, pad_token_id, left=True)


class VideoDataset(torch.utils.data.Dataset):
    """Video files -> video_inputs dicts (decode + patchify in DataLoader workers), e.g. for sample.py or bench.py.
    A bad file yields {'skip': reason, 'index': i}."""

    def __init__(self, paths, video_kwargs=None):
        self.paths, self.video_kwargs = [str(p) for p in paths], dict(video_kwargs or {})

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return {**video_inputs(self.paths[i], self.video_kwargs), "index": i}
        except VideoError as e:
            return {"skip": str(e), "index": i}


# ----------------------------------------------------------------------------------------------------------------------
# curriculum sampler


class CurriculumSampler:
    """Batches of record indices (a DataLoader batch_sampler): stage by stage (attribute -> expression -> emotion),
    each stage `stage_epochs[s]` passes over its level's records, later-stage batches mixing in a `replay` fraction
    drawn from earlier stages; or, with mix=True, the same samples in one shuffled mix (the baseline). With
    0 < mix_first < 1, that fraction of every stage's samples is trained first, as one shuffled "mix" stage (every
    level seen before the curriculum proper; mix_first=1 is the mix).

    The schedule is built once from the seed: batch(step) is a pure function of (seed, step), so resuming from
    state_dict() replays exactly the uninterrupted run's batches. Every rank builds the same global batch
    (batch_size * world_size) and takes its slice. Records whose level is not a stage are not sampled (n_excluded).

    With DataLoader workers the sampler runs ahead of training by the prefetch depth: checkpoint with
    state_dict(step=<batches consumed>)."""

    def __init__(self, levels, batch_size, stages=LEVELS, stage_epochs=(1, 1, 1), replay=0.0, mix=False, seed=0,
                 rank=0, world_size=1, drop_last=True, mix_first=0.0):
        if len(stage_epochs) != len(stages):
            raise ValueError(f"stage_epochs {tuple(stage_epochs)} needs one value per stage {tuple(stages)}")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {replay}")
        if not 0.0 <= mix_first <= 1.0:
            raise ValueError(f"mix_first must be in [0, 1], got {mix_first}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SettingError(f"config key 'seed': must be an integer >= 0 (numpy seeds the schedule), got {seed!r}")
        mix = mix or mix_first >= 1.0
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad rank {rank} / world_size {world_size} / batch_size {batch_size}")
        self.stages, self.batch_size, self.rank, self.world_size = tuple(stages), batch_size, rank, world_size
        self.seed, self.mix, self.step = seed, mix, 0
        G = batch_size * world_size
        pools = [np.array([i for i, lv in enumerate(levels) if lv == s], dtype=np.int64) for s in self.stages]
        self.n_excluded = len(levels) - sum(len(p) for p in pools)
        rng = np.random.default_rng(seed)

        def passes(pool, epochs):  # `epochs` shuffled passes over pool; a fractional last pass is a random subset
            full = int(math.floor(epochs))
            seq = [rng.permutation(pool) for _ in range(full)]
            seq.append(rng.permutation(pool)[:int(round((epochs - full) * len(pool)))])
            return np.concatenate(seq)

        def chunks(seq, k):  # k-sized chunks; the tail is dropped or filled by wrapping to the stage start
            n = len(seq) // k if drop_last else -(-len(seq) // k)
            if n and not drop_last and len(seq) % k:
                seq = np.concatenate([seq, np.resize(seq, n * k - len(seq))])
            return [seq[i * k:(i + 1) * k] for i in range(n)]

        samples = [passes(p, e) for p, e in zip(pools, stage_epochs)]
        batches, bounds = [], []
        if mix:
            bounds.append(("mix", 0))
            batches = chunks(rng.permutation(np.concatenate(samples)), G)
        else:
            if mix_first > 0:  # the head of every stage's samples, pulled forward into one shuffled warm-up stage
                cut = [int(round(mix_first * len(seq))) for seq in samples]
                bounds.append(("mix", 0))
                batches = chunks(rng.permutation(np.concatenate([q[:c] for q, c in zip(samples, cut)])), G)
                samples = [q[c:] for q, c in zip(samples, cut)]
            for s, seq in enumerate(samples):
                bounds.append((self.stages[s], len(batches)))
                earlier = np.concatenate(pools[:s]) if s else np.zeros(0, dtype=np.int64)
                r = int(round(replay * G)) if len(earlier) else 0
                for chunk in chunks(seq, G - r):
                    old = rng.choice(earlier, r, replace=len(earlier) < r) if r else earlier[:0]
                    batches.append(rng.permutation(np.concatenate([chunk, old])))  # replay spread over all ranks
        self.schedule = np.stack(batches) if batches else np.zeros((0, G), dtype=np.int64)  # [steps, G]
        self.bounds = bounds  # [(stage, first step)]

    def __len__(self):
        return len(self.schedule)

    def batch(self, step):
        """This rank's record indices at `step`."""
        B = self.batch_size
        return self.schedule[step, self.rank * B:(self.rank + 1) * B].tolist()

    def __iter__(self):
        if self.step >= len(self):
            self.step = 0
        while self.step < len(self):
            self.step += 1
            yield self.batch(self.step - 1)

    def stage_span(self, step):
        """(first, end) batch of the stage that `step` belongs to; the last stage ends at len(self)."""
        starts = [b for _, b in self.bounds] + [len(self)]
        i = max(bisect.bisect_right(starts[:-1], step) - 1, 0)
        return starts[i], starts[i + 1]

    def stage_of(self, step):
        """The stage name ('mix' for the baseline) that `step` belongs to."""
        starts = [b for _, b in self.bounds]
        return self.bounds[max(bisect.bisect_right(starts, step) - 1, 0)][0] if self.bounds else None

    def state_dict(self, step=None):
        return {"step": self.step if step is None else int(step), "seed": self.seed, "steps": len(self),
                "global_batch": self.schedule.shape[1], "mix": self.mix}

    def load_state_dict(self, sd):
        for key, mine in (("seed", self.seed), ("steps", len(self)), ("global_batch", self.schedule.shape[1]),
                          ("mix", self.mix)):
            if key in sd and sd[key] != mine:
                raise ValueError(f"sampler state has {key}={sd[key]!r} but this sampler has {mine!r}: the data, seed "
                                 "or batch config changed, so the schedule would differ")
        self.step = int(sd["step"])
