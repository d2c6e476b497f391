"""Checks every exported graph must pass: ONNX validity, no control flow, the contract's names and dtypes."""

from __future__ import annotations

from pathlib import Path

import onnx

from flamingo_edge.errors import GraphContractError
from flamingo_edge.graphs import GraphSpec

# Control flow makes graphs data-dependent and defeats TensorRT's optimisation profiles (DESIGN.md).
FORBIDDEN_OPS = ("If", "Loop", "Scan")

_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
                  onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
                  onnx.TensorProto.BOOL: "bool"}


def _io(values) -> list[tuple[str, str, int]]:
    return [(v.name, _ONNX_TO_NUMPY.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
             len(v.type.tensor_type.shape.dim)) for v in values]


def _compare(kind: str, actual: list[tuple[str, str, int]], expected, spec_name: str, path: Path) -> list[str]:
    wanted = [(t.name, t.dtype, len(t.dims)) for t in expected]
    if actual == wanted:
        return []
    problems = [f"{kind} {i}: graph has {a}, contract says {w}" for i, (a, w) in enumerate(zip(actual, wanted)) if a != w]
    if len(actual) != len(wanted):
        problems.append(f"{len(actual)} {kind}s in the graph, {len(wanted)} in the contract")
    return problems


def check_graph(path: str | Path, spec: GraphSpec) -> None:
    """Validate an exported graph file against the contract.

    Runs `onnx.checker` with full shape inference, refuses If/Loop/Scan nodes, and compares input and output names,
    dtypes and ranks (in order) with `spec`.

    Raises:
        GraphContractError: listing every problem found.
    """
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise GraphContractError(f"{spec.name}: {path} is not a valid ONNX graph: {error}") from None
    model = onnx.load(str(path), load_external_data=False)
    problems = [f"{node.op_type} node {node.name!r} (no control flow allowed)"
                for node in model.graph.node if node.op_type in FORBIDDEN_OPS]
    problems += _compare("input", _io(model.graph.input), spec.inputs, spec.name, path)
    problems += _compare("output", _io(model.graph.output), spec.outputs, spec.name, path)
    if problems:
        raise GraphContractError(f"{spec.name}: {path} breaks the graph contract: " + "; ".join(problems)
                                 + "; re-export with this flamingo-edge version")
