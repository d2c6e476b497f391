"""Checks every exported graph must pass: ONNX validity, no control flow, the contract's names and dtypes."""

from __future__ import annotations

from pathlib import Path

import onnx

from flamingo_edge.errors import GraphContractError
from flamingo_edge.graphs import GraphSpec, TensorSpec, io_mismatches

# Control flow makes graphs data-dependent and defeats TensorRT's optimisation profiles (DESIGN.md).
FORBIDDEN_OPS = ("If", "Loop", "Scan")

_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
                  onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
                  onnx.TensorProto.BOOL: "bool"}


def _declared(values) -> list[TensorSpec]:
    """ONNX graph inputs or outputs as TensorSpecs (dynamic dims by name, unknown dims as None)."""
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor_type.shape.dim)
        specs.append(TensorSpec(value.name, _ONNX_TO_NUMPY.get(tensor_type.elem_type, str(tensor_type.elem_type)),
                                dims))
    return specs


def _mismatches(kind: str, values, expected) -> list[str]:
    """`io_mismatches`, plus the order: the exported graphs keep the contract's order exactly."""
    declared = _declared(values)
    problems = io_mismatches(kind, declared, expected)
    if not problems and [t.name for t in declared] != [t.name for t in expected]:
        problems.append(f"{kind}s are in the order {[t.name for t in declared]}, "
                        f"the contract's is {[t.name for t in expected]}")
    return problems


def check_graph(path: str | Path, spec: GraphSpec) -> None:
    """Validate an exported graph file against the contract.

    Runs `onnx.checker` with full shape inference, refuses If/Loop/Scan nodes, and compares input and output names
    (in order), dtypes, ranks and fixed dims with `spec` (`graphs.io_mismatches`, shared with the runtime backends).

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
    problems += _mismatches("input", model.graph.input, spec.inputs)
    problems += _mismatches("output", model.graph.output, spec.outputs)
    if problems:
        raise GraphContractError(f"{spec.name}: {path} breaks the graph contract: " + "; ".join(problems)
                                 + "; re-export with this flamingo-edge version")
