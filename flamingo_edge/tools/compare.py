"""Parity of an export (on a runtime backend) with the PyTorch reference, per graph, per layer and end to end.

    reference = Pipeline(sessions = PyTorch graph wrappers)   backend = Pipeline.open(export, backend)
         │ same prompts and images                                 │
         ├─ records the feed each graph really sees ──────────────▶ per graph: the backend session on that feed
         ├─ per-layer outputs (forward hooks) ◀── matched ──────── per layer: the ONNX tensor leaving the layer's scope
         └─ logits, greedy tokens ◀──────────── compared ───────── logits, greedy tokens

Both pipelines run the same runtime code (processor, caches, generation), so every difference comes from the graphs
and the backend. Each graph is fed the reference's own inputs, so an error is localized to the graph that makes it
instead of being carried down the chain. Per-layer probes name the first layer whose output leaves the tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flamingo_edge.extras import require

# Before importing torch, so that the base install gets the typed error naming the extra, not a ModuleNotFoundError.
require("torch", "export", "comparing an export with the PyTorch reference (flamingo_edge.tools.compare)")

import torch  # noqa: E402

from flamingo_edge.artifacts import read_export_record
from flamingo_edge.graphs import GRAPH_NAMES, GraphSpec, build_graphs
from flamingo_edge.models.checkpoint import load_checkpoint, resolve_checkpoint
from flamingo_edge.config import FlamingoConfig, config_differences
from flamingo_edge.precision import WEIGHT_ONLY_PRECISIONS, Precision
from flamingo_edge.runtime.backend import RecordingSession
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import Processor
from flamingo_edge.tolerances import (FP16_TOP1_AGREEMENT, INT8_TASK_METRIC_DROP, LOGITS_REL_TOL,
                                      WEIGHT_ONLY_TOP1_AGREEMENT, relative_error)

logger = logging.getLogger(__name__)

REPORT_VERSION = 1


@dataclass(frozen=True)
class TensorDiff:
    """How far `actual` is from `expected`: max |a - e|, that over max |e|, and cosine similarity of the flattened
    tensors (1.0 for two all-zero tensors)."""

    max_abs: float
    max_rel: float
    cosine: float

    @classmethod
    def of(cls, actual: np.ndarray, expected: np.ndarray) -> TensorDiff:
        a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
        norms = float(np.linalg.norm(a) * np.linalg.norm(e))
        cosine = float(a @ e / norms) if norms > 0 else float(np.array_equal(a, e))
        return cls(float(np.abs(a - e).max(initial=0.0)), relative_error(a, e), cosine)


@dataclass
class LayerDiff:
    name: str  # the PyTorch module path inside the graph, e.g. "decoder.layers.1"
    diff: TensorDiff


@dataclass
class GraphReport:
    outputs: dict[str, TensorDiff]
    layers: list[LayerDiff] = field(default_factory=list)
    max_rel: float = 0.0
    passed: bool = True
    first_divergent_layer: str | None = None


class TorchSession:
    """A graph's PyTorch wrapper behind the runtime's Session protocol (compare records its feeds with the
    runtime's RecordingSession, the first of each kind: the decoder's prefill and its decode steps)."""

    def __init__(self, spec: GraphSpec, module: torch.nn.Module):
        self.spec, self.module = spec, module

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            # a read-only feed (the pipeline's cross K/V) is copied: torch tensors over read-only memory are undefined
            outputs = self.module(*(torch.from_numpy(np.require(feed[name], requirements="W"))
                                    for name in self.spec.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: tensor.numpy().copy() for name, tensor in zip(self.spec.output_names, outputs)}

    def probes(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output of every layer (each child of a ModuleList), in the order they ran, by module path."""
        seen: dict[str, np.ndarray] = {}
        handles = []
        for path, module in _layers(self.module):
            def hook(_, __, output, path=path):
                first = output[0] if isinstance(output, tuple) else output
                seen.setdefault(path, first.detach().numpy().copy())
            handles.append(module.register_forward_hook(hook))
        try:
            self.run(feed)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def close(self) -> None:
        pass

    def __enter__(self) -> TorchSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every child of every ModuleList: the repeated blocks a divergence is localized to."""
    return [(f"{path}.{index}", child) for path, parent in module.named_modules()
            if isinstance(parent, torch.nn.ModuleList) for index, child in enumerate(parent)]


def onnx_layer_outputs(path: Path, feed: Mapping[str, np.ndarray], layers: list[str]) -> dict[str, list[np.ndarray]]:
    """Every tensor that leaves each layer's scope in an ONNX graph, computed by ONNX Runtime on `feed`.

    The TorchScript exporter names a module's nodes after its path ("/decoder/layers.1/mlp/..."), so a layer's
    outputs are the tensors its nodes make that a node outside it (or the graph output) reads.
    """
    import onnx
    import onnxruntime

    from flamingo_edge.graphs import SEQLENS_K
    from flamingo_edge.runtime.onnxruntime_backend import in_place_feed

    model = onnx.load(str(path))
    producers = {}  # tensor -> scope of the node that makes it
    for node in model.graph.node:
        for out in node.output:
            producers[out] = node.name
    scopes = {layer: _scope(layer) for layer in layers}
    leaving: dict[str, list[str]] = {layer: [] for layer in layers}
    readers = [(node.name, list(node.input)) for node in model.graph.node]
    readers.append(("", [o.name for o in model.graph.output]))
    for reader, inputs in readers:
        for tensor in inputs:
            maker = producers.get(tensor, "")
            for layer, scope in scopes.items():
                if maker.startswith(scope) and not reader.startswith(scope) and tensor not in leaving[layer]:
                    leaving[layer].append(tensor)
    existing = {o.name for o in model.graph.output}
    extra = [t for tensors in leaving.values() for t in tensors if t not in existing]
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(extra))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if SEQLENS_K in {value.name for value in session.get_inputs()}:  # a decoder that writes the cache in place
        feed = in_place_feed(feed)[0]
    values = dict(zip(names, session.run(names, dict(feed))))
    return {layer: [values[t] for t in tensors] for layer, tensors in leaving.items()}


def _scope(path: str) -> str:
    """The TorchScript exporter's node-name prefix for a module path: "decoder.layers.1" -> "/decoder/layers.1/"
    (a ModuleList child keeps its index after a dot)."""
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def _match(expected: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray | None:
    """The last candidate with the reference output's shape (a layer's result is made after its side outputs)."""
    same = [c for c in candidates if c.shape == expected.shape]
    return same[-1] if same else None


@dataclass
class GraphRun:
    """One feed of a graph and what each side made of it."""

    feed: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    backend: dict[str, np.ndarray]


def compare_graph(name: str, reference: RecordingSession, backend_session, graph_file: Path | None,
                  tolerance: float, runs: list[GraphRun] | None = None) -> GraphReport:
    """One graph on the reference's first recorded feed (and each later one, e.g. a decode step); each feed and
    both sides' outputs are appended to `runs` when given."""
    outputs: dict[str, TensorDiff] = {}
    for index, feed in enumerate(reference.feeds):
        expected, actual = reference.run(feed), backend_session.run(feed)
        if runs is not None:
            runs.append(GraphRun(feed, expected, actual))
        for out in reference.spec.output_names:
            key = out if index == 0 else f"{out}@{'decode' if name == 'decoder' else f'feed{index}'}"
            outputs[key] = TensorDiff.of(actual[out], expected[out])
    report = GraphReport(outputs=outputs)
    report.max_rel = max((d.max_rel for d in outputs.values()), default=0.0)
    report.passed = report.max_rel <= tolerance
    if graph_file is not None and reference.feeds:
        feed = reference.feeds[0]
        expected = reference.probes(feed)
        found = onnx_layer_outputs(graph_file, feed, list(expected))
        for layer, value in expected.items():
            actual = _match(value, found.get(layer, []))
            if actual is None:
                logger.info("%s: no tensor of shape %s leaves %s in the graph; not compared", name, value.shape,
                            layer)
                continue
            report.layers.append(LayerDiff(layer, TensorDiff.of(actual, value)))
        report.first_divergent_layer = next((l.name for l in report.layers if l.diff.max_rel > tolerance), None)
    return report


@dataclass
class EndToEnd:
    logits: TensorDiff
    top1_agreement: float  # over every real prompt position
    top1_agreement_per_position: list[list[bool]]  # per prompt, per real position
    first_divergent_token: dict  # {"teacher_forced": int | None, "free_running": int | None}
    generated: dict  # {"reference": [texts], "backend": [texts]}


def _real_logits(pipeline: Pipeline, prompts: list) -> list[np.ndarray]:
    """Each prompt's logits at its real (unpadded) positions, [S_i, V], one prompt at a time."""
    return [pipeline.logits([prompt])[0] for prompt in prompts]


def _first_difference(a: list, b: list) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_end_to_end(reference: Pipeline, backend: Pipeline, prompts: list, new_tokens: int) -> EndToEnd:
    ours, theirs = _real_logits(backend, prompts), _real_logits(reference, prompts)
    diff = TensorDiff.of(np.concatenate([o.reshape(-1) for o in ours]), np.concatenate([t.reshape(-1) for t in theirs]))
    agree = [(o.argmax(-1) == t.argmax(-1)).tolist() for o, t in zip(ours, theirs)]
    total = sum(len(a) for a in agree)
    ref_gen = reference.complete(prompts, max_new_tokens=new_tokens)
    back_gen = backend.complete(prompts, max_new_tokens=new_tokens)
    free = [_first_difference(r.token_ids, b.token_ids) for r, b in zip(ref_gen, back_gen)]
    forced = []
    for prompt, completion in zip(prompts, ref_gen):  # the reference's continuation fed to both
        prompt_ids = reference.processor.tokenize([prompt]).input_ids[0]
        length, ids = len(prompt_ids), np.concatenate([prompt_ids, completion.token_ids])
        ref_next = _forced_argmax(reference, prompt, ids)[length - 1:]
        back_next = _forced_argmax(backend, prompt, ids)[length - 1:]
        forced.append(_first_difference(ref_next.tolist(), back_next.tolist()))
    return EndToEnd(diff, sum(map(sum, agree)) / max(total, 1), agree,
                    {"teacher_forced": _earliest(forced), "free_running": _earliest(free)},
                    {"reference": [c.text for c in ref_gen], "backend": [c.text for c in back_gen]})


def _earliest(indices: list[int | None]) -> int | None:
    found = [i for i in indices if i is not None]
    return min(found) if found else None


def _forced_argmax(pipeline: Pipeline, prompt: list, ids: np.ndarray) -> np.ndarray:
    """Greedy next token at every position of `ids` (the prompt's tokens plus a continuation), one prefill."""
    from flamingo_edge.runtime.generation import run_decoder
    from flamingo_edge.runtime.kv_cache import SelfAttentionCache

    batch = pipeline.processor.tokenize([prompt])
    cross = pipeline.rows_kv(batch.images, batch.image_attention_mask.shape[2])
    extra = len(ids) - batch.input_ids.shape[1]
    # The continuation attends to the same images as the prompt's last position.
    image_mask = np.concatenate([batch.image_attention_mask,
                                 np.repeat(batch.image_attention_mask[:, -1:], extra, axis=1)], axis=1)
    text = pipeline.config.decoder
    cache = SelfAttentionCache(layers=text.self_attention_layers, batch=1, heads=text.kv_head_count, head_dim=text.head_dim,
                               capacity=len(ids))
    logits = run_decoder(pipeline.sessions["decoder"], ids[None].astype(np.int64),
                         np.ones((1, len(ids)), np.int64), cache, cross, image_mask)
    return logits[0].argmax(-1)


@dataclass
class CompareReport:
    """The JSON report of `flamingo-edge compare` (docs/compare.md describes every key)."""

    version: int
    checkpoint: str
    export: str
    backend: str
    precision: str
    tolerance: dict
    graphs: dict[str, GraphReport]
    end_to_end: EndToEnd
    task: dict | None
    passed: bool
    failures: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def reference_pipeline(checkpoint: Path, export_dir: Path, config: FlamingoConfig) -> Pipeline:
    """A Pipeline whose four sessions are the PyTorch graph wrappers of the checkpoint's reference model."""
    from flamingo_edge.export.wrappers import WRAPPERS

    model = load_checkpoint(checkpoint)
    specs = build_graphs(config)
    sessions = {name: RecordingSession(TorchSession(specs[name], WRAPPERS[name](model).eval()), first_per_kind=True)
                for name in GRAPH_NAMES}
    return Pipeline(config=config, sessions=sessions, processor=Processor.from_pretrained(export_dir),
                    max_context=config.decoder.max_positions, max_images=16, image_cache_size=64,
                    prefix_cache_bytes=0)


def write_polygraphy(out_dir: Path, graph: str, runs: list[GraphRun], backend: str) -> list[Path]:
    """`<graph>_inputs.json` (the feeds, for `polygraphy run --load-inputs`) and `<graph>_outputs.json` (a
    Polygraphy RunResults with one runner per side, for `--load-outputs` or `polygraphy inspect data`)."""
    try:
        from polygraphy.comparator import IterationResult, RunResults
        from polygraphy.json import to_json
    except ImportError:
        from flamingo_edge.errors import FeatureUnavailableError

        raise FeatureUnavailableError("--polygraphy needs Polygraphy: pip install polygraphy") from None
    from flamingo_edge.artifacts import atomic_write

    results = RunResults()
    for runner, side in (("pytorch", "reference"), (backend, "backend")):
        results.append((runner, [IterationResult(outputs=getattr(run, side), runner_name=runner) for run in runs]))
    inputs, outputs = out_dir / f"{graph}_inputs.json", out_dir / f"{graph}_outputs.json"
    atomic_write(inputs, to_json([run.feed for run in runs]).encode())
    atomic_write(outputs, to_json(results).encode())
    return [inputs, outputs]


def check_exported_from(checkpoint: Path, export_dir: Path, record) -> None:
    """Refuse an export made from another checkpoint, before any weight is loaded: the recorded model config must
    be the checkpoint's, and the recorded hash of the weights (exports since it is recorded) theirs.

    Raises:
        CheckpointError: naming the checkpoint the export was made from.
    """
    from flamingo_edge.artifacts import checkpoint_digest
    from flamingo_edge.errors import CheckpointError
    from flamingo_edge.models.checkpoint import load_config, weight_files

    made_from = f"{export_dir} was exported from {record.checkpoint}"
    fix = (f"pass that checkpoint, or export this one and compare that export (flamingo-edge export {checkpoint} "
           "-o OUT)")
    differences = config_differences(load_config(checkpoint).to_dict(), record.config)
    if differences:
        raise CheckpointError(f"{made_from}, a model unlike {checkpoint} ({'; '.join(differences[:3])}); {fix}")
    if record.checkpoint_sha256 and checkpoint_digest(weight_files(checkpoint)) != record.checkpoint_sha256:
        raise CheckpointError(f"{made_from} (weights sha256 {record.checkpoint_sha256[:16]}), not from the weights "
                              f"of {checkpoint}; {fix}")


def compare(checkpoint: str | Path, export_dir: str | Path, prompts: list, *, backend: str = "onnxruntime",
            new_tokens: int = 12, task_n: int = 0, on_stage=None, polygraphy_dir: str | Path | None = None,
            engines: str | Path | None = None, cuda_graph: bool = False) -> CompareReport:
    """Compare an export run by `backend` with the checkpoint's PyTorch reference.

    Args:
        checkpoint: the checkpoint folder (or "demo").
        export_dir: its export folder.
        prompts: prompts as the Processor takes them (lists of text and uint8 RGB images).
        backend: the runtime backend that runs the export ("onnxruntime" or "tensorrt").
        engines, cuda_graph: with "tensorrt", the export's engines folder, and whether decode steps replay CUDA graphs.
        new_tokens: greedy tokens generated per prompt for the token comparisons.
        task_n: held-out demo scenes to score on both sides (0: skip); only for the demo checkpoint.
        on_stage: called with a short name as each stage starts (progress).
        polygraphy_dir: also write each graph's feeds and both sides' outputs here in Polygraphy's formats.

    Raises:
        CheckpointError: the export was made from another checkpoint (its export.json says which).
    """
    stage = on_stage or (lambda name: None)
    checkpoint, export_dir = resolve_checkpoint(checkpoint), Path(export_dir)
    record = read_export_record(export_dir)
    check_exported_from(checkpoint, export_dir, record)
    config = FlamingoConfig.from_dict(record.config)
    tolerance = LOGITS_REL_TOL
    failures = []
    stage("reference")
    reference = reference_pipeline(checkpoint, export_dir, config)
    open_options = {"backend": backend, "engines": engines, "cuda_graph": cuda_graph}
    with Pipeline.open(export_dir, prefix_cache_bytes=0, **open_options) as under_test:
        stage("end to end")
        end_to_end = compare_end_to_end(reference, under_test, prompts, new_tokens)
        graphs = {}
        for name in GRAPH_NAMES:
            stage(name)
            graph_file = export_dir / record.graphs[name].file if backend == "onnxruntime" else None
            runs: list[GraphRun] = []
            graphs[name] = compare_graph(name, reference.sessions[name], under_test.sessions[name], graph_file,
                                         tolerance, runs)
            if polygraphy_dir is not None:
                write_polygraphy(Path(polygraphy_dir), name, runs, backend)
    task = None
    if task_n and _is_demo(checkpoint):
        stage("task")
        task = _task_accuracy(checkpoint, export_dir, open_options, task_n)
    rules = {"relative_error": tolerance}
    if record.precision == Precision.FP32:  # every tensor within the fp32 tolerance
        for name, graph in graphs.items():
            if not graph.passed:
                where = f", first at layer {graph.first_divergent_layer}" if graph.first_divergent_layer else ""
                failures.append(f"graph {name}: relative error {graph.max_rel:.3g} > {tolerance:g}{where}")
        if end_to_end.logits.max_rel > tolerance:
            failures.append(f"end to end: logits relative error {end_to_end.logits.max_rel:.3g} > {tolerance:g}")
    else:
        failures += _judge_quantized(Precision(record.precision), end_to_end, task, rules)
    return CompareReport(REPORT_VERSION, str(checkpoint), str(export_dir), backend, record.precision, rules, graphs,
                         end_to_end, task, not failures, failures)


def _judge_quantized(precision: Precision, end_to_end: EndToEnd, task: dict | None, rules: dict) -> list[str]:
    """The failures of a quantized export, and its rules added to `rules`: int8 by the task metric (top-1 agreement
    without a task to score), weight-only precisions by the task metric and top-1 agreement, fp16 by top-1."""
    failures = []
    if task is not None and precision in (Precision.INT8, *WEIGHT_ONLY_PRECISIONS):
        rules["task_metric_drop"] = INT8_TASK_METRIC_DROP  # the task metric may drop this much, no more
        for metric in ("answer_accuracy", "caption_accuracy"):
            drop = task["reference"][metric] - task["backend"][metric]
            if drop > INT8_TASK_METRIC_DROP:
                failures.append(f"task: {metric} drops by {drop:.3f} > {INT8_TASK_METRIC_DROP}")
    if precision == Precision.INT8 and task is not None:
        return failures
    threshold = WEIGHT_ONLY_TOP1_AGREEMENT[precision] if precision in WEIGHT_ONLY_PRECISIONS else FP16_TOP1_AGREEMENT
    rules["top1_agreement"] = threshold
    if end_to_end.top1_agreement < threshold:
        failures.append(f"end to end: top-1 agreement {end_to_end.top1_agreement:.4f} < {threshold}")
    return failures


def _is_demo(checkpoint: Path) -> bool:
    """Whether `checkpoint` is the folder the word `demo` names (there may be none)."""
    from flamingo_edge.errors import CheckpointError
    from flamingo_edge.models.checkpoint import DEMO

    try:
        return checkpoint.resolve() == resolve_checkpoint(DEMO).resolve()
    except CheckpointError:
        return False


def _task_accuracy(checkpoint: Path, export_dir: Path, open_options: dict, n: int) -> dict:
    from flamingo_edge.demo.evaluate import evaluate, pipeline_answerer, pytorch_answerer

    reference = evaluate(pytorch_answerer(checkpoint), n=n).to_dict()
    ours = evaluate(pipeline_answerer(export_dir, **open_options), n=n).to_dict()
    return {"n": n, "reference": reference, "backend": ours}
