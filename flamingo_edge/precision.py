"""The precision vocabulary: what an export's graphs compute in and what engines are built as. One enum for export
records, quantize, build, manifests, compare's judging rules and the CLI choices.

Members are strings ("fp32", ...), so records on disk and comparisons with plain strings keep working.
"""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    FP32 = "fp32"  # the reference: what `flamingo-edge export` writes
    FP16 = "fp16"  # float16 graphs, norms/softmax/gates kept in fp32 (`quantize --precision fp16`)
    INT8 = "int8"  # explicit Q/DQ graphs: TensorRT 11's only INT8, also run (and measured) on ONNX Runtime
    # Weight-only, block-wise: the language model's matrix products read 4- or 8-bit weights, activations stay float
    # (`quantize --precision int4|int8-weights`; ONNX Runtime MatMulNBits or TensorRT block-quantized DQ weights)
    INT4 = "int4"
    INT8_WEIGHTS = "int8-weights"
    # fp32 graphs built with TensorRT's own calibrator from calibration caches (TensorRT <= 10: JetPack 5/6):
    # a way to build engines (`build --int8-calibration`), not a precision an export has
    INT8_IMPLICIT = "int8-implicit"

    def __str__(self) -> str:
        return self.value


EXPORT_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4,
                     Precision.INT8_WEIGHTS)  # what export.json may record
# what `flamingo-edge quantize` makes from an fp32 export
QUANTIZED_PRECISIONS = (Precision.FP16, Precision.INT8, Precision.INT4, Precision.INT8_WEIGHTS)
WEIGHT_ONLY_PRECISIONS = (Precision.INT4, Precision.INT8_WEIGHTS)
WEIGHT_BITS = {Precision.INT4: 4, Precision.INT8_WEIGHTS: 8}
# Weakly typed TensorRT (8.5, or 10.x for implicit INT8) needs builder flags for what it may use; strongly typed
# builds take the precision from the graph.
BUILDER_FLAGS = {Precision.FP32: (), Precision.FP16: ("FP16",), Precision.INT8: ("INT8", "FP16"),
                 Precision.INT8_IMPLICIT: ("INT8", "FP16"), Precision.INT4: ("INT4", "FP16"),
                 Precision.INT8_WEIGHTS: ("INT8", "FP16")}
