"""A graph of a flamingo-edge export, run by ONNX Runtime inside Triton's Python backend (written by `flamingo-edge
triton-repo --python-only` as REPO/<graph>/1/model.py, next to model.onnx).

For Triton servers without the onnxruntime backend, such as the one PyTriton bundles. It needs numpy and onnxruntime
in the Python environment of the backend stub, not flamingo-edge. Inputs and outputs are those of config.pbtxt,
whose names and dims are the graph contract's (flamingo_edge/graphs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One ONNX Runtime session; each request is one run (max_batch_size 0: a request holds the whole batch)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"  # its .onnx.data beside it
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            values = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value))
                                for name, value in zip(self.outputs, values)]))
        return responses

    def finalize(self):
        self.session = None
