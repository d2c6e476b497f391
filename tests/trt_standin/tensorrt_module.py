"""A CPU stand-in for the `tensorrt` / `tensorrt_rtx` Python module, as the TensorRT backend uses it.

Test harness only. Names and enum values are TensorRT's (tests/runtime/test_tensorrt_standin.py checks them against
the installed tensorrt_rtx). An "engine" is a real engine file whose bytes the harness registered (by sha256) with
the ONNX graph it was built from and the optimization profiles its manifest records:

    Runtime(logger).deserialize_cuda_engine(bytes) ─▶ Engine: I/O names, dtypes, shapes (-1: dynamic) from the ONNX,
                                                              profiles from the manifest
    engine.create_execution_context() ─▶ Context: profile, input shapes (checked against the profile, as TensorRT
                                                  does), tensor addresses
    context.get_tensor_shape(output)  ─▶ the output shapes ONNX Runtime gives for the current input shapes (one
                                          probe run on zeros per set of shapes, cached)
    context.execute_async_v3(stream)  ─▶ checks every binding (its bytes inside one live device allocation), then
                                          enqueues on the CUDA stand-in's stream an op that reads the inputs from
                                          their addresses, runs the ONNX graph with ONNX Runtime (CPU) and writes the
                                          outputs to theirs; under capture the op is recorded, and TensorRT's rule
                                          that shapes must not change between the last plain run and a capture is
                                          checked

`int64_as_int32=True` presents int64 tensors as INT32, as TensorRT 8.5 does, so the backend's cast path runs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
               DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
               DataType.INT64: np.int64}
ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 7: DataType.INT64}  # onnx.TensorProto elem_type -> DataType


def nptype(trt_type) -> type:
    """TensorRT's `nptype`: the numpy type of a DataType."""
    return NUMPY_TYPES[DataType(trt_type)]


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ILogger:
    """TensorRT's logger interface (the backend subclasses it and calls `ILogger.__init__`)."""

    class Severity(IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self):
        pass

    def log(self, severity, msg) -> None:
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = ILogger.Severity

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity, msg) -> None:
        if int(severity) <= int(self.min_severity):
            logger.warning("TensorRT stand-in: %s", msg)


@dataclass(frozen=True)
class EngineRecipe:
    """What an engine file stands for: its graph's ONNX file and the profiles it was built with."""

    graph: str
    onnx: Path
    profiles: tuple[dict[str, tuple[Shape, Shape, Shape]], ...]


class Registry:
    """Engine recipes by the sha256 of the engine bytes, the CUDA stand-in the engines run on, and the options."""

    def __init__(self, cuda, *, int64_as_int32: bool = False, capturable: bool = True):
        self.cuda, self.int64_as_int32, self.capturable = cuda, int64_as_int32, capturable
        self.recipes: dict[str, EngineRecipe] = {}
        self.sessions: dict[Path, object] = {}  # one ONNX Runtime session per ONNX file
        self.lock = threading.Lock()

    def add(self, engine_bytes: bytes, recipe: EngineRecipe) -> None:
        self.recipes[hashlib.sha256(engine_bytes).hexdigest()] = recipe

    def onnxruntime(self, path: Path):
        import onnxruntime

        with self.lock:
            if path not in self.sessions:
                self.sessions[path] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return self.sessions[path]


class Engine:
    """ICudaEngine's name-based API."""

    def __init__(self, recipe: EngineRecipe, registry: Registry, log: ILogger):
        import onnx

        self.recipe, self.registry, self.log = recipe, registry, log
        graph = onnx.load(str(recipe.onnx), load_external_data=False).graph
        self.modes, self.onnx_dtypes, self.shapes = {}, {}, {}
        for mode, values in ((TensorIOMode.INPUT, graph.input), (TensorIOMode.OUTPUT, graph.output)):
            for value in values:
                tensor = value.type.tensor_type
                self.modes[value.name] = mode
                self.onnx_dtypes[value.name] = ONNX_TYPES[tensor.elem_type]
                self.shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                                for d in tensor.shape.dim)
        self.names = list(self.modes)
        self.inputs = [n for n in self.names if self.modes[n] == TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if self.modes[n] == TensorIOMode.OUTPUT]
        self.output_shapes_cache: dict[tuple, dict[str, Shape]] = {}

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.recipe.profiles)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_dtype(self, name: str) -> DataType:
        dtype = self.onnx_dtypes[name]
        return DataType.INT32 if dtype == DataType.INT64 and self.registry.int64_as_int32 else dtype

    def get_tensor_shape(self, name: str) -> Shape:
        return self.shapes[name]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.modes.get(name, TensorIOMode.NONE)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Shape]:
        if self.modes.get(name) != TensorIOMode.INPUT or not 0 <= profile_index < len(self.recipe.profiles):
            self.log.log(ILogger.Severity.ERROR, f"getProfileShape: no profile {profile_index} for {name!r}")
            return []
        return [tuple(shape) for shape in self.recipe.profiles[profile_index][name]]

    def create_execution_context(self) -> Context:
        return Context(self)

    def output_shapes(self, input_shapes: dict[str, Shape]) -> dict[str, Shape]:
        """The output shapes for these input shapes: ONNX Runtime's, from one run on zeros (cached)."""
        key = tuple(input_shapes[name] for name in self.inputs)
        if key not in self.output_shapes_cache:
            feed = {name: np.zeros(input_shapes[name], nptype(self.onnx_dtypes[name])) for name in self.inputs}
            results = self.registry.onnxruntime(self.recipe.onnx).run(self.outputs, feed)
            self.output_shapes_cache[key] = {n: tuple(r.shape) for n, r in zip(self.outputs, results)}
        return self.output_shapes_cache[key]


class Context:
    """IExecutionContext: one optimization profile, the input shapes and the tensor addresses."""

    def __init__(self, engine: Engine):
        self.engine, self.log = engine, engine.log
        self.profile = 0  # TensorRT's default
        self.input_shapes: dict[str, Shape] = {}
        self.addresses: dict[str, int] = {}
        self.ran_with: dict[str, Shape] | None = None  # input shapes of the last enqueue outside a capture

    def _error(self, message: str) -> bool:
        self.log.log(ILogger.Severity.ERROR, f"{self.engine.recipe.graph}: {message}")
        return False

    def set_optimization_profile_async(self, profile_index: int, stream: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return self._error(f"setOptimizationProfileAsync: no profile {profile_index}")
        if self.engine.registry.cuda.find_stream(stream) is None:
            return self._error(f"setOptimizationProfileAsync: {stream:#x} is no stream")
        self.profile, self.input_shapes, self.ran_with = profile_index, {}, None
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(s) for s in shape)
        if self.engine.modes.get(name) != TensorIOMode.INPUT:
            return self._error(f"setInputShape: {name!r} is not an input")
        low, _, high = self.engine.recipe.profiles[self.profile][name]
        declared = self.engine.shapes[name]
        if len(shape) != len(declared) or any(d >= 0 and s != d for s, d in zip(shape, declared)) \
                or any(not lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return self._error(f"setInputShape: {name} {shape} is outside profile {self.profile} "
                               f"[{tuple(low)}, {tuple(high)}]")
        self.input_shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Shape:
        if name in self.input_shapes:
            return self.input_shapes[name]
        if self.engine.modes.get(name) == TensorIOMode.OUTPUT and len(self.input_shapes) == len(self.engine.inputs):
            return self.engine.output_shapes(self.input_shapes)[name]
        return self.engine.shapes[name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.modes:
            return self._error(f"setTensorAddress: no tensor {name!r}")
        self.addresses[name] = int(memory)
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        """TensorRT 10+ and RTX: whether this context's runs may be captured on `stream` (`Registry.capturable`)."""
        return self.engine.registry.capturable and self.engine.registry.cuda.find_stream(stream) is not None

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Check the bindings, then enqueue the graph's run on the stand-in stream (recorded under capture)."""
        engine, cuda = self.engine, self.engine.registry.cuda
        unset = [name for name in engine.inputs if name not in self.input_shapes]
        unbound = [name for name in engine.names if name not in self.addresses]
        if unset or unbound:
            return self._error(f"enqueueV3: input shapes not set for {unset}, no address for {unbound}")
        capturing = cuda.is_capturing(stream_handle)
        if capturing and self.ran_with != self.input_shapes:
            # TensorRT: after a shape change, the first enqueue does shape-dependent setup that a capture must not
            # record ("call enqueueV3() once before capturing").
            return self._error("enqueueV3 under stream capture with input shapes that changed since the last "
                               "enqueue outside a capture")
        shapes = {**self.input_shapes, **engine.output_shapes(self.input_shapes)}
        dtypes = {name: nptype(engine.get_tensor_dtype(name)) for name in engine.names}
        addresses = dict(self.addresses)
        for name in engine.names:
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * np.dtype(dtypes[name]).itemsize
            problem = cuda.check_range(addresses[name], nbytes, "device")
            if problem is not None:
                cuda.violations.append(f"{engine.recipe.graph}: binding {name} {shapes[name]}: {problem}")
                return self._error(f"enqueueV3: binding {name} {shapes[name]}: {problem}")
        recipe, registry = engine.recipe, engine.registry

        def run():
            feed = {name: cuda.read(addresses[name], dtypes[name], shapes[name])
                    .astype(nptype(engine.onnx_dtypes[name]), copy=False) for name in engine.inputs}
            results = registry.onnxruntime(recipe.onnx).run(engine.outputs, feed)
            for name, result in zip(engine.outputs, results):
                if tuple(result.shape) != shapes[name]:
                    raise RuntimeError(f"{recipe.graph}: output {name} has shape {result.shape}, "
                                       f"TensorRT said {shapes[name]}")
                cuda.write(addresses[name], result.astype(dtypes[name], copy=False))

        error = cuda.enqueue(stream_handle, f"{recipe.graph}: execute_async_v3 (profile {self.profile})", run,
                             f"{recipe.graph} execute")
        if error != cuda.cudaError_t.cudaSuccess:
            return self._error(f"enqueueV3: {error.name}")
        if not capturing:
            self.ran_with = dict(self.input_shapes)
        return True


def make_module(registry: Registry, version: str, name: str = "tensorrt_rtx") -> ModuleType:
    """A module that stands in for `tensorrt_rtx` (or `tensorrt`), its engines the registry's."""

    class Runtime:
        """IRuntime: deserializes the registered engines."""

        def __init__(self, logger: ILogger):
            self.logger = logger
            self.engine_host_code_allowed = False
            self.DLA_core = -1

        def deserialize_cuda_engine(self, serialized_engine) -> Engine | None:
            recipe = registry.recipes.get(hashlib.sha256(bytes(serialized_engine)).hexdigest())
            if recipe is None:
                self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: not an engine the "
                                                        "stand-in's harness registered")
                return None
            return Engine(recipe, registry, self.logger)

    module = ModuleType(name, f"CPU stand-in for {name} (tests/trt_standin)")
    for value in (DataType, TensorIOMode, ILogger, Logger, Runtime, nptype):
        setattr(module, value.__name__, value)
    module.__version__ = version
    module.registry = registry
    return module
