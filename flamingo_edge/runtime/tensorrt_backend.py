"""The TensorRT backend: the engines of an engines folder (`flamingo-edge build`), run by tensor name.

    open_engines(ENGINES, EXPORT, specs)
      ├─ manifest: engine hashes, the export's ONNX hashes, then flavour, version and compute capability against
      │            this machine -> EngineMismatchError naming both and the rebuild command (before deserializing)
      └─ TensorRTSession per graph, all on one CUDA stream:
           at open: engine I/O vs the graph contract; one execution context per optimization profile (decoder:
                    prefill and decode); device buffers for every tensor at the profiles' largest shapes (the KV
                    inputs and outputs included) and pinned host staging of the same size, allocated once
           at run:  check_feed -> pick the profile -> inputs into pinned staging -> H2D -> execute_async_v3
                    (or the decode context's CUDA graph) -> D2H -> synchronize -> fresh numpy outputs

Works with TensorRT 8.5 to 11 and TensorRT for RTX (the name-based API they share) and cuda-python; no torch.
Written against those APIs and NOT yet run on a GPU: CI has none (docs/engines.md says what was run where).

The session keeps the backend protocol (numpy in, fresh numpy out), so the self-attention cache travels to the
device with every decode step; keeping it on the device is the next step for long contexts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flamingo_edge.manifest import DLA_GRAPHS, Manifest, RuntimeKey, check_runtime, read_manifest
from flamingo_edge.errors import EngineMismatchError, GraphContractError, PromptTooLongError
from flamingo_edge.graphs import GraphSpec, TensorSpec, format_dims
from flamingo_edge.runtime.backend import BaseSession, check_model_io

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


def select_profile(profiles: list[dict[str, tuple[Shape, Shape, Shape]]], shapes: Mapping[str, Shape]) -> int:
    """The optimization profile for a set of input shapes: of those that admit every shape, the one whose opt shape
    of the first input (the decoder's input_ids [B, S]) is nearest, so a decode step (S = 1) takes the decode profile
    whatever its past length, and a prompt the prefill one.

    Raises:
        PromptTooLongError: no profile admits the shapes (the engines were built for smaller limits).
    """
    best = None
    for index, profile in enumerate(profiles):
        fits = all(all(low <= size <= high for low, size, high in zip(lows, shapes[name], highs))
                   for name, (lows, _, highs) in profile.items())
        if fits:
            first, (_, opts, _) = next(iter(profile.items()))
            distance = sum(abs(size - opt) for size, opt in zip(shapes[first], opts))
            if best is None or distance < best[0]:
                best = (distance, index)
    if best is None:
        largest = {name: highs for name, (_, _, highs) in profiles[-1].items()}
        over = [f"{name} {tuple(shape)} > {tuple(largest[name])}" for name, shape in shapes.items()
                if name in largest and any(s > h for s, h in zip(shape, largest[name]))]
        raise PromptTooLongError("these inputs exceed the shape limits the engines were built for ("
                                 + ("; ".join(over) or "no profile admits them")
                                 + "); rebuild with larger --max-prompt/--max-context/--max-images/--max-batch")
    return best[1]


class TensorRTSession(BaseSession):
    """One engine, checked against its contract when opened and fed by name.

    `run` returns fresh arrays on every call; they belong to the caller.
    """

    def __init__(self, path: str | Path, spec: GraphSpec, trt, stream, *, cuda_graph: bool = False,
                 host_code_allowed: bool = False, dla_core: int | None = None):
        """Deserialize `path` (already checked against this machine by `open_engines`).

        Args:
            path: a .engine file.
            spec: the graph's contract.
            trt: the TensorRT (engines/trt_compat.TensorRT) that built it.
            stream: the runtime.cuda.Stream every session of a pipeline shares.
            cuda_graph: replay the decode profile's runs from a CUDA graph, captured for the current input shapes and
                captured again when they change (the pipeline then decodes with a fixed-size past, so the shapes
                stay the same for every step and every generation of the same batch size).
            host_code_allowed: the engine is version-compatible and carries its lean runtime (trusted: its sha256
                was checked against our manifest).
            dla_core: the DLA core the engine was built for (Jetson).

        Raises:
            EngineMismatchError: TensorRT refuses the engine.
            GraphContractError: its inputs/outputs differ from `spec`.
        """
        from flamingo_edge.trt_compat import collecting_logger
        from flamingo_edge.runtime import cuda

        self.path, self.spec, self.trt, self.stream, self.cuda = Path(path), spec, trt, stream, cuda
        module = trt.module
        self.log = collecting_logger(module)
        self.runtime = module.Runtime(self.log)
        if host_code_allowed:
            self.runtime.engine_host_code_allowed = True
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"{spec.name}: {trt.flavour} {trt.version} cannot deserialize {self.path} ("
                                      + ("; ".join(self.log.errors[-3:]) or "no message") + "); rebuild it on this "
                                      "machine with flamingo-edge build")
        self.dtypes = self._check_io(module)
        self.profiles = [{t.name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(t.name, index))
                          for t in spec.inputs} for index in range(self.engine.num_optimization_profiles)]
        self.contexts = []
        for index in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            if context is None or context.set_optimization_profile_async(index, stream.ptr) is False:
                raise EngineMismatchError(f"{spec.name}: TensorRT could not set up profile {index} of {self.path} ("
                                          + ("; ".join(self.log.errors[-3:]) or "no message") + ")")
            self.contexts.append(context)
        stream.synchronize()
        self.buffers, self.staging = {}, {}
        for name, nbytes in self._largest_bytes().items():
            self.buffers[name], self.staging[name] = cuda.DeviceBuffer(nbytes), cuda.PinnedBuffer(nbytes)
        for context in self.contexts:
            for name, buffer in self.buffers.items():
                context.set_tensor_address(name, buffer.ptr)
        decode = len(self.profiles) - 1 if spec.name == "decoder" and len(self.profiles) > 1 else None
        self.graph_profile = decode if cuda_graph else None
        self.graph, self.graph_shapes = None, None  # one CUDA graph, for the decode context's current shapes
        stream.acquire()

    def _check_io(self, module) -> dict[str, np.dtype]:
        """The engine's dtype of every tensor, after checking its I/O against the contract. TensorRT 8.5 turns int64
        inputs into int32; those are accepted and cast when fed."""
        declared = {"input": [], "output": []}
        dtypes = {}
        wanted = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = np.dtype(module.nptype(self.engine.get_tensor_dtype(name)))
            dtypes[name] = dtype
            contract = wanted.get(name)
            as_declared = contract.dtype if contract is not None and (dtype.name, contract.dtype) == (
                "int32", "int64") else dtype.name
            dims = tuple(None if d < 0 else d for d in self.engine.get_tensor_shape(name))
            kind = "input" if self.engine.get_tensor_mode(name) == module.TensorIOMode.INPUT else "output"
            declared[kind].append(TensorSpec(name, as_declared, dims))
        check_model_io(self.spec, self.path, declared["input"], declared["output"])
        return dtypes

    def _largest_bytes(self) -> dict[str, int]:
        """Bytes of every tensor at the largest shapes of any profile: inputs from the profiles, outputs as TensorRT
        infers them from those inputs."""
        sizes: dict[str, int] = {}
        for context, profile in zip(self.contexts, self.profiles):
            for name, (_, _, high) in profile.items():
                context.set_input_shape(name, high)
            for tensor in (*self.spec.inputs, *self.spec.outputs):
                shape = tuple(context.get_tensor_shape(tensor.name))
                nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[tensor.name].itemsize
                sizes[tensor.name] = max(sizes.get(tensor.name, 0), nbytes)
        return sizes

    closed_hint = "open the engines again to run them"

    @property
    def closed(self) -> bool:
        return self.engine is None

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine (the feed is checked).

        Raises:
            PromptTooLongError: the feed exceeds the engine's shape limits.
            CudaError: TensorRT or CUDA failed.
        """
        shapes = {name: tuple(feed[name].shape) for name in self.spec.input_names}
        index = select_profile(self.profiles, shapes)
        context = self.contexts[index]
        for name, shape in shapes.items():
            staged = self.staging[name].view(self.dtypes[name], shape)
            np.copyto(staged, feed[name], casting="same_kind" if staged.dtype == feed[name].dtype else "unsafe")
            if not context.set_input_shape(name, shape):
                raise GraphContractError(f"{self.spec.name}: TensorRT refused shape {format_dims(shape)} for {name}")
            self.cuda.copy_to_device(self.buffers[name], self.staging[name], staged.nbytes, self.stream)
        outputs = {t.name: tuple(context.get_tensor_shape(t.name)) for t in self.spec.outputs}
        self._execute(index, context, shapes)
        for name, shape in outputs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            self.cuda.copy_to_host(self.staging[name], self.buffers[name], nbytes, self.stream)
        self.stream.synchronize()
        return {t.name: self.staging[t.name].view(self.dtypes[t.name], outputs[t.name]).astype(t.np_dtype, copy=True)
                for t in self.spec.outputs}

    def _execute(self, index: int, context, shapes: dict[str, Shape]) -> None:
        """Enqueue the engine: a plain `execute_async_v3`, or for the decode profile with CUDA graphs, its graph.

        A captured graph belongs to its context's state, so the decode context keeps one graph, for the shapes it
        was captured with. New shapes get a plain run first (TensorRT finishes its shape-dependent setup there, and
        the capture must not see it), then a new capture. If a capture fails, graphs are turned off for the session
        and it goes on with plain runs.
        """
        key = tuple(shapes.values())
        if index == self.graph_profile and self.graph is not None and key == self.graph_shapes:
            self.graph.launch(self.stream)
            return
        self._enqueue(context)
        if index != self.graph_profile:
            return
        if self.graph is not None:
            self.graph.close()
            self.graph = None
        try:
            self.graph, self.graph_shapes = self.cuda.CudaGraph(self.stream, lambda: self._enqueue(context)), key
        except self.cuda.CudaError as error:
            logger.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.spec.name, error)
            self.graph_profile = None

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self.stream.ptr):
            raise self.cuda.CudaError(f"{self.spec.name}: TensorRT could not run {self.path.name} ("
                                      + ("; ".join(self.log.errors[-3:]) or "no message") + ")")

    def _release(self) -> None:
        """Free the device memory, the pinned staging, the graphs and the engine."""
        if self.graph is not None:
            self.graph.close()
        for buffer in (*self.buffers.values(), *self.staging.values()):
            buffer.close()
        self.graph, self.buffers, self.staging = None, {}, {}
        self.stream.release()
        self.contexts, self.engine = [], None


def runtime_key(manifest: Manifest):
    """The TensorRT the manifest needs, imported, and this machine's key.

    Raises:
        FeatureUnavailableError: that TensorRT, cuda-python or a GPU is missing.
    """
    from flamingo_edge.trt_compat import load
    from flamingo_edge.runtime.cuda import device_info

    trt = load(manifest.tensorrt["flavour"])
    info = device_info()
    return trt, RuntimeKey(trt.flavour, trt.version, info.compute_capability, info.name)


def open_engines(engines_dir: str | Path, export_dir: str | Path | None, specs: Mapping[str, GraphSpec], *,
                 cuda_graph: bool = False) -> tuple[Manifest, dict[str, TensorRTSession]]:
    """Check an engines folder against the export and this machine, then open one session per graph of `specs`.

    Raises:
        EngineBuildError: an incomplete or modified engines folder.
        EngineMismatchError: engines built from other ONNX graphs, or for another TensorRT or GPU.
        FeatureUnavailableError: no TensorRT, cuda-python or GPU here.
        GraphContractError: an engine's I/O differs from the contract.
    """
    from flamingo_edge.runtime.cuda import Stream

    manifest = read_manifest(engines_dir, export_dir)
    missing = [name for name in specs if name not in manifest.engines]
    if missing:
        raise EngineMismatchError(f"{engines_dir} has no engines for {missing}; run flamingo-edge build again")
    trt, key = runtime_key(manifest)
    check_runtime(manifest, key, engines_dir, export_dir)
    stream = Stream()  # one stream for every graph; each session holds it, the last to close destroys it
    sessions: dict[str, TensorRTSession] = {}
    try:
        for name, spec in specs.items():
            sessions[name] = TensorRTSession(Path(engines_dir) / manifest.engines[name]["file"], spec, trt, stream,
                                             cuda_graph=cuda_graph, host_code_allowed=manifest.version_compatible,
                                             dla_core=manifest.dla_core if name in DLA_GRAPHS else None)
    except BaseException:
        for session in sessions.values():
            session.close()
        raise
    finally:
        stream.release()
    logger.info("opened %s: %s engines for %s on %s", engines_dir, manifest.precision, manifest.compute_capability,
                key.describe())
    return manifest, sessions
