"""runtime/cuda.py's answers when CUDA cannot start: cuda-python built for a newer CUDA than the driver
(cudaErrorInsufficientDriver), no driver at all, and cuda-python 11.8, which raises instead of returning an error.
A small stand-in for cuda-python's runtime module answers the calls; no GPU or driver is needed."""

from __future__ import annotations

import enum

import pytest

from flamingo_edge.errors import FeatureUnavailableError
from flamingo_edge.runtime import cuda


class CudaError(enum.IntEnum):  # the values are cuda-python's
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class Runtime:
    """cuda-python's runtime module as far as `device_info` calls it."""

    cudaError_t = CudaError

    def __init__(self, *, count=(CudaError.cudaErrorInsufficientDriver, 0), runtime=13040, driver=12060,
                 raises: str | None = None):
        self.count, self.runtime, self.driver, self.raises = count, runtime, driver, raises

    def cudaGetDeviceCount(self):
        if self.raises:
            raise RuntimeError(self.raises)
        return self.count

    def cudaRuntimeGetVersion(self):
        return CudaError.cudaSuccess, self.runtime

    def cudaDriverGetVersion(self):
        return CudaError.cudaSuccess, self.driver

    def cudaGetErrorString(self, error):
        return CudaError.cudaSuccess, {CudaError.cudaErrorNoDevice: b"no CUDA-capable device is detected"}[error]


def _device_info_with(monkeypatch, runtime: Runtime) -> str:
    monkeypatch.setattr(cuda, "runtime_module", lambda: runtime)
    with pytest.raises(FeatureUnavailableError) as raised:
        cuda.device_info()
    return str(raised.value)


def test_cuda_13_python_on_a_cuda_12_driver_names_both_and_the_extra(monkeypatch):
    message = _device_info_with(monkeypatch, Runtime(runtime=13040, driver=12060))  # cuda-python 13 on JetPack 6
    assert message.startswith("CUDA cannot start (cudaGetDeviceCount: cudaErrorInsufficientDriver): ")
    assert "cuda-python is built for CUDA 13.4, which needs an NVIDIA driver for CUDA 13 (driver >= 580" in message
    assert "this machine's driver supports CUDA 12.6" in message
    assert "pip install 'flamingo-edge[tensorrt-cu12]'" in message
    assert "no usable one" not in message  # there is a GPU; its driver is older
    message = _device_info_with(monkeypatch, Runtime(runtime=12080, driver=11040))  # cuda-python 12 on JetPack 5
    assert "CUDA 12.8, which needs an NVIDIA driver for CUDA 12 (driver >= 525" in message
    assert "supports CUDA 11.4" in message and "'flamingo-edge[tensorrt-cu11]'" in message


def test_insufficient_driver_without_any_driver_says_no_usable_gpu_and_why(monkeypatch):
    # What this CPU machine answers: cudaDriverGetVersion gives 0 when no driver is installed.
    message = _device_info_with(monkeypatch, Runtime(runtime=13040, driver=0))
    assert message.startswith("TensorRT engines run on an NVIDIA GPU and this machine has no usable one (CUDA: "
                              "cudaErrorInsufficientDriver, and no driver says its version); use backend "
                              "'onnxruntime' here. If it has a GPU: the installed cuda-python is built for CUDA 13.4")
    assert "'flamingo-edge[tensorrt-cu12]'" in message and "'flamingo-edge[tensorrt-cu13]'" in message


def test_cuda_python_11_raising_without_a_driver_is_the_same_typed_error(monkeypatch):
    message = _device_info_with(monkeypatch, Runtime(raises="Failed to dlopen libcuda.so"))
    assert message == ("TensorRT engines run on an NVIDIA GPU and this machine has no usable one (cuda-python: "
                       "Failed to dlopen libcuda.so); use backend 'onnxruntime' here")


def test_no_device_keeps_cudas_reason(monkeypatch):
    message = _device_info_with(monkeypatch, Runtime(count=(CudaError.cudaErrorNoDevice, 0)))
    assert message == ("TensorRT engines run on an NVIDIA GPU and this machine has no usable one (CUDA: no "
                       "CUDA-capable device is detected); use backend 'onnxruntime' here")


def test_every_extra_the_errors_name_exists():
    import re
    from pathlib import Path

    text = (Path(cuda.__file__).read_text())
    named = set(re.findall(r"flamingo-edge\[([a-z0-9-]+)\]", text)) | set(cuda.CUDA_EXTRAS.values())
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert named and named <= set(declared), named - set(declared)
