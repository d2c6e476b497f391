"""ONNX export of the PyTorch reference model: needs the `[export]` extra (torch, onnx, safetensors)."""

from flamingo_edge.extras import require

require("torch", "export", "ONNX export (flamingo_edge.export)")
require("onnx", "export", "ONNX export (flamingo_edge.export)")
