"""OpenFlamingo as data: the tokenizer files `write_processor_files` writes, the prompts, masks and pixel values the
runtime `Processor` builds from them.

Independent references: transformers' own `add_special_tokens` and tokenizer call (as open_flamingo 2.0.1 makes
them), open_flamingo's masking rule rebuilt here from the token ids, and Pillow + torch for open_clip's eval
transform; and, at the end, the real upstream output: the fixtures tests/reference/openflamingo/make_fixtures.py
wrote with open_flamingo 2.0.1, transformers 4.33.3 and open_clip 2.20.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.runtime.processor import prompt_items
from flamingo_edge.errors import CheckpointError, PromptError
from flamingo_edge.models.importers.openflamingo_processor import (
    END_OF_CHUNK_TOKEN, IMAGE_TOKEN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, OPENFLAMINGO_PROMPT_FORMAT, PAD_TOKEN,
    open_clip_image_settings, write_processor_files)
from flamingo_edge.runtime.image import AlphaHandling, ImagePreprocessor, ImageSettings, center_crop, load_image
from flamingo_edge.runtime.processor import BosSource, Processor, PromptFormat
from flamingo_edge.runtime.tokenizer import Tokenizer

from conftest import assert_imports_without

PIL = pytest.importorskip("PIL")
torch = pytest.importorskip("torch")
from PIL import Image, ImageOps  # noqa: E402

LEGACY_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13

CORPUS = (
    "A photo of a dog playing in the park. A photo of a cat sleeping on a red sofa.",
    "An image of two birds sitting on a branch. An image of a small boat on a blue lake.",
    "Question: what is shown in the picture? Answer: a red square and a blue circle.",
    "Output: a yellow triangle on a green background. The quick brown fox jumps over the lazy dog.",
)
WORDS = "a photo of the dog cat red blue Question: Answer: An image two on  and".split(" ")


# ------------------------------------------------------------------------------------------ language-model folders

# name: (special tokens trained into the model vocabulary, named tokens, post-processor adds BOS, extra added tokens)
LM_KINDS = {
    # LLaMA layout: <unk> 0, <s> 1, </s> 2, BOS added by the post-processor, no pad token (-> <PAD> is added)
    "llama": (("<unk>", "<s>", "</s>"), {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, True, ()),
    # GPT-NeoX-20B layout: <|endoftext|> is BOS/EOS/UNK, non-special tokens added after the model vocabulary (the
    # real one has 23 whitespace tokens there), nothing added when encoding, no pad token
    "gpt_neox": (("<|endoftext|>", "<|padding|>"), {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                                   "eos_token": "<|endoftext|>"}, False, ("  ", "   ", "    ")),
    # MPT's release names a pad token: open_flamingo adds no <PAD>
    "mpt": (("<|endoftext|>", "<|padding|>"), {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                              "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}, False, ()),
}


def _lm_tokenizer_folder(folder, kind):
    """A byte-level BPE trained offline, saved with transformers' save_pretrained as a language model ships it."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, named, adds_bos, extra = LM_KINDS[kind]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    if adds_bos:
        bos = named["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    if extra:
        hf.add_tokens(list(extra))
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(LM_KINDS))
def converted(request, tmp_path_factory):
    """(kind, language-model folder, our OpenFlamingo folder, ids write_processor_files returned)."""
    root = tmp_path_factory.mktemp(f"of-{request.param}")
    lm = _lm_tokenizer_folder(root / "lm", request.param)
    out = root / "of"
    out.mkdir()
    return request.param, lm, out, write_processor_files(lm, out, image_size=28)


def _open_flamingo_tokenizer(lm_dir):
    """transformers' tokenizer with OpenFlamingo's tokens, as open_flamingo's create_model_and_transforms makes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # open_flamingo's README and evaluation code set it before generating
    return tokenizer


def test_added_token_ids_match_transformers(converted):
    kind, lm, out, ids = converted
    upstream = _open_flamingo_tokenizer(lm)
    expected = {"endofchunk": upstream.convert_tokens_to_ids(END_OF_CHUNK_TOKEN),
                "image": upstream.convert_tokens_to_ids(IMAGE_TOKEN), "pad": upstream.pad_token_id,
                "bos": upstream.bos_token_id, "eos": upstream.eos_token_id, "vocab_size": len(upstream)}
    assert ids == expected
    before = len(Tokenizer.from_pretrained(lm).backend.get_vocab())
    assert (ids["endofchunk"], ids["image"]) == (before, before + 1)  # after every token, added ones included
    assert (ids["pad"] == before + 2) == (kind != "mpt")
    ours = Tokenizer.from_pretrained(out)
    assert ours.padding_side == "left"
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert ours.token_to_id(END_OF_CHUNK_TOKEN) == ids["endofchunk"]


def test_written_folder_loads_in_transformers(converted):
    """The files are also what transformers would save: same ids, special tokens and padding side."""
    from transformers import AutoTokenizer

    _, lm, out, ids = converted
    upstream, reloaded = _open_flamingo_tokenizer(lm), AutoTokenizer.from_pretrained(out)
    assert reloaded.padding_side == "left" and len(reloaded) == ids["vocab_size"]
    assert reloaded.pad_token_id == ids["pad"] and set(upstream.all_special_tokens) <= set(reloaded.all_special_tokens)
    text = "<image>An image of two birds.<|endofchunk|><image>A photo of"
    assert reloaded(text)["input_ids"] == upstream(text)["input_ids"]


def test_processor_config_round_trips(converted):
    _, _, out, ids = converted
    processor = Processor.from_pretrained(out)
    assert processor.prompt_format == OPENFLAMINGO_PROMPT_FORMAT
    assert processor.image_preprocessor.settings == open_clip_image_settings(28)
    assert processor.image_preprocessor.image_shape == (3, 28, 28)
    assert processor.stop_token_ids == [ids["endofchunk"]]
    assert processor.image_token_id == ids["image"]
    config = json.loads((out / "processor_config.json").read_text())
    assert config["image_processor"]["size"] == {"shortest_edge": 28}
    assert config["image_processor"]["crop_size"] == {"height": 28, "width": 28}


# ------------------------------------------------------------------------------------------------- prompts and masks


def _random_prompt(rng, images):
    """An OpenFlamingo prompt string: text, <image> markers and <|endofchunk|>, possibly text before the first image."""
    pieces = [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 5)))) if rng.random() < 0.5 else ""]
    for _ in range(images):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        pieces.append(f"<image>{words}{END_OF_CHUNK_TOKEN if rng.random() < 0.6 else ''}")
    return "".join(pieces)


def _random_image(rng):
    return rng.integers(0, 256, (int(rng.integers(5, 60)), int(rng.integers(5, 60)), 3), dtype=np.uint8)


def _batch(rng, prompts):
    """Our items for prompt strings, with the CLI's "<image>" convention, and their images."""
    return [prompt_items(p, [_random_image(rng) for _ in range(p.count("<image>"))]) for p in prompts]


def _prompt_batches(rng):
    yield ["<image>An image of two birds.<|endofchunk|><image>A photo of"]
    yield ["A short story. <image>Question: what is shown? Answer: a dog.<|endofchunk|><image>Question: what?",
           "<image>An image of"]
    yield ["text only, no image at all", "<image> leading space after the image "]
    for _ in range(6):
        yield [_random_prompt(rng, int(rng.integers(0, 4))) for _ in range(int(rng.integers(1, 4)))]


def test_prompts_match_transformers_tokenizer(converted, rng):
    """input_ids and the left-padded attention_mask equal `tokenizer(prompts, padding="longest")` with OF's tokens."""
    _, lm, out, _ = converted
    upstream, ours = _open_flamingo_tokenizer(lm), Processor.from_pretrained(out)
    for prompts in _prompt_batches(rng):
        expected = upstream(prompts, padding="longest", return_tensors="np")
        got = ours.tokenize(_batch(rng, prompts))
        assert got.input_ids.dtype == np.int64, prompts
        assert np.array_equal(got.input_ids, expected["input_ids"]), prompts
        assert np.array_equal(got.attention_mask, expected["attention_mask"]), prompts


def _open_flamingo_mask(input_ids, image_token_id, images):
    """open_flamingo's MaskedCrossAttention (only_attend_immediate_media=True), written from its code:
    text_time = cumsum(media_locations); token t attends image m iff text_time[t] == m + 1."""
    ids = torch.from_numpy(input_ids)
    text_time = (ids == image_token_id).cumsum(dim=-1)  # [B, S]
    media_time = torch.arange(images) + 1  # [M]
    return (text_time[..., None] == media_time).to(torch.int64).numpy()  # [B, S, M]


def test_image_attention_mask_is_open_flamingos_rule(converted, rng):
    _, _, out, ids = converted
    processor = Processor.from_pretrained(out)
    for prompts in _prompt_batches(rng):
        got = processor.tokenize(_batch(rng, prompts))
        images = got.image_attention_mask.shape[2]
        if not any(got.images):
            assert not got.image_attention_mask.any() and images == 1
            continue
        assert np.array_equal(got.image_attention_mask, _open_flamingo_mask(got.input_ids, ids["image"], images))
        # Decode steps attend as the prompt's last token (runtime/generation.py); open_flamingo's cached-media mode
        # attends the row's last image: text_time = count_nonzero(media_locations).
        count = (got.input_ids == ids["image"]).sum(axis=1)
        assert np.array_equal(got.image_attention_mask[:, -1], (np.arange(images) == count[:, None] - 1))


def test_typed_image_marker_and_endofchunk_do_not_reset(converted, rng):
    """A "<image>" typed in a text item marks an image; neither <|endofchunk|> nor EOS resets the mask."""
    _, _, out, ids = converted
    processor = Processor.from_pretrained(out)
    eos = processor.tokenizer.eos_token
    first, second = _random_image(rng), _random_image(rng)
    typed = processor.tokenize([["<image>two birds" + END_OF_CHUNK_TOKEN + eos + " and", second]])
    items = processor.tokenize([[first, "two birds" + END_OF_CHUNK_TOKEN + eos + " and", second]])
    assert np.array_equal(typed.input_ids, items.input_ids)
    row = items.image_attention_mask[0]
    start = int(np.flatnonzero(items.input_ids[0] == ids["image"])[0])
    assert row[start:].any(axis=1).all()  # from the first <image> on, every token attends an image
    assert len(typed.images[0]) == 1 and typed.images[0][0] is second  # one image for two markers: the first slot


# ------------------------------------------------------------------------------------------------------------ images


def _open_clip_reference(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip's eval transform written with Pillow (resize, crop) and torch (ToTensor, Normalize) as torchvision
    runs them: `Resize(size)` of the shorter side, `CenterCrop(size)`, `convert("RGB")`, `/255`, `(x - m) / s`."""
    pil = Image.fromarray(image)
    width, height = pil.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    pil = pil.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    pil = pil.crop((left, top, left + size, top + size)).convert("RGB")
    tensor = torch.from_numpy(np.array(pil, np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std).numpy()


# (height, width): square, just over, excess 1 / 2 / 3 / 5 (round half to even), tall past 2:1 (Pillow 13's vertical
# pass first), one-pixel sides, upscaling.
OPEN_CLIP_SOURCE_SIZES = [(56, 56), (57, 56), (56, 57), (59, 56), (56, 61), (80, 61), (47, 100), (130, 97),
                          (300, 40), (40, 300), (1, 1), (1, 90), (90, 1), (13, 9), (224, 224), (480, 640)]


@pytest.mark.parametrize("size", [24, 33, 56, 224])
def test_pixel_values_match_open_clip_transform(rng, size):
    ours = ImagePreprocessor(open_clip_image_settings(size), legacy_pass_order=LEGACY_PASS_ORDER)
    sizes = OPEN_CLIP_SOURCE_SIZES + [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(8)]
    for height, width in sizes:
        for channels in (3, 4, None):  # RGB, RGBA (resized premultiplied, alpha dropped), grayscale
            shape = (height, width) if channels is None else (height, width, channels)
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            got = ours(image)
            assert got.dtype == np.float32 and got.shape == (3, size, size)
            difference = np.abs(got - _open_clip_reference(image, size)).max()
            assert difference == 0.0, (height, width, channels, difference)


def test_rescale_equals_to_tensor_for_every_byte():
    """transformers rescales in float64 then casts; torchvision's ToTensor divides float32 by 255: equal bits."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    settings = ImageSettings(height=16, width=16, do_normalize=False)
    got = ImagePreprocessor(settings)(values)
    expected = torch.from_numpy(values).permute(2, 0, 1).to(torch.float32).div(255).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("source, crop", [((10, 7), (6, 6)), ((5, 5), (8, 9)), ((4, 20), (9, 9)), ((9, 9), (9, 9))])
def test_center_crop_matches_torchvision_on_pillow(rng, source, crop):
    """torchvision's center_crop on a PIL image: pad with 0 (ImageOps.expand), then crop at round((side - crop) / 2)."""
    image = rng.integers(0, 256, (*source, 3), dtype=np.uint8)
    pil = Image.fromarray(image)
    (height, width), (crop_height, crop_width) = source, crop
    if crop_height > height or crop_width > width:
        pad_w, pad_h = max(crop_width - width, 0), max(crop_height - height, 0)
        pil = ImageOps.expand(pil, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=0)
    top, left = int(round((pil.height - crop_height) / 2.0)), int(round((pil.width - crop_width) / 2.0))
    expected = np.asarray(pil.crop((left, top, left + crop_width, top + crop_height)))
    assert np.array_equal(center_crop(image, crop_height, crop_width), expected)


def test_idefics_settings_are_unchanged_by_default():
    settings = ImageSettings()
    assert (settings.shortest_edge, settings.crop_size, settings.alpha_handling) == (
        None, None, AlphaHandling.COMPOSITE_ON_WHITE)
    assert settings.output_size == (224, 224)
    assert PromptFormat().bos_added_by is BosSource.PROCESSOR and PromptFormat().image_mask_resets_at_eos


def test_settings_round_trip_through_json():
    for settings in (ImageSettings(), open_clip_image_settings(33), open_clip_image_settings((40, 30))):
        assert ImageSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    for prompt_format in (PromptFormat(), OPENFLAMINGO_PROMPT_FORMAT):
        assert PromptFormat.from_dict(json.loads(json.dumps(prompt_format.to_dict()))) == prompt_format


def test_writing_the_processor_files_imports_neither_torch_nor_transformers():
    assert_imports_without("flamingo_edge.models.importers.openflamingo_processor")


# ------------------------------------------------------------------------------------------------------- error paths


def test_language_model_without_tokenizer_json(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json: only fast tokenizers.*save_pretrained"):
        write_processor_files(tmp_path / "lm", tmp_path, image_size=224)


def test_missing_language_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"language model folder .*nope does not exist"):
        write_processor_files(tmp_path / "nope", tmp_path, image_size=224)


@pytest.mark.parametrize("entry, match", [
    ({"image_tokn": "<image>"}, r"unknown prompt_format keys \['image_tokn'\]"),
    ({"strip_text": "no"}, r"prompt_format\.strip_text is 'no'; expected true or false"),
    ({"stop_tokens": "<|endofchunk|>"}, r"prompt_format\.stop_tokens is .*; expected a list of strings or null"),
    ({"bos_added_by": "model"}, r"bos_added_by 'model' is not one of 'processor', 'tokenizer'"),
    ([1, 2], r"\"prompt_format\" must be a JSON object"),
])
def test_bad_prompt_format(tmp_path, entry, match):
    (tmp_path / "processor_config.json").write_text(json.dumps({"prompt_format": entry}))
    with pytest.raises(CheckpointError, match=match):
        PromptFormat.from_pretrained(tmp_path)


def test_prompt_format_token_missing_from_vocabulary(converted):
    _, _, out, _ = converted
    tokenizer, images = Tokenizer.from_pretrained(out), ImagePreprocessor.from_pretrained(out)
    with pytest.raises(CheckpointError, match=r"stop token '<\|im_end\|>' is not in the tokenizer's vocabulary"):
        Processor(tokenizer, images, PromptFormat(image_wrap_token=None, stop_tokens=("<|im_end|>",)))
    with pytest.raises(CheckpointError, match=r"image_wrap_token '<fake_token_around_image>' is not in"):
        Processor(tokenizer, images)  # IDEFICS' format on OpenFlamingo's tokenizer


def test_end_of_utterance_needs_a_token(converted):
    _, _, out, _ = converted
    with pytest.raises(PromptError, match="has no end-of-utterance token"):
        Processor.from_pretrained(out)([["a", "b"]], add_end_of_utterance_token=True)


@pytest.mark.parametrize("config, match", [
    ({"size": {"shortest_edge": 32}}, r"shortest_edge without a centre crop"),
    ({"size": {"shortest_edge": 32}, "do_center_crop": True}, r"do_center_crop is on but crop_size is None"),
    ({"size": {"shortest_edge": 32, "longest_edge": 64}}, r"size .* is not supported"),
    ({"alpha_handling": "premultiply"}, r"alpha_handling 'premultiply' is not one of"),
])
def test_bad_image_settings(config, match):
    with pytest.raises(CheckpointError, match=match):
        ImageSettings.from_dict(config)


# ------------------------------------------------------------------------------- against open_flamingo's own output

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openflamingo"
FIXTURE_FAMILIES = ("llama", "mpt", "gpt_neox")
PIXEL_TOLERANCE = 1e-6  # required; the values are in fact equal


def _fixture_file(*parts) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: write the fixtures with tests/reference/openflamingo/make_fixtures.py "
                    "(see the README beside it)")
    return path


@pytest.fixture(scope="module", params=FIXTURE_FAMILIES)
def released(request, tmp_path_factory):
    """(cases.json, our folder converted from the family's lm/ folder, the ids write_processor_files returned)."""
    family = request.param
    cases = json.loads(_fixture_file(family, "cases.json").read_text())
    vision = json.loads(_fixture_file(family, "vision.json").read_text())
    out = tmp_path_factory.mktemp(f"of-fixture-{family}")
    ids = write_processor_files(_fixture_file(family, "lm"), out, image_size=vision["vision_cfg"]["image_size"])
    return cases, out, ids


def test_token_ids_equal_open_flamingos(released):
    cases, _, ids = released
    special = cases["special_token_ids"]
    assert ids == {"endofchunk": special["<|endofchunk|>"], "image": special["<image>"], "pad": special["pad"],
                   "bos": special["bos"], "eos": special["eos"], "vocab_size": cases["len_tokenizer"]}


def test_prompts_equal_open_flamingos(released):
    """Every recorded case: ids, left-padded mask, the image mask by open_flamingo's rule, and open_clip's pixels."""
    from safetensors.numpy import load_file

    cases, out, ids = released
    processor = Processor.from_pretrained(out)
    tensors = load_file(str(_fixture_file(cases["family"], "tensors.safetensors")))
    for case in cases["cases"]:
        name = case["name"]
        images = [[load_image(_fixture_file("images", image)) for image in row] for row in case["images"]]
        got = processor([prompt_items(text, row) for text, row in zip(case["prompts"], images)])
        assert got["input_ids"].tolist() == case["input_ids"], name
        assert got["attention_mask"].tolist() == case["attention_mask"], name
        expected_mask = _open_flamingo_mask(got["input_ids"], ids["image"], got["image_attention_mask"].shape[2])
        assert np.array_equal(got["image_attention_mask"], expected_mask), name
        vision_x = tensors[f"{name}/vision_x"][:, :, 0]  # [B, T, 1, 3, H, W] -> [B, T, 3, H, W], zero images padded
        assert got["pixel_values"].shape == vision_x.shape, name
        assert np.abs(got["pixel_values"] - vision_x).max() <= PIXEL_TOLERANCE, name


def test_pixel_values_equal_open_clips():
    """open_clip 2.20's eval transform at the model's size and at an odd size, on every fixture image."""
    from safetensors.numpy import load_file

    index = json.loads(_fixture_file("preprocess.json").read_text())["keys"]
    expected = load_file(str(_fixture_file("preprocess.safetensors")))
    assert index and set(index) == set(expected)
    worst = {}
    for key, entry in index.items():
        ours = ImagePreprocessor(open_clip_image_settings(entry["image_size"]))
        worst[key] = float(np.abs(ours(load_image(_fixture_file("images", entry["image"]))) - expected[key]).max())
    assert max(worst.values()) <= PIXEL_TOLERANCE, worst
