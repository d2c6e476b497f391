"""The tokenizer of a `save_pretrained` checkpoint, on the `tokenizers` library alone (no transformers).

It loads `tokenizer.json` and applies what transformers' `TokenizersBackend` (5.x) does on top of it: the special
tokens named in `tokenizer_config.json` (or, in older checkpoints, `special_tokens_map.json`) are registered as
special tokens, truncation and padding baked into `tokenizer.json` are switched off (the processor never truncates
and pads itself), and `encode` adds no special tokens, as `IdeficsProcessor` calls the tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from flamingo_edge.errors import CheckpointError, PromptError
from flamingo_edge.artifacts import read_json

logger = logging.getLogger(__name__)

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' class-level default when the config names no padding side (LlamaTokenizer pads left).
_LEFT_PADDING_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _content(token: Any) -> str | None:
    """A special token as written in a config: a string, an AddedToken dict ({"content": ...}) or null."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise CheckpointError(f"cannot read special token {token!r}: expected a string or a dict with \"content\"")


def _added_token(token: Any) -> AddedToken:
    """The AddedToken transformers registers for a special token (dict flags kept, `special` forced on)."""
    if isinstance(token, dict):
        flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        return AddedToken(token["content"], special=True, **flags)
    return AddedToken(token, special=True, normalized=False)


def _load_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json merged over it the way transformers 5 merges it."""
    path = folder / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    legacy = folder / "special_tokens_map.json"
    if legacy.is_file() and "added_tokens_decoder" not in config:  # transformers reads it only in that case
        for key, value in read_json(legacy).items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                extra = list(config.get("extra_special_tokens") or [])
                config["extra_special_tokens"] = extra + [t for t in value if t not in extra]
            else:
                config[key] = value
    return config


class Tokenizer:
    """Text ↔ token ids for one checkpoint.

    Args:
        backend: the `tokenizers.Tokenizer` (special tokens already registered).
        special_tokens: named special tokens, e.g. {"bos_token": "<s>", "pad_token": "<unk>"}.
        extra_special_tokens: the other special tokens (IDEFICS: `<image>`, `<fake_token_around_image>`, ...).
        padding_side: "left" or "right".
    """

    def __init__(self, backend: Backend, *, special_tokens: dict[str, str],
                 extra_special_tokens: Sequence[str] = (), padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise CheckpointError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.extra_special_tokens = list(extra_special_tokens)
        self.padding_side = padding_side

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json`) from a checkpoint folder.

        Raises:
            CheckpointError: a file is missing or cannot be parsed.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; this runtime needs the fast-tokenizer file: save it with "
                                  "AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for parse errors
            raise CheckpointError(f"cannot load {path}: {error}; the file is corrupt or was written by an "
                                  "incompatible tokenizers version, re-save it with save_pretrained") from error
        config = _load_config(folder)
        named = {key: config[key] for key in NAMED_TOKENS if config.get(key) is not None}
        named.update({key: value for key, value in config.items()  # model-specific tokens, e.g. "image_token"
                      if key.endswith("_token") and key not in NAMED_TOKENS and isinstance(value, (str, dict))
                      and _content(value) is not None and key != "extra_special_tokens"})
        extra = config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            named.update(extra)
            extra = []
        backend.add_special_tokens([_added_token(t) for t in [*named.values(), *extra]])
        padding_side = config.get("padding_side") or (backend.padding or {}).get("direction")
        if padding_side is None:
            padding_side = "left" if config.get("tokenizer_class") in _LEFT_PADDING_CLASSES else "right"
        logger.debug("tokenizer from %s (%d tokens, padding %s)", path, backend.get_vocab_size(), padding_side)
        return cls(backend, special_tokens={k: _content(v) for k, v in named.items()},
                   extra_special_tokens=[_content(t) for t in extra], padding_side=padding_side)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a text.

        Args:
            text: special tokens written in it (e.g. "<s>", "<image>") become their single ids.
            add_special_tokens: let the post-processor of tokenizer.json add what it adds (a LLaMA tokenizer
                prepends `<s>`, a GPT-NeoX one nothing), as transformers' `tokenizer(text)` does. Off by default, as
                `IdeficsProcessor` calls its tokenizer.

        Returns:
            The ids.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of token ids, without clean-up of tokenization spaces (transformers skips it for BPE too).

        Args:
            ids: token ids, e.g. a row of `input_ids`.
            skip_special_tokens: leave out special tokens (BOS, EOS, padding, the image tokens).

        Returns:
            The text.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text (IDEFICS prompts start with it), or None."""
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The EOS token's text, or None."""
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        """The BOS token's id, or None."""
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The EOS token's id, or None."""
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """The id `pad` fills with, or None."""
        return self._named_id("pad_token")

    def pad(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to the longest sequence on `padding_side` with the pad token.

        Args:
            sequences: token ids, one list per prompt.

        Returns:
            (input_ids int64 [B, S], attention_mask int64 [B, S]), the mask 0 on padding.

        Raises:
            PromptError: the sequences differ in length and the tokenizer has no pad token.
        """
        length = max(len(ids) for ids in sequences)
        pad_id = self.pad_token_id
        if pad_id is None and any(len(ids) != length for ids in sequences):
            raise PromptError("these prompts tokenize to different lengths and the tokenizer has no pad token; "
                              "run them one at a time or set \"pad_token\" in tokenizer_config.json")
        input_ids = np.full((len(sequences), length), pad_id or 0, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, ids in enumerate(sequences):
            span = slice(length - len(ids), length) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask
