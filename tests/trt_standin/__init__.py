"""A CPU stand-in for CUDA (cuda-python's runtime) and TensorRT, to run the UNMODIFIED TensorRT backend
(flamingo_edge/runtime/tensorrt_backend.py and runtime/cuda.py) on a machine without a GPU. Test harness only.

    with installed(engines_dir, export_dir) as standin:          # real engines, built on the CPU by TensorRT for RTX
        with Pipeline.open(export_dir, backend="tensorrt", engines=engines_dir) as pipeline:
            ...                                                  # the real backend, on the stand-ins
        standin.cuda.events, standin.cuda.violations             # captures, replays, broken rules

`installed` patches `flamingo_edge.runtime.cuda.runtime_module` (-> cuda_runtime.CudaRuntime) and
`flamingo_edge.trt_compat.load` (-> tensorrt_module, with the manifest's flavour and version; the stand-in device
has the manifest's compute capability), so the manifest checks pass as on a matching GPU. Engines map to their
export's ONNX graph by the sha256 of their bytes; their profiles come from manifest.json (TensorRT for RTX cannot
deserialize an engine without a GPU, so the engine's own profiles cannot be read here; the manifest records what
the build set).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

from trt_standin.cuda_runtime import CudaRuntime
from trt_standin.tensorrt_module import EngineRecipe, Registry, make_module


@dataclass
class StandIn:
    cuda: CudaRuntime
    tensorrt: ModuleType
    registry: Registry


def register_engines(registry: Registry, engines_dir: str | Path, export_dir: str | Path) -> tuple[dict, str]:
    """Map every engine of an engines folder to its export's ONNX graph and the manifest's profiles.
    Returns the manifest's `tensorrt` record ({"flavour", "version"}) and compute capability ("SM86")."""
    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.manifest import read_manifest

    manifest = read_manifest(engines_dir, export_dir)  # checks the engines' and the ONNX files' hashes
    record = read_export_record(export_dir)
    for name, entry in manifest.engines.items():
        profiles = tuple({tensor: tuple(tuple(shape) for shape in shapes) for tensor, shapes in profile.items()}
                         for profile in manifest.profiles[name])
        recipe = EngineRecipe(name, Path(export_dir) / record.graphs[name].file, profiles)
        registry.add((Path(engines_dir) / entry["file"]).read_bytes(), recipe)
    return manifest.tensorrt, manifest.compute_capability


@contextlib.contextmanager
def installed(engines_dir: str | Path, export_dir: str | Path, *, int64_as_int32: bool = False,
              asynchronous: bool = True, capturable: bool = True) -> Iterator[StandIn]:
    """Install the stand-ins for the engines of `engines_dir` (built from `export_dir`) while the block runs.

    Args:
        int64_as_int32: present int64 tensors as INT32, as TensorRT 8.5 does.
        asynchronous: streams run their ops on a worker thread (else at enqueue, in the caller's thread).
        capturable: what the contexts' `is_stream_capturable` answers.
    """
    from flamingo_edge.trt_compat import TensorRT

    cuda = CudaRuntime(asynchronous=asynchronous)
    registry = Registry(cuda, int64_as_int32=int64_as_int32, capturable=capturable)
    built, capability = register_engines(registry, engines_dir, export_dir)
    cuda.properties.major, cuda.properties.minor = int(capability[2:-1]), int(capability[-1])  # "SM86" -> 8, 6
    module = make_module(registry, built["version"], built["flavour"])

    def load(flavour: str = "auto") -> TensorRT:
        return TensorRT(module, built["flavour"], built["version"])

    with mock.patch("flamingo_edge.runtime.cuda.runtime_module", lambda: cuda), \
            mock.patch("flamingo_edge.trt_compat.load", load):
        yield StandIn(cuda, module, registry)
