"""Captions and answers for a stream of frames: what a camera app embeds.

    source thread: read every frame ─▶ on_frame(frame) ─▶ selected? (--every N / --fps F) ─▶ unchanged? reuse the last
                   frame's pixels ─▶ vision side now (vision ─▶ resampler ─▶ xattn_kv, cached by content) ─▶ latest slot
    worker thread: latest slot ─▶ few-shot preamble + frame + prompt ─▶ generate ─▶ StreamResult (callback, iterator)

Live sources keep only the latest encoded frame: a frame still waiting when a newer one is encoded is dropped and
counted (the language side always works on the newest frame). Files and folders are processed frame by frame, none
dropped. The few-shot preamble is the same for every frame, so its K/V come from the prefix cache and its images from
the image cache; prompts rotate over the selected frames. An unchanged frame (same pixels, or a mean difference
under `change_threshold` on a small thumbnail) reuses the last frame's cached visual tokens.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from flamingo_edge.errors import UsageError
from flamingo_edge.runtime.kv_cache import CrossAttentionCache
from flamingo_edge.runtime.pipeline import check_generate_settings
from flamingo_edge.runtime.sources import Frame, FrameSource

logger = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class StreamResult:
    frame: int  # the source's frame index
    prompt: str
    text: str
    token_ids: list[int]
    seconds: dict  # vision (0 when cached), first_token, generate, latency (frame read -> text done)
    reused: bool  # the visual tokens came from the cache (unchanged or repeated frame)
    dropped: int  # frames dropped so far (live sources)
    source: str = ""  # the source's URI


@dataclass
class StreamStats:
    counts: Counter = field(default_factory=Counter)  # read, selected, encoded, dropped, processed, reused
    started: float = field(default_factory=time.perf_counter)

    def rates(self) -> dict[str, float]:
        """Per second since the start: frames read, processed and dropped."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {name: self.counts[name] / elapsed for name in ("read", "processed", "dropped")}


class FrameStream:
    """Runs a Pipeline over a FrameSource on two threads; iterate it for results, or pass `on_result` (then only the
    callback gets them, and nothing accumulates in a long run).

    Use as a context manager, or call `stop()`: it stops reading, lets the current generation finish and joins the
    threads. An error on either thread (a lost camera, a failed graph) ends the stream and is raised by the iterator.
    """

    def __init__(self, pipeline, source: FrameSource, *, prompts: list[str], few_shot: list | None = None,
                 every: int = 1, fps: float | None = None, max_new_tokens: int = 32, change_threshold: float = 0.0,
                 latest_only: bool | None = None, on_frame: Callable[[Frame], None] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 on_result: Callable[[StreamResult], None] | None = None, scheduler=None, **generation):
        """
        Args:
            pipeline: an open Pipeline (any backend).
            source: where frames come from (`sources.open_source`).
            prompts: the text after each frame; they rotate over the selected frames.
            few_shot: items (text, RGB images) put before every frame, the same for all (e.g. example captions).
            every: take every N-th frame.
            fps: take at most F frames a second (by the time they are read).
            max_new_tokens: per frame.
            change_threshold: a frame whose 32x32 grey thumbnail differs from the last selected frame's by less than
                this mean absolute difference (0-255) counts as unchanged and reuses its visual tokens (0: only
                identical pixels do).
            latest_only: drop frames the language side had no time for (default: for live sources only).
            on_frame: called on the source thread with every frame read (e.g. to draw and record it).
            on_text: called on the worker thread with (frame index, text) as each token's text is generated.
            on_result: called on the worker thread with every result.
            scheduler: a started `Scheduler` over `pipeline` that generates for this stream (and for others: several
                sources share the decoder's batch, `MultiStream`); None: the worker runs `pipeline.generate` itself.
            generation: more `Pipeline.generate` settings (temperature, stop_strings...; with a scheduler, those of
                `Scheduler.submit`).

        Raises:
            UsageError: no prompts, bad every/fps/threshold, or a generation setting out of range (max_new_tokens,
                seed, ...), refused here rather than at the first frame.
        """
        if not prompts:
            raise UsageError("a frame stream needs at least one prompt")
        if every < 1 or (fps is not None and fps <= 0) or change_threshold < 0:
            raise UsageError("--every must be >= 1, --fps > 0 and the change threshold >= 0")
        checked = inspect.signature(check_generate_settings).parameters  # the rest the sampler checks
        check_generate_settings(max_new_tokens=max_new_tokens,
                                **{k: v for k, v in generation.items() if k in checked})
        self.pipeline, self.source, self.prompts, self.scheduler = pipeline, source, list(prompts), scheduler
        self.few_shot, self.every, self.fps = list(few_shot or []), every, fps
        self.max_new_tokens, self.change_threshold, self.generation = max_new_tokens, change_threshold, generation
        self.latest_only = source.live if latest_only is None else latest_only
        self.on_frame, self.on_text, self.on_result = on_frame, on_text, on_result
        self.stats = StreamStats()
        self._stop = threading.Event()  # stop everything: the worker ends after its current frame
        self._stop_reading = threading.Event()  # read no more frames, finish those taken
        self._slot: queue.Queue = queue.Queue(maxsize=1)  # the latest encoded frame, for the worker
        self._results: queue.Queue = queue.Queue()
        # Results are queued for the iterator; a callback-only app never iterates, so nothing is kept for it.
        self._queue_results = on_result is None
        self._error: BaseException | None = None
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (thumbnail, pixels) of the last selected frame
        self._reader = threading.Thread(target=self._read_loop, name="flamingo-edge-frames", daemon=True)
        self._worker = threading.Thread(target=self._work_loop, name="flamingo-edge-language", daemon=True)
        self._started = False

    def start(self) -> FrameStream:
        if not self._started:
            self._started = True
            self.stats.started = time.perf_counter()
            self._reader.start()
            self._worker.start()
        return self

    def run(self) -> None:
        """Start, and block until the source ends or `stop()`; results go to `on_result` only. Re-raises a thread's
        error."""
        self.start()
        self._worker.join()
        self._reader.join()
        if self._error is not None:
            raise self._error

    def stop_reading(self) -> None:
        """Read no more frames; those already taken are still processed and yielded (callable from any thread,
        `on_frame` included)."""
        self._stop_reading.set()

    def stop(self) -> None:
        """Stop reading; the generation under way finishes; the threads are joined."""
        self._stop_reading.set()
        self._stop.set()
        if self._started:
            if threading.current_thread() is not self._reader:
                self._reader.join()
            if threading.current_thread() is not self._worker:
                self._worker.join()

    def __enter__(self) -> FrameStream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __iter__(self) -> Iterator[StreamResult]:
        """Results in frame order until the source ends or `stop()`; re-raises a thread's error. (With `on_result`,
        iterate before the first result arrives to get them all here too.)"""
        self._queue_results = True
        self.start()
        while True:
            item = self._results.get()
            if item is _END:
                break
            yield item
        self._worker.join()
        if self._error is not None:
            raise self._error

    # source thread

    def _selected(self, frame: Frame, last_taken: float | None) -> bool:
        if frame.index % self.every:
            return False
        return self.fps is None or last_taken is None or frame.seconds - last_taken >= 1.0 / self.fps

    def _unchanged(self, image: np.ndarray) -> np.ndarray:
        """The pixels to use: the last selected frame's when this one has not changed (their K/V are cached)."""
        import cv2

        thumbnail = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
        last = self._last
        if last is not None and last[1].shape == image.shape:
            if np.array_equal(last[1], image) or (
                    self.change_threshold > 0
                    and np.abs(thumbnail.astype(np.int16) - last[0]).mean() < self.change_threshold):
                return last[1]
        self._last = (thumbnail.astype(np.int16), image)
        return image

    def _read_loop(self) -> None:
        last_taken = None
        try:
            for frame in self.source:
                self.stats.counts["read"] += 1
                if self.on_frame:
                    self.on_frame(frame)
                if self._stop_reading.is_set():
                    break
                if not self._selected(frame, last_taken):
                    continue
                last_taken = frame.seconds
                self.stats.counts["selected"] += 1
                image = self._unchanged(frame.image)
                key = CrossAttentionCache.key_of(image)
                reused = image is not frame.image or key in self.pipeline.image_cache
                start = time.perf_counter()
                self.pipeline.image_kv(image, key)  # the vision side now (a cache hit for an unchanged frame)
                encoded = (frame, image, reused, 0.0 if reused else time.perf_counter() - start)
                self.stats.counts["encoded"] += 1
                self._hand_over(encoded)
        except BaseException as error:  # a lost camera or a failed graph: end the stream, raise it to the reader
            self._error = error
        finally:
            self.source.close()
            self._put_slot(_END)

    def _hand_over(self, item) -> None:
        if not self.latest_only:
            self._put_slot(item)  # waits for the worker: no frame dropped
            return
        try:
            self._slot.put_nowait(item)
        except queue.Full:
            try:
                self._slot.get_nowait()  # a newer frame replaces the one still waiting
                self.stats.counts["dropped"] += 1
            except queue.Empty:
                pass
            self._slot.put_nowait(item)

    def _put_slot(self, item) -> None:
        while True:
            try:
                self._slot.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set() and item is not _END:
                    return
                if item is _END and not self._worker.is_alive():
                    return

    # worker thread

    def _work_loop(self) -> None:
        turn = 0
        try:
            while True:
                item = self._slot.get()
                if item is _END:
                    break
                frame, image, reused, vision_s = item
                prompt = self.prompts[turn % len(self.prompts)]
                turn += 1
                result = self._generate(frame, image, prompt, reused, vision_s)
                self.stats.counts["processed"] += 1
                self.stats.counts["reused"] += reused
                if self.on_result:
                    self.on_result(result)
                if self._queue_results:
                    self._results.put(result)
                if self._stop.is_set():
                    break
        except BaseException as error:
            self._error = self._error or error
            self._stop_reading.set()
            self._stop.set()
        finally:
            self._results.put(_END)

    def _generate(self, frame: Frame, image: np.ndarray, prompt: str, reused: bool, vision_s: float) -> StreamResult:
        start = time.perf_counter()
        text, ids, first = "", [], None
        items = [*self.few_shot, image, prompt]
        if self.scheduler is not None:
            pieces = ((piece.text, piece.token) for piece in
                      self.scheduler.submit(items, max_new_tokens=self.max_new_tokens, **self.generation))
        else:
            pieces = ((step.text[0], int(step.tokens[0])) for step in
                      self.pipeline.generate([items], max_new_tokens=self.max_new_tokens, **self.generation))
        for piece, token in pieces:
            first = first if first is not None else time.perf_counter() - start
            text += piece
            if self.on_text and piece:
                self.on_text(frame.index, piece)
            ids.append(token)
        done = time.perf_counter()
        seconds = {"vision": vision_s, "first_token": first or 0.0, "generate": done - start,
                   "latency": done - frame.seconds}
        return StreamResult(frame.index, prompt, text, ids, seconds, reused, self.stats.counts["dropped"],
                            self.source.uri)


class MultiStream:
    """Several sources at once through one Pipeline: a `FrameStream` per source (each with its own reader, latest-frame
    slot and prompt rotation) whose generations share one `Scheduler`, so the language side decodes the sources'
    frames in one batch instead of one after another.

    Iterate it for every source's results as they come (`StreamResult.source` names the source). A source that fails
    (a camera lost for good) ends alone: its error is kept in `errors` and logged; the others go on. Use as a context
    manager, or call `stop()`.
    """

    def __init__(self, pipeline, sources: list[FrameSource], *, max_batch: int | None = None,
                 prefill_chunk: int | str | None = "auto", on_result: Callable[[StreamResult], None] | None = None,
                 **options):
        """
        Args:
            pipeline: an open Pipeline (any backend).
            sources: the frame sources (`sources.open_source`), at least one.
            max_batch: most frames decoded together (default: one per source).
            prefill_chunk: see `Scheduler`.
            on_result: called with every result (on the source's worker thread).
            options: `FrameStream` options, the same for every source (prompts, few_shot, every, fps, ...).

        Raises:
            UsageError: no sources, or a FrameStream option out of range.
        """
        from flamingo_edge.runtime.scheduler import Scheduler

        if not sources:
            raise UsageError("a multi-source stream needs at least one source")
        self.scheduler = Scheduler(pipeline, max_batch=max_batch or len(sources), prefill_chunk=prefill_chunk)
        self.on_result, self.errors = on_result, {}
        self._results: queue.Queue = queue.Queue()
        self.streams = [FrameStream(pipeline, source, scheduler=self.scheduler, on_result=self._deliver, **options)
                        for source in sources]
        self._runners = [threading.Thread(target=self._run, args=(stream,), name=f"flamingo-edge-source-{i}",
                                          daemon=True) for i, stream in enumerate(self.streams)]
        self._started = False

    def _deliver(self, result: StreamResult) -> None:
        if self.on_result:
            self.on_result(result)
        self._results.put(result)

    def _run(self, stream: FrameStream) -> None:
        try:
            stream.run()
        except BaseException as error:  # this source ends; the others go on
            self.errors[stream.source.uri] = error
            logger.warning("%s: %s", stream.source.uri, error)
        finally:
            self._results.put(_END)

    def start(self) -> MultiStream:
        if not self._started:
            self._started = True
            self.scheduler.start()
            for runner in self._runners:
                runner.start()
        return self

    def __iter__(self) -> Iterator[StreamResult]:
        """Every source's results until all have ended or `stop()`."""
        self.start()
        ended = 0
        while ended < len(self.streams):
            item = self._results.get()
            if item is _END:
                ended += 1
                continue
            yield item

    def stop(self) -> None:
        """Stop every source (the generations under way finish), then the scheduler."""
        for stream in self.streams:
            stream.stop_reading()
        for stream in self.streams:
            stream.stop()
        for runner in self._runners:
            if runner.is_alive():
                runner.join()
        self.scheduler.close()

    def __enter__(self) -> MultiStream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
