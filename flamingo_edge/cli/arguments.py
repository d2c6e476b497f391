"""Argument types shared by the subcommands: argparse refuses a bad value at once, naming the flag, with exit 2."""

from __future__ import annotations

import argparse


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def count(text: str) -> int:
    """An integer >= 1 (scenes, tokens, runs, images)."""
    return _integer(text, 1)


def natural(text: str) -> int:
    """An integer >= 0 (seeds, sizes where 0 means none)."""
    return _integer(text, 0)


def mebibytes(text: str) -> int:
    """A size in MiB, an integer >= 0 (0 means none), as bytes."""
    return natural(text) << 20


def counts(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (`32,128,512`), in the order given, repeats dropped."""
    values = [count(part.strip()) for part in text.split(",")]
    return list(dict.fromkeys(values))


def text(value: str) -> str:
    """Text for the model (a prompt, a stop string): valid UTF-8 (bytes that are not arrive as lone surrogates)."""
    from flamingo_edge.errors import PromptError
    from flamingo_edge.runtime.processor import check_text

    try:
        check_text(value, "the value")
    except PromptError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value
