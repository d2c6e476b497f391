"""OpenFlamingo's tokenizer and preprocessing, written as files the runtime reads (no torch, no transformers).

open_flamingo 2.0.1 `create_model_and_transforms` (src/open_flamingo/src/factory.py) loads the language model's
tokenizer and then does

    text_tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if text_tokenizer.pad_token is None:
        text_tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lang_encoder.resize_token_embeddings(len(text_tokenizer))

and preprocesses images with open_clip's eval transform (`image_transform(image_size, is_train=False)`: shorter side
to the image size, bicubic; centre crop; RGB; ToTensor; Normalize with OpenAI CLIP's mean/std). `write_processor_files`
repeats the token additions on the `tokenizers` library (the ids are assigned the same way: after every token the
tokenizer already has, in that order) and records the rest as data: `processor_config.json` holds the image
settings and OpenFlamingo's prompt format (`OPENFLAMINGO_PROMPT_FORMAT`), which is all the runtime needs to treat
OpenFlamingo differently from IDEFICS.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from flamingo_edge.artifacts import atomic_write, read_json
from flamingo_edge.errors import CheckpointError
from flamingo_edge.runtime.image import AlphaHandling, ImageSettings
from flamingo_edge.runtime.processor import PROCESSOR_CONFIG, BosSource, PromptFormat
from flamingo_edge.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

END_OF_CHUNK_TOKEN = "<|endofchunk|>"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<PAD>"  # added only when the language model's tokenizer has no pad token
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip's OPENAI_DATASET_STD

# How open_flamingo writes and reads prompts: "<image>" per image and nothing around it; the text as the user wrote
# it; `tokenizer(text)` adds the special tokens (LLaMA: <s>; GPT-NeoX and MPT: none); a token attends the latest
# <image> at or before it (MaskedCrossAttention: cumsum of media locations), never reset by <|endofchunk|> or EOS;
# `Flamingo.generate` stops at <|endofchunk|>.
OPENFLAMINGO_PROMPT_FORMAT = PromptFormat(
    image_token=IMAGE_TOKEN, image_wrap_token=None, bos_added_by=BosSource.TOKENIZER, strip_text=False,
    image_mask_resets_at_eos=False, stop_tokens=(END_OF_CHUNK_TOKEN,), end_of_utterance_token=None,
)



def open_clip_image_settings(image_size: int | tuple[int, int], image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                             image_std: tuple[float, ...] = OPENAI_CLIP_STD) -> ImageSettings:
    """open_clip 2.20 `image_transform(image_size, is_train=False, mean, std)` as `ImageSettings`.

    A square size (an int, or equal sides) is `Resize(S, BICUBIC)` of the shorter side then `CenterCrop(S)`; open_clip
    passes a non-square (height, width) to `Resize` as is, which squashes, and the crop is then a no-op.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else (int(v) for v in image_size)
    common = dict(image_mean=tuple(image_mean), image_std=tuple(image_std),
                  alpha_handling=AlphaHandling.DROP_AFTER_RESIZE)
    if height != width:
        return ImageSettings(height=height, width=width, **common)
    return ImageSettings(shortest_edge=height, crop_size=(height, width), **common)


def _load_lm_tokenizer(lm_dir: Path) -> Tokenizer:
    """The language model's tokenizer, its named special tokens registered as transformers registers them."""
    if not lm_dir.is_dir():
        raise CheckpointError(f"the language model folder {lm_dir} does not exist; pass the Hugging Face folder "
                              "of the model OpenFlamingo was trained on (config.json, weights, tokenizer files)")
    if not (lm_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{lm_dir} has no tokenizer.json: only fast tokenizers are supported (the runtime "
                              "uses the `tokenizers` library). Write one with transformers: "
                              "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    return Tokenizer.from_pretrained(lm_dir)


def _add_openflamingo_tokens(tokenizer: Tokenizer) -> bool:
    """Add <|endofchunk|>, <image> and, without a pad token, <PAD>, in open_flamingo's order and with its flags.

    transformers turns each string into `AddedToken(token, special=True, normalized=False)` (no stripping) and
    `tokenizers` gives a new token the next id after every token it has. Returns whether <PAD> was added.
    """
    backend = tokenizer.backend
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in (END_OF_CHUNK_TOKEN, IMAGE_TOKEN)])
    if tokenizer.special_tokens.get("pad_token") is not None:
        return False
    backend.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    tokenizer.special_tokens["pad_token"] = PAD_TOKEN
    return True


def _merged(tokens: list[str], new: tuple[str, ...]) -> list[str]:
    return [*tokens, *(t for t in new if t not in tokens)]


def _tokenizer_config(lm_dir: Path, new_ids: dict[str, int], pad_added: bool) -> dict[str, Any]:
    """The language model's tokenizer_config.json with OpenFlamingo's tokens, <PAD> and left padding."""
    path = lm_dir / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    key = "extra_special_tokens" if "extra_special_tokens" in config else "additional_special_tokens"
    if isinstance(config.get(key) or [], list):
        config[key] = _merged(list(config.get(key) or []), (END_OF_CHUNK_TOKEN, IMAGE_TOKEN))
    else:  # transformers 5's named extras ({"image_token": ...}); tokenizer.json marks the new tokens special
        logger.debug("%s: %s is a mapping; OpenFlamingo's tokens are recorded in tokenizer.json only", path, key)
    if pad_added:
        config["pad_token"] = PAD_TOKEN
    if isinstance(config.get("added_tokens_decoder"), dict):  # transformers >= 4.34 reads the added tokens here
        for token, token_id in new_ids.items():
            config["added_tokens_decoder"].setdefault(str(token_id), {
                "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True})
    config["padding_side"] = "left"  # OpenFlamingo generates from left-padded batches
    return config


def _special_tokens_map(lm_dir: Path, pad_added: bool) -> dict[str, Any]:
    """The language model's special_tokens_map.json (transformers <= 4.33 reads it) with OpenFlamingo's tokens."""
    path = lm_dir / "special_tokens_map.json"
    tokens = read_json(path) if path.is_file() else {}
    tokens["additional_special_tokens"] = _merged(list(tokens.get("additional_special_tokens") or []),
                                                  (END_OF_CHUNK_TOKEN, IMAGE_TOKEN))
    if pad_added:
        tokens["pad_token"] = PAD_TOKEN
    return tokens


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_processor_files(lm_dir: str | Path, out_dir: str | Path, *, image_size: int | tuple[int, int],
                          image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                          image_std: tuple[float, ...] = OPENAI_CLIP_STD) -> dict[str, int | None]:
    """Write OpenFlamingo's tokenizer and processor files for a language model into `out_dir`.

    Files: tokenizer.json (the language model's, with OpenFlamingo's tokens added), tokenizer_config.json and
    special_tokens_map.json (the new special tokens, <PAD> when added, left padding), processor_config.json
    ("image_processor": open_clip's eval transform as `ImageSettings`; "prompt_format": `OPENFLAMINGO_PROMPT_FORMAT`).
    `Processor.from_pretrained(out_dir)` reads them back.

    Args:
        lm_dir: the language model's Hugging Face folder: tokenizer.json (required), tokenizer_config.json and
            special_tokens_map.json (optional), before OpenFlamingo's tokens were added.
        out_dir: an existing folder to write into (the converter's staging folder).
        image_size: the open_clip vision tower's image size (`vision_cfg.image_size`): an int, or (height, width).
        image_mean, image_std: the normalisation (open_flamingo uses open_clip's OpenAI CLIP values).

    Returns:
        {"endofchunk", "image", "pad", "bos", "eos": token ids (bos/eos None when the tokenizer has none),
        "vocab_size": len(tokenizer) after the additions, the rows of OpenFlamingo's resized embedding}.

    Raises:
        CheckpointError: lm_dir is missing, has no tokenizer.json, or its tokenizer files cannot be read.
    """
    lm_dir, out_dir = Path(lm_dir), Path(out_dir)
    tokenizer = _load_lm_tokenizer(lm_dir)
    pad_added = _add_openflamingo_tokens(tokenizer)
    ids = {"endofchunk": tokenizer.token_to_id(END_OF_CHUNK_TOKEN), "image": tokenizer.token_to_id(IMAGE_TOKEN),
           "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "vocab_size": tokenizer.backend.get_vocab_size(with_added_tokens=True)}
    new_ids = {END_OF_CHUNK_TOKEN: ids["endofchunk"], IMAGE_TOKEN: ids["image"]}
    if pad_added:
        new_ids[PAD_TOKEN] = ids["pad"]
    atomic_write(out_dir / "tokenizer.json", tokenizer.backend.to_str(pretty=True).encode("utf-8"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(lm_dir, new_ids, pad_added))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map(lm_dir, pad_added))
    _write_json(out_dir / PROCESSOR_CONFIG, {
        "image_processor": open_clip_image_settings(image_size, image_mean, image_std).to_dict(),
        "prompt_format": OPENFLAMINGO_PROMPT_FORMAT.to_dict(),
    })
    logger.info("OpenFlamingo tokens: %s=%d, %s=%d, pad=%s (%s), vocabulary %d", END_OF_CHUNK_TOKEN,
                ids["endofchunk"], IMAGE_TOKEN, ids["image"], ids["pad"], "added" if pad_added else "kept",
                ids["vocab_size"])
    return ids
