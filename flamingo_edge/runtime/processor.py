"""IDEFICS prompts → model inputs, equal to transformers' `IdeficsProcessor.__call__` (transformers 5.23).

A prompt is a list of items, each a `str` (text) or a numpy image; a batch is a list of prompts. Every image becomes
`<fake_token_around_image><image><fake_token_around_image>` in the text (`<image><fake_token_around_image>` right
after another image), the text starts with the BOS token, and `image_attention_mask` tells each token which image
it may attend to: the most recent one, none before the first image, none after an EOS token until the next image.

Unlike transformers, a string is always text: URLs are never fetched (an edge runtime does not go to the network;
load files with `load_image` and pass the arrays). Only the `prompts` calling convention is supported, not
`images=..., text=...`.

Nothing here imports torch or transformers: numpy, OpenCV and `tokenizers` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flamingo_edge.errors import CheckpointError, PromptError
from flamingo_edge.runtime.image import ImagePreprocessor, load_image
from flamingo_edge.runtime.tokenizer import Tokenizer

__all__ = ["Processor", "PromptBatch", "Tokenizer", "ImagePreprocessor", "load_image"]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"


@dataclass(frozen=True)
class PromptBatch:
    """A tokenized batch: int64 input_ids / attention_mask [B, S], image_attention_mask [B, S, M], and each row's
    images (uint8 arrays, in prompt order; a row may have fewer than M)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_attention_mask: np.ndarray
    images: list[list[np.ndarray]]


@dataclass
class _Sample:
    """One prompt turned into text, plus its images in order."""

    text: str
    images: list[np.ndarray]


class Processor:
    """Builds `input_ids`, `attention_mask`, `pixel_values` and `image_attention_mask` for IDEFICS prompts.

    Args:
        tokenizer: the checkpoint's tokenizer.
        image_preprocessor: the checkpoint's image preprocessing.

    Raises:
        CheckpointError: the tokenizer has no `<image>` token.
    """

    def __init__(self, tokenizer: Tokenizer, image_preprocessor: ImagePreprocessor):
        self.tokenizer = tokenizer
        self.image_preprocessor = image_preprocessor
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None:
            raise CheckpointError(f"the tokenizer has no {IMAGE_TOKEN} token, so this is not an IDEFICS checkpoint "
                                  "(or its tokenizer files are from another model)")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        """Load from a folder written by `IdeficsProcessor.save_pretrained` (or an older `save_pretrained`).

        Raises:
            CheckpointError: a file is missing, corrupt or asks for something unsupported.
        """
        return cls(Tokenizer.from_pretrained(folder), ImagePreprocessor.from_pretrained(folder))

    def __call__(self, prompts: list, add_eos_token: bool = False,
                 add_end_of_utterance_token: bool | None = None) -> dict[str, np.ndarray]:
        """Turn a batch of prompts into model inputs.

        Args:
            prompts: a list of prompts, each a list of items (`str` text or a uint8 numpy image, [H, W], [H, W, 1],
                [H, W, 3] RGB or [H, W, 4] RGBA); a flat list of items is taken as one prompt, like transformers.
            add_eos_token: append the EOS token to every prompt.
            add_end_of_utterance_token: put `<end_of_utterance>` between two consecutive text items. None does what
                transformers 5.x does, which is never: its test `"<end_of_utterance>" in
                tokenizer.special_tokens_map.get("additional_special_tokens", [])` is always False since 5.0
                (special_tokens_map holds named tokens only).

        Returns:
            input_ids int64 [B, S], attention_mask int64 [B, S], pixel_values float32 [B, M, 3, H, W] (zeros
            where a prompt has fewer than M images; M = max(1, most images in one prompt)) and
            image_attention_mask int64 [B, S, M] (int64 [B, S, 1] of zeros when no prompt has an image).

        Raises:
            PromptError: a malformed batch or item, or prompts that need padding without a pad token.
            ImageError: an image the preprocessor cannot take.
        """
        batch = self.tokenize(prompts, add_eos_token, add_end_of_utterance_token)
        max_images = batch.image_attention_mask.shape[2]
        pixel_values = np.zeros((len(batch.images), max_images, *self.image_preprocessor.image_shape), np.float32)
        for row, images in enumerate(batch.images):
            for slot, image in enumerate(images):
                pixel_values[row, slot] = self.image_preprocessor(image)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": pixel_values,
                "image_attention_mask": batch.image_attention_mask}

    def tokenize(self, prompts: list, add_eos_token: bool = False,
                 add_end_of_utterance_token: bool | None = None) -> PromptBatch:
        """Everything `__call__` computes except the pixel values: ids, masks, and each row's images in order.

        The runtime uses this to preprocess only the images its cross-attention cache has not seen. Arguments and
        errors as for `__call__`.
        """
        samples = [self._build_sample(i, p, add_eos_token, bool(add_end_of_utterance_token))
                   for i, p in enumerate(_as_batch(prompts))]
        input_ids, attention_mask = self.tokenizer.pad([self.tokenizer.encode(s.text) for s in samples])
        max_images = max(1, max(len(s.images) for s in samples))
        if any(s.images for s in samples):
            image_attention_mask = self._image_attention_mask(input_ids, max_images)
        else:  # text only: one dummy image that nothing attends to
            image_attention_mask = np.zeros((*input_ids.shape, 1), dtype=np.int64)
        # Like transformers, a row keeps only as many images as it has <image> tokens (a typed "<image>" counts).
        counts = [min(int(np.sum(row == self.image_token_id)), max_images) for row in input_ids]
        images = [sample.images[:count] for sample, count in zip(samples, counts)]
        return PromptBatch(input_ids, attention_mask, image_attention_mask, images)

    def _build_sample(self, index: int, prompt: Any, add_eos_token: bool, add_end_of_utterance: bool) -> _Sample:
        """The prompt's text, item by item as in transformers (text items stripped of surrounding spaces)."""
        if not isinstance(prompt, (list, tuple)):
            raise PromptError(f"prompt {index} is a {type(prompt).__name__}; a prompt is a list of items "
                              "(str text or numpy images), e.g. [\"User:\", image, \"Describe it.\"]")
        text, images = self.tokenizer.bos_token or "", []
        last_was_image = False
        for position, item in enumerate(prompt):
            last_was_text = position > 0 and not last_was_image
            if isinstance(item, str):
                if add_end_of_utterance and last_was_text:
                    text += END_OF_UTTERANCE_TOKEN
                text += item.strip(" ")
                last_was_image = False
            elif isinstance(item, np.ndarray):
                text += IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN
                images.append(item)
                last_was_image = True
            else:
                raise PromptError(f"prompt {index}, item {position} is a {type(item).__name__}; items must be str "
                                  "(text) or numpy arrays (images: use load_image(path) or np.asarray(pil_image))")
        if add_eos_token:
            text += self.tokenizer.eos_token or ""
        return _Sample(text, images)

    def _image_attention_mask(self, input_ids: np.ndarray, max_images: int) -> np.ndarray:
        """int64 [B, S, M]: one-hot of the latest image per token.

        Same values as transformers' `image_attention_mask_for_packed_input_ids` + `incremental_to_binary_
        attention_mask`: the index of the latest `<image>` token so far, -1 before the first one and on every
        token after an EOS up to the next `<image>` (the EOS itself keeps its image), -1 also for indices >= M;
        -1 rows become all-zero. Padding is not special: right padding after an image attends to that image.
        """
        batch, length = input_ids.shape
        position = np.arange(length)
        is_image = input_ids == self.image_token_id  # [B, S]
        latest = np.cumsum(is_image, axis=1) - 1  # [B, S] index of the latest image, -1 before the first
        last_image_at = np.maximum.accumulate(np.where(is_image, position, -1), axis=1)
        eos_id = self.tokenizer.eos_token_id
        eos_at = np.where(input_ids == eos_id, position, -1) if eos_id is not None else np.full_like(input_ids, -1)
        last_eos_at = np.maximum.accumulate(eos_at, axis=1)
        eos_before = np.concatenate([np.full((batch, 1), -1), last_eos_at[:, :-1]], axis=1)  # strictly before
        latest[(eos_before > last_image_at) | (latest >= max_images)] = -1
        mask = latest[..., None] == np.arange(max_images)  # [B, S, M]; -1 matches nothing
        return mask.astype(np.int64)


def _as_batch(prompts: Any) -> list:
    """A list of prompts; a flat list of items (none of them a list) is one prompt, as in transformers."""
    if isinstance(prompts, (str, np.ndarray)) or not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts must be a list of prompts (lists of str / numpy images), got "
                          f"{type(prompts).__name__}; wrap a single prompt as [[...]]")
    if not prompts:
        raise PromptError("prompts is empty; pass at least one prompt, e.g. [[\"User:\", image, \"Describe it.\"]]")
    if not any(isinstance(p, (list, tuple)) for p in prompts):
        return [prompts]
    return list(prompts)
