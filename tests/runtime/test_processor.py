"""The runtime processor against transformers' IdeficsProcessor / IdeficsImageProcessorPil / Pillow, on fresh random
inputs (the session seed from conftest)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flamingo_edge.errors import CheckpointError, ImageError, PromptError
from flamingo_edge.runtime.image import ImagePreprocessor, ImageSettings, load_image
from flamingo_edge.runtime.resize import resize_bicubic
from flamingo_edge.runtime.processor import Processor, PromptFormat, image_preprocessor_from_pretrained
from flamingo_edge.runtime.tokenizer import Tokenizer
from flamingo_edge.tolerances import PIXEL_ABS_TOL

from conftest import assert_imports_without, random_image

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# Pillow 13 changed the order of the two resampling passes for some shapes (python-pillow/Pillow#9549).
LEGACY_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13

# (height, width) of source images: tiny, thin, equal to a preset's size, just off it, larger, non-square.
SOURCE_SIZES = [(1, 1), (1, 2), (2, 1), (1, 37), (41, 1), (3, 3), (7, 5), (24, 24), (28, 28), (32, 32), (31, 33),
                (23, 25), (100, 37), (37, 100), (225, 223), (224, 224), (300, 200), (480, 640), (97, 13)]
TARGET_SIZES = [24, 28, 32, 224]


def _upstream_image_processor(size):
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    return IdeficsImageProcessorPil(image_size=size)


def _ours(size):
    return ImagePreprocessor(ImageSettings(height=size, width=size), legacy_pass_order=LEGACY_PASS_ORDER)


# ------------------------------------------------------------------------------------------------------------ images


def test_resize_is_pillow_bicubic_bit_for_bit(rng):
    sizes = SOURCE_SIZES + [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(30)]
    mismatches = []
    for height, width in sizes:
        image = random_image(rng, height, width)
        for out_height, out_width in [(s, s) for s in TARGET_SIZES] + [(17, 29), (1, 1), (50, 3)]:
            expected = np.asarray(Image.fromarray(image).resize((out_width, out_height), Image.Resampling.BICUBIC))
            got = resize_bicubic(image, out_height, out_width, legacy_pass_order=LEGACY_PASS_ORDER)
            if not np.array_equal(got, expected):
                mismatches.append(((height, width), (out_height, out_width)))
    assert not mismatches, f"resize differs from Pillow for (source, target) sizes {mismatches}"


@pytest.mark.parametrize("size", TARGET_SIZES)
def test_pixel_values_match_transformers(rng, size):
    upstream, ours = _upstream_image_processor(size), _ours(size)
    sizes = SOURCE_SIZES + [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(10)]
    images = [random_image(rng, h, w) for h, w in sizes]
    expected = upstream([Image.fromarray(image) for image in images], return_tensors="np")  # [N, 3, S, S]
    got = ours.batch(images)
    assert got.dtype == np.float32 and got.shape == (len(images), 3, size, size)
    assert np.abs(got - np.asarray(expected)).max() <= PIXEL_ABS_TOL


@pytest.mark.parametrize("layout", ["gray", "gray1", "rgba"])
def test_grayscale_and_rgba_match_transformers(rng, layout):
    upstream, ours = _upstream_image_processor(28), _ours(28)
    for height, width in [(1, 1), (28, 28), (45, 19), (200, 160)]:
        if layout == "rgba":
            image = random_image(rng, height, width, 4)
            image[0, :, 3] = 0  # fully transparent and fully opaque rows, besides random alpha
            image[-1, :, 3] = 255
            pil = Image.fromarray(image)  # mode RGBA: transformers composites it onto white
        else:
            gray = random_image(rng, height, width, None)
            image = gray if layout == "gray" else gray[..., None]
            pil = Image.fromarray(gray)  # mode L
        expected = np.asarray(upstream([pil], return_tensors="np"))[0]
        assert np.abs(ours(image) - expected).max() <= PIXEL_ABS_TOL, (layout, height, width)


def test_load_image_matches_pillow(tmp_path, rng):
    rgb, rgba, gray = random_image(rng, 13, 21), random_image(rng, 9, 4, 4), random_image(rng, 5, 6, None)
    for name, array in [("rgb.png", rgb), ("rgba.png", rgba), ("gray.png", gray), ("rgb.bmp", rgb)]:
        Image.fromarray(array).save(tmp_path / name)
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))  # what transformers' load_image returns
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), name


# ----------------------------------------------------------------------------------------------- prompts (parity)


@pytest.fixture(scope="module")
def processors(idefics_checkpoint):
    """(transformers' IdeficsProcessor, ours), both loaded from the same save_pretrained folder."""
    from transformers import AutoProcessor

    ours = Processor(Tokenizer.from_pretrained(idefics_checkpoint),
                     ImagePreprocessor.from_pretrained(idefics_checkpoint, legacy_pass_order=LEGACY_PASS_ORDER))
    return AutoProcessor.from_pretrained(idefics_checkpoint), ours


def _prompt_cases(rng):
    def image():
        return random_image(rng, *(int(v) for v in rng.integers(1, 90, 2)))

    return {
        "text_then_image": [["User: what is this? ", image(), "Assistant:"]],
        "two_interleaved": [["User:", image(), "and", image(), "compare them."]],
        "three_interleaved": [[image(), "first", image(), " second ", image(), "third"]],
        "consecutive_images": [["look:", image(), image(), image(), "three in a row"]],
        "text_only": [["A photo of a cat sitting on the grass."]],
        "text_text": [["User: hi", "Assistant: hello", "User: bye"]],
        "flat_single_prompt": ["User:", image(), "describe"],
        "batch_padding": [["User:", image(), "Describe this image in many words please."],
                          ["short", image(), image()]],
        "batch_with_text_only_row": [["the quick brown fox jumps over the lazy dog"], [image(), "a dog"]],
        "eos_in_middle": [["User:", image(), "two circles.</s>", "User: and now?", image(), "a square"],
                          ["x</s>y", image()]],
        "literal_image_token_in_text": [["a <image> in text", image(), "b"]],
        "empty_prompt_in_batch": [[], ["text", image()]],
    }


def _assert_same(expected, got):
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "image_attention_mask"}
    for key in ("input_ids", "attention_mask", "image_attention_mask"):
        want = expected[key].numpy()
        # transformers returns a bool [B, S, 1] image_attention_mask for text-only batches, int64 otherwise
        assert got[key].dtype == np.int64, key
        assert want.shape == got[key].shape and np.array_equal(want.astype(np.int64), got[key]), key
        assert want.dtype in (np.int64, np.bool_), key
    want = expected["pixel_values"].numpy()
    assert got["pixel_values"].dtype == np.float32 and want.shape == got["pixel_values"].shape
    assert np.abs(want - got["pixel_values"]).max() <= PIXEL_ABS_TOL


def _to_pil(prompts):
    def convert(item):
        return Image.fromarray(item) if isinstance(item, np.ndarray) else item

    if not any(isinstance(p, list) for p in prompts):
        return [convert(item) for item in prompts]
    return [[convert(item) for item in prompt] for prompt in prompts]


@pytest.mark.parametrize("add_eos_token", [False, True])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prompts_match_transformers(processors, rng, padding_side, add_eos_token):
    upstream, ours = processors
    upstream.tokenizer.padding_side = ours.tokenizer.padding_side = padding_side
    try:
        for name, prompts in _prompt_cases(rng).items():
            expected = upstream(text=_to_pil(prompts), add_eos_token=add_eos_token)
            try:
                _assert_same(expected, ours(prompts, add_eos_token=add_eos_token))
            except AssertionError as error:
                raise AssertionError(f"case {name!r}: {error}") from error
    finally:
        upstream.tokenizer.padding_side = ours.tokenizer.padding_side = "left"


@pytest.mark.parametrize("add_end_of_utterance_token", [None, True, False])
def test_end_of_utterance_matches_transformers(processors, rng, add_end_of_utterance_token):
    upstream, ours = processors
    prompts = [["User: hi", "Assistant: hello", random_image(rng, 20, 30), "User: what is it?", "Assistant:"]]
    expected = upstream(text=_to_pil(prompts), add_end_of_utterance_token=add_end_of_utterance_token)
    got = ours(prompts, add_end_of_utterance_token=add_end_of_utterance_token)
    _assert_same(expected, got)
    eou = ours.tokenizer.token_to_id("<end_of_utterance>")
    assert (eou in got["input_ids"]) == bool(add_end_of_utterance_token)  # None means off in transformers 5


def test_explicit_idefics_prompt_format_changes_nothing(processors, idefics_checkpoint, tmp_path, rng):
    """IDEFICS is the default prompt format: writing it into processor_config.json gives the same inputs, and
    generation stops at EOS by default."""
    _, ours = processors
    names = [p.name for p in idefics_checkpoint.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "explicit", [*names, "processor_config.json"])
    config = json.loads((folder / "processor_config.json").read_text())
    assert "prompt_format" not in config
    config["prompt_format"] = PromptFormat().to_dict()
    (folder / "processor_config.json").write_text(json.dumps(config))
    explicit = Processor.from_pretrained(folder)
    explicit.image_preprocessor = ours.image_preprocessor  # the same Pillow pass order
    assert explicit.prompt_format == ours.prompt_format == PromptFormat()
    assert explicit.stop_token_ids == ours.stop_token_ids == [ours.tokenizer.eos_token_id]
    for name, prompts in _prompt_cases(rng).items():
        want, got = ours(prompts, add_eos_token=True), explicit(prompts, add_eos_token=True)
        assert all(np.array_equal(want[key], got[key]) for key in want), name


def test_vision_feed_is_one_image_slot(processors, idefics_checkpoint, rng):
    """The CLIP-style preprocessor's side of the interface the pipeline uses (mllama's: test_mllama_processor)."""
    _, ours = processors
    preprocessor = ours.image_preprocessor
    image = random_image(rng, 37, 61)
    feed = preprocessor.vision_feed(image)
    assert list(feed) == ["pixel_values"] and np.array_equal(feed["pixel_values"], preprocessor(image)[None])
    assert (preprocessor.slots_per_image, preprocessor.padding_feed(), preprocessor.tiles_of(image)) == (1, None, 1)
    loaded = image_preprocessor_from_pretrained(idefics_checkpoint)
    assert type(loaded) is ImagePreprocessor and loaded.settings == preprocessor.settings


def test_padding_side_and_ids_come_from_the_checkpoint(processors):
    upstream, ours = processors
    tokenizer = upstream.tokenizer
    assert ours.tokenizer.padding_side == tokenizer.padding_side == "left"
    assert (ours.tokenizer.bos_token_id, ours.tokenizer.eos_token_id, ours.tokenizer.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ours.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_decode_matches_transformers(processors, rng):
    upstream, ours = processors
    text = "<s>User:<fake_token_around_image><image><fake_token_around_image>two red circles.</s>"
    ids = ours.tokenizer.encode(text)
    assert ids == upstream.tokenizer(text, add_special_tokens=False)["input_ids"]
    random_ids = rng.integers(0, len(upstream.tokenizer), 40).tolist()
    for skip in (False, True):
        for sample in (ids, random_ids):
            assert ours.tokenizer.decode(sample, skip_special_tokens=skip) == upstream.tokenizer.decode(
                sample, skip_special_tokens=skip)


def test_older_tokenizer_layout_matches_transformers(tmp_path, idefics_checkpoint):
    """AddedToken dicts in tokenizer_config.json and the special tokens in special_tokens_map.json."""
    from transformers import AutoTokenizer

    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "old", ["tokenizer.json"])
    token = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": token, "model_max_length": 2048}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "</s>", "normalized": False}, "pad_token": "<unk>", "unk_token": "<unk>",
        "additional_special_tokens": ["<end_of_utterance>", "<fake_token_around_image>", "<image>"]}))
    upstream, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    assert (ours.padding_side, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        upstream.padding_side, upstream.bos_token_id, upstream.eos_token_id, upstream.pad_token_id)
    assert ours.extra_special_tokens == list(upstream.extra_special_tokens)
    text = "<s>User:<image><fake_token_around_image> a cat</s>"
    assert ours.encode(text) == upstream(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ import isolation


def test_runtime_imports_neither_torch_nor_transformers():
    assert_imports_without("flamingo_edge.runtime.processor")


# ----------------------------------------------------------------------------------------------------- error paths


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match=r"cannot read image file .*nope\.png.*check the path"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n this is not really a png \x00\x01"])
def test_corrupt_image_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"broken\.png is not an image OpenCV can decode.*re-save"):
        load_image(path)


def _copy_checkpoint_files(source, target, names):
    target.mkdir()
    for name in names:
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_missing_tokenizer_json(tmp_path, idefics_checkpoint):
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "ckpt",
                                    ["tokenizer_config.json", "processor_config.json"])
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing.*save_pretrained"):
        Processor.from_pretrained(folder)


def test_corrupt_tokenizer_json(tmp_path, idefics_checkpoint):
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "ckpt",
                                    ["tokenizer_config.json", "processor_config.json"])
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match=r"cannot load .*tokenizer\.json.*corrupt"):
        Tokenizer.from_pretrained(folder)


def test_corrupt_tokenizer_config(tmp_path, idefics_checkpoint):
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "ckpt", ["tokenizer.json"])
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_pretrained(folder)


def test_unsupported_resample(tmp_path, idefics_checkpoint):
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "ckpt", ["processor_config.json"])
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["resample"] = 2
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"resample=2 is not implemented"):
        ImagePreprocessor.from_pretrained(folder)


@pytest.mark.parametrize("key, value, match", [
    ("image_size", -1, r"height is -1, expected a positive integer"),
    ("image_size", "big", r"cannot read the image settings"),
    ("rescale_factor", "x", r"rescale_factor is 'x', expected a positive number"),
    ("image_std", [0.5, 0.0, 0.5], r"image_std is \[0\.5, 0\.0, 0\.5\], expected three numbers > 0"),
    ("image_mean", [0.5, 0.5], r"image_mean is \[0\.5, 0\.5\], expected three numbers"),
    ("do_normalize", "yes", r"do_normalize is 'yes', expected true or false"),
])
def test_bad_image_settings_name_the_file_and_the_value(tmp_path, idefics_checkpoint, key, value, match):
    """A wrong value is a CheckpointError naming processor_config.json (each was an exception from numpy on the
    first image, or a silently wrong normalisation)."""
    folder = _copy_checkpoint_files(idefics_checkpoint, tmp_path / "ckpt", ["processor_config.json"])
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"][key] = value
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"processor_config\.json: .*" + match):
        ImagePreprocessor.from_pretrained(folder)


def test_older_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_size": 40, "resample": 3}))
    settings = ImagePreprocessor.from_pretrained(tmp_path).settings
    assert (settings.height, settings.width, settings.image_mean) == (40, 40, ImageSettings().image_mean)


def test_missing_image_settings(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no image settings.*save_pretrained"):
        ImagePreprocessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("item, kind", [(3.5, "float"), (None, "NoneType"), ([1, 2], "list")])
def test_unsupported_prompt_item(processors, item, kind):
    _, ours = processors
    with pytest.raises(PromptError, match=rf"prompt 0, item 1 is a {kind}; items must be str"):
        ours([["User:", item, "text"]] if kind != "list" else [["User:", item]])


def test_bad_prompt_batches(processors):
    _, ours = processors
    with pytest.raises(PromptError, match="prompts must be a list of prompts"):
        ours("just a string")
    with pytest.raises(PromptError, match="prompts is empty"):
        ours([])
    with pytest.raises(PromptError, match="prompt 1 is a str; a prompt is a list of items"):
        ours([["fine"], "not a list"])


@pytest.mark.parametrize("image, match", [
    (np.zeros((4, 4, 3), dtype=np.float32), "expected a uint8 image"),
    (np.zeros((3, 5, 6), dtype=np.uint8), r"channel-first arrays need np\.moveaxis"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "the image is empty"),
])
def test_bad_image_arrays(processors, image, match):
    _, ours = processors
    with pytest.raises(ImageError, match=match):
        ours([["User:", image]])
