"""Token generation with the decoder graph: prefill, decode steps, streaming steps.

Greedy decoding here reproduces transformers' `generate` for IDEFICS: tokens generated after the prompt attend to
the image mask of the prompt's last position, and a row that has finished keeps being fed the pad token (its output
is ignored) until every row has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from flamingo_edge.graphs import GraphSpec
from flamingo_edge.runtime.kv_cache import SelfAttentionCache
from flamingo_edge.runtime.sampling import Sampler
from flamingo_edge.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationStep:
    """One generated token per row."""

    index: int  # 0 for the first generated token
    tokens: np.ndarray  # int64 [B]; the pad id for rows that had already finished
    text: list[str]  # per row, the text this token adds ("" while a multi-byte character is incomplete)
    finished: list[bool]  # per row: it produced a stop token or stop string, or reached max_new_tokens
    seconds: float  # model time behind this token (the prefill, image encoding included, for index 0)
    # per row, why it ended at this step: "stop_token", "stop_string" or "length"; None if it goes on or had ended
    finish_reason: list[str | None] = ()


@dataclass(frozen=True)
class StopCondition:
    """When a row is done."""

    max_new_tokens: int
    token_ids: frozenset[int]  # e.g. EOS
    strings: tuple[str, ...] = ()


def decoder_feed(spec: GraphSpec, input_ids: np.ndarray, new_mask: np.ndarray, cache: SelfAttentionCache,
                 cross: Mapping[str, np.ndarray], image_attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder's inputs by name: new tokens [B, S], their mask `new_mask` [B, S] (1 = real token), the cache's
    past K/V and its `attention_mask` over past slots + new tokens (`SelfAttentionCache.feed`), the rows' cross K/V
    and the image mask [B, S, M]."""
    feed = {"input_ids": input_ids, "image_attention_mask": image_attention_mask}
    feed.update(cache.feed(new_mask))
    feed.update(cross)
    return {name: feed[name] for name in spec.input_names}


def run_decoder(session, input_ids, new_mask, cache, cross, image_attention_mask) -> np.ndarray:
    """Run S new tokens after the cached ones, write their K/V into the cache, return logits [B, S, V].

    `new_mask` [B, S]: the new tokens' attention mask (the prompt's for a prefill, ones for a decode step). A
    session that keeps the cache on its device (TensorRT) is told which cache it reads (`attach_cache`).
    """
    attach = getattr(session, "attach_cache", None)
    if attach is not None:
        attach(cache)
    outputs = session.run(decoder_feed(session.spec, input_ids, new_mask, cache, cross, image_attention_mask))
    cache.update(outputs, new_mask)
    return outputs["logits"]


def step_speed(steps: list[GenerationStep]) -> tuple[float, float]:
    """Time to first token (s) and decode tokens/s of one generation, from its steps' model time (nan for 1 step).

    The one place these rates are computed: `generate`, `demo` and `bench` all report them from here.
    """
    decode_seconds = sum(step.seconds for step in steps[1:])
    return steps[0].seconds, (len(steps) - 1) / decode_seconds if decode_seconds > 0 else float("nan")


class TextStream:
    """Incremental detokenization of one row: the text each new token adds.

    Text that ends in an incomplete UTF-8 character is held back until the character completes or the row ends
    (`flush`). Releasing it earlier could not be taken back if later bytes complete the character, and the streamed
    pieces would no longer add up to the decoded tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self._decoded().endswith("\ufffd"):
            return ""
        return self.flush()

    def flush(self) -> str:
        """Release everything decoded so far (at the end of a row)."""
        text = self._decoded()
        delta, self.text = text[len(self.text):], text
        return delta

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def advance(stream: TextStream, token: int, index: int, stop: StopCondition) -> tuple[str, str | None]:
    """One row's `index`-th generated token: the text it adds, and why the row ends with it ("stop_token",
    "stop_string", "length"; None: it goes on). A row that ends releases the text held back (`TextStream.flush`)."""
    text = stream.push(token)
    reason = ("stop_token" if token in stop.token_ids
              else "stop_string" if any(s in stream.text[-(len(s) + len(text)):] for s in stop.strings)
              else "length" if index + 1 == stop.max_new_tokens else None)
    if reason is not None:
        text += stream.flush()
    return text, reason


def generate(decoder, tokenizer: Tokenizer, input_ids: np.ndarray, attention_mask: np.ndarray,
             image_attention_mask: np.ndarray, cross: Mapping[str, np.ndarray], cache: SelfAttentionCache,
             sampler: Sampler, stop: StopCondition, *, pad_token_id: int, start: float | None = None,
             on_prefill: Callable[[SelfAttentionCache], None] | None = None) -> Iterator[GenerationStep]:
    """Prefill the prompt, then decode one token at a time, yielding a step per token.

    A decode step's host work does not grow with the context: the cache feeds its whole buffers and writes one slot
    (`SelfAttentionCache`), the history is a preallocated array the sampler sees a view of, and the text of a row is
    decoded from its generated tokens only.

    Args:
        decoder: the decoder Session.
        tokenizer: for the streamed text.
        input_ids, attention_mask: int64 [B, S] prompt (padded); image_attention_mask: int64 [B, S, M].
        cross: cross_key.i / cross_value.i [B, Hx, M*L, Dh] for the rows' images.
        cache: a self-attention cache with room for S + stop.max_new_tokens - 1 tokens (the last token is never
            fed), empty or already holding the K/V of the prompt's first P tokens (a reused prefix): then only the
            other S - P are run. Its capacity is the past every decode step feeds: the same for every step, and for
            every generation when it is the context (a CUDA graph replays them).
        sampler: picks the next token from logits [B, V] and the history [B, T].
        stop: when rows are done.
        pad_token_id: fed to rows that have finished.
        start: perf_counter() when the work for the first token began (default: now).
        on_prefill: called with the cache once the prompt is in it (e.g. to keep it as a reusable prefix).
    """
    start = time.perf_counter() if start is None else start
    batch, prompt = input_ids.shape
    cached = cache.length  # prompt tokens whose K/V are already in the cache (a reused prefix)
    logits = run_decoder(decoder, input_ids[:, cached:], attention_mask[:, cached:], cache, cross,
                         image_attention_mask[:, cached:])
    if on_prefill:
        on_prefill(cache)
    new_image_mask = image_attention_mask[:, -1:, :]  # generated tokens attend as the prompt's last token does
    new_mask = np.ones((batch, 1), np.int64)  # every row's new token is real (finished rows are fed the pad token)
    streams = [TextStream(tokenizer) for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    history = np.empty((batch, prompt + stop.max_new_tokens), np.int64)  # the sampler sees history[:, :T]
    history[:, :prompt] = input_ids
    for index in range(stop.max_new_tokens):
        tokens = np.where(finished, pad_token_id, sampler(logits[:, -1], history[:, : prompt + index]))
        tokens = tokens.astype(np.int64)
        texts, reasons = [""] * batch, [None] * batch
        for row in np.flatnonzero(~finished):
            texts[row], reasons[row] = advance(streams[row], int(tokens[row]), index, stop)
        ending = np.array([reason is not None for reason in reasons])
        finished |= ending
        yield GenerationStep(index, tokens, texts, finished.tolist(), time.perf_counter() - start, reasons)
        if finished.all():
            return
        start = time.perf_counter()
        history[:, prompt + index] = tokens
        logits = run_decoder(decoder, tokens[:, None], new_mask, cache, cross, new_image_mask)
