"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda).

cuda-python returns `(error, *values)` tuples; `call` turns a failed call into a `CudaError` that names the call
and CUDA's own message. cuda-python >= 12.6 spells the module `cuda.bindings.runtime`; older releases (the 11.x line
for JetPack 5's CUDA 11.4) spell it `cuda.cudart`; both are accepted. Imported only when a TensorRT session opens
or a TensorRT engine is built on a GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from flamingo_edge.errors import FeatureUnavailableError, FlamingoEdgeError


class CudaError(FlamingoEdgeError):
    """A CUDA runtime call failed on a machine that has a GPU."""


def runtime_module():
    """cuda-python's runtime module.

    Raises:
        FeatureUnavailableError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise FeatureUnavailableError(
                "the TensorRT backend needs cuda-python: pip install 'flamingo-edge[tensorrt]' (cuda-python "
                "matching the CUDA major of the driver: 11.x on JetPack 5, 12.x on JetPack 6, 13.x on JetPack 7)"
            ) from None
    return runtime


def call(runtime, name: str, *args):
    """Call `runtime.<name>(*args)`; return its values (none, one, or a tuple)."""
    error, *values = getattr(runtime, name)(*args)
    if error != runtime.cudaError_t.cudaSuccess:
        message = runtime.cudaGetErrorString(error)[1]
        message = message.decode() if isinstance(message, bytes) else message
        raise CudaError(f"CUDA {name} failed: {error.name} ({message})")
    return values[0] if len(values) == 1 else tuple(values) if values else None


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    major: int
    minor: int
    total_memory: int

    @property
    def compute_capability(self) -> str:
        """As TensorRT for RTX names it: "SM86"."""
        return f"SM{self.major}{self.minor}"


def device_info(index: int = 0) -> DeviceInfo:
    """The name and compute capability of a CUDA device.

    Raises:
        FeatureUnavailableError: cuda-python is missing, or there is no usable CUDA GPU (no driver, no device).
    """
    runtime = runtime_module()
    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess or count <= index:
        reason = runtime.cudaGetErrorString(error)[1] if error != runtime.cudaError_t.cudaSuccess else b"no device"
        reason = reason.decode() if isinstance(reason, bytes) else reason
        raise FeatureUnavailableError(f"TensorRT engines run on an NVIDIA GPU and this machine has no usable one "
                                      f"(CUDA: {reason}); use backend 'onnxruntime' here")
    props = call(runtime, "cudaGetDeviceProperties", index)
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name, props.major, props.minor, props.totalGlobalMem)


class Stream:
    """One CUDA stream, shared by the sessions of a pipeline: each `acquire`s it and `release`s it when it closes;
    the last release (after the creator's own) destroys it."""

    def __init__(self):
        self.runtime = runtime_module()
        # Non-blocking: no implicit synchronization with the legacy default stream, which would also break capture.
        self.handle = call(self.runtime, "cudaStreamCreateWithFlags", self.runtime.cudaStreamNonBlocking)
        self.users = 1

    def acquire(self) -> Stream:
        self.users += 1
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.close()

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call(self.runtime, "cudaStreamSynchronize", self.handle)

    def close(self) -> None:
        if self.handle is not None:
            call(self.runtime, "cudaStreamDestroy", self.handle)
            self.handle = None


class DeviceBuffer:
    """Device memory of a fixed size, allocated once."""

    def __init__(self, nbytes: int):
        self.runtime, self.nbytes = runtime_module(), max(int(nbytes), 1)
        self.ptr = int(call(self.runtime, "cudaMalloc", self.nbytes))

    def close(self) -> None:
        if self.ptr:
            call(self.runtime, "cudaFree", self.ptr)
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (fast, asynchronous copies), seen from Python as a numpy byte array."""

    def __init__(self, nbytes: int):
        self.runtime, self.nbytes = runtime_module(), max(int(nbytes), 1)
        self.ptr = int(call(self.runtime, "cudaMallocHost", self.nbytes))
        self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The first bytes of the buffer as an array of `shape` (no copy)."""
        count = int(np.prod(shape, dtype=np.int64))
        return self.bytes[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self.bytes = None
            call(self.runtime, "cudaFreeHost", self.ptr)
            self.ptr = 0


def copy_to_device(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    runtime = stream.runtime
    call(runtime, "cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice,
         stream.handle)


def copy_to_host(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    runtime = stream.runtime
    call(runtime, "cudaMemcpyAsync", dst.ptr, src.ptr, nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost,
         stream.handle)


class CudaGraph:
    """A captured sequence of launches on a stream, replayed with one call."""

    def __init__(self, stream: Stream, enqueue):
        """Capture what `enqueue()` puts on `stream` (it must only enqueue work, never synchronize; an exception
        from it ends the capture and is raised).

        Raises:
            CudaError: the capture or the instantiation failed.
        """
        runtime = self.runtime = stream.runtime
        self.graph = self.exec = None
        call(runtime, "cudaStreamBeginCapture", stream.handle,
             runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue()
        finally:
            self.graph = call(runtime, "cudaStreamEndCapture", stream.handle)
        # cudaGraphInstantiateWithFlags has one signature in cuda-python 11 to 13 (cudaGraphInstantiate has not).
        self.exec = call(runtime, "cudaGraphInstantiateWithFlags", self.graph, 0)

    def launch(self, stream: Stream) -> None:
        call(self.runtime, "cudaGraphLaunch", self.exec, stream.handle)

    def close(self) -> None:
        if self.exec is not None:
            call(self.runtime, "cudaGraphExecDestroy", self.exec)
        if self.graph is not None:
            call(self.runtime, "cudaGraphDestroy", self.graph)
        self.exec = self.graph = None
