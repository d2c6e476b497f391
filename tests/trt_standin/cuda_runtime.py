"""A CPU stand-in for cuda-python's runtime module (`cuda.bindings.runtime`), as `flamingo_edge.runtime.cuda` uses it.

Test harness only. Every call returns cuda-python's `(error, *values)` tuple; names, signatures and error codes are
the real module's (tests/runtime/test_tensorrt_standin.py checks them against the installed cuda-python).

    "device" memory  = host memory (numpy arrays kept alive in `allocations`) at real addresses, filled with 0xFF
                       (NaN as float32) so that a read of memory nobody wrote shows
    pinned memory    = the same, registered as the other kind
    cudaMemcpyAsync  = bounds-checked: each range must lie inside ONE live allocation of the kind the copy names
                       (device vs pinned host), else cudaErrorInvalidValue and a line in `violations`
    a stream         = a FIFO of ops: run at enqueue (synchronous), or by a worker thread per stream (asynchronous,
                       so host code that reads results before synchronizing sees stale memory, as on a GPU)
    stream capture   = while a stream captures, work enqueued on it, by ANY thread, is recorded, not run (as in
                       CUDA); synchronizing a capturing stream, or an unsafe call (malloc/free) under a Global capture
                       or from the capturing thread of a ThreadLocal one, invalidates the capture
    cudaGraphLaunch  = enqueues the recorded ops again

What it cannot model: kernels' real timing and concurrency across streams, device memory limits, the driver's own
checks beyond these.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from types import SimpleNamespace

import numpy as np


class cudaError_t(IntEnum):  # the members we return, with cuda-python's values
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureWrongThread = 908


ERROR_STRINGS = {  # cudaGetErrorString's text for each (cuda-python 12/13)
    cudaError_t.cudaSuccess: b"no error",
    cudaError_t.cudaErrorInvalidValue: b"invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: b"out of memory",
    cudaError_t.cudaErrorInvalidDevice: b"invalid device ordinal",
    cudaError_t.cudaErrorInvalidResourceHandle: b"invalid resource handle",
    cudaError_t.cudaErrorIllegalState: b"the operation cannot be performed in the present state",
    cudaError_t.cudaErrorIllegalAddress: b"an illegal memory access was encountered",
    cudaError_t.cudaErrorStreamCaptureUnsupported: b"operation not permitted when stream is capturing",
    cudaError_t.cudaErrorStreamCaptureInvalidated: b"operation failed due to a previous error during capture",
    cudaError_t.cudaErrorStreamCaptureWrongThread: b"attempt to terminate a thread-local capture sequence from "
                                                   b"another thread",
}


class cudaMemcpyKind(IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


DEVICE, PINNED = "device", "pinned"
# cudaMemcpyKind -> (kind of dst, kind of src)
COPY_KINDS = {cudaMemcpyKind.cudaMemcpyHostToDevice: (DEVICE, PINNED),
              cudaMemcpyKind.cudaMemcpyDeviceToHost: (PINNED, DEVICE),
              cudaMemcpyKind.cudaMemcpyDeviceToDevice: (DEVICE, DEVICE),
              cudaMemcpyKind.cudaMemcpyHostToHost: (PINNED, PINNED)}


class MemoryViolation(Exception):
    """An op touched memory outside every live allocation of the kind it needs (a GPU would fault, or corrupt)."""


@dataclass
class Allocation:
    ptr: int
    nbytes: int
    kind: str  # DEVICE or PINNED
    memory: np.ndarray  # keeps the bytes alive; ptr is its address


@dataclass(frozen=True)
class Op:
    """One piece of work on a stream: a copy or a TensorRT launch."""

    what: str  # "memcpy HostToDevice 1536 B", "decoder: execute_async_v3"
    thread: str  # the thread that enqueued it
    run: Callable[[], None]


@dataclass
class Capture:
    thread: threading.Thread
    mode: cudaStreamCaptureMode
    ops: list[Op] = field(default_factory=list)
    invalidated: str | None = None  # why the capture is invalid


class StandInStream:
    """A FIFO of ops; `capture` is set between cudaStreamBeginCapture and cudaStreamEndCapture."""

    def __init__(self, handle: int, asynchronous: bool):
        self.handle, self.capture = handle, None
        self.error: cudaError_t | None = None  # sticky, like an illegal address on a GPU: every later sync sees it
        self.run_lock = threading.Lock()  # ops of one stream never overlap (synchronous mode runs them in callers)
        self.queue: queue.Queue | None = None
        if asynchronous:
            self.queue = queue.Queue()
            self.worker = threading.Thread(target=self._work, name=f"standin-stream-{handle:#x}", daemon=True)
            self.worker.start()

    def submit(self, op: Op, violations: list[str]) -> None:
        if self.queue is not None:
            self.queue.put((op, violations))
        else:
            self._execute(op, violations)

    def _execute(self, op: Op, violations: list[str]) -> None:
        with self.run_lock:
            try:
                op.run()
            except MemoryViolation as error:
                violations.append(f"{op.what} (enqueued by {op.thread}): {error}")
                self.error = self.error or cudaError_t.cudaErrorIllegalAddress
            except Exception as error:  # a failed launch: reported at the next synchronize, as on a GPU
                violations.append(f"{op.what} (enqueued by {op.thread}) failed: {error!r}")
                self.error = self.error or cudaError_t.cudaErrorIllegalAddress

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._execute(*item)
            finally:
                self.queue.task_done()

    def drain(self) -> None:
        if self.queue is not None:
            self.queue.join()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.put(None)
            self.worker.join()


class CudaRuntime:
    """The stand-in module: `runtime_module()` returns an instance. `events` counts what happened (captures,
    graph launches, replayed ops, ops another thread put into a capture); `violations` lists every bounds or capture
    rule broken."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1

    def __init__(self, *, device_name: str = "NVIDIA GeForce RTX 3090 (CPU stand-in)", major: int = 8,
                 minor: int = 6, total_memory: int = 24 << 30, asynchronous: bool = True):
        self.properties = SimpleNamespace(name=device_name.encode(), major=major, minor=minor,
                                          totalGlobalMem=total_memory)
        self.asynchronous = asynchronous
        self.lock = threading.RLock()
        self.allocations: dict[int, Allocation] = {}
        self.streams: dict[int, StandInStream] = {}
        self.graphs: dict[int, tuple[Op, ...]] = {}
        self.execs: dict[int, tuple[Op, ...]] = {}
        self.handles = itertools.count(0x5000)
        self.events: Counter = Counter()
        self.bytes_copied: Counter = Counter()  # by direction ("HostToDevice", ...): what the copies moved
        self.violations: list[str] = []
        # called (in the capturing thread) right after a capture begins: tests use it to interleave another thread
        self.on_begin_capture: Callable[[int], None] | None = None

    # errors and the device

    def cudaGetErrorString(self, error):
        return cudaError_t.cudaSuccess, ERROR_STRINGS.get(cudaError_t(error), b"unknown error")

    def cudaGetDeviceCount(self):
        return cudaError_t.cudaSuccess, 1

    def cudaGetDeviceProperties(self, device):
        if device != 0:
            return cudaError_t.cudaErrorInvalidDevice, None
        return cudaError_t.cudaSuccess, self.properties

    # memory

    def _unsafe_during_capture(self, call: str) -> cudaError_t | None:
        """cudaMalloc/cudaFree & co. under a Global capture (any thread) or from a ThreadLocal capture's own thread
        are prohibited and invalidate that capture (CUDA programming guide, "Cross-stream dependencies and events":
        cudaStreamCaptureMode)."""
        me = threading.current_thread()
        for stream in self.streams.values():
            capture = stream.capture
            if capture is not None and (capture.mode == cudaStreamCaptureMode.cudaStreamCaptureModeGlobal or (
                    capture.mode == cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal and capture.thread is me)):
                capture.invalidated = capture.invalidated or f"{call} during capture"
                self.violations.append(f"{call} while stream {stream.handle:#x} was capturing ({capture.mode.name})")
                return cudaError_t.cudaErrorStreamCaptureUnsupported
        return None

    def _allocate(self, size: int, kind: str, call: str):
        with self.lock:
            error = self._unsafe_during_capture(call)
            if error is not None:
                return error, None
            if int(size) < 0:
                return cudaError_t.cudaErrorInvalidValue, None
            memory = np.full(max(int(size), 1), 0xFF, np.uint8)
            ptr = memory.ctypes.data
            self.allocations[ptr] = Allocation(ptr, int(size), kind, memory)
            self.events[f"{call}"] += 1
            return cudaError_t.cudaSuccess, ptr

    def _free(self, ptr, kind: str, call: str):
        with self.lock:
            error = self._unsafe_during_capture(call)
            if error is not None:
                return (error,)
            allocation = self.allocations.get(int(ptr))
            if allocation is None or allocation.kind != kind:
                self.violations.append(f"{call}({int(ptr):#x}): not the start of a live {kind} allocation")
                return (cudaError_t.cudaErrorInvalidValue,)
            streams = [s for s in self.streams.values() if s.capture is None]
        for stream in streams:  # like CUDA's free, wait for the work that may still use it
            stream.drain()
        with self.lock:
            del self.allocations[int(ptr)]
            self.events[call] += 1
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size):
        return self._allocate(size, DEVICE, "cudaMalloc")

    def cudaFree(self, devPtr):
        return self._free(devPtr, DEVICE, "cudaFree")

    def cudaMallocHost(self, size):
        return self._allocate(size, PINNED, "cudaMallocHost")

    def cudaFreeHost(self, ptr):
        return self._free(ptr, PINNED, "cudaFreeHost")

    def check_range(self, ptr: int, nbytes: int, kind: str) -> str | None:
        """None if [ptr, ptr + nbytes) lies inside one live allocation of `kind`, else what is wrong."""
        ptr, nbytes = int(ptr), int(nbytes)
        with self.lock:
            # the allocation ptr falls in; an empty range may also sit at an allocation's end
            found = [a for a in self.allocations.values() if a.ptr <= ptr < a.ptr + a.nbytes
                     or (nbytes == 0 and ptr == a.ptr + a.nbytes)]
        if not found:
            return f"{ptr:#x} (+{nbytes} B) is in no live {kind} allocation"
        allocation = found[0]
        if allocation.kind != kind:
            return f"{ptr:#x} is {allocation.kind} memory; expected {kind}"
        if ptr + nbytes > allocation.ptr + allocation.nbytes:
            return (f"{nbytes} B at offset {ptr - allocation.ptr} overruns a {allocation.nbytes} B {kind} "
                    f"allocation by {ptr + nbytes - allocation.ptr - allocation.nbytes} B")
        return None

    def read(self, ptr: int, dtype, shape) -> np.ndarray:
        """A copy of device memory as an array (the TensorRT stand-in's input read).

        Raises:
            MemoryViolation: the range is not inside one live device allocation.
        """
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        problem = self.check_range(ptr, nbytes, DEVICE)
        if problem is not None:
            raise MemoryViolation(f"read of {nbytes} B: {problem}")
        if nbytes == 0:
            return np.zeros(shape, dtype)
        raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
        return np.frombuffer(raw, np.uint8).copy().view(dtype).reshape(shape)

    def write(self, ptr: int, array: np.ndarray) -> None:
        """Copy an array into device memory (the TensorRT stand-in's output write).

        Raises:
            MemoryViolation: the range is not inside one live device allocation.
        """
        array = np.ascontiguousarray(array)
        problem = self.check_range(ptr, array.nbytes, DEVICE)
        if problem is not None:
            raise MemoryViolation(f"write of {array.nbytes} B: {problem}")
        if array.nbytes:
            ctypes.memmove(int(ptr), array.ctypes.data, array.nbytes)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        return self._copy(dst, count, src, count, count, 1, kind, stream, "cudaMemcpyAsync")

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        return self._copy(dst, dpitch, src, spitch, width, height, kind, stream, "cudaMemcpy2DAsync")

    def cudaMemsetAsync(self, devPtr, value, count, stream):
        ptr, count = int(devPtr), int(count)
        problem = self.check_range(ptr, count, DEVICE)
        if problem is not None:
            self.violations.append(f"cudaMemsetAsync {count} B: {problem}")
            return (cudaError_t.cudaErrorInvalidValue,)

        def fill():
            again = self.check_range(ptr, count, DEVICE)
            if again:
                raise MemoryViolation(again)
            ctypes.memset(ptr, int(value), count)

        return (self.enqueue(stream, f"cudaMemsetAsync {count} B", fill, "Memset"),)

    def _pageable(self, ptr: int, nbytes: int) -> bool:
        """Whether [ptr, ptr + nbytes) is ordinary host memory: in no allocation of ours (a numpy array's)."""
        with self.lock:
            return not any(a.ptr < ptr + max(nbytes, 1) and ptr < a.ptr + a.nbytes for a in self.allocations.values())

    def _copy(self, dst, dpitch, src, spitch, width, height, kind, stream, call: str):
        """`height` rows of `width` bytes, each `dpitch`/`spitch` apart (a plain copy is one row). Host memory is
        pinned (ours), or for a host-to-device copy also pageable: as CUDA does, the call then takes the source's
        bytes before it returns (the caller may reuse them at once), and it cannot be captured."""
        kind = cudaMemcpyKind(kind)
        if kind not in COPY_KINDS:  # cudaMemcpyDefault (unified addressing) is not modelled
            self.violations.append(f"{call} with {kind.name}: not modelled by the stand-in")
            return (cudaError_t.cudaErrorInvalidValue,)
        dst_kind, src_kind = COPY_KINDS[kind]
        dst, src, dpitch, spitch = int(dst), int(src), int(dpitch), int(spitch)
        width, height = int(width), int(height)
        if width > min(dpitch, spitch) and height > 1:
            self.violations.append(f"{call}: width {width} > pitch ({dpitch}, {spitch})")
            return (cudaError_t.cudaErrorInvalidValue,)
        span = lambda pitch: (height - 1) * pitch + width if height else 0  # noqa: E731
        pageable = kind == cudaMemcpyKind.cudaMemcpyHostToDevice and self._pageable(src, span(spitch))
        checks = [("dst", self.check_range(dst, span(dpitch), dst_kind))]
        if not pageable:
            checks.append(("src", self.check_range(src, span(spitch), src_kind)))
        problems = [f"{side} {problem}" for side, problem in checks if problem is not None]
        name = kind.name[len("cudaMemcpy"):]
        what = f"{call} {name} {width * height} B" + (" (pageable)" if pageable else "")
        if pageable and self.is_capturing(stream):
            problems.append("a copy from pageable host memory cannot be captured")
        if problems:
            self.violations.append(f"{what}: " + "; ".join(problems))
            return (cudaError_t.cudaErrorInvalidValue,)
        with self.lock:
            self.bytes_copied[name] += width * height
        if pageable:  # taken now, as CUDA stages pageable memory before the call returns
            taken = np.empty(span(spitch), np.uint8)
            if taken.nbytes:
                ctypes.memmove(taken.ctypes.data, src, taken.nbytes)
            source, source_check = taken.ctypes.data, None
        else:
            taken, source, source_check = None, src, (src, span(spitch), src_kind)

        def copy():
            again = [p for p in (self.check_range(dst, span(dpitch), dst_kind),
                                 source_check and self.check_range(*source_check)) if p]
            if again:  # freed between enqueue and execution
                raise MemoryViolation("; ".join(again))
            keep = taken  # noqa: F841  (the pageable bytes live until the copy ran)
            for row in range(height if width else 0):
                ctypes.memmove(dst + row * dpitch, source + row * spitch, width)

        return (self.enqueue(stream, what, copy, name),)

    # streams

    def find_stream(self, handle) -> StandInStream | None:
        with self.lock:
            return self.streams.get(int(handle))

    def cudaStreamCreateWithFlags(self, flags):
        with self.lock:
            handle = next(self.handles)
            self.streams[handle] = StandInStream(handle, self.asynchronous)
            self.events["streams_created"] += 1
        return cudaError_t.cudaSuccess, handle

    def cudaStreamSynchronize(self, stream):
        target = self.find_stream(stream)
        if target is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if target.capture is not None:
            target.capture.invalidated = target.capture.invalidated or "cudaStreamSynchronize during capture"
            self.violations.append(f"cudaStreamSynchronize on capturing stream {target.handle:#x} "
                                   f"(from {threading.current_thread().name})")
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        target.drain()
        return (target.error or cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        with self.lock:
            target = self.streams.pop(int(stream), None)
        if target is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        target.drain()
        target.stop()
        return (cudaError_t.cudaSuccess,)

    def enqueue(self, stream, what: str, run: Callable[[], None], kind: str) -> cudaError_t:
        """Put an op on a stream: recorded if the stream is capturing, else run (now, or by its worker). `kind`
        counts it in `events` ("HostToDevice", "decoder execute", "graph launch")."""
        target = self.find_stream(stream)
        if target is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        op = Op(what, threading.current_thread().name, run)
        with self.lock:
            self.events[f"enqueued {kind}"] += 1
            capture = target.capture
            if capture is not None:
                capture.ops.append(op)
                self.events["captured_ops"] += 1
                if capture.thread is not threading.current_thread():
                    self.events["foreign_captured_ops"] += 1
                    self.violations.append(f"{what} from {op.thread} was recorded into the graph that "
                                           f"{capture.thread.name} is capturing")
                return cudaError_t.cudaSuccess
        target.submit(op, self.violations)
        return cudaError_t.cudaSuccess

    def is_capturing(self, stream) -> bool:
        target = self.find_stream(stream)
        return target is not None and target.capture is not None

    # capture and graphs

    def cudaStreamBeginCapture(self, stream, mode):
        target = self.find_stream(stream)
        if target is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        with self.lock:
            if target.capture is not None:
                return (cudaError_t.cudaErrorIllegalState,)
            target.capture = Capture(threading.current_thread(), cudaStreamCaptureMode(mode))
            self.events["captures_begun"] += 1
        if self.on_begin_capture is not None:
            self.on_begin_capture(target.handle)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        target = self.find_stream(stream)
        if target is None or target.capture is None:
            return cudaError_t.cudaErrorIllegalState, None
        with self.lock:
            capture = target.capture
            if (capture.mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed
                    and capture.thread is not threading.current_thread()):
                return cudaError_t.cudaErrorStreamCaptureWrongThread, None
            target.capture = None
            if capture.invalidated:
                self.events["captures_invalidated"] += 1
                return cudaError_t.cudaErrorStreamCaptureInvalidated, None
            handle = next(self.handles)
            self.graphs[handle] = tuple(capture.ops)
            self.events["captures"] += 1
        return cudaError_t.cudaSuccess, handle

    def cudaGraphInstantiateWithFlags(self, graph, flags):
        with self.lock:
            ops = self.graphs.get(int(graph))
            if ops is None:
                return cudaError_t.cudaErrorInvalidValue, None
            handle = next(self.handles)
            self.execs[handle] = ops
        return cudaError_t.cudaSuccess, handle

    def cudaGraphLaunch(self, graphExec, stream):
        with self.lock:
            ops = self.execs.get(int(graphExec))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue,)

        def replay():
            for op in ops:
                op.run()

        error = self.enqueue(stream, f"cudaGraphLaunch of {len(ops)} ops", replay, "graph launch")
        if error == cudaError_t.cudaSuccess:
            with self.lock:
                self.events["graph_launches"] += 1
                self.events["replayed_ops"] += len(ops)
        return (error,)

    def cudaGraphExecDestroy(self, graphExec):
        with self.lock:
            found = self.execs.pop(int(graphExec), None)
        return (cudaError_t.cudaSuccess if found is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaGraphDestroy(self, graph):
        with self.lock:
            found = self.graphs.pop(int(graph), None)
        return (cudaError_t.cudaSuccess if found is not None else cudaError_t.cudaErrorInvalidValue,)

    def live(self) -> Counter:
        """Live allocations by kind and live streams (all zero once every pipeline is closed)."""
        with self.lock:
            counts = Counter(a.kind for a in self.allocations.values())
            counts["streams"] = len(self.streams)
            return counts
