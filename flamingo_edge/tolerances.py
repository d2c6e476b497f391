"""The accuracy thresholds of DESIGN.md, in one place: `compare` and the tests import these constants."""

# fp32 (PyTorch vs upstream, ONNX Runtime vs PyTorch): max |a - b| over logits <= LOGITS_REL_TOL * max |logits|.
LOGITS_REL_TOL = 1e-4
# fp16: fraction of positions whose top-1 token agrees with fp32.
FP16_TOP1_AGREEMENT = 0.99
# INT8: demo task metric may drop at most this much (absolute, in [0, 1]) below fp32.
INT8_TASK_METRIC_DROP = 0.01
# Image preprocessing vs the upstream processor: max |pixel difference| after normalisation.
PIXEL_ABS_TOL = 1e-5


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (numpy arrays or torch tensors)."""
    scale = float(abs(expected).max())
    return float(abs(actual - expected).max()) / (scale if scale > 0 else 1.0)
