"""What real stacks read beside the weights: preprocessor_config.json / generation_config.json in our checkpoints
(transformers' AutoImageProcessor and GenerationConfig, vLLM), and the chat-template files of a tokenizer
directory (chat_template.jinja > chat_template.json > tokenizer_config.json, vision handling required)."""
import json
import shutil

import numpy as np
import pytest
import torch

import common
import data
from model import VidEmo
from tiny import IM_END, PAD, QWEN25_VL_TEMPLATE, tiny_config, to_v5_layout

VIDEO_MSG = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What emotion?"}]}]
VIDEO_RUN = "<|vision_start|><|video_pad|><|vision_end|>"


# ----------------------------------------------------------------------------------------------------------------------
# preprocessor_config.json / generation_config.json


def test_written_constants_are_datas():
    assert VidEmo.IMAGE_MEAN == data.CLIP_MEAN and VidEmo.IMAGE_STD == data.CLIP_STD
    assert (VidEmo.MIN_PIXELS, VidEmo.MAX_PIXELS) == (data.VIDEO_DEFAULTS["min_pixels"],
                                                      data.VIDEO_DEFAULTS["max_pixels"])
    assert (data.PATCH_SIZE, data.MERGE_SIZE, data.TEMPORAL_PATCH_SIZE) == (14, 2, 2)


def test_image_processor_reproduces_our_patches(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor
    ckpt = tmp_path / "ckpt"
    VidEmo(tiny_config()).save_pretrained(ckpt)
    cfg = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (cfg["patch_size"], cfg["temporal_patch_size"], cfg["merge_size"]) == (14, 2, 2)
    proc = AutoImageProcessor.from_pretrained(ckpt)
    assert "Qwen2VLImageProcessor" in type(proc).__name__
    rng = np.random.default_rng(0)
    # already a multiple of 28 / resized down (bicubic) / above max_pixels / below min_pixels
    for h, w in [(112, 168), (100, 150), (500, 700), (30, 40)]:
        path = tmp_path / f"img_{h}x{w}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ours, grid = data.patchify_image(data.load_image(path))
        out = proc(images=Image.open(path), return_tensors="pt")
        assert out["image_grid_thw"].tolist() == grid.tolist()
        torch.testing.assert_close(out["pixel_values"].float(), ours, atol=1e-5, rtol=1e-5)


def test_generation_config_has_our_eos(tmp_path):
    from transformers import GenerationConfig
    for cfg in (tiny_config(), to_v5_layout(tiny_config())):  # ids at top level, or under text_config
        VidEmo(cfg).save_pretrained(tmp_path / "a")
        g = GenerationConfig.from_pretrained(tmp_path / "a")
        assert g.eos_token_id == [IM_END, PAD]  # <|im_end|>, then <|endoftext|>
        assert g.pad_token_id == PAD and g.bos_token_id == PAD


def test_side_files_carried_over_unchanged(tmp_path):
    """A Hub checkpoint's own files (Qwen's pixel budget, sampling defaults) survive load -> save byte for byte, also
    when the weights come from a state_dict (gathered FSDP state) and into a sharded save."""
    src = tmp_path / "hub"
    VidEmo(tiny_config()).save_pretrained(src)
    qwen_pre = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD),
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    qwen_gen = {"bos_token_id": PAD, "pad_token_id": PAD, "do_sample": True, "eos_token_id": [IM_END, PAD],
                "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                "transformers_version": "4.49.0"}
    files = {"preprocessor_config.json": json.dumps(qwen_pre), "generation_config.json": json.dumps(qwen_gen) + "\n",
             "video_preprocessor_config.json": '{"fps": 2.0}'}
    for fn, text in files.items():
        (src / fn).write_text(text)
    model = VidEmo.from_pretrained(src)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", state_dict=model.state_dict(), max_shard_size=100_000)
    for out in ("a", "b"):
        for fn, text in files.items():
            assert (tmp_path / out / fn).read_text() == text, (out, fn)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    # a model built in memory writes ours
    VidEmo(tiny_config()).save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "preprocessor_config.json").read_text())["max_pixels"] == 128 * 28 * 28
    assert not (tmp_path / "c" / "video_preprocessor_config.json").exists()


def test_full_checkpoint_loads_in_auto_processor(tmp_path, qwen_tokenizer_dir):
    """common.save_checkpoint = model + tokenizer: the whole directory is a Qwen2.5-VL processor directory."""
    pytest.importorskip("torchvision", reason="transformers 5's Qwen2-VL video processor needs torchvision")
    from transformers import AutoProcessor
    tok = data.load_tokenizer(vl_tokenizer_dir(tmp_path / "tok", qwen_tokenizer_dir, "json"))
    common.save_checkpoint(str(tmp_path / "ckpt"), VidEmo(tiny_config()).save_pretrained, tokenizer=tok)
    proc = AutoProcessor.from_pretrained(tmp_path / "ckpt")
    assert VIDEO_RUN in proc.apply_chat_template(VIDEO_MSG, tokenize=False)


# ----------------------------------------------------------------------------------------------------------------------
# chat templates: chat_template.jinja > chat_template.json > tokenizer_config.json, with vision handling


def vl_tokenizer_dir(d, qwen_tokenizer_dir, where, config_template="keep"):
    """The real Qwen tokenizer (its tokenizer_config.json holds Qwen3's text-only template) with the VL template
    written to `where` ("json", "jinja" or None). config_template: "keep" the text one, "drop" it, or a string."""
    shutil.copytree(qwen_tokenizer_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if config_template == "drop":
        cfg.pop("chat_template", None)
    elif config_template != "keep":
        cfg["chat_template"] = config_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if where == "json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25_VL_TEMPLATE}))
    elif where == "jinja":
        (d / "chat_template.jinja").write_text(QWEN25_VL_TEMPLATE)
    return d


def renders_video(tok):
    return VIDEO_RUN in tok.apply_chat_template(VIDEO_MSG, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("where", ["json", "jinja"])
def test_template_only_in_separate_file(tmp_path, qwen_tokenizer_dir, where, capsys):
    tok = data.load_tokenizer(vl_tokenizer_dir(tmp_path / "t", qwen_tokenizer_dir, where, config_template="drop"))
    assert tok.chat_template == QWEN25_VL_TEMPLATE and renders_video(tok)
    assert capsys.readouterr().out == ""  # prints nothing
    # string content (our records: <video> already expanded) renders the same ChatML
    text = tok.apply_chat_template([{"role": "user", "content": VIDEO_RUN + "hi"}], tokenize=False)
    assert text == f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{VIDEO_RUN}hi" \
                   "<|im_end|>\n"


@pytest.mark.parametrize("where", ["json", "jinja"])
def test_separate_vl_file_beats_text_template_in_config(tmp_path, qwen_tokenizer_dir, where):
    d = vl_tokenizer_dir(tmp_path / "t", qwen_tokenizer_dir, where)  # tokenizer_config.json keeps the text one
    assert "<|vision_start|>" not in json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
    tok = data.load_tokenizer(d)
    assert tok.chat_template == QWEN25_VL_TEMPLATE and renders_video(tok)


def test_jinja_beats_json(tmp_path, qwen_tokenizer_dir):
    d = vl_tokenizer_dir(tmp_path / "t", qwen_tokenizer_dir, "json")
    other = QWEN25_VL_TEMPLATE.replace("You are a helpful assistant.", "You read faces.")
    (d / "chat_template.jinja").write_text(other)
    assert data.load_tokenizer(d).chat_template == other
    # a text-only .jinja does not shadow the VL chat_template.json
    (d / "chat_template.jinja").write_text(json.loads((d / "tokenizer_config.json").read_text())["chat_template"])
    assert data.load_tokenizer(d).chat_template == QWEN25_VL_TEMPLATE


def test_saved_tokenizer_keeps_the_vl_template(tmp_path, qwen_tokenizer_dir):
    """What our checkpoints write (tokenizer.save_pretrained) loads back with the chosen VL template."""
    tok = data.load_tokenizer(vl_tokenizer_dir(tmp_path / "t", qwen_tokenizer_dir, "json"))
    tok.save_pretrained(tmp_path / "saved")
    assert data.load_tokenizer(tmp_path / "saved").chat_template == QWEN25_VL_TEMPLATE


def test_no_vision_template_is_a_clear_error(tmp_path, qwen_tokenizer_dir):
    d = vl_tokenizer_dir(tmp_path / "t", qwen_tokenizer_dir, None)  # only the text-only template in the config
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: the chat template has no vision handling"):
        data.load_tokenizer(d)
    tok = data.load_tokenizer(d, require_vision=False)  # allowed explicitly: used as is
    assert "<think>" in tok.chat_template
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: the chat template has no vision handling"):
        data.load_tokenizer(d)
    assert data.load_tokenizer(d, require_vision=False).chat_template.startswith("{% for m")  # .jinja first
    e = vl_tokenizer_dir(tmp_path / "e", qwen_tokenizer_dir, None, config_template="drop")
    with pytest.raises(ValueError, match="has no chat_template"):
        data.load_tokenizer(e)
    (e / "chat_template.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"chat_template\.json: cannot read"):
        data.load_tokenizer(e)
