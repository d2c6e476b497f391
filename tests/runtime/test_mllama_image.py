"""Llama 3.2 Vision (mllama) preprocessing against transformers' MllamaImageProcessorPil and MllamaProcessor's
cross-attention mask functions, on fresh random inputs (the session seed from conftest)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flamingo_edge.errors import CheckpointError, ImageError, PromptError
from flamingo_edge.runtime.mllama_image import (BICUBIC, BILINEAR, BOX, HAMMING, LANCZOS, MllamaImagePreprocessor,
                                                MllamaImageSettings, cross_attention_mask, optimal_tiled_canvas,
                                                preprocess, resize_pil, size_fit_to_canvas, supported_aspect_ratios)

from conftest import assert_imports_without, random_image

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

mllama_pil = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")
mllama_processing = pytest.importorskip("transformers.models.mllama.processing_mllama")

# Pillow 13 changed the order of the two resampling passes for some shapes (python-pillow/Pillow#9549).
LEGACY_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what Llama 3.2 Vision's preprocessor_config.json holds
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _upstream(settings: MllamaImageSettings, images: list[list[np.ndarray]]):
    processor = mllama_pil.MllamaImageProcessorPil(
        size={"height": settings.tile_size, "width": settings.tile_size}, max_image_tiles=settings.max_image_tiles,
        resample=settings.resample, image_mean=list(settings.image_mean), image_std=list(settings.image_std),
        rescale_factor=settings.rescale_factor, do_rescale=settings.do_rescale, do_normalize=settings.do_normalize)
    return processor([[Image.fromarray(image) for image in sample] for sample in images], return_tensors="np")


# ------------------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS])
def test_resize_is_pillow_bit_for_bit(rng, resample):
    sizes = [(1, 1, 5, 7), (3, 40, 56, 56), (40, 3, 56, 20), (100, 37, 56, 21), (37, 100, 13, 56)]
    sizes += [tuple(int(v) for v in rng.integers(1, 200, 4)) for _ in range(12)]
    mismatches = []
    for in_height, in_width, height, width in sizes:
        image = random_image(rng, in_height, in_width)
        expected = np.asarray(Image.fromarray(image).resize((width, height), resample=resample))
        ours = resize_pil(image, height, width, resample, legacy_pass_order=LEGACY_PASS_ORDER)
        if not np.array_equal(ours, expected):
            mismatches.append(((in_height, in_width, height, width),
                               int(np.abs(ours.astype(int) - expected.astype(int)).max())))
    assert not mismatches, f"(in_h, in_w, h, w), max diff: {mismatches}"


def test_resize_refuses_nearest():
    with pytest.raises(CheckpointError, match="resample 0 is not supported"):
        resize_pil(np.zeros((4, 4, 3), np.uint8), 2, 2, 0)


# ---------------------------------------------------------------------------------------------------- geometry


def test_canvas_and_fit_match_upstream(rng):
    cases = [(int(h), int(w), int(t), int(n)) for h, w, t, n in zip(
        rng.integers(1, 2000, 300), rng.integers(1, 2000, 300), rng.choice([14, 32, 56, 224, 560], 300),
        rng.integers(1, 7, 300))]
    cases += [(560, 560, 560, 4), (1, 1, 560, 4), (560, 1120, 560, 4), (3000, 10, 560, 4), (10, 3000, 560, 4)]
    for height, width, tile, max_tiles in cases:
        canvas = mllama_pil.get_optimal_tiled_canvas(height, width, max_tiles, tile)
        rows, cols = optimal_tiled_canvas(height, width, max_tiles, tile)
        assert (rows * tile, cols * tile) == tuple(int(v) for v in canvas), (height, width, tile, max_tiles)
        expected = mllama_pil.get_image_size_fit_to_canvas(height, width, int(canvas[0]), int(canvas[1]), tile)
        assert size_fit_to_canvas(height, width, rows * tile, cols * tile, tile) == tuple(int(v) for v in expected)


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6])
def test_supported_aspect_ratios_match_upstream(max_tiles):
    assert list(supported_aspect_ratios(max_tiles)) == mllama_pil.get_all_supported_aspect_ratios(max_tiles)


# -------------------------------------------------------------------------------------------------- pixel values

# (height, width): wide, tall, tiny, square, exactly one tile, bigger than the largest canvas, thin strips
SHAPES = [(20, 90), (90, 20), (3, 5), (1, 1), (40, 40), (56, 56), (300, 500), (500, 170), (1, 60), (60, 1)]
SETTINGS = {
    "1_tile_32": MllamaImageSettings(tile_size=32, max_image_tiles=1),
    "2_tiles_56_clip": MllamaImageSettings(tile_size=56, max_image_tiles=2, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "4_tiles_32_clip": MllamaImageSettings(tile_size=32, max_image_tiles=4, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "4_tiles_56_bicubic": MllamaImageSettings(tile_size=56, max_image_tiles=4, resample=BICUBIC),
    "4_tiles_32_no_normalize": MllamaImageSettings(tile_size=32, max_image_tiles=4, do_normalize=False),
}


def _compare(settings, images):
    ours = preprocess(images, settings, legacy_pass_order=LEGACY_PASS_ORDER)
    expected = _upstream(settings, images)
    diff = float(np.abs(ours.pixel_values - expected["pixel_values"]).max())
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == expected["pixel_values"].shape
    assert diff == 0.0, f"pixel_values differ by up to {diff}"
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert getattr(ours, key).dtype == np.int64
        np.testing.assert_array_equal(getattr(ours, key), expected[key], err_msg=key)
    assert ours.num_tiles == expected["num_tiles"]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_pixel_values_equal_upstream(rng, name):
    settings = SETTINGS[name]
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 260, 2)) for _ in range(4)]
    for i, (height, width) in enumerate(shapes):  # one image per sample, then two
        _compare(settings, [[random_image(rng, height, width)]])
        other = shapes[(i + 3) % len(shapes)]
        _compare(settings, [[random_image(rng, height, width), random_image(rng, *other)]])


@pytest.mark.parametrize("name", ["2_tiles_56_clip", "4_tiles_32_clip"])
def test_batch_with_different_image_counts(rng, name):
    images = [[random_image(rng, 20, 90), random_image(rng, 300, 500), random_image(rng, 3, 5)], [random_image(rng, 90, 20)]]
    _compare(SETTINGS[name], images)
    _compare(SETTINGS[name], [images[1], images[0]])


def test_gray_and_rgba_images_like_pil_images(rng):
    settings = SETTINGS["4_tiles_32_clip"]
    images = [[random_image(rng, 40, 70, None), random_image(rng, 70, 40, 4)]]  # PIL "L" and "RGBA" upstream
    _compare(settings, images)


def test_no_images():
    out = preprocess([[], []], SETTINGS["4_tiles_32_clip"])
    assert out.pixel_values.shape == (2, 0, 4, 3, 32, 32) and out.num_tiles == [[], []]


def test_bad_image_is_refused():
    with pytest.raises(ImageError, match="expected a uint8 image"):
        preprocess([[np.zeros((8, 8, 3), np.float32)]])
    with pytest.raises(ImageError, match="do_convert_rgb is off"):
        preprocess([[np.zeros((8, 8), np.uint8)]], MllamaImageSettings(do_convert_rgb=False))


@pytest.mark.parametrize("name", ["2_tiles_56_clip", "4_tiles_32_clip", "4_tiles_56_bicubic"])
def test_preprocessor_slots_equal_upstream(rng, name):
    """MllamaImagePreprocessor, one image at a time: its feeds are upstream's slots of a batch, padding slots too."""
    settings = SETTINGS[name]
    ours = MllamaImagePreprocessor(settings, legacy_pass_order=LEGACY_PASS_ORDER)
    images = [[random_image(rng, 20, 90), random_image(rng, 300, 500), random_image(rng, 3, 5)], [random_image(rng, 90, 20)], []]
    expected = _upstream(settings, images)
    tiles, side = settings.max_image_tiles, settings.tile_size
    assert ours.slots_per_image == tiles and ours.image_shape == (tiles, 3, side, side)
    for b, sample in enumerate(images):
        for m in range(3):
            feed = ours.vision_feed(sample[m]) if m < len(sample) else ours.padding_feed()
            assert feed["pixel_values"].shape == (1, tiles, 3, side, side) and feed["pixel_values"].dtype == np.float32
            assert feed["aspect_ratio_ids"].shape == (1,) and feed["aspect_ratio_mask"].shape == (1, tiles)
            for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
                assert np.array_equal(feed[key][0], expected[key][b, m]), (b, m, key)
        assert [ours.tiles_of(image) for image in sample] == expected["num_tiles"][b]
    assert np.array_equal(ours.batch(images[0]), expected["pixel_values"][0])
    assert np.array_equal(ours(images[1][0]), expected["pixel_values"][1, 0])


def test_preprocessor_from_saved_processor(tmp_path):
    processor = mllama_pil.MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2)
    processor.save_pretrained(tmp_path)  # preprocessor_config.json alone: the older layout
    assert MllamaImagePreprocessor.from_pretrained(tmp_path).settings == MllamaImageSettings(tile_size=56,
                                                                                              max_image_tiles=2)
    with pytest.raises(CheckpointError, match="has no image settings"):
        MllamaImagePreprocessor.from_pretrained(tmp_path / "nothing")
    (tmp_path / "idefics").mkdir()
    (tmp_path / "idefics" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "IdeficsImageProcessor", "image_size": 56}))
    with pytest.raises(CheckpointError, match=r"is not Llama 3\.2 Vision's image processor.*ImagePreprocessor"):
        MllamaImagePreprocessor.from_pretrained(tmp_path / "idefics")


# ------------------------------------------------------------------------------------------------------ settings


def test_settings_from_saved_processor_config(tmp_path):
    processor = mllama_pil.MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=2,
                                                   resample=BICUBIC, image_mean=list(CLIP_MEAN),
                                                   image_std=list(CLIP_STD), rescale_factor=0.5)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    settings = MllamaImageSettings.from_processor_config(config)
    assert settings == MllamaImageSettings(tile_size=56, max_image_tiles=2, resample=BICUBIC, rescale_factor=0.5,
                                           image_mean=CLIP_MEAN, image_std=CLIP_STD)
    defaults = json.loads(json.dumps(mllama_pil.MllamaImageProcessorPil().to_dict()))
    assert MllamaImageSettings.from_processor_config(defaults) == MllamaImageSettings()


@pytest.mark.parametrize("config, match", [
    ({"do_pad": False}, "do_pad is false"),
    ({"do_resize": False}, "do_resize is false"),
    ({"size": {"height": 56, "width": 28}}, "is not a square tile"),
    ({"size": {"shortest_edge": 56}}, "is not a square tile"),
    ({"resample": 0}, "resample 0 is not supported"),
    ({"max_image_tiles": 0}, "max_image_tiles is 0, expected a positive integer"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean is \[0\.5, 0\.5\], expected three numbers"),
    ({"image_std": "x"}, "cannot read the mllama image settings"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std is .*, expected three numbers > 0"),
    ({"rescale_factor": "x"}, "rescale_factor is 'x', expected a positive number"),
    ({"do_normalize": "yes"}, "do_normalize is 'yes', expected true or false"),
    ({"max_image_tiles": "4"}, "max_image_tiles is '4', expected a positive integer"),
])
def test_bad_settings_are_refused(config, match):
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: .*" + match):
        MllamaImageSettings.from_processor_config(config)


# ------------------------------------------------------------------------------------------ cross-attention mask

IMAGE, PAD = 128256, 128004  # <|image|> and <|finetune_right_pad_id|> in Llama 3.2 Vision's vocabulary
# Each sample: the positions of its image tokens, the sequence length before padding.
MASK_CASES = {
    "first_token": [([0], 6)],
    "text_before_first_image": [([3], 8)],
    "consecutive_images": [([1, 2, 6], 10)],
    "consecutive_at_start": [([0, 1], 7)],
    "three_consecutive_then_one": [([2, 3, 4, 8], 11)],
    "image_last_token": [([2, 5], 6)],
    "no_image_in_one_sample": [([1, 4], 8), ([], 5)],
    "padding_different_counts": [([0, 3], 9), ([1], 4), ([2, 3, 5], 7)],
}


def _ids(rng, cases, *, left_padding=False):
    length = max(n for _, n in cases)
    ids = np.full((len(cases), length), PAD, dtype=np.int64)
    for b, (positions, n) in enumerate(cases):
        row = rng.integers(0, 1000, n)
        row[positions] = IMAGE
        if left_padding:
            ids[b, length - n:] = row
        else:
            ids[b, :n] = row
    return ids


def _upstream_mask(ids, num_tiles, max_tiles):
    sparse = [mllama_processing.get_cross_attention_token_mask(row.tolist(), IMAGE) for row in ids]
    return mllama_processing.convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_tiles, ids.shape[1])


@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_cross_attention_mask_equals_upstream(rng, case, left_padding):
    cases = MASK_CASES[case]
    ids = _ids(rng, cases, left_padding=left_padding)
    for max_tiles in (1, 4):
        num_tiles = [[int(rng.integers(1, max_tiles + 1)) for _ in positions] for positions, _ in cases]
        ours = cross_attention_mask(ids, num_tiles, IMAGE, max_tiles)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, _upstream_mask(ids, num_tiles, max_tiles))


def test_cross_attention_mask_random_sequences(rng):
    for _ in range(50):
        batch, length = int(rng.integers(1, 4)), int(rng.integers(1, 20))
        ids = rng.integers(0, 1000, (batch, length))
        ids[rng.random((batch, length)) < 0.3] = IMAGE
        for row in ids:  # right padding of random length
            row[length - int(rng.integers(0, length)):] = PAD
        num_tiles = [[int(rng.integers(1, 5)) for _ in range(int(np.sum(row == IMAGE)))] for row in ids]
        np.testing.assert_array_equal(cross_attention_mask(ids, num_tiles, IMAGE, 4),
                                      _upstream_mask(ids, num_tiles, 4))


def test_cross_attention_mask_refuses_count_mismatch():
    ids = np.array([[IMAGE, 5, 6, IMAGE, 7]])
    with pytest.raises(PromptError, match="sample 0 has 2 image tokens .* but 1 images"):
        cross_attention_mask(ids, [[4]], IMAGE, 4)
    with pytest.raises(PromptError, match="num_tiles has 2 samples but input_ids has 1"):
        cross_attention_mask(ids, [[4, 4], [1]], IMAGE, 4)


# ----------------------------------------------------------------------------------------------------- imports


def test_imports_neither_torch_nor_transformers():
    assert_imports_without("flamingo_edge.runtime.mllama_image")
