"""PyTorch -> ONNX: one generic function for every graph, plus the whole-model export with its record.

    checkpoint --load_checkpoint--> FlamingoModel --WRAPPERS[name]--> nn.Module per graph
        --torch.onnx.export--> <tmp>/<name>.onnx --check_graph--> --verify_graph (ORT vs PyTorch)--> OUT/<name>.onnx
    OUT/export.json is written last: a folder without it (or whose hashes differ) is not an export. The whole folder
    is written under a temporary name next to OUT and renamed when complete (`artifacts.atomic_folder`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from flamingo_edge import __version__
from flamingo_edge.artifacts import (EXPORT_RECORD, OPSETS, ExportRecord, GraphFile, atomic_folder, atomic_write,
                                    check_new_folder, checkpoint_digest, sha256_of)
from flamingo_edge.errors import CheckpointError, ExportError, ParityError, UsageError
from flamingo_edge.export.checks import check_graph
from flamingo_edge.export.wrappers import WRAPPERS
from flamingo_edge.graphs import CONTRACT_VERSION, DEFAULT_OPSET, GRAPH_NAMES, GraphSpec, build_graphs, example_feed
from flamingo_edge.models.checkpoint import load_checkpoint, resolve_checkpoint, weight_files
from flamingo_edge.models.flamingo import FlamingoModel
from flamingo_edge.tolerances import LOGITS_REL_TOL, relative_error

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GB limit, with headroom for the graph itself
# Sizes of the dynamic axes used to trace (all > 1, so no axis is specialised) and to check on fresh inputs
# (P = 0 prefill and S = 1 decode included).
TRACE_SIZES = {"N": 2, "F": 1, "B": 2, "S": 3, "P": 4, "M": 2}
CHECK_SIZES = ({"N": 1, "F": 1, "B": 1, "S": 7, "P": 0, "M": 1}, {"N": 3, "F": 2, "B": 2, "S": 1, "P": 5, "M": 3})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json")


def _sizes(model: FlamingoModel, sizes: dict[str, int]) -> dict[str, int]:
    return {**sizes, "L": model.config.visual_tokens_per_slot}


def _torch_inputs(spec: GraphSpec, feed: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(feed[name]) for name in spec.input_names)


def fold_initializer_tanh(graph: onnx.ModelProto) -> int:
    """Replace Tanh(initializer) by its value: the gates tanh(alpha) are constants of the graph (DESIGN.md).

    The TorchScript exporter's constant folding leaves these Tanh nodes in place. Returns how many were folded.
    """
    initializers = {init.name: init for init in graph.graph.initializer}
    folded = [node for node in graph.graph.node if node.op_type == "Tanh" and node.input[0] in initializers]
    for node in folded:
        value = np.tanh(onnx.numpy_helper.to_array(initializers[node.input[0]]))
        graph.graph.initializer.append(onnx.numpy_helper.from_array(value, name=node.output[0]))
        graph.graph.node.remove(node)
    used = {name for node in graph.graph.node for name in node.input}
    for name in {node.input[0] for node in folded} - used:
        graph.graph.initializer.remove(initializers[name])
    return len(folded)


def decompose_layer_norm(graph: onnx.ModelProto) -> int:
    """Rewrite every LayerNormalization (last axis) with ReduceMean, Sub, Mul, Add, Sqrt and Div, in place.

    TensorRT 8.5 (JetPack 5) has no LayerNormalization importer; these primitives import everywhere. The graph is
    still checked against PyTorch afterwards. Returns how many nodes were rewritten.

    Raises:
        ExportError: a LayerNormalization over other than the last axis, or one whose mean/inv-std outputs are used.
    """
    opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    nodes, count = [], 0
    for node in graph.graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("axis", -1) != -1 or any(name for name in node.output[1:]):
            raise ExportError(f"{node.name}: only a LayerNormalization over the last axis with one output can be "
                              "decomposed")
        x, scale, bias = node.input[0], node.input[1], node.input[2] if len(node.input) > 2 else ""
        name = f"{node.name or f'LayerNorm{count}'}/decomposed"
        epsilon = onnx.numpy_helper.from_array(np.array(attributes.get("epsilon", 1e-5), np.float32), f"{name}/eps")
        graph.graph.initializer.append(epsilon)

        def reduce_mean(source: str, out: str) -> onnx.NodeProto:
            if opset >= 18:  # axes became an input
                axes = onnx.numpy_helper.from_array(np.array([-1], np.int64), f"{out}/axes")
                graph.graph.initializer.append(axes)
                return onnx.helper.make_node("ReduceMean", [source, axes.name], [out], keepdims=1)
            return onnx.helper.make_node("ReduceMean", [source], [out], axes=[-1], keepdims=1)

        normalized = f"{name}/normalized" if bias or scale else node.output[0]
        nodes += [
            reduce_mean(x, f"{name}/mean"),
            onnx.helper.make_node("Sub", [x, f"{name}/mean"], [f"{name}/centered"]),
            onnx.helper.make_node("Mul", [f"{name}/centered", f"{name}/centered"], [f"{name}/squared"]),
            reduce_mean(f"{name}/squared", f"{name}/variance"),
            onnx.helper.make_node("Add", [f"{name}/variance", epsilon.name], [f"{name}/variance_eps"]),
            onnx.helper.make_node("Sqrt", [f"{name}/variance_eps"], [f"{name}/std"]),
            onnx.helper.make_node("Div", [f"{name}/centered", f"{name}/std"], [normalized]),
        ]
        if bias:
            nodes.append(onnx.helper.make_node("Mul", [normalized, scale], [f"{name}/scaled"]))
            nodes.append(onnx.helper.make_node("Add", [f"{name}/scaled", bias], [node.output[0]]))
        else:
            nodes.append(onnx.helper.make_node("Mul", [normalized, scale], [node.output[0]]))
        count += 1
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    return count


def export_graph(spec: GraphSpec, module: nn.Module, feed: dict[str, np.ndarray], out_dir: Path, *,
                 opset: int = DEFAULT_OPSET, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 decompose_layernorm: bool = False) -> GraphFile:
    """Export one graph to OUT/<name>.onnx, checked against the contract, written atomically.

    Args:
        spec: the graph's contract entry; the module's forward takes its inputs in order.
        module: the wrapper module to trace.
        feed: example inputs (numpy, by name) to trace with.
        out_dir: destination folder.
        opset: ONNX opset.
        external_data_threshold: graphs whose weights exceed this many bytes keep them in <name>.onnx.data.
        decompose_layernorm: write LayerNormalization with primitive ops (for TensorRT 8.5).

    Returns:
        The GraphFile entry for export.json.

    Raises:
        GraphContractError: the traced graph breaks the contract.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".export-{spec.name}-") as tmp:
        traced, final = Path(tmp) / "traced.onnx", Path(tmp) / f"{spec.name}.onnx"
        # The TorchScript exporter (dynamo=False) is deprecated but is the one that gives plain, TensorRT-friendly
        # graphs with named dynamic axes; silence its deprecation notice.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module.eval(), _torch_inputs(spec, feed), str(traced), input_names=spec.input_names,
                output_names=spec.output_names, opset_version=opset, dynamo=False,
                dynamic_axes={t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)},
            )
        graph = onnx.load(str(traced))
        fold_initializer_tanh(graph)
        if decompose_layernorm:
            decompose_layer_norm(graph)
        external = sum(t.ByteSize() for t in graph.graph.initializer) > external_data_threshold
        data_name = f"{spec.name}.onnx.data" if external else None
        onnx.save_model(graph, str(final), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=0)
        check_graph(final, spec)
        entry = GraphFile(file=final.name, sha256=sha256_of(final), data_file=data_name,
                          data_sha256=sha256_of(Path(tmp) / data_name) if external else None)
        if external:  # data first: the .onnx that points at it appears last
            (Path(tmp) / data_name).replace(out_dir / data_name)
        final.replace(out_dir / final.name)
    return entry


def verify_graph(path: Path, spec: GraphSpec, module: nn.Module, feeds: list[dict[str, np.ndarray]]) -> float:
    """ONNX Runtime (CPU) against PyTorch on the given inputs; returns the worst relative error.

    Raises:
        ParityError: listing every output over LOGITS_REL_TOL, with its error and input sizes.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    failures, worst = [], 0.0
    for feed in feeds:
        actual = dict(zip(spec.output_names, session.run(spec.output_names, feed)))
        with torch.no_grad():
            expected = module(*_torch_inputs(spec, feed))
        expected = expected if isinstance(expected, tuple) else (expected,)
        for name, reference in zip(spec.output_names, expected):
            error = relative_error(actual[name], reference.numpy())
            worst = max(worst, error)
            if not error <= LOGITS_REL_TOL:
                shapes = {k: v.shape for k, v in feed.items()}
                failures.append(f"{name}: max abs error {error:.2e} x max|value| (inputs {shapes})")
    if failures:
        raise ParityError(f"{spec.name}: ONNX Runtime differs from PyTorch beyond {LOGITS_REL_TOL}: "
                          + "; ".join(failures))
    return worst


def _check_tokenizer(checkpoint: Path) -> None:
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint}: no tokenizer.json; the runtime needs the fast-tokenizer file: save it "
                              "with AutoTokenizer.from_pretrained(checkpoint).save_pretrained(checkpoint) (a folder "
                              "written by flamingo-edge convert: convert it again)")


def _copy_tokenizer_files(checkpoint: Path, out_dir: Path) -> list[str]:
    _check_tokenizer(checkpoint)
    copied = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    for name in copied:
        atomic_write(out_dir / name, (checkpoint / name).read_bytes())
    return copied


def check_export_target(checkpoint: Path, out_dir: Path, *, overwrite: bool = False) -> None:
    """Refuse an export folder that would hide or destroy something: the checkpoint's own folder (or one that holds
    it), an existing folder without `overwrite`, or with it anything that is not an earlier export.

    Raises:
        UsageError: with the reason and another choice.
    """
    target, source = out_dir.resolve(), checkpoint.resolve()
    try:
        str(target).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{os.fsencode(out_dir)!r} has bytes that are not UTF-8, and torch's ONNX exporter cannot "
                         "write to such a path; pick an output folder whose name is UTF-8") from None
    if target == source or target in source.parents:
        where = "the checkpoint's own folder" if target == source else f"a folder that holds the checkpoint {source}"
        raise UsageError(f"{out_dir} is {where}; an export needs a folder of its own: pick another output folder")
    if not out_dir.exists():
        check_new_folder(out_dir)  # it can be created: refused now, not after the work
        return
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not an export folder; remove it or pick another output folder")
    if not overwrite:
        raise UsageError(f"{out_dir} already exists; pick another output folder, or replace that export with "
                         "--overwrite (overwrite=True): it is replaced only once the new export is complete")
    if any(out_dir.iterdir()) and not (out_dir / EXPORT_RECORD).is_file():
        raise UsageError(f"{out_dir} is not an export (no {EXPORT_RECORD}) and not empty; --overwrite replaces only "
                         "an earlier export: pick another output folder")


def _export_graphs(model: FlamingoModel, out_dir: Path, *, opset: int, seed: int | None,
                   on_graph: Callable[[str], None] | None, external_data_threshold: int,
                   decompose_layernorm: bool) -> dict[str, GraphFile]:
    """Every graph of `model` into `out_dir`, each checked against the contract and against PyTorch."""
    specs = build_graphs(model.config)
    rng = np.random.default_rng(seed)
    vocab = model.config.decoder.total_vocab_size
    ratios = model.config.vision.max_aspect_ratio_id if model.config.tiled else 1
    graphs = {}
    for name in GRAPH_NAMES:
        if on_graph:
            on_graph(name)
        module = WRAPPERS[name](model).eval()
        trace = example_feed(specs[name], _sizes(model, TRACE_SIZES), rng=rng, vocab_size=vocab,
                             max_aspect_ratio_id=ratios)
        graphs[name] = export_graph(specs[name], module, trace, out_dir, opset=opset,
                                    external_data_threshold=external_data_threshold,
                                    decompose_layernorm=decompose_layernorm)
        checks = [example_feed(specs[name], _sizes(model, sizes), rng=rng, vocab_size=vocab, max_aspect_ratio_id=ratios)
                  for sizes in CHECK_SIZES]
        error = verify_graph(out_dir / graphs[name].file, specs[name], module, checks)
        logger.info("%s: exported, ONNX Runtime vs PyTorch relative error %.2e", name, error)
    return graphs


def export_all(checkpoint: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET, seed: int | None = None,
               on_graph: Callable[[str], None] | None = None,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, decompose_layernorm: bool = False,
               overwrite: bool = False) -> ExportRecord:
    """Export the four graphs of a checkpoint, check each against PyTorch, and write OUT/export.json.

    The folder is written under a temporary name next to `out_dir` and renamed when complete: an export that fails
    or is interrupted leaves nothing at `out_dir`.

    Args:
        checkpoint: an IDEFICS save_pretrained folder, a folder written by flamingo-edge convert, or "demo".
        out_dir: the export folder to write; it must not exist, unless `overwrite`.
        opset: ONNX opset (default 17, the newest TensorRT 8.5 parses; 13 to 20).
        seed: seed of the random check inputs (default: fresh).
        on_graph: called with each graph's name before it is exported (progress display).
        external_data_threshold: see `export_graph`.
        decompose_layernorm: write LayerNormalization with primitive ops, for TensorRT 8.5 (JetPack 5).
        overwrite: replace an earlier export at `out_dir`, once the new one is complete (never merged into it).

    Returns:
        The record written to OUT/export.json.

    Raises:
        CheckpointError: the checkpoint cannot be loaded, or has no tokenizer.json.
        UsageError: an unsupported opset; `out_dir` exists (without `overwrite`), is not an export (with it), is the
            checkpoint's folder, or cannot be written.
        GraphContractError, ParityError: a graph fails its checks (nothing is written).
    """
    checkpoint, out_dir = resolve_checkpoint(checkpoint), Path(out_dir)
    if type(opset) is not int or opset not in OPSETS:
        raise UsageError(f"opset {opset!r} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1} "
                         f"(default {DEFAULT_OPSET}, the newest TensorRT 8.5 parses)")
    check_export_target(checkpoint, out_dir, overwrite=overwrite)
    model = load_checkpoint(checkpoint)
    _check_tokenizer(checkpoint)  # before the work, not after it
    digest = checkpoint_digest(weight_files(checkpoint))
    with atomic_folder(out_dir, overwrite=overwrite) as partial:
        graphs = _export_graphs(model, partial, opset=opset, seed=seed, on_graph=on_graph,
                                external_data_threshold=external_data_threshold,
                                decompose_layernorm=decompose_layernorm)
        record = ExportRecord(
            contract_version=CONTRACT_VERSION, opset=opset, flamingo_edge_version=__version__,
            checkpoint=str(checkpoint.resolve()), config=model.config.to_dict(), graphs=graphs,
            tokenizer_files=_copy_tokenizer_files(checkpoint, partial),
            layer_norm="decomposed" if decompose_layernorm else "onnx", checkpoint_sha256=digest,
        )
        atomic_write(partial / EXPORT_RECORD, record.to_json().encode())
    return record
