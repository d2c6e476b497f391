"""The Pipeline: the only code that knows the graph order and the per-image cache policy.

    image --preprocess--> vision --> resampler --> xattn_kv --> cross K/V per image (cached by content)
    prompt --tokenize--> decoder prefill --> decoder step* (self-attention KV cache) --> streamed text

No torch, no transformers: an export folder (and for TensorRT its engines folder), a backend, numpy, OpenCV and
tokenizers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flamingo_edge.artifacts import read_export_record
from flamingo_edge.errors import ExportError, PromptError, PromptTooLongError, UsageError
from flamingo_edge.graphs import CONTRACT_VERSION, GRAPH_NAMES, build_graphs, cross_key, cross_value
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.runtime.backend import BackendKind, parse_choice
from flamingo_edge.runtime.sessions import open_session
from flamingo_edge.runtime.generation import GenerationStep, StopCondition, generate, run_decoder
from flamingo_edge.runtime.kv_cache import CachedPrefix, CrossAttentionCache, PrefixCache, SelfAttentionCache
from flamingo_edge.runtime.processor import Processor, PromptBatch, check_text
from flamingo_edge.runtime.sampling import Sampler, make_sampler

logger = logging.getLogger(__name__)

IMAGE_CACHE_BYTES = 1 << 30  # the image cache's default bound in bytes (engines/plan.py counts the same)


def _check_integer(name: str, value, minimum: int, *, none_means: str | None = None) -> None:
    """Refuse a setting that is not an integer >= minimum (or None, when `none_means` says what None does)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        also = f", or None for {none_means}" if none_means else ""
        raise UsageError(f"{name} must be an integer >= {minimum}{also}; got {value!r}")


def check_open_settings(*, max_context, max_images, image_cache_size, prefix_cache_bytes,
                        image_cache_bytes=None) -> None:
    """Refuse `Pipeline.open` limits that mean nothing (before any file is read).

    Raises:
        UsageError: naming the setting, the value received and what it must be.
    """
    _check_integer("max_context", max_context, 1, none_means="the model's own limit")
    _check_integer("max_images", max_images, 1)
    _check_integer("image_cache_size", image_cache_size, 0)
    _check_integer("image_cache_bytes", image_cache_bytes, 0, none_means="no bound but image_cache_size")
    _check_integer("prefix_cache_bytes", prefix_cache_bytes, 0)


def check_generate_settings(*, max_new_tokens, seed=None, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                            stop_token_ids=None, stop_strings=()) -> None:
    """Refuse `Pipeline.generate` settings of the wrong type or out of range, before any graph runs (the sampler
    checks the ranges of temperature, top_k, top_p and repetition_penalty).

    Raises:
        UsageError: naming the setting, the value received and what it must be.
        PromptError: a stop string that is not valid text.
    """
    _check_integer("max_new_tokens", max_new_tokens, 1)
    _check_integer("seed", seed, 0, none_means="a fresh seed")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise UsageError(f"{name} must be a number; got {value!r}")
    if isinstance(stop_strings, str) or not all(isinstance(s, str) for s in stop_strings):
        raise UsageError(f"stop_strings must be a list of strings, e.g. [{'###'!r}]; got {stop_strings!r}")
    for text in stop_strings:
        check_text(text, "a stop string")
    if stop_token_ids is not None and (isinstance(stop_token_ids, (str, bytes)) or not all(
            i is None or (isinstance(i, (int, np.integer)) and not isinstance(i, bool)) for i in stop_token_ids)):
        raise UsageError(f"stop_token_ids must be a list of token ids (integers); got {stop_token_ids!r}")


@dataclass(frozen=True)
class Completion:
    """A finished generation for one prompt."""

    text: str
    token_ids: list[int]  # generated ids only, up to and including a stop token
    finish_reason: str = "length"  # "stop_token", "stop_string" or "length" (max_new_tokens reached)


class Pipeline:
    """Chains the four graphs of an export with a self-attention KV cache and a per-image cross-attention cache.

    Use `Pipeline.open(export_dir)`. `stats` counts graph runs and image-cache hits (a repeated image costs no
    vision, resampler or xattn_kv run).
    """

    def __init__(self, *, config: FlamingoConfig, sessions: dict, processor: Processor, max_context: int,
                 max_images: int, image_cache_size: int, prefix_cache_bytes: int, max_prompt: int | None = None,
                 max_batch: int | None = None, static_decode: bool = False,
                 image_cache_bytes: int | None = IMAGE_CACHE_BYTES):
        self.config, self.sessions, self.processor = config, sessions, processor
        self.max_context, self.max_images = max_context, max_images
        self.max_prompt, self.max_batch = max_prompt, max_batch  # TensorRT engines' limits (None: unlimited)
        self.static_decode = static_decode  # decode steps feed a past of max_context - 1 slots (fixed shapes)
        self.image_cache = CrossAttentionCache(capacity=image_cache_size, max_bytes=image_cache_bytes)
        self.prefix_cache = PrefixCache(max_bytes=prefix_cache_bytes)
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()  # a camera stream encodes frames and generates on two threads
        self._prefix_lock = threading.Lock()  # a scheduler's prefills and a direct generate may share the cache
        self._encoding: dict[str, threading.Event] = {}  # images being encoded now, by cache key
        self._encoding_lock = threading.Lock()
        self._padding_kv: dict[str, np.ndarray] | None = None  # a padding image slot's cross K/V (mllama), once
        blocks = range(len(config.decoder.cross_layers))
        self._cross_names = [name(i) for i in blocks for name in (cross_key, cross_value)]

    @classmethod
    def open(cls, export_dir: str | Path, *, backend: str = "onnxruntime", device: str = "auto",
             engines: str | Path | None = None, cuda_graph: bool = False, static_decode: bool | None = None,
             max_context: int | None = None, max_images: int = 16, image_cache_size: int = 64,
             image_cache_bytes: int | None = IMAGE_CACHE_BYTES, prefix_cache_bytes: int = 64 << 20) -> Pipeline:
        """Open an export folder written by `flamingo-edge export`.

        Args:
            export_dir: the folder with export.json (tokenizer, config; the graphs for onnxruntime).
            backend: "onnxruntime" or "tensorrt".
            device: "auto", "cpu" or "cuda".
            engines: (tensorrt) the folder `flamingo-edge build` wrote from this export.
            cuda_graph: (tensorrt) replay decode steps from a CUDA graph; implies `static_decode`.
            static_decode: decode steps feed a past of `max_context` - 1 slots, masked beyond the cached tokens, so
                every step and every generation of a batch size has the same shapes (default: when CUDA graphs
                replay decode steps: `cuda_graph` asked for, and TensorRT can capture the decoder).
                Same tokens; each step attends over the whole context.
            max_context: most tokens (prompt + generated) per sequence; default the model's max positions (and with
                engines, at most what they were built for).
            max_images: most images per prompt (with engines, at most what they were built for).
            image_cache_size: images whose cross-attention K/V are kept (least recently used are dropped).
            image_cache_bytes: the most bytes of cross-attention K/V kept, whatever the count (default 1 GiB: 64
                IDEFICS-9B images, 2 of Llama 3.2 Vision 11B's); None: bounded by image_cache_size alone.
            prefix_cache_bytes: memory for the self-attention K/V of earlier single prompts, reused when a prompt
                begins with the same tokens and images (a fixed few-shot preamble); 0 disables it.

        Raises:
            ExportError: the folder is incomplete, modified, or from another contract version.
            UsageError: a limit of the wrong type or out of range (max_context 0, a negative cache size).
            GraphContractError: a graph does not match the contract.
            EngineMismatchError: (tensorrt) engines built from other graphs, or for another TensorRT or GPU.
            FeatureUnavailableError: (tensorrt) no TensorRT, cuda-python or GPU here.
            UsageError: tensorrt without `engines`, or `engines`/`cuda_graph` with another backend.
        """
        check_open_settings(max_context=max_context, max_images=max_images, image_cache_size=image_cache_size,
                            prefix_cache_bytes=prefix_cache_bytes, image_cache_bytes=image_cache_bytes)
        export_dir = Path(export_dir)
        record = read_export_record(export_dir)
        if record.contract_version != CONTRACT_VERSION:
            raise ExportError(f"{export_dir}: exported with graph contract v{record.contract_version}, this "
                              f"flamingo-edge reads v{CONTRACT_VERSION}: re-run flamingo-edge export")
        config = FlamingoConfig.from_dict(record.config)
        specs = build_graphs(config)
        processor = Processor.from_pretrained(export_dir)  # before any session: a bad folder opens nothing
        if processor.image_preprocessor.slots_per_image != config.slots_per_image:
            raise ExportError(f"{export_dir}: its image processor gives {processor.image_preprocessor.slots_per_image} "
                              f"cross-attention slots per image (tiles), its model takes {config.slots_per_image}; "
                              "the processor files are not this model's: export the checkpoint again")
        limit = config.decoder.max_positions if max_context is None else min(max_context, config.decoder.max_positions)
        engine_limits = {}
        tensorrt = parse_choice(BackendKind, backend, "runtime backend") is BackendKind.TENSORRT
        if not tensorrt and (engines is not None or cuda_graph):
            raise UsageError("engines and cuda_graph (--engines, --cuda-graph) go with backend 'tensorrt'")
        if tensorrt:
            if engines is None:
                raise UsageError("the tensorrt backend runs the engines flamingo-edge build wrote from this export: "
                                 "give their folder (--engines ENGINES)")
            from flamingo_edge.runtime.tensorrt_backend import open_engines

            manifest, sessions = open_engines(engines, export_dir, specs, cuda_graph=cuda_graph)
            engine_limits = manifest.limits
            limit, max_images = min(limit, engine_limits["max_context"]), min(max_images, engine_limits["max_images"])
        else:
            if (record.quantization or {}).get("encoding") == "TRT_INT4DequantizeLinear":
                raise ExportError(f"{export_dir}: its int4 graphs use TensorRT's own TRT_INT4DequantizeLinear "
                                  "(quantized for TensorRT 10.0-10.15), which only TensorRT runs: build engines from "
                                  "it, or quantize the fp32 export with --target onnxruntime to run it here")
            sessions = {name: open_session(export_dir / record.graphs[name].file, specs[name], backend, device=device)
                        for name in GRAPH_NAMES}
        # fixed decode shapes pay for attending over the whole context; only worth it when graphs replay them
        graphs = cuda_graph and getattr(sessions["decoder"], "cuda_graphs", False)
        return cls(config=config, sessions=sessions, processor=processor,
                   max_context=limit, max_images=max_images, image_cache_size=image_cache_size,
                   image_cache_bytes=image_cache_bytes,
                   prefix_cache_bytes=prefix_cache_bytes, max_prompt=engine_limits.get("max_prompt"),
                   max_batch=engine_limits.get("max_batch"),
                   static_decode=graphs if static_decode is None else static_decode)

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, *names: str, by: int = 1) -> None:
        with self._stats_lock:
            for name in names:
                self.stats[name] += by

    def _encode(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """vision -> resampler -> xattn_kv for one image's vision feed: cross K/V [1, Hx, L, Dh] per name (a tiled
        tower's L is its T*P tokens)."""
        features = self.sessions["vision"].run(feed)["image_features"]  # [1, T, Dv]; tiled: [1, T, P, Dvo]
        if features.ndim == 3:
            features = features[:, None]  # one frame: [1, 1, T, Dv]
        visual = self.sessions["resampler"].run({"image_features": features})["visual_tokens"]
        kv = self.sessions["xattn_kv"].run({"visual_tokens": visual})
        self._count("vision_runs", "resampler_runs", "xattn_kv_runs")
        return kv

    def padding_kv(self) -> dict[str, np.ndarray] | None:
        """Cross K/V of a padding image slot as the family's reference fills it, or None where such slots are zeros.

        mllama computes a batch row's missing images from zero pixels (aspect ratio id 0) and lets the rows that see
        no image attend to every visual token of their row, those slots included; zeros there would change them.
        """
        if self.config.decoder.cross_empty_rows != "attend_all":
            return None
        if self._padding_kv is None:  # computed once per pipeline
            feed = self.processor.image_preprocessor.padding_feed()
            if feed is None:
                return None
            self._padding_kv = self._encode(feed)
        return self._padding_kv

    def image_kv(self, image: np.ndarray, key: str | None = None) -> dict[str, np.ndarray]:
        """Cross K/V of one image, [1, Hx, L, Dh] per name: from the cache, or vision -> resampler -> xattn_kv.
        `key`: the image's `CrossAttentionCache.key_of`, when the caller has it already (it hashes every pixel)."""
        key = CrossAttentionCache.key_of(image) if key is None else key
        cached = self.image_cache.get(key)
        if cached is None:
            # threads asking for the same new image at once (concurrent requests): one encodes, the others wait for it
            with self._encoding_lock:
                underway = self._encoding.get(key)
                if underway is None:
                    self._encoding[key] = threading.Event()
            if underway is not None:
                underway.wait()
                cached = self.image_cache.get(key)  # None if it failed or the cache keeps nothing: encode it here
        if cached is not None:
            self._count("image_cache_hits")
            return cached
        try:
            kv = self._encode(self.processor.image_preprocessor.vision_feed(image))
            self.image_cache.put(key, kv)
        finally:
            if underway is None:
                with self._encoding_lock:
                    self._encoding.pop(key).set()
        return kv

    def rows_kv(self, images: list[list[np.ndarray]], slots: int, keys: list[list[str]] | None = None,
                ) -> dict[str, np.ndarray]:
        """Cross K/V per row, [B, Hx, slots*L, Dh] (`slots` images; a tiled tower's image is T mask slots): each
        row's images in order, then in unused slots zeros (masked), or when some row has an image and the family
        fills them (mllama), the padding image's K/V (`padding_kv`). `keys`: the images' cache keys, in the same
        layout, when the caller has them already."""
        heads, head_dim = self.config.decoder.cross_kv_head_count, self.config.decoder.cross_head_dim
        tokens = self.config.visual_tokens_per_image
        rows = {name: np.zeros((len(images), slots, heads, tokens, head_dim), np.float32) for name in self._cross_names}
        padding = self.padding_kv() if any(images) and any(len(r) < slots for r in images) else None
        for row, row_images in enumerate(images):
            for slot, image in enumerate(row_images):
                key = keys[row][slot] if keys is not None else None
                for name, value in self.image_kv(image, key).items():
                    rows[name][row, slot] = value[0]
            for slot in range(len(row_images), slots if padding is not None else 0):
                for name, value in padding.items():
                    rows[name][row, slot] = value[0]
        # [B, M, Hx, L, Dh] -> [B, Hx, M*L, Dh], image-major as the decoder's image_attention_mask expects. Read-only:
        # fed unchanged at every step of a generation, so a device backend may keep them where it copied them once.
        result = {}
        for name, value in rows.items():
            result[name] = np.ascontiguousarray(value.transpose(0, 2, 1, 3, 4)).reshape(len(images), heads, -1,
                                                                                      head_dim)
            result[name].setflags(write=False)
        return result

    def _check_limits(self, input_ids: np.ndarray, images: list[list[np.ndarray]], max_new_tokens: int) -> None:
        if self.max_prompt is not None and input_ids.shape[1] > self.max_prompt:
            raise PromptTooLongError(f"the prompt has {input_ids.shape[1]} tokens; the engines take at most "
                                     f"{self.max_prompt} (rebuild them with a larger --max-prompt)")
        if self.max_batch is not None and len(images) > self.max_batch:
            raise PromptError(f"{len(images)} prompts in one batch; the engines take at most {self.max_batch} "
                              "(rebuild them with a larger --max-batch)")
        needed = input_ids.shape[1] + max_new_tokens
        if needed > self.max_context:
            raise PromptTooLongError(
                f"the prompt has {input_ids.shape[1]} tokens and {max_new_tokens} new tokens were asked for: "
                f"{needed} > {self.max_context}, the context this pipeline allows; shorten the prompt or lower "
                "max_new_tokens")
        for row, row_images in enumerate(images):
            if len(row_images) > self.max_images:
                raise PromptError(f"prompt {row} has {len(row_images)} images; at most {self.max_images} are allowed "
                                  "(Pipeline.open(max_images=...))")

    def cache_slots(self, prompt: int, max_new_tokens: int) -> int:
        """Slots of a generation's self-attention cache: every decode step feeds them all as its past. The prompt and
        every generated token but the last (never fed); with `static_decode`, the context less that one token, the
        same for every generation."""
        return max(prompt, self.max_context - 1 if self.static_decode else prompt + max_new_tokens - 1)

    def encode(self, prompts: list, max_new_tokens: int) -> tuple[PromptBatch, dict[str, np.ndarray], list[list[str]]]:
        """Tokenize, check the limits (before any graph runs) and gather the rows' cross K/V (the image side: vision,
        resampler, xattn_kv for images the cache has not seen). Safe to call from several threads at once; the
        decoder is not run. Returns (batch, cross, the images' cache keys).

        Raises:
            PromptTooLongError, PromptError, ImageError: as `generate`.
        """
        batch = self.processor.tokenize(prompts)
        self._check_limits(batch.input_ids, batch.images, max_new_tokens)
        keys = [[CrossAttentionCache.key_of(image) for image in row] for row in batch.images]  # hashed once
        slots = batch.image_attention_mask.shape[2] // self.config.slots_per_image  # images
        return batch, self.rows_kv(batch.images, slots, keys), keys

    def start_cache(self, batch: PromptBatch, keys: list[list[str]], max_new_tokens: int, *,
                    use_prefix: bool = True) -> tuple[SelfAttentionCache, Callable | None]:
        """A self-attention cache sized for the batch's generation and, for a single prompt, filled with the longest
        cached prefix. Returns (cache, on_prefill): on_prefill keeps the filled prompt as a reusable prefix (None
        for a batch, or without a prefix cache)."""
        text = self.config.decoder
        cache = SelfAttentionCache(layers=text.self_attention_layers, batch=len(batch.images),
                                   heads=text.kv_head_count, head_dim=text.head_dim,
                                   capacity=self.cache_slots(batch.input_ids.shape[1], max_new_tokens))
        self._count("prefill_runs")
        if len(batch.images) != 1 or not self.prefix_cache.max_bytes or not use_prefix:
            return cache, None
        token_ids = tuple(int(t) for t in batch.input_ids[0])
        positions = np.flatnonzero(batch.input_ids[0] == self.processor.image_token_id)
        images = tuple((int(p), key) for p, key in zip(positions, keys[0]))
        if self.config.decoder.cross_empty_rows == "attend_all":
            # mllama: the tokens before the row's first image attend to all of its images, so from the first token on
            # the K/V depend on every image: a prefix is reused only by a prompt with the same images
            images = ((0, "|".join(keys[0])), *images)
        with self._prefix_lock:
            reused, prefix = self.prefix_cache.lookup(token_ids, images)
        if prefix is not None:
            cache.load([k[:, :, :reused] for k in prefix.keys], [v[:, :, :reused] for v in prefix.values])
            self._count("prefix_tokens_reused", by=reused)

        def keep_prefix(filled: SelfAttentionCache) -> None:
            stored = CachedPrefix(token_ids, images, *filled.snapshot())
            with self._prefix_lock:
                self.prefix_cache.store(stored)

        return cache, keep_prefix

    def _prepare(self, prompts: list, max_new_tokens: int, *, use_prefix: bool = True):
        """`encode`, then `start_cache`. Returns (batch, cross, cache, on_prefill)."""
        batch, cross, keys = self.encode(prompts, max_new_tokens)
        cache, keep_prefix = self.start_cache(batch, keys, max_new_tokens, use_prefix=use_prefix)
        return batch, cross, cache, keep_prefix

    def logits(self, prompts: list) -> np.ndarray:
        """Logits of every prompt position, float32 [B, S, V] (one prefill; for comparisons with a reference)."""
        batch, cross, cache, _ = self._prepare(prompts, 0, use_prefix=False)  # every position's logits
        return run_decoder(self.sessions["decoder"], batch.input_ids, batch.attention_mask, cache, cross,
                           batch.image_attention_mask)

    @property
    def pad_token_id(self) -> int:
        """Fed to the rows of a batch that have finished (the tokenizer's pad id, else 0)."""
        pad = self.processor.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def stop_condition(self, max_new_tokens: int, stop_token_ids: list[int] | None,
                       stop_strings: tuple[str, ...]) -> StopCondition:
        """When a generation ends: `stop_token_ids` (None: the prompt format's stop tokens), `stop_strings`, or
        after `max_new_tokens`."""
        stop_ids = self.processor.stop_token_ids if stop_token_ids is None else stop_token_ids
        return StopCondition(max_new_tokens, frozenset(i for i in stop_ids if i is not None), tuple(stop_strings))

    def generate(self, prompts: list, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_token_ids: list[int] | None = None, stop_strings: tuple[str, ...] = (),
                 sampler: Sampler | None = None) -> Iterator[GenerationStep]:
        """Generate for a batch of prompts, yielding one `GenerationStep` per token (all rows at once).

        Args:
            prompts: a batch of prompts, as for `Processor` (items: str text or uint8 RGB images); or one prompt.
            max_new_tokens: most tokens to generate per row.
            temperature, top_k, top_p, repetition_penalty, seed: sampling (temperature 0 = greedy).
            stop_token_ids: tokens that end a row (default: the processor's, i.e. the prompt format's
                `stop_tokens`, else the tokenizer's EOS; OpenFlamingo stops at `<|endofchunk|>`).
            stop_strings: strings that end a row once generated.
            sampler: picks each next token instead of the settings above (a callable (logits [B, V] float32,
                history [B, T] int64) -> tokens [B] int64, e.g. from `sampling.make_sampler`); it cannot be combined
                with them.

        Raises:
            PromptTooLongError: prompt + max_new_tokens over the context, before any graph runs.
            UsageError: max_new_tokens < 1, a negative seed, or another setting of the wrong type or out of range.
            PromptError, ImageError: a malformed prompt or image.
        """
        check_generate_settings(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids,
                                stop_strings=stop_strings)
        start = time.perf_counter()
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        seed=seed)
        if sampler is None:
            sampler = make_sampler(**settings)
        elif not callable(sampler):
            raise UsageError(f"sampler must be a callable (logits, history) -> tokens; got {type(sampler).__name__}")
        elif settings != dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None):
            raise UsageError("pass either a sampler or sampling settings (temperature, top_k, top_p, "
                             "repetition_penalty, seed), not both: the sampler decides alone")
        batch, cross, cache, keep_prefix = self._prepare(prompts, max_new_tokens)
        stop = self.stop_condition(max_new_tokens, stop_token_ids, stop_strings)
        for step in generate(self.sessions["decoder"], self.processor.tokenizer, batch.input_ids,
                             batch.attention_mask, batch.image_attention_mask, cross, cache, sampler, stop,
                             pad_token_id=self.pad_token_id, start=start, on_prefill=keep_prefix):
            self._count("decode_tokens")
            yield step

    def complete(self, prompts: list, **settings) -> list[Completion]:
        """`generate` run to the end: the text, generated ids and finish reason of every row."""
        texts, ids, done, reasons = None, None, None, None
        for step in self.generate(prompts, **settings):
            texts = texts or [""] * len(step.tokens)
            ids = ids or [[] for _ in step.tokens]
            reasons = reasons or ["length"] * len(step.tokens)
            done = done if done is not None else [False] * len(step.tokens)
            for row, token in enumerate(step.tokens):
                if not done[row]:
                    texts[row] += step.text[row]
                    ids[row].append(int(token))
                    reasons[row] = step.finish_reason[row] or reasons[row]
            done = step.finished
        return [Completion(*row) for row in zip(texts, ids, reasons)]
