"""manifest.py: engines of one TensorRT version built by its CUDA 12 wheels are refused by its CUDA 13 wheels (and
the other way round) where both sides know their CUDA major; unknown on either side is not a mismatch."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flamingo_edge.errors import EngineMismatchError
from flamingo_edge.manifest import MANIFEST_VERSION, Manifest, RuntimeKey, check_runtime

VERSION = "1.7.1.116"


def _manifest(cuda_major: int | None) -> Manifest:
    return Manifest(MANIFEST_VERSION, "/export", "fp32", {"flavour": "tensorrt_rtx", "version": VERSION}, "rtx-sm86",
                    "SM86", {"max_batch": 1, "max_prompt": 32, "max_context": 48, "max_images": 3}, None, {},
                    cuda_major=cuda_major)


def test_the_cuda_build_of_tensorrt_must_match_where_known():
    key = RuntimeKey("tensorrt_rtx", VERSION, "SM86", "NVIDIA GeForce RTX 3090", cuda_major=13)
    check_runtime(_manifest(13), key, "engines")
    with pytest.raises(EngineMismatchError, match=r"built with the CUDA 12 build of tensorrt_rtx and this "
                                                  r"machine has its CUDA 13 build \(pip install "
                                                  r"tensorrt-rtx-cu12==1\.7\.1\.116"):
        check_runtime(_manifest(12), key, "engines")
    check_runtime(_manifest(None), key, "engines")  # a manifest from before the CUDA major was recorded


def test_the_runtime_side_reads_the_installed_wheel_when_not_told(monkeypatch):
    import flamingo_edge.manifest as manifest_module

    key = RuntimeKey("tensorrt_rtx", VERSION, "SM86", "NVIDIA GeForce RTX 3090")  # as tensorrt_backend makes it
    monkeypatch.setattr(manifest_module, "cuda_major", lambda flavour: 13)
    with pytest.raises(EngineMismatchError, match="CUDA 12 build"):
        check_runtime(_manifest(12), key, "engines")
    monkeypatch.setattr(manifest_module, "cuda_major", lambda flavour: None)  # JetPack's apt TensorRT: unknown
    check_runtime(_manifest(12), key, "engines")
    check_runtime(_manifest(12), replace(key, cuda_major=12), "engines")
