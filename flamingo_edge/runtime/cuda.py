"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda).

cuda-python returns `(error, *values)` tuples; `call` turns a failed call into a `CudaError` that names the call
and CUDA's own message. cuda-python >= 12.6 spells the module `cuda.bindings.runtime`; older releases (the 11.x line
for JetPack 5's CUDA 11.4) spell it `cuda.cudart`; both are accepted. Imported only when a TensorRT session opens
or a TensorRT engine is built on a GPU.

cuda-python's major must be the driver's CUDA major or an older one: cuda-python 13 needs a driver for CUDA 13
(>= 580), and on an older driver (JetPack 6, a 525 to 57x datacenter driver) every call answers
cudaErrorInsufficientDriver. The extras pin it per major (pyproject.toml, docs/engines.md's support matrix), and
`device_info` names the one to install.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from flamingo_edge.errors import FeatureUnavailableError, FlamingoEdgeError

# CUDA major -> the flamingo-edge extra whose cuda-python is built for it ([tensorrt] is [tensorrt-cu12], JetPack 6).
CUDA_EXTRAS = {11: "tensorrt-cu11", 12: "tensorrt-cu12", 13: "tensorrt-cu13"}
# CUDA major -> the drivers that run it: the oldest datacenter driver (NVIDIA's CUDA Compatibility guide, "Minor
# Version Compatibility": 11.x >= 450, 12.x >= 525, 13.x >= 580) and the JetPack whose driver has it.
DRIVERS = {11: "driver >= 450, JetPack 5", 12: "driver >= 525, JetPack 6", 13: "driver >= 580, JetPack 7"}
INSTALL_BY_DRIVER = ("pip install 'flamingo-edge[tensorrt-cu12]' (drivers 525 to 57x, JetPack 6; [tensorrt] is the "
                     "same) or 'flamingo-edge[tensorrt-cu13]' (drivers >= 580, JetPack 7)")


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
                f"the TensorRT backend needs cuda-python of the driver's CUDA major: {INSTALL_BY_DRIVER}") from None
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


def _version(runtime, name: str) -> int | None:
    """`runtime.<name>()`'s version number (12060 for CUDA 12.6), or None when the call fails or answers 0."""
    try:
        error, version = getattr(runtime, name)()
    except (AttributeError, RuntimeError, ValueError):
        return None
    return version if error == runtime.cudaError_t.cudaSuccess and version else None


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _no_usable_gpu(reason: str, hint: str = "") -> FeatureUnavailableError:
    return FeatureUnavailableError(f"TensorRT engines run on an NVIDIA GPU and this machine has no usable one "
                                   f"({reason}); use backend 'onnxruntime' here{hint}")


def _insufficient_driver(runtime) -> FeatureUnavailableError:
    """cudaErrorInsufficientDriver: cuda-python's CUDA is newer than the driver's, or there is no driver at all.
    The error names both CUDA versions where the calls answer, and the extra that matches the driver."""
    built, driver = _version(runtime, "cudaRuntimeGetVersion"), _version(runtime, "cudaDriverGetVersion")
    needs = "" if built is None else (
        f"the installed cuda-python is built for CUDA {_cuda(built)}, which needs an NVIDIA driver for CUDA "
        f"{built // 1000} ({DRIVERS.get(built // 1000, 'see NVIDIA CUDA Compatibility guide')})")
    if driver is None:  # cudaDriverGetVersion answers 0 when no driver is installed
        hint = (f". If it has a GPU: {needs}; install the cuda-python of its driver's CUDA major: "
                f"{INSTALL_BY_DRIVER}") if needs else ""
        return _no_usable_gpu("CUDA: cudaErrorInsufficientDriver, and no driver says its version", hint)
    have = driver // 1000
    fix = (f"install the cuda-python of the driver's CUDA major, pip install 'flamingo-edge[{CUDA_EXTRAS[have]}]' "
           f"(cuda-python for CUDA {have}), or update the driver" if have in CUDA_EXTRAS else "update the driver")
    return FeatureUnavailableError(
        f"CUDA cannot start (cudaGetDeviceCount: cudaErrorInsufficientDriver): "
        f"{needs or 'the installed cuda-python is built for a newer CUDA than the driver'}; this machine's driver "
        f"supports CUDA {_cuda(driver)}. Fix: {fix}")


def device_info(index: int = 0) -> DeviceInfo:
    """The name and compute capability of a CUDA device.

    Raises:
        FeatureUnavailableError: cuda-python is missing, it is built for a newer CUDA than the driver (the message
            names both and the extra to install), or there is no usable CUDA GPU (no driver, no device).
    """
    runtime = runtime_module()
    try:
        error, count = runtime.cudaGetDeviceCount()
    except RuntimeError as raised:  # cuda-python 11.8 raises, instead of returning an error, when it finds no driver
        raise _no_usable_gpu(f"cuda-python: {raised}") from None
    if error == getattr(runtime.cudaError_t, "cudaErrorInsufficientDriver", None):
        raise _insufficient_driver(runtime)
    if error != runtime.cudaError_t.cudaSuccess or count <= index:
        reason = runtime.cudaGetErrorString(error)[1] if error != runtime.cudaError_t.cudaSuccess else b"no device"
        reason = reason.decode() if isinstance(reason, bytes) else reason
        raise _no_usable_gpu(f"CUDA: {reason}")
    props = call(runtime, "cudaGetDeviceProperties", index)
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name, props.major, props.minor, props.totalGlobalMem)


class Stream:
    """One CUDA stream, owned by one session (a TensorRT session creates its own and closes it)."""

    def __init__(self):
        self.runtime = runtime_module()
        # Non-blocking: no implicit synchronization with the legacy default stream, which would also break capture.
        self.handle = call(self.runtime, "cudaStreamCreateWithFlags", self.runtime.cudaStreamNonBlocking)

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


def zero(buffer: DeviceBuffer, stream: Stream) -> None:
    """Fill device memory with zero bytes (fresh memory holds anything, NaN included)."""
    call(stream.runtime, "cudaMemsetAsync", buffer.ptr, 0, buffer.nbytes, stream.handle)


def copy_from_host(dst: DeviceBuffer, array: np.ndarray, stream: Stream) -> None:
    """Copy a C-contiguous numpy array (ordinary, pageable memory) to the start of `dst`. CUDA stages pageable memory
    before the call returns, so the array may change afterwards; such a copy cannot be captured in a CUDA graph."""
    if array.nbytes:
        runtime = stream.runtime
        call(runtime, "cudaMemcpyAsync", dst.ptr, array.ctypes.data, array.nbytes,
             runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle)


def copy_2d_from_host(dst: int, dst_pitch: int, array: np.ndarray, src_pitch: int, width: int, rows: int,
                      stream: Stream) -> None:
    """Copy `rows` rows of `width` bytes from a numpy array's memory (rows `src_pitch` bytes apart) to device address
    `dst` (rows `dst_pitch` apart): a slice of every (batch, head) of a K/V buffer in one call."""
    if width and rows:
        runtime = stream.runtime
        call(runtime, "cudaMemcpy2DAsync", dst, dst_pitch, array.ctypes.data, src_pitch, width, rows,
             runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle)


def copy_2d_on_device(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int,
                      stream: Stream) -> None:
    """Copy `rows` rows of `width` bytes between device addresses (rows `src_pitch` / `dst_pitch` bytes apart)."""
    if width and rows:
        runtime = stream.runtime
        call(runtime, "cudaMemcpy2DAsync", dst, dst_pitch, src, src_pitch, width, rows,
             runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle)


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
