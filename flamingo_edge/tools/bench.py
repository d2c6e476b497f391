"""Speed of an export on a backend, per stage, and against the PyTorch references in the same run.

One workload (`Workload`: images, prompt tokens, new tokens) is run `runs` times after a warm-up through the
backend's Pipeline, whose sessions and preprocessing are wrapped by timers; with a reference checkpoint the same
workload then runs through transformers' `generate` and through our PyTorch reference. Every image is new in every
run (no image-cache hits) and every run generates exactly `new_tokens` (end-of-sequence ignored).

Figures: median, min and max over the runs. Time to first token (TTFT) is from the call to the first token, image
preprocessing, vision, resampler, xattn_kv and prefill included; decode tokens/s counts the tokens after the first.
For the references, TTFT is `generate(max_new_tokens=1)` and decode is (N - 1) / (t(N) - t(1)).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from flamingo_edge.artifacts import read_export_record, read_json
from flamingo_edge.config import config_differences
from flamingo_edge.errors import ExportError, PromptError, PromptTooLongError
from flamingo_edge.extras import require
from flamingo_edge.runtime.generation import step_speed
from flamingo_edge.runtime.onnx_weights import weight_bytes_per_token
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.tools.bandwidth import BandwidthProbe

REPORT_VERSION = 2  # 2: host_per_token_s, decode_rate_vs_step_rate; several prompt lengths in one report
STAGES = ("preprocess", "vision", "resampler", "xattn_kv", "prefill", "decode_per_token")


@dataclass(frozen=True)
class Workload:
    images: int = 1
    prompt_tokens: int = 32
    new_tokens: int = 32
    runs: int = 5


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


class _Timed:
    """Forwards to `inner`, adding each call's seconds to `log[name]`: a session's own `last_run_seconds` for run(),
    the wall time of __call__ otherwise."""

    def __init__(self, inner, name: str, log: dict[str, list[float]]):
        self._inner, self._name, self._log = inner, name, log

    def _timed(self, function, *args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self._log[self._name].append(time.perf_counter() - start)

    def run(self, feed):
        """A session's run, timed by the session itself (`last_run_seconds`, the backend's own clock)."""
        outputs = self._inner.run(feed)
        self._log[self._name].append(self._inner.last_run_seconds)
        return outputs

    def __call__(self, *args, **kwargs):
        return self._timed(self._inner, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def make_prompt(tokenize: Callable[[list], int], images: list[np.ndarray], tokens: int) -> list:
    """images first, then filler text, so that the prompt is `tokens` tokens long, or as close above as the
    tokenizer allows: a binary search over the filler's length in characters (the token count grows with it)."""
    def prompt(chars: int) -> list:
        return [*images, ("a " * (chars // 2 + 1))[:chars] + "caption:"]

    low, high = 0, 2 * tokens
    while tokenize(prompt(high)) < tokens:
        if high > 64 * tokens:
            raise PromptError(f"cannot build a {tokens}-token prompt: the tokenizer makes too few tokens of text")
        high *= 2
    while low < high:  # the fewest characters that give at least `tokens` tokens
        middle = (low + high) // 2
        if tokenize(prompt(middle)) >= tokens:
            high = middle
        else:
            low = middle + 1
    return prompt(low)


def random_images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8) for _ in range(count)]


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def decode_bytes_per_token(export_dir: Path, config, workload: Workload, past_slots: int) -> int:
    """What one decode step reads: the decoder graph's weights as stored (packed 4-bit or 8-bit weights and their
    scales for weight-only precisions, fp16 or fp32 otherwise; one row of an embedding table or of a rotary table)
    plus the self-attention K/V of the `past_slots` a step feeds (the whole cache, `Pipeline.cache_slots`: the
    slots not yet written are read and masked) and the cross-attention K/V, all fp32."""
    record = read_export_record(export_dir, verify_hashes=False)
    weights = weight_bytes_per_token(export_dir / record.graphs["decoder"].file)
    text = config.decoder
    self_kv = 2 * text.self_attention_layers * text.kv_head_count * text.head_dim * past_slots * 4
    cross_kv = (2 * len(text.cross_layers) * text.cross_kv_head_count * text.cross_head_dim
                * workload.images * config.visual_tokens_per_image * 4)
    return int(weights + self_kv + cross_kv)


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PipelineRuns:
    """An export's Pipeline with its sessions and preprocessing under timers. Each `run` generates the workload once
    on new images; `result` sums up the timed runs. Two of these in one process interleave two exports' runs."""

    def __init__(self, export_dir: str | Path, workload: Workload, *, backend: str = "onnxruntime",
                 device: str = "auto", seed: int = 0, engines: str | Path | None = None, cuda_graph: bool = False,
                 probe: BandwidthProbe | None = None):
        self.export_dir, self.workload, self.probe = Path(export_dir), workload, probe
        self._rng = np.random.default_rng(seed)  # same seed, same images: two exports see the same workload
        self._log: dict[str, list[float]] = defaultdict(list)
        self._runs: dict[str, list[float]] = defaultdict(list)
        self.pipeline = Pipeline.open(self.export_dir, backend=backend, device=device, prefix_cache_bytes=0,
                                      engines=engines, cuda_graph=cuda_graph)
        try:
            self._prepare()
        except BaseException:
            self.pipeline.close()
            raise

    def _prepare(self) -> None:
        pipeline, processor, workload = self.pipeline, self.pipeline.processor, self.workload
        self.prompt = make_prompt(lambda p: processor.tokenize([p]).input_ids.shape[1],
                                  random_images(self._rng, workload.images), workload.prompt_tokens)
        self.prompt_tokens = processor.tokenize([self.prompt]).input_ids.shape[1]
        if self.prompt_tokens + workload.new_tokens > pipeline.max_context:
            raise PromptTooLongError(f"{self.prompt_tokens} prompt tokens + {workload.new_tokens} new tokens > "
                                     f"{pipeline.max_context}, the model's context; lower --prompt-tokens or "
                                     "--new-tokens")
        log = self._log
        pipeline.sessions = {name: _Timed(session, name, log) for name, session in pipeline.sessions.items()}
        preprocessor = processor.image_preprocessor  # the pipeline preprocesses one image at a time, here
        preprocessor.vision_feed = _Timed(preprocessor.vision_feed, "preprocess", log)
        processor.tokenize = _Timed(processor.tokenize, "preprocess", log)

    def run(self, *, timed: bool = True) -> None:
        """One generation of the workload on new images (no cache hits); `timed=False` for a warm-up."""
        log, runs = self._log, self._runs
        log.clear()
        prompt = [*random_images(self._rng, self.workload.images), self.prompt[-1]]
        if timed and self.probe:  # the bandwidth of this moment, for this run's floor (tools/bandwidth.py)
            runs["copy_bytes_per_s"].append(self.probe.measure())
        steps = list(self.pipeline.generate([prompt], max_new_tokens=self.workload.new_tokens, stop_token_ids=[]))
        if not timed:
            return
        decoder = log["decoder"]
        first, decode = step_speed(steps)  # the rates generate and demo report, computed in one place
        runs["ttft_s"].append(first)
        runs["decode_tokens_per_s"].append(decode)
        for name in ("preprocess", "vision", "resampler", "xattn_kv"):
            runs[name].append(sum(log[name]))
        runs["prefill"].append(decoder[0])
        runs["decode_per_token"].append(statistics.median(decoder[1:]) if len(decoder) > 1 else float("nan"))
        # a decode token's time outside the decoder graph: feeding, the cache update, sampling, stop checks, text
        outside = sum(step.seconds for step in steps[1:]) - sum(decoder[1:])
        runs["host_per_token_s"].append(outside / max(len(steps) - 1, 1))

    def result(self) -> dict:
        """Spreads of the timed runs, the prompt and the bytes a decode step reads (docs/bench.md)."""
        report = {name: asdict(Spread.of(values)) for name, values in self._runs.items()}
        past_slots = self.pipeline.cache_slots(self.prompt_tokens, self.workload.new_tokens)
        bytes_per_token = decode_bytes_per_token(self.export_dir, self.pipeline.config, self.workload, past_slots)
        floor = {}
        if self._runs.get("copy_bytes_per_s"):
            floors = [bytes_per_token / bandwidth for bandwidth in self._runs["copy_bytes_per_s"]]
            # each run's floor over its own decode step, measured moments apart
            fractions = Spread.of([f / step for f, step in zip(floors, self._runs["decode_per_token"])])
            floor = {"memory_bandwidth": {
                "copy_bytes_per_s": report["copy_bytes_per_s"]["median"],
                "copy_bytes_per_s_spread": report["copy_bytes_per_s"],
                "decode_floor_s": statistics.median(floors),
                "fraction_of_floor_reached": fractions.median, "fraction_of_floor_spread": asdict(fractions)}}
        return {"prompt_tokens": self.prompt_tokens, "stages_s": {s: report[s] for s in STAGES},
                "ttft_s": report["ttft_s"], "decode_tokens_per_s": report["decode_tokens_per_s"],
                "host_per_token_s": report["host_per_token_s"],
                # end-to-end decode rate / the decoder graph's own step rate (1 = no time outside the graph)
                "decode_rate_vs_step_rate": report["decode_tokens_per_s"]["median"]
                * report["decode_per_token"]["median"],
                "decode_bytes_per_token": bytes_per_token, "prompt": self.prompt[-1],
                "device_bytes": self.device_bytes(), **floor}

    def device_bytes(self) -> int | None:
        """GPU memory the backend's sessions allocated for their inputs and outputs (TensorRT), or None (a backend
        that does not report it)."""
        sizes = [getattr(session, "device_bytes", None) for session in self.pipeline.sessions.values()]
        return None if any(size is None for size in sizes) else int(sum(sizes))

    def close(self) -> None:
        self.pipeline.close()

    def __enter__(self) -> PipelineRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_pipeline(export_dir: str | Path, workload: Workload, *, backend: str = "onnxruntime",
                   device: str = "auto", seed: int = 0, on_run: Callable[[], None] | None = None,
                   engines: str | Path | None = None, cuda_graph: bool = False,
                   probe: BandwidthProbe | None = None) -> dict:
    """Per-stage latency, TTFT, decode tokens/s and peak RSS of the backend's pipeline on `workload` (with
    "tensorrt", the export's `engines`); with a `probe`, the decode's memory-bandwidth floor run by run."""
    with PipelineRuns(export_dir, workload, backend=backend, device=device, seed=seed, engines=engines,
                      cuda_graph=cuda_graph, probe=probe) as runs:
        for run in range(workload.runs + 1):
            runs.run(timed=run > 0)  # the first is a warm-up
            if run and on_run:
                on_run()
        result = runs.result()
    return {**result, "peak_rss_bytes": peak_rss()}


def bench_with_baseline(export_dir: str | Path, baseline: str | Path, workload: Workload, *,
                        backend: str = "onnxruntime", baseline_backend: str = "onnxruntime", device: str = "auto",
                        seed: int = 0, engines: str | Path | None = None,
                        cuda_graph: bool = False, probe: BandwidthProbe | None = None) -> tuple[dict, dict]:
    """The export and its baseline in one process on the same images and prompt, their timed runs interleaved
    (alternating which goes first), so that the machine's drift and noise fall on both alike.

    Peak RSS is the export's own, taken after its warm-up, before the baseline is opened; the baseline's is None
    (in the same process, its peak would include the export's).
    """
    options = {"device": device, "seed": seed, "probe": probe}
    with PipelineRuns(export_dir, workload, backend=backend, engines=engines, cuda_graph=cuda_graph,
                      **options) as ours:
        ours.run(timed=False)
        ours_rss = peak_rss()
        with PipelineRuns(baseline, workload, backend=baseline_backend, **options) as theirs:
            theirs.run(timed=False)
            for run in range(workload.runs):
                for side in ((ours, theirs) if run % 2 == 0 else (theirs, ours)):
                    side.run()
            return {**ours.result(), "peak_rss_bytes": ours_rss}, {**theirs.result(), "peak_rss_bytes": None}


def check_same_model(export_dir: Path, baseline: Path) -> None:
    """Refuse a baseline that is not an export of the same checkpoint: the same model config, and the same weights'
    sha256 where both exports record it (exports made before it was recorded are judged by the config alone).

    Raises:
        ExportError: naming the checkpoint each was exported from.
    """
    ours, theirs = (read_export_record(folder, verify_hashes=False) for folder in (export_dir, baseline))
    made = f"{export_dir} was exported from {ours.checkpoint}, the baseline {baseline} from {theirs.checkpoint}"
    fix = f"pass as --baseline the fp32 export of {ours.checkpoint} (flamingo-edge export {ours.checkpoint} -o OUT)"
    differences = config_differences(ours.config, theirs.config)
    if differences:
        raise ExportError(f"{made}, another model ({'; '.join(differences[:3])}); {fix}")
    if ours.checkpoint_sha256 and theirs.checkpoint_sha256 and ours.checkpoint_sha256 != theirs.checkpoint_sha256:
        raise ExportError(f"{made}, other weights (sha256 {ours.checkpoint_sha256[:16]} vs "
                          f"{theirs.checkpoint_sha256[:16]}); {fix}")


def bench_transformers(checkpoint: Path, prompt_text: str, workload: Workload, seed: int) -> dict:
    """transformers' own model (IdeficsForVisionText2Text, or MllamaForConditionalGeneration for a Llama 3.2 Vision
    checkpoint) and processor, `generate` on the same workload."""
    require("transformers", "test", "bench --reference of an IDEFICS or mllama checkpoint (transformers' own model)")
    import torch
    from PIL import Image
    from transformers import AutoProcessor, IdeficsForVisionText2Text, MllamaForConditionalGeneration

    mllama = read_json(checkpoint / "config.json").get("model_type") == "mllama"
    model = (MllamaForConditionalGeneration if mllama else IdeficsForVisionText2Text).from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(seed)

    def inputs(images):
        pictures = [Image.fromarray(i) for i in images]
        if mllama:  # the images lead, as our prompt's items do
            return processor(images=[pictures], text=[processor.image_token * len(pictures) + prompt_text],
                             return_tensors="pt")
        return processor(text=[[*pictures, prompt_text]], return_tensors="pt")

    def generate(images, n):
        with torch.no_grad():
            model.generate(**inputs(images), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return _two_point(generate, rng, workload)


def bench_pytorch_reference(checkpoint: Path, prompt_text: str, workload: Workload, seed: int) -> dict:
    """Our PyTorch reference model (greedy with its KV cache) on the same workload."""
    from flamingo_edge.models import load_checkpoint
    from flamingo_edge.models.generate import greedy_generate
    from flamingo_edge.runtime.processor import Processor

    model, processor = load_checkpoint(checkpoint), Processor.from_pretrained(checkpoint)
    rng = np.random.default_rng(seed)

    def generate(images, n):
        greedy_generate(model, processor([[*images, prompt_text]]), max_new_tokens=n, stop_token_ids=(),
                        pad_token_id=0)

    return _two_point(generate, rng, workload)


def _two_point(generate, rng, workload: Workload) -> dict:
    """TTFT = time of 1 token; decode tokens/s = (N - 1) / (t(N) - t(1)); new images every run; one warm-up."""
    runs = defaultdict(list)
    for run in range(workload.runs + 1):
        images = random_images(rng, workload.images)
        one = _seconds(lambda: generate(images, 1))
        full = _seconds(lambda: generate(images, workload.new_tokens))
        if run:
            runs["ttft_s"].append(one)
            runs["decode_tokens_per_s"].append((workload.new_tokens - 1) / max(full - one, 1e-9))
    return {name: asdict(Spread.of(values)) for name, values in runs.items()}


def ratios(ours: dict, theirs: dict) -> dict:
    """{decode: our tokens/s ÷ theirs, ttft: their time to first token ÷ ours} (above 1: we are faster)."""
    return {"decode": ours["decode_tokens_per_s"]["median"] / theirs["decode_tokens_per_s"]["median"],
            "ttft": theirs["ttft_s"]["median"] / ours["ttft_s"]["median"]}


def stage_ratios(ours: dict, theirs: dict) -> dict:
    """{stage: their median seconds ÷ ours} for each stage (above 1: ours is faster)."""
    return {stage: theirs["stages_s"][stage]["median"] / ours["stages_s"][stage]["median"] for stage in STAGES}


def bench_lengths(export_dir: str | Path, workload: Workload, prompt_lengths: list[int], *,
                  on_stage: Callable[[str], None] | None = None, **options) -> dict:
    """`bench` at every prompt length of `prompt_lengths`, one after the other in this process (each with its own
    references and bandwidth measurement): {"version", "prompt_lengths", "reports": [a `bench` report per length]}."""
    from flamingo_edge.config import FlamingoConfig

    context = FlamingoConfig.from_dict(read_export_record(export_dir, verify_hashes=False).config).decoder.max_positions
    if max(prompt_lengths) + workload.new_tokens > context:  # before the shorter lengths' minutes of work
        raise PromptTooLongError(f"{max(prompt_lengths)} prompt tokens + {workload.new_tokens} new tokens > {context}, "
                                 "the model's context; lower --prompt-tokens or --new-tokens")
    reports = []
    for length in prompt_lengths:
        stage = (lambda name, length=length: on_stage(f"{length} tokens: {name}")) if on_stage else None
        reports.append(bench(export_dir, replace(workload, prompt_tokens=length), on_stage=stage, **options))
    return {"version": REPORT_VERSION, "prompt_lengths": list(prompt_lengths), "reports": reports}


def bench(export_dir: str | Path, workload: Workload, *, backend: str = "onnxruntime", device: str = "auto",
          reference: str | Path | None = None, baseline: str | Path | None = None, seed: int = 0,
          on_stage: Callable[[str], None] | None = None, engines: str | Path | None = None,
          cuda_graph: bool = False) -> dict:
    """The whole `flamingo-edge bench` report (docs/bench.md describes every key). With backend "tensorrt",
    `engines` is the engines folder of `export_dir` (the baseline, if any, runs on ONNX Runtime: its engines are
    not known). A baseline (an export of the same checkpoint, e.g. the fp32 one a quantized export was made from)
    runs interleaved with the export, in the same process, on the same images and prompt.

    Raises:
        ExportError: the baseline is an export of another checkpoint.
    """
    import os

    export_dir = Path(export_dir)
    if baseline is not None:
        check_same_model(export_dir, Path(baseline))
    if reference is not None:  # before the backend's runs, not minutes later
        require("torch", "export", "bench --reference (the PyTorch reference)")
    stage = on_stage or (lambda name: None)
    options = {"device": device, "seed": seed, "engines": engines, "cuda_graph": cuda_graph}
    with BandwidthProbe() as probe:
        if baseline is None:
            stage("backend")
            ours, theirs = bench_pipeline(export_dir, workload, backend=backend, probe=probe, **options), None
        else:
            stage("backend and baseline")
            ours, theirs = bench_with_baseline(export_dir, baseline, workload, backend=backend, probe=probe,
                                               baseline_backend="onnxruntime" if engines else backend, **options)
    report = {"version": REPORT_VERSION, "export": str(export_dir), "backend": backend, "device": device,
              "engines": str(engines) if engines else None,
              "workload": asdict(workload), "cpu_count": os.cpu_count(), "backend_result": ours,
              "memory_bandwidth": ours.pop("memory_bandwidth"),
              "gpu_memory_bytes": ours.get("device_bytes")}
    report["precision"] = read_export_record(export_dir, verify_hashes=False).precision
    if theirs is not None:
        baseline_record = read_export_record(baseline, verify_hashes=False)
        report.update(baseline=str(baseline), baseline_precision=baseline_record.precision, baseline_result=theirs,
                      speedup_vs_baseline=ratios(ours, theirs),
                      stage_speedup_vs_baseline=stage_ratios(ours, theirs),
                      baseline_memory_bandwidth=theirs.pop("memory_bandwidth"))
    if reference is not None:
        from flamingo_edge.models.checkpoint import is_own_format, resolve_checkpoint

        checkpoint = resolve_checkpoint(reference)
        stage("transformers")
        if is_own_format(checkpoint):  # converted (e.g. from open_flamingo): transformers has no class for it
            theirs, speedup = None, None
            report["transformers_skipped"] = ("a converted checkpoint: transformers cannot load it; its upstream "
                                              "(open_flamingo) runs only in its own environment")
        else:
            theirs = bench_transformers(checkpoint, ours["prompt"], workload, seed)
            speedup = ratios(ours, theirs)
        stage("pytorch reference")
        torch_ref = bench_pytorch_reference(checkpoint, ours["prompt"], workload, seed)
        report.update(reference=str(checkpoint), transformers=theirs, pytorch_reference=torch_ref,
                      speedup_vs_transformers=speedup, speedup_vs_pytorch_reference=ratios(ours, torch_ref))
    return report
