"""Which ONNX operators each TensorRT version's ONNX parser imports, and a check of an export against them that runs
before any build (torch-free, TensorRT-free: the point is to learn on a CPU that JetPack 5 will refuse a graph).

The lists are onnx/onnx-tensorrt `docs/operators.md` at the parser commit each TensorRT release pins (ops marked
supported): 8.5 = branch 8.5-GA (the release/8.5 pin, with the doc fixes for HardSwish, Mod and OneHot), 8.6 = tag
release/8.6-GA (6ba67d34), 10.16 = 6bde6596 (release/10.16 pin), 11.1 = 7c51a63a (release/11.1 pin). For 10.3
(JetPack 6) no doc copy could be read; its list is the 10.1-GA doc's (96e78110), which the parser changelog supports
(10.2 and 10.3 add no operators; 10.4 adds the window ops, 10.5 STFT) and its opset ceiling, 20, is the 10.1 doc's.
Attribute-level restrictions (e.g. Q/DQ zero points must be 0, Einsum without ellipsis before 10.12) are not checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flamingo_edge.trt_compat import version_tuple
from flamingo_edge.errors import UsageError
from flamingo_edge.extras import require

_TENSORRT_8_5 = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GRU",
    "HardSwish", "HardSigmoid", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsNaN", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max",
    "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero",
    "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round", "ScaledTanh",
    "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"
))


@dataclass(frozen=True)
class OperatorSupport:
    version: str
    operators: frozenset[str]
    max_opset: int


_8_6 = _TENSORRT_8_5 | {"GroupNormalization", "IsInf", "LayerNormalization"}
_10_3 = _8_6 | {"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"}
_10_16 = _10_3 | {"Attention", "BlackmanWindow", "HammingWindow", "HannWindow", "RMSNormalization", "RotaryEmbedding",
                  "STFT", "TensorScatter"}
SUPPORT = {
    "8.5": OperatorSupport("8.5", _TENSORRT_8_5, 17),
    "8.6": OperatorSupport("8.6", _8_6, 17),
    "10.3": OperatorSupport("10.3", _10_3, 20),
    "10.16": OperatorSupport("10.16", _10_16, 24),
    "11.1": OperatorSupport("11.1", _10_16 | {"Swish"}, 24),
}
# What to do about an operator an older TensorRT lacks.
# TensorRT's own operators (domain "trt") that flamingo-edge writes, and the first release whose parser imports them
# (onnx-tensorrt's changelog: "Added support for INT4 quantization", 10.0 EA, through TRT_INT4DequantizeLinear).
TENSORRT_OWN_OPERATORS = {("trt", "TRT_INT4DequantizeLinear"): (10, 0)}
HINTS = {"LayerNormalization": "export with --decompose-layernorm (TensorRT 8.5 has no LayerNormalization importer)",
         "Gelu": "export at opset 17, where GELU is written with Erf"}


def _key(version: str) -> tuple[int, ...]:
    return version_tuple(version)[:2]


def support_for(version: str) -> OperatorSupport:
    """The operator support of a TensorRT version: the newest listed release not newer than it (8.5.2 -> 8.5,
    10.7 -> 10.3, 10.13 -> 10.3: a lower bound there, never a false "supported").

    Raises:
        UsageError: a version older than 8.5, or not a version.
    """
    try:
        wanted = _key(version)
    except ValueError:
        raise UsageError(f"{version!r} is not a TensorRT version (e.g. 8.5, 10.3)") from None
    known = [key for key in SUPPORT if _key(key) <= wanted]
    if not known:
        raise UsageError(f"TensorRT {version}: flamingo-edge supports TensorRT 8.5 (JetPack 5) and newer")
    return SUPPORT[max(known, key=_key)]


def graph_problems(onnx_path: str | Path, support: OperatorSupport) -> list[str]:
    """What in one ONNX graph the TensorRT of `support` cannot import: its opset, and unsupported or custom-domain
    operators (with counts and a hint where one is known)."""
    require("onnx", "tensorrt", "the TensorRT operator check (build for TensorRT, build --check-ops)")
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    problems = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > support.max_opset:
        problems.append(f"opset {opset} > {support.max_opset}, the newest TensorRT {support.version} imports "
                        f"(export with --opset {support.max_opset})")
    counts = Counter((node.domain, node.op_type) for node in model.graph.node
                     if (node.domain not in ("", "ai.onnx") or node.op_type not in support.operators)
                     and _key(support.version) < TENSORRT_OWN_OPERATORS.get((node.domain, node.op_type), (99,)))
    for (domain, op), count in sorted(counts.items()):
        name = f"{domain}::{op}" if domain not in ("", "ai.onnx") else op
        hint = f": {HINTS[op]}" if op in HINTS else ""
        problems.append(f"{count} x {name}{hint}")
    return problems


def check_export(export_dir: str | Path, version: str) -> dict[str, list[str]]:
    """Per graph of an export, what TensorRT `version` cannot import (empty lists: every graph imports)."""
    from flamingo_edge.artifacts import read_export_record

    export_dir = Path(export_dir)
    record = read_export_record(export_dir)
    support = support_for(version)
    return {name: graph_problems(export_dir / entry.file, support) for name, entry in record.graphs.items()}
