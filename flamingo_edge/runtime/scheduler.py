"""In-flight batching: many requests share one Pipeline's decoder, joining and leaving at token boundaries.

    submit() (caller's thread) ─ tokenize, check limits, image side (vision ─▶ resampler ─▶ xattn_kv, cached) ─▶ queue
    scheduler thread, each iteration:
        1. drop cancelled requests
        2. prefill one newcomer alone (its prefix from the prefix cache), in chunks that each take about one decode
           step while others are decoding, then sample its first token
        3. when rows join or enough rows have left: gather the batch's KV cache (rows right-aligned) and cross K/V
        4. one decode step for every row of the batch; each row samples, detokenizes and stops by its own rules

A request's tokens are those it would get alone (`Pipeline.generate` with one prompt), whatever else runs with it:
its own sampler (seed, temperature...), its own stop rule, and a KV cache row whose tokens keep their positions
(`SelfAttentionCache.gather`). The running batch waits for at most one prefill chunk between two decode steps.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flamingo_edge.errors import UsageError
from flamingo_edge.runtime.generation import StopCondition, TextStream, advance, run_decoder
from flamingo_edge.runtime.kv_cache import SelfAttentionCache
from flamingo_edge.runtime.pipeline import Completion, Pipeline, check_generate_settings
from flamingo_edge.runtime.sampling import make_sampler

logger = logging.getLogger(__name__)

CANCELLED = "cancelled"  # the finish reason of a request cancelled before it ended
AUTO = "auto"
MIN_AUTO_CHUNK = 16  # prompt tokens: a smaller chunk costs more in repeated weight reads than the wait it saves
FIRST_AUTO_CHUNK = 64  # before any prefill has been timed


@dataclass(frozen=True)
class RequestStep:
    """One generated token of one request."""

    index: int  # 0 for the first generated token
    token: int  # -1 for the step that ends a cancelled request
    text: str  # the text this token adds ("" while a multi-byte character is incomplete)
    finished: bool
    finish_reason: str | None = None  # "stop_token", "stop_string", "length" or "cancelled" when it ended


class Request:
    """A submitted prompt: iterate it for its steps as they come, or wait for `result()`. Thread-safe."""

    def __init__(self, number: int, prompt: list, settings: dict, stop: StopCondition):
        self.number, self.prompt, self.settings, self.stop = number, prompt, settings, stop
        self.submitted = time.perf_counter()
        self.ttft_s: float | None = None  # submit -> first token
        self.tokens_per_s: float | None = None  # decode rate after the first token (None for a single token)
        self._steps: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._text, self._ids, self._reason, self._error = [], [], None, None
        self._first_at = None

    def __iter__(self) -> Iterator[RequestStep]:
        """The steps as they are generated, until the last; re-raises the error that ended the request."""
        while True:
            step = self._steps.get()
            if isinstance(step, BaseException):
                raise step
            yield step
            if step.finished:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The whole completion, once the request has ended.

        Raises:
            TimeoutError: not finished within `timeout` seconds.
            the error that ended the request (a failed graph run, the scheduler closed before it ran).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.number} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return Completion("".join(self._text), list(self._ids), self._reason)

    def cancel(self) -> None:
        """Stop generating (a client that went away): its batch row is freed at the next token boundary, and the
        request ends with finish reason "cancelled"."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # scheduler thread

    def _emit(self, step: RequestStep) -> None:
        now = time.perf_counter()
        if step.index == 0:
            self.ttft_s, self._first_at = now - self.submitted, now
        self._text.append(step.text)
        self._ids.append(step.token)
        if step.finished:
            self._reason = step.finish_reason
            if step.index > 0:
                self.tokens_per_s = step.index / max(now - self._first_at, 1e-9)
        self._steps.put(step)
        if step.finished:
            self._done.set()

    def _end(self, reason: str) -> None:
        """End without a new token (cancelled)."""
        self._reason = reason
        self._steps.put(RequestStep(len(self._ids), -1, "", True, reason))
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._steps.put(error)
        self._done.set()


class _Row:
    """A request the scheduler has taken: its prompt's encoding, then its place in the decode batch."""

    def __init__(self, request: Request, sampler, batch, cross, keys, pad_token_id: int, tokenizer):
        self.request, self.sampler, self.batch, self.cross, self.keys = request, sampler, batch, cross, keys
        prompt = batch.input_ids.shape[1]
        self.history = np.empty((1, prompt + request.stop.max_new_tokens), np.int64)  # the sampler sees a view
        self.history[:, :prompt] = batch.input_ids
        self.prompt, self.generated, self.used = prompt, 0, 0  # used: the row's real tokens in the KV cache
        self.image_mask = batch.image_attention_mask[:, -1:, :]  # [1, 1, M_r]: generated tokens' image mask
        self.stream, self.pad = TextStream(tokenizer), pad_token_id
        self.cache = self.on_prefill = None  # the row's own cache while it is prefilled
        self.prefilled = 0  # prompt tokens in its own cache
        self.finished = False
        self.last_token = pad_token_id

    @property
    def remaining(self) -> int:
        """Tokens this row may still feed: every token it generates but the last."""
        return self.request.stop.max_new_tokens - self.generated

    def take(self, logits: np.ndarray) -> None:
        """Sample the next token from this row's last logits [V], emit it, and note whether the row ended."""
        request = self.request
        token = int(self.sampler(logits[None], self.history[:, : self.prompt + self.generated])[0])
        text, reason = advance(self.stream, token, self.generated, request.stop)
        self.history[0, self.prompt + self.generated] = token
        request._emit(RequestStep(self.generated, token, text, reason is not None, reason))
        self.generated += 1
        self.last_token, self.finished = token, reason is not None


class Scheduler:
    """In-flight batching over one Pipeline: submit prompts from any thread; one background thread runs them.

    Use as a context manager, or `start()` then `close()`. Requests keep their own prompt, images, sampling settings,
    stop rule and context; they share the Pipeline's image and prefix caches. `stats` counts decode steps, rows
    stepped (occupancy = rows_stepped / steps), prefill chunks, gathers, requests done, cancelled and failed, and the
    seconds spent in decode steps, prefills and gathers (`decode_s`, `prefill_s`, `gather_s`).
    """

    def __init__(self, pipeline: Pipeline, *, max_batch: int = 8, prefill_chunk: int | str | None = AUTO,
                 compact_below: float = 0.5, one_graph_at_a_time: bool | None = None):
        """
        Args:
            pipeline: an open Pipeline; the scheduler is then the only caller of its decoder.
            max_batch: most requests decoded together (with TensorRT engines, at most what they were built for).
            prefill_chunk: prompt tokens prefilled per iteration; "auto" (default): while other requests are
                decoding, as many as take about one decode step (measured as it runs: prefill seconds per token,
                decode seconds per step; at least 16), else the whole prompt; None: always the whole prompt. The
                running batch waits for one chunk at most between two decode steps.
            compact_below: rebuild the batch without its finished rows once they are at least this fraction of it
                (they are fed a pad token until then; a join always rebuilds it).
            one_graph_at_a_time: the image side of `submit` (on the callers' threads) and the scheduler's iterations
                take turns instead of running at once. Default: when the decoder runs on the CPU, where two ONNX
                Runtime runs at once oversubscribe the cores (each session has its own thread pool): on 2 cores,
                eight clients' images encoded beside the decode batch made its steps ~15 % slower and its prefills
                twice as long. A GPU runs them side by side.

        Raises:
            UsageError: max_batch < 1, prefill_chunk < 1, or compact_below outside (0, 1].
        """
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be an integer >= 1; got {max_batch!r}")
        if prefill_chunk not in (None, AUTO) and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                                  or prefill_chunk < 1):
            raise UsageError(f"prefill_chunk must be an integer >= 1, 'auto', or None for whole prompts; got "
                             f"{prefill_chunk!r}")
        if not 0 < compact_below <= 1:
            raise UsageError(f"compact_below must be in (0, 1]; got {compact_below!r}")
        if pipeline.max_batch is not None and max_batch > pipeline.max_batch:
            logger.warning("max_batch %d: the engines take at most %d rows; using %d", max_batch, pipeline.max_batch,
                           pipeline.max_batch)
            max_batch = pipeline.max_batch
        self.pipeline, self.max_batch, self.prefill_chunk = pipeline, max_batch, prefill_chunk
        self.compact_below = compact_below
        self._step_s = self._token_s = None  # running estimates: seconds per decode step, per prefilled token
        self.decoder = pipeline.sessions["decoder"]
        self.stats: Counter = Counter()
        self._waiting: deque[_Row] = deque()
        self._wake = threading.Condition()
        self._numbers = iter(range(1, 1 << 62))
        self._rows: list[_Row] = []  # the decode batch, in cache row order
        self._cache: SelfAttentionCache | None = None
        self._cross: dict[str, np.ndarray] = {}
        self._image_mask: np.ndarray | None = None
        self._joining: list[_Row] = []  # prefilled, waiting for the next gather
        self._prefilling: _Row | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="flamingo-edge-scheduler", daemon=True)
        if one_graph_at_a_time is None:
            one_graph_at_a_time = getattr(self.decoder, "on_cuda", True) is False  # ONNX Runtime on the CPU
        self._graphs = threading.Lock() if one_graph_at_a_time else contextlib.nullcontext()

    # any thread

    def submit(self, prompt: list, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_token_ids: list[int] | None = None, stop_strings: tuple[str, ...] = ()) -> Request:
        """Queue one prompt (items: str text or uint8 RGB images). Its tokenization, limits and images are handled
        here, on the caller's thread, so a bad request fails at once and the scheduler thread runs only the decoder
        (on the CPU the image side takes turns with its iterations: `one_graph_at_a_time`).

        Raises:
            UsageError: a setting of the wrong type or out of range, or the scheduler is closed.
            PromptTooLongError, PromptError, ImageError: as `Pipeline.generate`.
        """
        if self._closed:
            raise UsageError("this scheduler is closed; open a new one")
        check_generate_settings(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids,
                                stop_strings=stop_strings)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed)
        sampler = make_sampler(**settings)  # refuses bad sampling settings here, not on the scheduler thread
        stop = self.pipeline.stop_condition(max_new_tokens, stop_token_ids, stop_strings)
        request = Request(next(self._numbers), prompt, settings, stop)
        with self._graphs:  # the image side
            batch, cross, keys = self.pipeline.encode([prompt], max_new_tokens)
        row = _Row(request, sampler, batch, cross, keys, self.pipeline.pad_token_id, self.pipeline.processor.tokenizer)
        with self._wake:
            if self._closed:
                raise UsageError("this scheduler is closed; open a new one")
            self._waiting.append(row)
            self.stats["submitted"] += 1
            self._wake.notify()
        return request

    def start(self) -> Scheduler:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop: requests not yet finished end with an error saying so; the thread is joined."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._fail_all(UsageError("the scheduler was closed before this request finished"))

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Requests taken and not finished (being prefilled or in the decode batch)."""
        return sum(not row.finished for row in self._taken())

    def _taken(self) -> list[_Row]:
        """The rows taken from the queue: in the decode batch, prefilled and waiting to join, being prefilled."""
        return [*self._rows, *self._joining, *([self._prefilling] if self._prefilling else [])]

    # scheduler thread

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._has_work():
                    self._wake.wait()
                if self._closed:
                    return
            self.step()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._joining or any(not r.finished for r in self._rows))

    def step(self) -> None:
        """One iteration: drop cancelled rows, prefill (a chunk of) one newcomer, join, one decode step. The
        background thread calls it; a test may drive a scheduler that was not started by calling it itself."""
        with self._graphs:
            self._step()

    def _step(self) -> None:
        self._drop_cancelled()
        if self._prefilling is None and not self._joining:
            self._take_next()
        if self._prefilling is not None:
            self._prefill_chunk()
        self._maybe_gather()
        if any(not row.finished for row in self._rows):
            self._decode_step()

    def _drop_cancelled(self) -> None:
        with self._wake:
            for row in [r for r in self._waiting if r.request.cancelled]:
                self._waiting.remove(row)
                self._cancelled(row)
        for row in self._taken():
            if not row.finished and row.request.cancelled:
                row.finished = True
                self._cancelled(row)
        if self._prefilling is not None and self._prefilling.finished:
            self._prefilling = None
        self._joining = [row for row in self._joining if not row.finished]

    def _cancelled(self, row: _Row) -> None:
        row.request._end(CANCELLED)
        self.stats["requests_cancelled"] += 1

    def _take_next(self) -> None:
        if sum(not row.finished for row in self._rows) >= self.max_batch:
            return
        with self._wake:
            if not self._waiting:
                return
            row = self._waiting.popleft()
        try:
            row.cache, row.on_prefill = self.pipeline.start_cache(row.batch, row.keys, row.request.stop.max_new_tokens)
            row.prefilled = row.cache.length  # a reused prefix
            self._prefilling = row
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            row.request._fail(error)
            self.stats["requests_failed"] += 1

    def _prefill_chunk(self) -> None:
        row = self._prefilling
        batch = row.batch
        chunk = self._chunk()
        end = row.prompt if chunk is None else min(row.prompt, row.prefilled + chunk)
        start = time.perf_counter()
        try:
            logits = run_decoder(self.decoder, batch.input_ids[:, row.prefilled:end],
                                 batch.attention_mask[:, row.prefilled:end], row.cache, row.cross,
                                 batch.image_attention_mask[:, row.prefilled:end])
            seconds = time.perf_counter() - start
            self.stats["prefill_chunks"] += 1
            self.stats["prefill_s"] += seconds
            self._token_s = _average(self._token_s, seconds / (end - row.prefilled))
            row.prefilled = end
            if end < row.prompt:
                return
            if row.on_prefill:
                row.on_prefill(row.cache)
            row.used = row.cache.length
            row.take(logits[0, -1])
            self.stats["tokens"] += 1
        except Exception as error:  # noqa: BLE001 - this request fails, the others go on
            row.request._fail(error)
            self.stats["requests_failed"] += 1
            self._prefilling = None
            return
        self._prefilling = None
        if row.finished:
            self._finished(row)
        else:
            self._joining.append(row)

    def _chunk(self) -> int | None:
        """Prompt tokens to prefill now (None: the rest of the prompt)."""
        if self.prefill_chunk != AUTO:
            return self.prefill_chunk
        if not any(not row.finished for row in self._rows) or self._step_s is None:
            return None  # nobody is waiting for a decode step
        if self._token_s is None:
            return FIRST_AUTO_CHUNK
        return max(MIN_AUTO_CHUNK, int(self._step_s / self._token_s))

    def _finished(self, row: _Row) -> None:
        row.cache = row.on_prefill = None
        self.stats["requests_done"] += 1

    def _maybe_gather(self) -> None:
        """Rebuild the batch when rows join (if their context fits beside the running rows), or when enough rows
        have finished."""
        running = [row for row in self._rows if not row.finished]
        joining = []
        limit = self.pipeline.max_context - 1  # the most slots a decode step may feed
        for row in self._joining:
            rows = [*running, *joining, row]
            if len(rows) <= self.max_batch and self._slots(rows) <= limit:
                joining.append(row)
        finished = len(self._rows) - len(running)
        if not joining and (not self._rows or finished < self.compact_below * len(self._rows)):
            return
        self._joining = [row for row in self._joining if row not in joining]
        rows = [*running, *joining]
        if not rows:
            self._rows, self._cache, self._cross, self._image_mask = [], None, {}, None
            return
        sources = [(self._cache, index, row.used) for index, row in enumerate(self._rows) if not row.finished]
        sources += [(row.cache, 0, row.used) for row in joining]
        capacity = self._capacity(rows)
        start = time.perf_counter()
        self._cache = SelfAttentionCache.gather(sources, capacity)
        for row in joining:
            row.cache = row.on_prefill = None
        self._rows = rows
        slots = max(row.image_mask.shape[2] for row in rows)
        self._image_mask = np.zeros((len(rows), 1, slots), np.int64)
        for index, row in enumerate(rows):
            self._image_mask[index, :, : row.image_mask.shape[2]] = row.image_mask[0]
        self._cross = self._gather_cross(rows, slots)
        self.stats["gathers"] += 1
        self.stats["gather_s"] += time.perf_counter() - start

    def _slots(self, rows: list[_Row]) -> int:
        """Cache slots a batch of `rows` needs: right-aligned at the longest, then room for the most tokens any of
        them may still feed."""
        return max(row.used for row in rows) + max(row.remaining for row in rows)

    def _capacity(self, rows: list[_Row]) -> int:
        if self.pipeline.static_decode:
            return self.pipeline.max_context - 1  # fixed decode shapes (CUDA graphs)
        return self._slots(rows)

    def _gather_cross(self, rows: list[_Row], slots: int) -> dict[str, np.ndarray]:
        """The rows' cross K/V [B, Hx, slots*L, Dh], each row's images first, zeros (masked) after."""
        gathered = {}
        for name, first in rows[0].cross.items():
            heads, tokens, head_dim = first.shape[1], self.pipeline.config.visual_tokens_per_slot, first.shape[3]
            value = np.zeros((len(rows), heads, slots * tokens, head_dim), first.dtype)
            for index, row in enumerate(rows):
                own = row.cross[name]
                value[index, :, : own.shape[2]] = own[0]
            value.setflags(write=False)
            gathered[name] = value
        return gathered

    def _decode_step(self) -> None:
        rows = self._rows
        tokens = np.array([[row.pad if row.finished else row.last_token] for row in rows], np.int64)
        new_mask = np.ones((len(rows), 1), np.int64)
        start = time.perf_counter()
        try:
            logits = run_decoder(self.decoder, tokens, new_mask, self._cache, self._cross, self._image_mask)
        except Exception as error:  # noqa: BLE001 - the batch's requests fail; later ones start afresh
            for row in rows:
                if not row.finished:
                    row.finished = True
                    row.request._fail(error)
                    self.stats["requests_failed"] += 1
            self._rows, self._cache, self._cross, self._image_mask = [], None, {}, None
            return
        running = [index for index, row in enumerate(rows) if not row.finished]
        seconds = time.perf_counter() - start
        self.stats["decode_s"] += seconds
        self._step_s = _average(self._step_s, seconds)
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(running)
        self.stats["rows_fed"] += len(rows)
        for index in running:
            row = rows[index]
            row.used += 1
            row.take(logits[index, -1])
            if row.finished:
                self._finished(row)
        self.stats["tokens"] += len(running)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for row in [*waiting, *self._taken()]:
            if not row.finished and not row.request.done:
                row.finished = True
                row.request._fail(error)
        self._rows, self._joining, self._prefilling, self._cache = [], [], None, None


def _average(estimate: float | None, sample: float, weight: float = 0.2) -> float:
    """An exponential moving average (the first sample starts it)."""
    return sample if estimate is None else (1 - weight) * estimate + weight * sample
