"""The runtime processor on a Llama 3.2 Vision (mllama) checkpoint against transformers' own MllamaProcessor, both
loaded from the same save_pretrained folder, on fresh random prompts and images (the session seed from conftest)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flamingo_edge.errors import CheckpointError, ImageError, PromptError
from flamingo_edge.runtime.image import ImagePreprocessor
from flamingo_edge.runtime.mllama_image import MllamaImagePreprocessor
from flamingo_edge.runtime.processor import (MLLAMA_PROMPT_FORMAT, Processor, PromptFormat,
                                             image_preprocessor_from_pretrained, prompt_items)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pytest.importorskip("transformers")

# Pillow 13 changed the order of the two resampling passes for some shapes (python-pillow/Pillow#9549).
LEGACY_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13
IMAGE_TOKEN, BOS = "<|image|>", "<|begin_of_text|>"
IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
TILE = 28  # the "tiny" preset's tile; max_image_tiles is 4


@pytest.fixture(scope="module")
def mllama(seed, tmp_path_factory):
    """(the save_pretrained folder, transformers' MllamaProcessor loaded from it, ours loaded from it)."""
    from transformers import AutoProcessor

    from flamingo_edge.models.random_mllama import build_random_mllama

    folder = tmp_path_factory.mktemp("mllama-processor")
    build_random_mllama("tiny", seed)[1].save_pretrained(folder)
    ours = Processor.from_pretrained(folder)
    ours.image_preprocessor.legacy_pass_order = LEGACY_PASS_ORDER  # the Pillow transformers runs on here
    return folder, AutoProcessor.from_pretrained(folder), ours


# (height range, width range) of a random image that fills this many 28-px tiles out of 4
TILE_SHAPES = {1: ((4, 28), (4, 28)), 2: ((4, 28), (29, 56)), 3: ((4, 28), (57, 84)), 4: ((29, 56), (29, 56))}


def _image(rng, tiles: int, *, tall: bool = False, channels: int | None = 3) -> np.ndarray:
    (h0, h1), (w0, w1) = TILE_SHAPES[tiles]
    height, width = int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))
    if tall:
        height, width = width, height
    shape = (height, width) if channels is None else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _upstream(upstream, prompts: list[list]) -> dict[str, np.ndarray]:
    """transformers on the same prompts: each image item written as <|image|>, padded as `padding=True` pads."""
    texts = ["".join(item if isinstance(item, str) else IMAGE_TOKEN for item in prompt) for prompt in prompts]
    images = [[Image.fromarray(item) for item in prompt if isinstance(item, np.ndarray)] for prompt in prompts]
    if not any(images):
        return dict(upstream(text=texts, padding=True, return_tensors="np"))
    return dict(upstream(text=texts, images=images, padding=True, return_tensors="np"))


def _assert_same(expected: dict, got: dict, preprocessor) -> None:
    assert set(got) == {"input_ids", "attention_mask", *IMAGE_KEYS, "image_attention_mask"}
    batch, length = expected["input_ids"].shape
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == np.int64 and np.array_equal(got[key], expected[key]), key
    mask = got["image_attention_mask"]
    assert mask.dtype == np.int64
    if "cross_attention_mask" not in expected:  # text only: one padding slot that nothing attends to
        assert np.array_equal(mask, np.zeros((batch, length, preprocessor.slots_per_image), np.int64))
        padding = preprocessor.padding_feed()
        for key in IMAGE_KEYS:
            assert np.array_equal(got[key], np.repeat(padding[key][None], batch, axis=0)), key
        return
    assert np.array_equal(mask, expected["cross_attention_mask"].reshape(batch, length, -1))  # [B, S, M*T]
    for key in IMAGE_KEYS:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, key
    diff = float(np.abs(got["pixel_values"] - expected["pixel_values"]).max())
    assert diff == 0.0, f"pixel_values differ by up to {diff}"
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert np.array_equal(got[key], expected[key]), key


def _cases(rng) -> dict[str, list[list]]:
    def image(tiles, **kwargs):
        return _image(rng, tiles, **kwargs)

    return {
        "image_first": [[image(1), "Describe it."]],
        "text_before_first_image": [["User: look at this ", image(2), " what is it?"]],
        "adjacent_images": [[image(4), image(1), "compare them."]],
        "separated_images": [["first", image(2, tall=True), "then", image(3), "end"]],
        "batch_padding_different_counts": [["short", image(4)],
                                           ["a much longer prompt with", image(1), "and", image(2), "some text"]],
        "batch_with_text_only_row": [["a text-only row, longer than the other one"], [image(2), "hi"]],
        "bos_already_in_text": [[BOS, image(1), "Describe"], [image(4), f"{BOS}Describe it"]],
        "spaces_kept_gray_image": [["  spaced  ", image(2, channels=None), " x "]],
        "image_only": [[image(1)]],
        "empty_prompt_in_batch": [[], ["text", image(1)]],
        "text_only": [["A photo of a cat."]],
        "text_only_padded": [["hello"], ["a longer text-only prompt here"]],
    }


# ------------------------------------------------------------------------------------------------------- parity


def test_prompts_equal_transformers(mllama, rng):
    _, upstream, ours = mllama
    tile_counts = set()
    for name, prompts in _cases(rng).items():
        tile_counts |= {ours.image_preprocessor.tiles_of(item) for prompt in prompts for item in prompt
                        if isinstance(item, np.ndarray)}
        try:
            _assert_same(_upstream(upstream, prompts), ours(prompts), ours.image_preprocessor)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    assert tile_counts == {1, 2, 3, 4}


def test_bos_rule_and_left_padding(mllama, rng):
    """What transformers' build_string_from_input + the post-processor give, spelled out."""
    _, _, ours = mllama
    bos, image = ours.tokenizer.bos_token_id, ours.image_token_id
    got = ours([[_image(rng, 1), "Describe it."], ["Hi", _image(rng, 1), _image(rng, 1), "a longer prompt"],
                [f"{BOS}x"]])
    ids, attention = got["input_ids"], got["attention_mask"]
    starts = [ids[row, int(np.argmax(attention[row]))] for row in range(3)]
    assert starts == [bos] * 3 and attention[:, -1].all()  # left padding: every row ends with a real token
    first = ids[0, int(np.argmax(attention[0])):]
    assert first[:3].tolist() == [bos, image, bos]  # BOS, the leading image, then the BOS written into the text
    second = ids[1, int(np.argmax(attention[1])):]
    assert second[:2].tolist() == [bos, bos]  # no leading image: the written BOS follows the tokenizer's
    third = ids[2, int(np.argmax(attention[2])):]
    assert np.sum(third == bos) == 2  # the text has a BOS: nothing written, the post-processor's is still added


def test_vision_feed_and_padding_feed_equal_transformers_slots(mllama, rng):
    _, upstream, ours = mllama
    preprocessor = ours.image_preprocessor
    prompts = [["a", _image(rng, 4), "b", _image(rng, 2, tall=True)], [_image(rng, 3), "c"], ["text only"]]
    expected = _upstream(upstream, prompts)
    tiles, side = preprocessor.slots_per_image, preprocessor.settings.tile_size
    assert tiles == 4 and preprocessor.image_shape == (tiles, 3, side, side)
    for row, prompt in enumerate(prompts):
        images = [item for item in prompt if isinstance(item, np.ndarray)]
        for slot in range(expected["pixel_values"].shape[1]):  # padding slots too
            feed = preprocessor.vision_feed(images[slot]) if slot < len(images) else preprocessor.padding_feed()
            assert {key: (value.dtype, value.shape) for key, value in feed.items()} == {
                "pixel_values": (np.float32, (1, tiles, 3, side, side)), "aspect_ratio_ids": (np.int64, (1,)),
                "aspect_ratio_mask": (np.int64, (1, tiles))}
            for key in IMAGE_KEYS:
                assert np.array_equal(feed[key][0], expected[key][row, slot]), (row, slot, key)
            if slot < len(images):
                assert preprocessor.tiles_of(images[slot]) == int(expected["aspect_ratio_mask"][row, slot].sum())
                assert np.array_equal(preprocessor(images[slot]), expected["pixel_values"][row, slot])
    padding = preprocessor.padding_feed()
    assert padding["aspect_ratio_ids"].tolist() == [0] and padding["aspect_ratio_mask"].tolist() == [[1, 0, 0, 0]]
    assert not padding["pixel_values"].any()


def test_tokenize_gives_the_tile_mask_and_each_rows_images(mllama, rng):
    _, _, ours = mllama
    first, second, third = _image(rng, 4), _image(rng, 1), _image(rng, 2)
    prompts = [["x", first, "y"], [second, third, "z"]]
    batch = ours.tokenize(prompts)
    assert [[id(image) for image in row] for row in batch.images] == [[id(first)], [id(second), id(third)]]
    assert batch.image_attention_mask.shape == (*batch.input_ids.shape, 2 * 4)
    assert np.array_equal(batch.image_attention_mask, ours(prompts)["image_attention_mask"])
    # adjacent images: the text after them sees both, each only over its own tiles
    assert batch.image_attention_mask[1, -1].tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
    text_only = ours.tokenize([["no image here"], ["nor here"]])
    assert text_only.image_attention_mask.shape == (*text_only.input_ids.shape, 4)
    assert not text_only.image_attention_mask.any() and text_only.images == [[], []]


def test_command_line_marker_becomes_the_image_token(mllama, rng):
    _, upstream, ours = mllama
    image = _image(rng, 2)
    got = ours([prompt_items("<image>Describe it.", [image])])
    expected = upstream(text=[f"{IMAGE_TOKEN}Describe it."], images=[[Image.fromarray(image)]], return_tensors="np")
    _assert_same(dict(expected), got, ours.image_preprocessor)


# ----------------------------------------------------------------------------------------------- checkpoint files


def _copy(source, target, names):
    target.mkdir()
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    return target


@pytest.mark.parametrize("layout", ["export", "processor_class_only", "old_preprocessor_config"])
def test_from_pretrained_detects_mllama(mllama, rng, tmp_path, layout):
    """An export's copies, a processor_config.json naming only the processor class, and the older layout where the
    image processor's settings sit alone in preprocessor_config.json (as on the Hub)."""
    folder, _, ours = mllama
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    target = _copy(folder, tmp_path / layout, tokenizer_files + ["processor_config.json"] * (layout == "export"))
    config = json.loads((folder / "processor_config.json").read_text())
    if layout == "processor_class_only":
        del config["image_processor"]["image_processor_type"]
        (target / "processor_config.json").write_text(json.dumps(config))
    elif layout == "old_preprocessor_config":
        (target / "preprocessor_config.json").write_text(json.dumps(config["image_processor"]))
    loaded = Processor.from_pretrained(target)
    assert isinstance(loaded.image_preprocessor, MllamaImagePreprocessor)
    assert loaded.image_preprocessor.settings == ours.image_preprocessor.settings
    assert loaded.prompt_format == MLLAMA_PROMPT_FORMAT
    loaded.image_preprocessor.legacy_pass_order = LEGACY_PASS_ORDER
    prompts = [["a", _image(rng, 2), "b"], [_image(rng, 4), _image(rng, 1), "c"]]
    want, got = ours(prompts), loaded(prompts)
    assert all(np.array_equal(want[key], got[key]) for key in want)


def test_explicit_prompt_format_entry_round_trips(mllama, tmp_path):
    folder, _, _ = mllama
    assert PromptFormat.from_dict(json.loads(json.dumps(MLLAMA_PROMPT_FORMAT.to_dict()))) == MLLAMA_PROMPT_FORMAT
    target = _copy(folder, tmp_path / "explicit", ["processor_config.json"])
    config = json.loads((target / "processor_config.json").read_text())
    config["prompt_format"] = PromptFormat(image_token="<|image|>", image_wrap_token=None).to_dict()
    (target / "processor_config.json").write_text(json.dumps(config))
    assert PromptFormat.from_pretrained(target).image_runs_attended_together is False  # the entry wins


def test_stop_tokens_are_llama3s_present_in_the_vocabulary(mllama):
    _, upstream, ours = mllama
    ids = [upstream.tokenizer.convert_tokens_to_ids(token) for token in ("<|end_of_text|>", "<|eot_id|>")]
    assert upstream.tokenizer.convert_tokens_to_ids("<|eom_id|>") is None  # the tiny vocabulary lacks it
    assert ours.stop_token_ids == ids and ours.tokenizer.eos_token_id in ids


def test_image_preprocessor_factory(mllama, idefics_checkpoint):
    folder, _, _ = mllama
    assert isinstance(image_preprocessor_from_pretrained(folder), MllamaImagePreprocessor)
    assert type(image_preprocessor_from_pretrained(idefics_checkpoint)) is ImagePreprocessor
    assert PromptFormat.from_pretrained(idefics_checkpoint) == PromptFormat()


# ---------------------------------------------------------------------------------------------------- error paths


def test_typed_image_token_without_an_image_is_refused(mllama, rng):
    _, upstream, ours = mllama
    image = _image(rng, 1)
    with pytest.raises(PromptError, match=r"prompt 0 has 2 <\|image\|> tokens but 1 images; .*remove it from the"):
        ours([[f"look {IMAGE_TOKEN} here", image, "and?"]])
    with pytest.raises(ValueError, match="number of <\\|image\\|> tokens"):  # transformers refuses it too
        upstream(text=[f"look {IMAGE_TOKEN} here{IMAGE_TOKEN}and?"], images=[[Image.fromarray(image)]])
    with pytest.raises(PromptError, match=r"prompt 1 has 1 <\|image\|> tokens but 0 images"):
        ours([["fine", image], [f"{IMAGE_TOKEN} typed only"]])


def test_typed_image_token_is_the_image_token(mllama):
    _, _, ours = mllama
    ids = ours.tokenizer.encode(f"a{IMAGE_TOKEN}b")
    assert ids.count(ours.image_token_id) == 1 and len(ids) == 3


def test_other_errors(mllama, tmp_path):
    folder, _, ours = mllama
    with pytest.raises(PromptError, match="has no end-of-utterance token"):
        ours([["a", "b"]], add_end_of_utterance_token=True)
    with pytest.raises(ImageError, match="expected a uint8 image"):
        ours.image_preprocessor.tiles_of(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="expected a uint8 image"):
        ours([["x", np.zeros((4, 4, 3), np.float32)]])
    with pytest.raises(CheckpointError, match=r"tiling image processor.*MllamaImagePreprocessor\.from_pretrained"):
        ImagePreprocessor.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="cannot both be true; set \"image_mask_resets_at_eos\": false"):
        PromptFormat(image_runs_attended_together=True)
    (tmp_path / "processor_config.json").write_text(json.dumps({"prompt_format": {"bos_after_leading_images": 1}}))
    with pytest.raises(CheckpointError, match=r"prompt_format\.bos_after_leading_images is 1; expected true or false"):
        PromptFormat.from_pretrained(tmp_path)
