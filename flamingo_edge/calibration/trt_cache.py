"""TensorRT's INT8 calibration cache, written from our own statistics, for implicit INT8 on TensorRT <= 10.

TensorRT 8.5 (JetPack 5) and 10.x (JetPack 6) can still build implicit INT8 engines with an `IInt8Calibrator`; given
a cache through `read_calibration_cache`, they skip calibration. So a Jetson can build INT8 from the statistics
computed here on the CPU, with no calibration loop on the device. TensorRT 11 and TensorRT for RTX dropped implicit
INT8: they take the Q/DQ graphs of `quantize.py` instead. Both come from the same activation ranges.

The format is plain text. The C++ and Python APIs only call it opaque bytes, so this is the de facto format:

    TRT-8502-EntropyCalibration2
    pixel_values: 3c898a9d
    /vision/patch_embed/Conv_output_0: 3f8a3d71

- The first line is `TRT-<NV_TENSORRT_VERSION>-<calibrator>`.
- Each further line is `<ONNX tensor name>: <hex of the big-endian float32 scale>`, where scale = amax / 127
  (symmetric int8).

Sources:
- ONNX Runtime's TensorRT execution provider, `ReadDynamicRange` in tensorrt_execution_provider_utils.h, parses it
  as "tensor name : scale in 32-bit single precision IEEE754 format" and computes range = scale * 127.
- NVIDIA ModelOpt's `calib_utils.import_scales_from_calib_cache` skips the header and decodes
  `struct.unpack("!f", bytes.fromhex(value))`.
- NV_TENSORRT_VERSION is major*1000 + minor*100 + patch up to TensorRT 8 (8.5.2 -> 8502) and
  major*10000 + minor*100 + patch from 10 on (10.3.0 -> 100300), per NvInferVersion.h.
- TensorRT ignores a cache whose header does not match its version and calibrator (NVIDIA/TensorRT#1378), so
  write the header of the TensorRT the device runs. The scales below the header do not depend on the TensorRT
  version (they are ONNX tensor names and our own activation ranges), so `for_tensorrt` rewrites the header of a
  cache written for another version; `flamingo-edge build` does so for the TensorRT that builds, and
  `int8_calibrator` refuses a cache whose header its TensorRT would ignore (it would build INT8 with no ranges).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flamingo_edge.errors import CalibrationError, FeatureUnavailableError, UsageError

logger = logging.getLogger(__name__)
CALIBRATOR = "EntropyCalibration2"  # the name IInt8EntropyCalibrator2 writes; the one the cache-only calibrator uses
INT8_MAX = 127.0


def header(tensorrt_version: str, calibrator: str = CALIBRATOR) -> str:
    """`TRT-<NV_TENSORRT_VERSION>-<calibrator>` for a version like "8.5.2" or "10.3" (patch 0 when omitted).

    Raises:
        UsageError: not a version TensorRT's implicit INT8 exists for (7.x to 10.x).
    """
    try:
        parts = [int(p) for p in tensorrt_version.split(".")[:3]]
    except ValueError:
        raise UsageError(f"{tensorrt_version!r} is not a TensorRT version like 8.5.2 or 10.3") from None
    major, minor, patch = (parts + [0, 0])[:3]
    if not 7 <= major <= 10:
        raise UsageError(f"TensorRT {tensorrt_version} has no implicit INT8 calibration (TensorRT 7 to 10 have it; "
                         "TensorRT 11 and TensorRT for RTX take the Q/DQ graphs instead)")
    number = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    return f"TRT-{number}-{calibrator}"


def for_tensorrt(cache: bytes, tensorrt_version: str) -> bytes:
    """`cache` (from `write_cache`) with the header of TensorRT `tensorrt_version` (e.g. trt.__version__,
    "10.7.0.23"); the scales are kept byte for byte.

    Raises:
        CalibrationError: not a TensorRT calibration cache.
        UsageError: a TensorRT without implicit INT8.
    """
    first, _ = read_cache(cache)
    wanted = header(tensorrt_version)
    if first == wanted:
        return cache
    logger.info("the calibration cache was written for %s; TensorRT %s reads only %s: rewriting the header", first,
                tensorrt_version, wanted)
    return (wanted + "\n").encode() + cache.split(b"\n", 1)[1]


def activation_amax(onnx_path: str | Path, samples: Iterable[Mapping[str, np.ndarray]],
                    method: str = "minmax") -> dict[str, float]:
    """max |value| of every float tensor of the graph over the calibration samples (ONNX Runtime's calibrator, run
    on the CPU on the recorded feeds; "entropy" and "percentile" clip outliers as ORT's quantizer does)."""
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator

    from flamingo_edge.calibration.record import onnxruntime_method, onnxruntime_reader

    with tempfile.TemporaryDirectory() as scratch:
        calibrator = create_calibrator(Path(onnx_path), None, augmented_model_path=str(Path(scratch) / "aug.onnx"),
                                       calibrate_method=onnxruntime_method(method), extra_options={"symmetric": True})
        calibrator.collect_data(onnxruntime_reader(samples))
        ranges = calibrator.compute_data().data
    return {name: float(max(np.abs(np.asarray(r.range_value[0])).max(), np.abs(np.asarray(r.range_value[1])).max()))
            for name, r in ranges.items()}


def write_cache(amax: Mapping[str, float], tensorrt_version: str) -> bytes:
    """The cache text for `amax` (tensor name -> max |value|), scales as float32 amax / 127."""
    lines = [header(tensorrt_version)]
    for name, value in amax.items():
        if ":" in name or "\n" in name:
            raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache")
        lines.append(f"{name}: {struct.pack('!f', np.float32(value / INT8_MAX)).hex()}")
    return ("\n".join(lines) + "\n").encode()


def read_cache(data: bytes) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> scale) of a cache's bytes.

    Raises:
        CalibrationError: not a TensorRT calibration cache.
    """
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise CalibrationError("not a TensorRT calibration cache: it is not ASCII text") from None
    if not lines or not lines[0].startswith("TRT-"):
        raise CalibrationError("not a TensorRT calibration cache: the first line must be TRT-<version>-<calibrator>")
    scales = {}
    for number, line in enumerate(lines[1:], 2):
        name, sep, value = line.rpartition(": ")
        try:
            if not sep or len(value) != 8:
                raise ValueError
            scales[name] = struct.unpack("!f", bytes.fromhex(value))[0]
        except ValueError:
            raise CalibrationError(f"calibration cache line {number} is not '<tensor>: <8 hex digits>': "
                                   f"{line!r}") from None
    return lines[0], scales


def qdq_scales(onnx_path: str | Path) -> dict[str, float]:
    """Input tensor -> scale of every QuantizeLinear in a Q/DQ graph (the activations; weights are stored int8)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {node.input[0]: float(constants[node.input[1]]) for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[1] in constants}


def int8_calibrator(cache: bytes | None = None, samples: Iterable[Mapping[str, np.ndarray]] | None = None,
                    trt=None, opt_shapes: Mapping[str, Sequence[int]] | None = None):
    """An `IInt8EntropyCalibrator2` for implicit INT8 on TensorRT 8.5/10.x: `config.int8_calibrator = ...` with
    `BuilderFlag.INT8`.

    With `cache` (from `write_cache`, with this TensorRT's header: `for_tensorrt`), TensorRT reads it and never asks
    for data: the way to build INT8 on a Jetson from statistics computed on the CPU. With `samples` (e.g.
    `iter_samples(CALIB, "vision")`) and no cache, TensorRT calibrates itself on the recorded feeds, one feed per
    batch, copied to the GPU with cuda-python; the cache it writes is kept in `.written`. TensorRT and cuda-python
    are imported here only.

    TensorRT calibrates a dynamic-shape network at the calibration profile's opt shapes only (profile 0 unless
    `config.set_calibration_profile` says otherwise) and reads each batch's device buffers as that shape: it is
    told pointers, never shapes. So `samples` need `opt_shapes`, that profile's {input: opt shape}; a feed of other
    shapes (the decoder's recorded prompts and steps vary in S and P) is skipped, never handed over, and counted
    in `.skipped` (`.used`: the feeds TensorRT got). When none fits, calibration ends with no data and the build
    fails; the decoder's recorded feeds calibrate through the cache instead (`quantize --precision int8` computes
    its ranges on the CPU over every feed, whatever its shape).

    Raises:
        FeatureUnavailableError: no TensorRT with implicit INT8 (none installed, TensorRT 11, TensorRT for RTX), or
            samples without cuda-python.
        UsageError: neither a cache nor samples, or samples without opt_shapes.
        CalibrationError: a cache whose header this TensorRT would ignore (another version or calibrator).
    """
    if cache is None and samples is None:
        raise UsageError("the calibrator needs a calibration cache or calibration samples")
    if cache is None and opt_shapes is None:
        raise UsageError("calibration samples need opt_shapes, the calibration profile's {input: opt shape}: "
                         "TensorRT reads every batch as that shape")
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            raise FeatureUnavailableError("the implicit INT8 calibrator needs TensorRT 8.5-10.x (pip install "
                                          "tensorrt, or JetPack's python3-libnvinfer)") from None
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise FeatureUnavailableError(f"TensorRT {getattr(trt, '__version__', '?')} has no implicit INT8 "
                                      "calibrators; build from the Q/DQ graphs (flamingo-edge quantize) instead")
    if cache is not None:
        first, wanted = read_cache(cache)[0], header(trt.__version__)
        if first != wanted:
            raise CalibrationError(
                f"the calibration cache's header is {first} and TensorRT {trt.__version__} reads only {wanted}: it "
                "would ignore the cache and build INT8 with no activation ranges. Rewrite the header with "
                "trt_cache.for_tensorrt(cache, trt.__version__) (flamingo-edge build does), or quantize again with "
                f"--trt-version {trt.__version__}")
        cudart = None
    else:
        from flamingo_edge.runtime.cuda import call, runtime_module

        cudart = runtime_module()
        opt_shapes = {name: tuple(int(d) for d in shape) for name, shape in opt_shapes.items()}

    from flamingo_edge.trt_compat import version_tuple

    narrow_int64 = version_tuple(getattr(trt, "__version__", "10"))[0] < 10

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.samples = iter(samples or ())
            self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
            self.written: bytes | None = None
            self.used = self.skipped = 0

        def get_batch_size(self):
            return 1  # every recorded feed is one batch, its own batch dimension included

        def next_fitting(self, names):
            """The next feed whose inputs have the opt shapes (None at the end); the others are skipped."""
            for sample in self.samples:
                shapes = {name: tuple(np.shape(sample[name])) for name in names}
                if all(shapes[name] == opt_shapes.get(name, shapes[name]) for name in names):
                    return sample
                if not self.skipped:
                    logger.warning("skipping calibration feeds whose shapes are not the calibration profile's opt "
                                   "shapes (TensorRT would read them as those): got %s, opt %s", shapes,
                                   {name: opt_shapes.get(name) for name in names})
                self.skipped += 1
            return None

        def get_batch(self, names):
            if cudart is None:
                return None  # the cache is complete
            sample = self.next_fitting(names)
            if sample is None:
                self.free()
                if not self.used:
                    logger.error("no calibration feed has the calibration profile's opt shapes %s (%d skipped): "
                                 "TensorRT calibrates on no data", opt_shapes, self.skipped)
                return None
            self.used += 1
            pointers = []
            for name in names:
                array = np.ascontiguousarray(sample[name])
                if array.dtype == np.int64 and narrow_int64:  # TensorRT 8.x imports int64 inputs as int32
                    array = array.astype(np.int32)
                pointer, size = self.buffers.get(name, (None, 0))
                if size < array.nbytes:
                    if pointer is not None:
                        call(cudart, "cudaFree", pointer)
                    pointer, size = call(cudart, "cudaMalloc", array.nbytes), array.nbytes
                    self.buffers[name] = (pointer, size)
                call(cudart, "cudaMemcpy", pointer, array.ctypes.data, array.nbytes,
                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
                pointers.append(int(pointer))
            return pointers

        def free(self):
            for pointer, _ in self.buffers.values():
                call(cudart, "cudaFree", pointer)
            self.buffers.clear()

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            self.written = bytes(data)

    return Calibrator()
