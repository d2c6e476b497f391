"""`open_session`: the one factory of runtime sessions (the backend modules are imported when a session is opened, so
importing this module loads neither onnxruntime's nor TensorRT's bindings)."""

from __future__ import annotations

from pathlib import Path

from flamingo_edge.errors import FeatureUnavailableError
from flamingo_edge.graphs import GraphSpec
from flamingo_edge.runtime.backend import BackendKind, Device, Session, parse_choice


def open_session(path: str | Path, spec: GraphSpec, kind: str | BackendKind = BackendKind.ONNXRUNTIME, *,
                 device: str | Device = Device.AUTO) -> Session:
    """Open one graph with a runtime backend.

    Args:
        path: the graph file: an .onnx written by `flamingo-edge export` (onnxruntime), or an .engine in a folder
            written by `flamingo-edge build` (tensorrt; its manifest is checked against this machine first).
        spec: the graph's contract, from `graphs.build_graphs(config)[name]`.
        kind: "onnxruntime" or "tensorrt".
        device: "auto" (the GPU when the backend can use one, else the CPU), "cpu" or "cuda" (tensorrt: always
            the GPU; "cpu" is refused).

    Returns:
        A Session; use it as a context manager or call `close()`.

    Raises:
        FeatureUnavailableError: an unknown backend or device, CUDA asked for but unusable, or (tensorrt) no
            TensorRT, cuda-python or GPU here.
        GraphContractError: the file is missing or unreadable, or its inputs/outputs differ from `spec`.
        EngineMismatchError: (tensorrt) the engine was built for another TensorRT or GPU.
    """
    kind = parse_choice(BackendKind, kind, "runtime backend")
    device = parse_choice(Device, device, "device")
    if kind is BackendKind.TENSORRT:
        if device is Device.CPU:
            raise FeatureUnavailableError("TensorRT engines run on the GPU only; use backend 'onnxruntime' for "
                                          "the CPU")
        from flamingo_edge.runtime.tensorrt_backend import open_engines

        return open_engines(Path(path).parent, None, {spec.name: spec})[1][spec.name]
    from flamingo_edge.runtime.onnxruntime_backend import OnnxRuntimeSession

    return OnnxRuntimeSession(path, spec, device=device)
