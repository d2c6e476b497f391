"""ONNX -> TensorRT engines: profiles from shape limits, targets, one compat module for every TensorRT flavour,
and the manifest that ties an engine to what it was built from and for. TensorRT is imported lazily."""
