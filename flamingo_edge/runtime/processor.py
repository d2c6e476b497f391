"""Prompts → model inputs: token ids, masks and pixel values, as each model family's own processor builds them.

A prompt is a list of items, each a `str` (text) or a numpy image; a batch is a list of prompts. What differs
between families is data, read from the checkpoint's `processor_config.json` ("prompt_format", see `PromptFormat`;
"image_processor", see `ImageSettings`):
- IDEFICS (the default, equal to transformers' `IdeficsProcessor.__call__`, transformers 5.23): every image becomes
  `<fake_token_around_image><image><fake_token_around_image>` (`<image><fake_token_around_image>` right after
  another image), text items are stripped of surrounding spaces, the text starts with the BOS token, and a token
  attends the most recent image, none before the first image and none after an EOS token until the next image.
- OpenFlamingo (equal to open_flamingo 2.0.1's use of its tokenizer and `MaskedCrossAttention`): every image is
  `<image>`, text is concatenated as given, the tokenizer's post-processor adds BOS (LLaMA) or nothing (GPT-NeoX,
  MPT), and a token attends the most recent `<image>` at or before it, with no reset.
- Llama 3.2 Vision (mllama; equal to transformers' `MllamaProcessor.__call__` with `padding=True`, transformers 5.23;
  chosen for a folder whose processor_config.json / preprocessor_config.json names `MllamaProcessor` or its image
  processor, when it has no "prompt_format"): every image is `<|image|>`, text is used as given, `<|begin_of_text|>`
  is written after any leading `<|image|>`s unless the text holds it already (`build_string_from_input`) and the
  tokenizer's post-processor adds its own in front, and a token attends every image of the latest run of adjacent
  `<|image|>`s at or before it, tile by tile: `image_attention_mask` is [B, S, M * T], one column per tile
  (transformers' `cross_attention_mask` [B, S, M, T] reshaped), T = the preprocessor's `slots_per_image`.

A checkpoint's chat template (Jinja, as transformers' `processor.apply_chat_template(..., tokenize=False)` renders
it; needs jinja2, which the base install leaves out) turns chat messages into prompt items:
`Processor.apply_chat_template` (read from the folder by `read_chat_template`, rendered by `render_chat_template`).

A `<image>` typed in a text item is an image marker like one written for an image item (`<|image|>` for mllama,
where the image count must then still equal the marker count, as transformers requires). Unlike transformers, a
string is always text: URLs are never fetched (an edge runtime does not go to the network; load files with
`load_image` and pass the arrays). Only the `prompts` calling convention is supported, not `images=..., text=...`.

Nothing here imports torch or transformers: numpy, OpenCV and `tokenizers` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from flamingo_edge.artifacts import read_json
from flamingo_edge.errors import CheckpointError, PromptError
from flamingo_edge.runtime.chat_template import (CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, LEGACY_CHAT_TEMPLATE_FILE,
                                                 TOKENIZER_CONFIG, message_images, read_chat_template,
                                                 render_chat_template)
from flamingo_edge.runtime.image import (PROCESSOR_CONFIG, ImagePreprocessing, ImagePreprocessor, load_image,
                                         uses_mllama_processor)
from flamingo_edge.runtime.mllama_image import MllamaImagePreprocessor, cross_attention_mask
from flamingo_edge.runtime.tokenizer import Tokenizer

__all__ = ["Processor", "ChatPrompt", "PromptBatch", "PromptFormat", "BosSource", "Tokenizer", "ImagePreprocessor",
           "MllamaImagePreprocessor", "MLLAMA_PROMPT_FORMAT", "image_preprocessor_from_pretrained", "load_image",
           "IMAGE_MARKER", "prompt_items", "read_prompt_file", "read_chat_template", "render_chat_template"]

logger = logging.getLogger(__name__)


class BosSource(str, Enum):
    """Who puts the BOS token in front of a prompt."""

    # The processor writes `tokenizer.bos_token` at the start of the text, encoded without special tokens (IDEFICS).
    PROCESSOR = "processor"
    # The post-processor of tokenizer.json adds its special tokens, as `tokenizer(text)` does in transformers:
    # LLaMA's adds `<s>`, GPT-NeoX's (also MPT's) adds nothing (OpenFlamingo).
    TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt becomes text and an image mask: `processor_config.json` → "prompt_format".

    The defaults are IDEFICS'; a checkpoint without the entry gets them, unless transformers' `MllamaProcessor` wrote
    it (then `MLLAMA_PROMPT_FORMAT`). Unknown keys are refused.
    """

    image_token: str = "<image>"  # marks an image in the text; cross-attention follows the latest one
    # Written around each run of adjacent images (IDEFICS); None: an image is just `image_token` (OpenFlamingo).
    image_wrap_token: str | None = "<fake_token_around_image>"
    bos_added_by: BosSource = BosSource.PROCESSOR
    strip_text: bool = True  # strip spaces around each text item (IDEFICS); False: text is used as given
    # After an EOS token, tokens attend no image until the next one (IDEFICS); False: never reset (OpenFlamingo,
    # where neither `<|endofchunk|>` nor EOS resets the mask).
    image_mask_resets_at_eos: bool = True
    stop_tokens: tuple[str, ...] | None = None  # tokens that end generation by default; None: the tokenizer's EOS
    # Put between two consecutive text items when asked (`add_end_of_utterance_token=True`, IDEFICS); None: no such
    # token in this format.
    end_of_utterance_token: str | None = "<end_of_utterance>"
    # Write the tokenizer's BOS token after the image tokens that start the text, unless the text holds it already
    # (mllama's `build_string_from_input`; with bos_added_by="tokenizer" a prompt then starts with two BOS, as in
    # transformers). False: nothing is written besides what bos_added_by says.
    bos_after_leading_images: bool = False
    # A token attends every image of the latest run of adjacent image tokens at or before it (mllama's
    # `get_cross_attention_token_mask`), and every image token must have its image (mllama's processor refuses other
    # counts). False: only the latest image, and a row keeps as many images as it has image tokens (IDEFICS,
    # OpenFlamingo). Needs image_mask_resets_at_eos false.
    image_runs_attended_together: bool = False
    # Stop tokens the vocabulary lacks are left out rather than refused, and the tokenizer's EOS always stops too
    # (Llama 3: generation_config stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>, which not every tokenizer
    # has). False: every stop token must be in the vocabulary.
    stop_tokens_if_in_vocabulary: bool = False

    def __post_init__(self):
        object.__setattr__(self, "bos_added_by", _bos_source(self.bos_added_by))
        if self.stop_tokens is not None:
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
        if self.image_runs_attended_together and self.image_mask_resets_at_eos:
            raise CheckpointError("prompt_format: image_runs_attended_together (mllama's mask) and "
                                  "image_mask_resets_at_eos (IDEFICS') cannot both be true; set "
                                  "\"image_mask_resets_at_eos\": false")

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "prompt_format") -> PromptFormat:
        """Read a "prompt_format" entry.

        Raises:
            CheckpointError: an unknown key, a value of the wrong type, or an unknown `bos_added_by`.
        """
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: \"prompt_format\" must be a JSON object, got {type(config).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown prompt_format keys {unknown}; known keys are {sorted(known)} "
                                  "(a newer flamingo-edge may have written this file: convert the checkpoint again)")
        for name, value in config.items():
            _check_field_type(name, value, source)
        try:
            return cls(**config)
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from error

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PromptFormat:
        """The "prompt_format" entry of `folder/processor_config.json`; without one, `MLLAMA_PROMPT_FORMAT` for a
        folder written by transformers' `MllamaProcessor` (`image.uses_mllama_processor`), else IDEFICS' format.

        Raises:
            CheckpointError: the file is not valid JSON, or the entry is malformed.
        """
        path = Path(folder) / PROCESSOR_CONFIG
        config = read_json(path) if path.is_file() else {}
        if "prompt_format" in config:
            return cls.from_dict(config["prompt_format"], source=str(path))
        return MLLAMA_PROMPT_FORMAT if uses_mllama_processor(folder) else cls()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this format, as `from_dict` reads it."""
        out = {field.name: getattr(self, field.name) for field in fields(self)}
        out["bos_added_by"] = self.bos_added_by.value
        out["stop_tokens"] = None if self.stop_tokens is None else list(self.stop_tokens)
        return out


_NONE = type(None)
_FIELD_TYPES = {  # name: (JSON types allowed, how to say it)
    "image_token": ((str,), "a string"),
    "image_wrap_token": ((str, _NONE), "a string or null"),
    "bos_added_by": ((str,), "a string"),
    "strip_text": ((bool,), "true or false"),
    "image_mask_resets_at_eos": ((bool,), "true or false"),
    "stop_tokens": ((list, _NONE), "a list of strings or null"),
    "end_of_utterance_token": ((str, _NONE), "a string or null"),
    "bos_after_leading_images": ((bool,), "true or false"),
    "image_runs_attended_together": ((bool,), "true or false"),
    "stop_tokens_if_in_vocabulary": ((bool,), "true or false"),
}


def _check_field_type(name: str, value: Any, source: str) -> None:
    allowed, expected = _FIELD_TYPES[name]
    if not isinstance(value, allowed) or (isinstance(value, list) and not all(isinstance(t, str) for t in value)):
        raise CheckpointError(f"{source}: prompt_format.{name} is {value!r}; expected {expected}")


def _bos_source(value: Any) -> BosSource:
    try:
        return BosSource(value)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in BosSource)
        raise CheckpointError(f"prompt_format.bos_added_by {value!r} is not one of {choices}") from None


# Llama 3.2 Vision, as transformers' MllamaProcessor builds its inputs (module docstring). The stop tokens are
# generation_config.json's eos_token_id of the released models (128001, 128008, 128009).
MLLAMA_PROMPT_FORMAT = PromptFormat(
    image_token="<|image|>", image_wrap_token=None, bos_added_by=BosSource.TOKENIZER, strip_text=False,
    image_mask_resets_at_eos=False, stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    end_of_utterance_token=None, bos_after_leading_images=True, image_runs_attended_together=True,
    stop_tokens_if_in_vocabulary=True)


def image_preprocessor_from_pretrained(folder: str | Path, *, legacy_pass_order: bool = False
                                       ) -> ImagePreprocessor | MllamaImagePreprocessor:
    """The image preprocessor a checkpoint or export folder asks for: `MllamaImagePreprocessor` when
    `image.uses_mllama_processor(folder)`, else the CLIP-style `ImagePreprocessor`.

    Args:
        folder: a `save_pretrained` folder, a converted checkpoint or an export.
        legacy_pass_order: resize like Pillow <= 12 (see `resize.resize_bicubic`).

    Raises:
        CheckpointError: no image settings, or settings this runtime does not implement.
    """
    kind = MllamaImagePreprocessor if uses_mllama_processor(folder) else ImagePreprocessor
    return kind.from_pretrained(folder, legacy_pass_order=legacy_pass_order)


@dataclass(frozen=True)
class PromptBatch:
    """A tokenized batch: int64 input_ids / attention_mask [B, S], image_attention_mask [B, S, M * slots] (slots =
    the preprocessor's `slots_per_image`: 1, or mllama's T tiles, image-major), and each row's images (uint8 arrays,
    in prompt order; a row may have fewer than M)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    image_attention_mask: np.ndarray
    images: list[list[np.ndarray]]


class ChatPrompt(list):
    """A prompt's items as `Processor.apply_chat_template` renders them: a list like any prompt, which also says
    whether the template wrote the special tokens (its text starts with BOS). The processor then adds none, as
    transformers' `apply_chat_template(..., tokenize=True)` and the model cards' `add_special_tokens=False` do."""

    def __init__(self, items, *, special_tokens_written: bool):
        super().__init__(items)
        self.special_tokens_written = special_tokens_written


@dataclass
class _Sample:
    """One prompt turned into text, plus its images in order, and whether its text holds the special tokens."""

    text: str
    images: list[np.ndarray]
    special_tokens_written: bool = False


class Processor:
    """Builds `input_ids`, `attention_mask`, `pixel_values` and `image_attention_mask` for a checkpoint's prompts.

    Args:
        tokenizer: the checkpoint's tokenizer.
        image_preprocessor: the checkpoint's image preprocessing (`ImagePreprocessor`, `MllamaImagePreprocessor`).
        prompt_format: the checkpoint's prompt format (default: IDEFICS').
        chat_template: the checkpoint's chat template(s), for `apply_chat_template`; None: it has none.

    Raises:
        CheckpointError: a token the prompt format names (image, wrap, stop tokens) is not in the vocabulary.
    """

    def __init__(self, tokenizer: Tokenizer, image_preprocessor: ImagePreprocessing,
                 prompt_format: PromptFormat | None = None, *, chat_template: str | dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.image_preprocessor = image_preprocessor
        self.prompt_format = prompt_format or PromptFormat()
        self.chat_template = chat_template  # `read_chat_template`'s result: a template, {name: template} or None
        self.image_token_id = self._token_id(self.prompt_format.image_token, "image_token")
        if self.prompt_format.image_wrap_token is not None:
            self._token_id(self.prompt_format.image_wrap_token, "image_wrap_token")
        self.stop_token_ids = self._stop_token_ids()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Processor:
        """Load from a checkpoint or export folder (`save_pretrained` files, or what a converter wrote).

        Raises:
            CheckpointError: a file is missing, corrupt or asks for something unsupported.
        """
        return cls(Tokenizer.from_pretrained(folder), image_preprocessor_from_pretrained(folder),
                   PromptFormat.from_pretrained(folder), chat_template=read_chat_template(folder))

    def _token_id(self, token: str, field: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the prompt format's {field} {token!r} is not in the tokenizer's vocabulary: the "
                                  "tokenizer files are from another model, or processor_config.json's "
                                  "\"prompt_format\" is wrong (no entry means IDEFICS' format)")
        return token_id

    def _stop_token_ids(self) -> list[int]:
        """Ids of the prompt format's stop tokens, or [EOS] (or [] without an EOS) when it names none; with
        `stop_tokens_if_in_vocabulary`, those in the vocabulary plus EOS."""
        fmt, eos = self.prompt_format, self.tokenizer.eos_token_id
        if fmt.stop_tokens is None:
            return [] if eos is None else [eos]
        if not fmt.stop_tokens_if_in_vocabulary:
            return [self._token_id(token, "stop token") for token in fmt.stop_tokens]
        ids = [i for i in map(self.tokenizer.token_to_id, fmt.stop_tokens) if i is not None]
        return ids + [eos] if eos is not None and eos not in ids else ids

    def __call__(self, prompts: list, add_eos_token: bool = False,
                 add_end_of_utterance_token: bool | None = None) -> dict[str, np.ndarray]:
        """Turn a batch of prompts into model inputs.

        Args:
            prompts: a list of prompts, each a list of items (`str` text or a uint8 numpy image, [H, W], [H, W, 1],
                [H, W, 3] RGB or [H, W, 4] RGBA); a flat list of items is taken as one prompt, like transformers.
            add_eos_token: append the EOS token to every prompt.
            add_end_of_utterance_token: put the format's end-of-utterance token between two consecutive text items.
                None does what transformers 5.x does for IDEFICS, which is never: its test `"<end_of_utterance>" in
                tokenizer.special_tokens_map.get("additional_special_tokens", [])` is always False since 5.0
                (special_tokens_map holds named tokens only).

        Returns:
            input_ids int64 [B, S], attention_mask int64 [B, S], the `vision` feed of every image slot stacked
            [B, M, ...] and image_attention_mask int64 [B, S, M * slots_per_image]; M = max(1, most images in one
            prompt), and a slot a prompt does not use holds the preprocessor's `padding_feed` (zeros if None).
            CLIP-style: pixel_values float32 [B, M, 3, H, W], mask [B, S, M] (int64 [B, S, 1] of zeros when no
            prompt has an image). mllama: pixel_values float32 [B, M, T, 3, S, S], aspect_ratio_ids int64 [B, M],
            aspect_ratio_mask int64 [B, M, T], mask [B, S, M * T] (a text-only batch gets one padding slot, where
            transformers returns no image inputs).

        Raises:
            PromptError: a malformed batch or item, prompts that need padding without a pad token, an
                end-of-utterance token asked of a format that has none, or (mllama) an image count that differs
                from the prompt's image tokens.
            ImageError: an image the preprocessor cannot take.
        """
        batch = self.tokenize(prompts, add_eos_token, add_end_of_utterance_token)
        preprocessor = self.image_preprocessor
        max_images = batch.image_attention_mask.shape[2] // preprocessor.slots_per_image
        padding = preprocessor.padding_feed() or {
            "pixel_values": np.zeros((1, *preprocessor.image_shape), np.float32)}
        # every slot starts as padding: [1, ...] -> [B, M, ...]
        images = {name: np.repeat(np.repeat(value[None], len(batch.images), axis=0), max_images, axis=1)
                  for name, value in padding.items()}
        for row, row_images in enumerate(batch.images):
            for slot, image in enumerate(row_images):
                for name, value in preprocessor.vision_feed(image).items():
                    images[name][row, slot] = value[0]
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **images,
                "image_attention_mask": batch.image_attention_mask}

    def tokenize(self, prompts: list, add_eos_token: bool = False,
                 add_end_of_utterance_token: bool | None = None) -> PromptBatch:
        """Everything `__call__` computes except the pixel values: ids, masks, and each row's images in order.

        The runtime uses this to preprocess only the images its cross-attention cache has not seen. Arguments and
        errors as for `__call__`.
        """
        if add_end_of_utterance_token and self.prompt_format.end_of_utterance_token is None:
            raise PromptError("add_end_of_utterance_token=True, but this checkpoint's prompt format has no "
                              "end-of-utterance token; write the separator into the text items instead")
        samples = [self._build_sample(i, p, add_eos_token, bool(add_end_of_utterance_token))
                   for i, p in enumerate(_as_batch(prompts))]
        by_tokenizer = self.prompt_format.bos_added_by is BosSource.TOKENIZER
        input_ids, attention_mask = self.tokenizer.pad(
            [self.tokenizer.encode(s.text, add_special_tokens=by_tokenizer and not s.special_tokens_written)
             for s in samples])
        max_images = max(1, max(len(s.images) for s in samples))
        if self.prompt_format.image_runs_attended_together:
            self._check_image_counts(input_ids, samples)
            images = [sample.images for sample in samples]
        else:  # like transformers' IDEFICS, a row keeps only as many images as it has image tokens (typed ones count)
            counts = [min(int(np.sum(row == self.image_token_id)), max_images) for row in input_ids]
            images = [sample.images[:count] for sample, count in zip(samples, counts)]
        slots = self.image_preprocessor.slots_per_image
        if any(s.images for s in samples):
            image_attention_mask = self._image_attention_mask(input_ids, images, max_images)
        else:  # text only: one dummy image that nothing attends to
            image_attention_mask = np.zeros((*input_ids.shape, slots), dtype=np.int64)
        return PromptBatch(input_ids, attention_mask, image_attention_mask, images)

    def apply_chat_template(self, messages: list, *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **variables: Any) -> ChatPrompt:
        """One conversation through the checkpoint's chat template, as the prompt items `__call__` and
        `Pipeline.generate` take.

        The text is what transformers' `processor.apply_chat_template(messages, add_generation_prompt=...,
        tokenize=False)` renders (`render_chat_template`). It is split at the prompt format's image token, and the
        messages' images go, in order, where the template wrote that token, so that `processor([items])` gives what
        transformers' `processor.apply_chat_template(..., tokenize=True)` gives: when the text starts with the BOS
        token (Llama 3's templates write `<|begin_of_text|>`), no special tokens are added to it (a `ChatPrompt`
        says so; `MllamaProcessor(text=...)` on the same text would add a second BOS).

        Args:
            messages: one conversation, e.g. [{"role": "user", "content": [{"type": "image", "image": array},
                {"type": "text", "text": "Describe it."}]}]; a content may also be a string. An image is a uint8
                numpy array (`load_image(path)`, `np.asarray(pil_image)`); URLs and paths are not fetched.
            add_generation_prompt: end with the assistant's header, so the model writes the reply (transformers'
                default is False).
            chat_template: the name of one of the checkpoint's templates, or a template's text; None: the
                checkpoint's (the one named "default" when it has several).
            variables: more template variables, e.g. `date_string="26 Jul 2024"` (Llama 3's templates otherwise
                write today's date); the tokenizer's named special tokens (`bos_token`, ...) are there already.

        Raises:
            CheckpointError: the checkpoint has no chat template (write the prompt's items yourself), has several
                and none named "default", or its template is not valid Jinja.
            FeatureUnavailableError: jinja2 >= 3.1.6 is not installed.
            PromptError: malformed messages, an image without its array, a template that refuses the messages (its
                `raise_exception`) or fails on them, or a text whose image tokens differ in number from the images.
        """
        text = render_chat_template(self._chat_template(chat_template), messages,
                                    add_generation_prompt=add_generation_prompt,
                                    variables={**self.tokenizer.special_tokens, **variables})
        images = message_images(messages)
        token = self.prompt_format.image_token
        pieces = text.split(token)
        if len(pieces) - 1 != len(images):
            raise PromptError(f"the chat template wrote {len(pieces) - 1} {token} for {len(images)} images: every "
                              f"{{\"type\": \"image\"}} block needs its array, and text must not contain {token}")
        bos = self.tokenizer.bos_token
        return ChatPrompt(_interleave(pieces, images), special_tokens_written=bool(bos) and text.startswith(bos))

    def _chat_template(self, chat_template: str | None) -> str:
        """The template to render, chosen as transformers' processor chooses it."""
        templates = self.chat_template
        if isinstance(templates, dict) and chat_template in templates:
            return templates[chat_template]
        if chat_template is not None:  # a template's text
            return chat_template
        if isinstance(templates, dict) and "default" in templates:
            return templates["default"]
        if isinstance(templates, dict):
            raise CheckpointError(f"this checkpoint has several chat templates, none named \"default\" "
                                  f"({', '.join(sorted(templates))}); pass chat_template=NAME")
        if templates is None:
            raise CheckpointError(
                f"this checkpoint has no chat template (none of {CHAT_TEMPLATE_FILE}, {LEGACY_CHAT_TEMPLATE_FILE}, "
                f"{CHAT_TEMPLATE_DIR}/ or a \"chat_template\" entry in {PROCESSOR_CONFIG} or {TOKENIZER_CONFIG}); "
                "write the prompt's items yourself, with the turn markers the model was trained on (e.g. [\"User:\", "
                "image, \"Describe it.\"]), or pass the template's text as chat_template=...")
        return templates

    def _check_image_counts(self, input_ids: np.ndarray, samples: list[_Sample]) -> None:
        """Every image token has its image and every image its token, as transformers' MllamaProcessor requires.

        Raises:
            PromptError: naming the first prompt whose counts differ.
        """
        token = self.prompt_format.image_token
        for index, (row, sample) in enumerate(zip(input_ids, samples)):
            markers = int(np.sum(row == self.image_token_id))
            if markers != len(sample.images):
                raise PromptError(f"prompt {index} has {markers} {token} tokens but {len(sample.images)} images; "
                                  f"each image item writes one {token}, so a {token} typed in a text item needs "
                                  "an image of its own: remove it from the text or pass the image as an item")

    def _image_text(self, after_image: bool) -> str:
        """The text of one image item: IDEFICS wraps each run of images, `<fake><image><fake><image><fake>`."""
        image, wrap = self.prompt_format.image_token, self.prompt_format.image_wrap_token
        if wrap is None:
            return image
        return image + wrap if after_image else wrap + image + wrap

    def _build_sample(self, index: int, prompt: Any, add_eos_token: bool, add_end_of_utterance: bool) -> _Sample:
        """The prompt's text, item by item as the family's processor writes it."""
        if not isinstance(prompt, (list, tuple)):
            raise PromptError(f"prompt {index} is a {type(prompt).__name__}; a prompt is a list of items "
                              "(str text or numpy images), e.g. [\"User:\", image, \"Describe it.\"]")
        fmt = self.prompt_format
        written = getattr(prompt, "special_tokens_written", False)  # a ChatPrompt whose template wrote BOS
        text = (self.tokenizer.bos_token or "") if fmt.bos_added_by is BosSource.PROCESSOR and not written else ""
        images, last_was_image = [], False
        for position, item in enumerate(prompt):
            last_was_text = position > 0 and not last_was_image
            if isinstance(item, str):
                check_text(item, f"prompt {index}, item {position}")
                if add_end_of_utterance and last_was_text:
                    text += fmt.end_of_utterance_token
                text += item.strip(" ") if fmt.strip_text else item
                last_was_image = False
            elif isinstance(item, np.ndarray):
                text += self._image_text(last_was_image)
                images.append(item)
                last_was_image = True
            else:
                raise PromptError(f"prompt {index}, item {position} is a {type(item).__name__}; items must be str "
                                  "(text) or numpy arrays (images: use load_image(path) or np.asarray(pil_image))")
        if fmt.bos_after_leading_images and self.tokenizer.bos_token:
            text = _bos_after_leading_images(text, self.tokenizer.bos_token, fmt.image_token)
        if add_eos_token:
            text += self.tokenizer.eos_token or ""
        return _Sample(text, images, written)

    def _image_attention_mask(self, input_ids: np.ndarray, images: list[list[np.ndarray]],
                              max_images: int) -> np.ndarray:
        """int64 [B, S, M * slots]: which slots of which image each token attends, by the prompt format's rule;
        an image fills `image_preprocessor.tiles_of(image)` of its slots (one for CLIP-style images) and the others
        stay 0. An image token without its image (IDEFICS allows it) keeps every slot, as transformers does.

        With `image_runs_attended_together`, this is `mllama_image.cross_attention_mask` (transformers'
        MllamaProcessor) reshaped [B, S, M, T] -> [B, S, M * T]; otherwise `_latest_image_mask` per tile.
        """
        batch, length = input_ids.shape
        slots, tiles_of = self.image_preprocessor.slots_per_image, self.image_preprocessor.tiles_of
        tiles = [[tiles_of(image) for image in row] for row in images]
        if self.prompt_format.image_runs_attended_together:
            mask = cross_attention_mask(input_ids, tiles, self.image_token_id, slots)  # [B, S, M', T], M' <= M
            mask = np.pad(mask, ((0, 0), (0, 0), (0, max_images - mask.shape[2]), (0, 0)))  # [B, S, M, T]
        else:
            filled = np.full((batch, max_images), slots)  # an image token without its image: every slot (IDEFICS)
            for row, counts in enumerate(tiles):
                filled[row, : len(counts)] = counts
            tile_is_real = np.arange(slots) < filled[:, None, :, None]  # [B, 1, M, T]
            mask = self._latest_image_mask(input_ids, max_images)[..., None] * tile_is_real  # [B, S, M, T]
        return mask.reshape(batch, length, max_images * slots).astype(np.int64)

    def _latest_image_mask(self, input_ids: np.ndarray, max_images: int) -> np.ndarray:
        """int64 [B, S, M]: one-hot of the latest image token at or before each token (an image token attends its
        own image).

        -1 (all zero) before the first image and for indices >= M. With `image_mask_resets_at_eos` (IDEFICS,
        transformers' `image_attention_mask_for_packed_input_ids` + `incremental_to_binary_attention_mask`) also on
        every token after an EOS up to the next image (the EOS itself keeps its image); without it (OpenFlamingo)
        this is open_flamingo's `cumsum(media_locations) == image index + 1`. Padding is not special: right padding
        after an image attends to that image, left padding attends nothing.
        """
        batch, length = input_ids.shape
        is_image = input_ids == self.image_token_id  # [B, S]
        latest = np.cumsum(is_image, axis=1) - 1  # [B, S] index of the latest image, -1 before the first
        eos_id = self.tokenizer.eos_token_id
        if self.prompt_format.image_mask_resets_at_eos and eos_id is not None:
            position = np.arange(length)
            last_image_at = np.maximum.accumulate(np.where(is_image, position, -1), axis=1)
            last_eos_at = np.maximum.accumulate(np.where(input_ids == eos_id, position, -1), axis=1)
            eos_before = np.concatenate([np.full((batch, 1), -1), last_eos_at[:, :-1]], axis=1)  # strictly before
            latest[eos_before > last_image_at] = -1
        latest[latest >= max_images] = -1
        mask = latest[..., None] == np.arange(max_images)  # [B, S, M]; -1 matches nothing
        return mask.astype(np.int64)


IMAGE_MARKER = "<image>"  # where an image goes in a prompt written as text (CLI, prompt files), for every family


def prompt_items(prompt: str, images: list) -> list:
    """'A<image>B' with one image -> ["A", image, "B"]: the processor's items; empty text pieces are dropped.

    Raises:
        PromptError: the number of markers differs from the number of images.
    """
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise PromptError(f"the prompt has {len(pieces) - 1} '{IMAGE_MARKER}' markers but {len(images)} --image "
                          f"were given; put one '{IMAGE_MARKER}' where each image goes")
    return _interleave(pieces, images)


def _interleave(pieces: list[str], images: list) -> list:
    """[t0, t1, t2] and [i0, i1] -> [t0, i0, t1, i1, t2], without the empty texts."""
    items = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        items += [image, piece]
    return [item for item in items if not (isinstance(item, str) and item == "")]


def read_prompt_file(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line, `<image>` where each image goes; blank lines are skipped.

    Raises:
        PromptError: the file cannot be read as UTF-8 text, or holds no prompt.
    """
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise PromptError(f"cannot read the prompts file {path}: {error}; pass a UTF-8 text file") from None
    if not lines:
        raise PromptError(f"{path} has no prompt; write one per line, with {IMAGE_MARKER} where each image goes")
    return lines


def check_text(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot take: lone surrogates, which is what Python makes of bytes that are not
    UTF-8 on a command line or in a file read with errors="surrogateescape".

    Raises:
        PromptError: naming the first bad character (or byte) and its position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        got = (f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
               else f"a lone surrogate U+{code:04X}")
        raise PromptError(f"{what} is not valid text: character {error.start} is {got}; pass UTF-8 text (set the "
                          "terminal or the file to UTF-8)") from None


def _bos_after_leading_images(text: str, bos_token: str, image_token: str) -> str:
    """`bos_token` after the image tokens that start `text`, unless `text` holds it anywhere: transformers'
    `build_string_from_input` (models/mllama/processing_mllama.py), which MllamaProcessor applies to every prompt."""
    if bos_token in text:
        return text
    rest = text
    while rest.startswith(image_token):
        rest = rest[len(image_token):]
    return text[: len(text) - len(rest)] + bos_token + rest


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
