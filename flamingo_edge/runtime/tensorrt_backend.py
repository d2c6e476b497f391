"""The TensorRT backend: the engines of an engines folder (`flamingo-edge build`), run by tensor name.

    open_engines(ENGINES, EXPORT, specs)
      ├─ manifest: engine hashes, the export's ONNX hashes, then flavour, version and compute capability against
      │            this machine -> EngineMismatchError naming both and the rebuild command (before deserializing)
      └─ TensorRTSession per graph, each with its own CUDA stream and lock:
           at open: engine I/O vs the graph contract; one execution context per optimization profile (decoder:
                    prefill and decode); device buffers for every tensor at the profiles' largest shapes (the KV
                    inputs and outputs included) and pinned host staging of the same size for every tensor but the
                    decoder's past (it stays on the device), allocated once
           at run:  check_feed -> (the session's lock) pick the profile -> inputs into pinned staging -> H2D ->
                    execute_async_v3 (or the decode context's CUDA graph) -> D2H -> synchronize -> fresh numpy outputs

Works with TensorRT 8.5 to 11 and TensorRT for RTX (the name-based API they share) and cuda-python; no torch.
Written against those APIs and NOT yet run on a GPU: CI has none. CI runs this module's code unmodified on a CPU
stand-in for CUDA and TensorRT (tests/; docs/engines.md says what that proves and what still needs a GPU).

Sessions are thread-safe: a camera stream encodes frames (vision, resampler, xattn_kv) on one thread while another
generates. Each session runs under its own lock on its own stream, so one thread's copies can never land in a CUDA
graph another thread is capturing, nor in its staging buffers.

An input that is the same read-only array as the one last copied to its buffer is not copied again: the pipeline's
cross-attention K/V of a generation (`Pipeline.rows_kv`) are copied once, not at every decode step.

The self-attention cache stays on the device. The decoder's past inputs are one device buffer per layer and K/V,
bound once in both contexts, that mirrors the runtime's SelfAttentionCache ([B, H, C, Dh], the same layout): the
pipeline attaches its cache (`attach_cache`), which then feeds its whole buffers for prefills too. While the mirror
is current, a run copies none of the past: after the engine, the new tokens' K/V are copied on the device into
slots P..P+S-1 (a strided copy, outside any CUDA graph), and only logits and the new K/V come back to the host. The
mirror is brought up to date from the host (slots 0..P-1 only) when the cache was loaded or reset. Past inputs have
no pinned staging: a past that is not an attached cache's is copied from where it lies.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flamingo_edge.manifest import DLA_GRAPHS, Manifest, RuntimeKey, check_runtime, read_manifest
from flamingo_edge.errors import EngineMismatchError, GraphContractError, PromptTooLongError, UsageError
from flamingo_edge.graphs import GraphSpec, TensorSpec, format_dims, new_key, new_value, past_key, past_value
from flamingo_edge.runtime.backend import BaseSession, check_model_io

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shapes

# TensorRT's I/O data types by name -> numpy. Ours, not `tensorrt.nptype`: TensorRT 8.5.1/8.5.2's nptype names
# `np.bool`, which numpy 1.24 removed (NVIDIA/TensorRT#2557), so it raises on JetPack 5 with any recent numpy.
TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool"}


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy dtype of a TensorRT DataType (an enum member: `.name` "FLOAT", or str() "DataType.FLOAT").

    Raises:
        GraphContractError: a type with no numpy equivalent among the contract's (bf16, fp8, int4).
    """
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in TRT_TO_NUMPY:
        raise GraphContractError(f"TensorRT data type {name} has no numpy type the graph contract uses "
                                 f"({', '.join(TRT_TO_NUMPY)}); rebuild the engines with flamingo-edge build")
    return np.dtype(TRT_TO_NUMPY[name])


def admits(profile: Profile, shapes: Mapping[str, Shape]) -> bool:
    """Whether every shape lies within the profile's min and max."""
    return all(all(low <= size <= high for low, size, high in zip(lows, shapes[name], highs))
               for name, (lows, _, highs) in profile.items())


def select_profile(profiles: list[Profile], shapes: Mapping[str, Shape]) -> int:
    """The optimization profile for a set of input shapes: of those that admit every shape, the one whose opt shape
    of the first input (the decoder's input_ids [B, S]) is nearest, so a decode step (S = 1) takes the decode profile
    whatever its past length, and a prompt the prefill one.

    Raises:
        PromptTooLongError: no profile admits the shapes (the engines were built for smaller limits).
    """
    best = None
    for index, profile in enumerate(profiles):
        if admits(profile, shapes):
            first, (_, opts, _) = next(iter(profile.items()))
            distance = sum(abs(size - opt) for size, opt in zip(shapes[first], opts))
            if best is None or distance < best[0]:
                best = (distance, index)
    if best is None:
        # the most any profile admits, per input and dimension (the prompt's limit is the prefill profile's S)
        largest = {name: tuple(max(profile[name][2][i] for profile in profiles) for i in range(len(highs)))
                   for name, (_, _, highs) in profiles[0].items()}
        over = [f"{name} {tuple(shape)} > {largest[name]}" for name, shape in shapes.items()
                if name in largest and any(s > h for s, h in zip(shape, largest[name]))]
        raise PromptTooLongError("these inputs exceed the shape limits the engines were built for ("
                                 + ("; ".join(over) or "no profile admits them together")
                                 + "); rebuild with larger --max-prompt/--max-context/--max-images/--max-batch")
    return best[1]


class TensorRTSession(BaseSession):
    """One engine, checked against its contract when opened and fed by name.

    `run` returns fresh arrays on every call; they belong to the caller.
    """

    def __init__(self, path: str | Path, spec: GraphSpec, trt, *, cuda_graph: bool = False,
                 host_code_allowed: bool = False, dla_core: int | None = None):
        """Deserialize `path` (already checked against this machine by `open_engines`).

        Args:
            path: a .engine file.
            spec: the graph's contract.
            trt: the TensorRT (engines/trt_compat.TensorRT) that built it.
            cuda_graph: replay the decode profile's runs from a CUDA graph. A graph is captured when the same input
                shapes come twice in a row (the pipeline then decodes with a fixed-size past, so the shapes stay
                the same for every step and every generation of the same batch size); a run with other shapes that
                another profile admits goes there, and the graph stays. Turned off, with a warning, where TensorRT
                says the context cannot be captured on this stream.
            host_code_allowed: the engine is version-compatible and carries its lean runtime (trusted: its sha256
                was checked against our manifest).
            dla_core: the DLA core the engine was built for (Jetson).

        Raises:
            EngineMismatchError: TensorRT refuses the engine or one of its profiles.
            GraphContractError: its inputs/outputs differ from `spec`.
            CudaError: a CUDA allocation failed (what was allocated is freed).
        """
        from flamingo_edge.trt_compat import collecting_logger
        from flamingo_edge.runtime import cuda

        self.path, self.spec, self.trt, self.cuda = Path(path), spec, trt, cuda
        self.lock = threading.Lock()  # one run at a time: staging, device buffers, contexts and graph are shared
        self.buffers, self.staging, self.contexts = {}, {}, []
        self.graph, self.graph_shapes, self.seen_shapes, self.graph_profile = None, None, None, None
        # The decoder's past inputs and the new K/V they are updated from; the attached SelfAttentionCache and the
        # (epoch, length) of its contents that the device buffers hold.
        layers = sum(name.startswith("past_key.") for name in spec.input_names)
        self.past = {past(layer): new(layer) for layer in range(layers)
                     for past, new in ((past_key, new_key), (past_value, new_value))}
        self.cache, self.mirrored = None, None
        self.on_device: dict[str, np.ndarray] = {}  # read-only inputs as last copied: the same array is not copied again
        self.engine = self.stream = None
        module = trt.module
        self.log = collecting_logger(module)
        self.runtime = module.Runtime(self.log)
        if host_code_allowed:
            self.runtime.engine_host_code_allowed = True
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineMismatchError(f"{spec.name}: {trt.flavour} {trt.version} cannot deserialize {self.path} ("
                                      + ("; ".join(self.log.errors[-3:]) or "no message") + "); rebuild it on this "
                                      "machine with flamingo-edge build")
        self.engine = engine
        try:
            self._open(module, cuda_graph)
        except BaseException:
            self._release()
            raise

    def _open(self, module, cuda_graph: bool) -> None:
        """Contexts, buffers and bindings (`__init__`; whatever it allocated is released if this raises)."""
        self.dtypes = self._check_io(module)
        self.profiles = [{t.name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(t.name, index))
                          for t in self.spec.inputs} for index in range(self.engine.num_optimization_profiles)]
        self.stream = self.cuda.Stream()  # this session's own: another thread's work never lands on it
        for index in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            if context is None:
                raise EngineMismatchError(f"{self.spec.name}: TensorRT could not create an execution context for "
                                          f"{self.path} (" + ("; ".join(self.log.errors[-3:]) or "no message") + ")")
            self.contexts.append(context)
            try:  # TensorRT 8.5 and 10.3 raise where later releases return False
                accepted = context.set_optimization_profile_async(index, self.stream.ptr)
            except RuntimeError as error:
                accepted, reason = False, str(error)
            else:
                reason = "; ".join(self.log.errors[-3:]) or "no message"
            if accepted is False:
                raise EngineMismatchError(f"{self.spec.name}: TensorRT could not set up optimization profile {index} "
                                          f"of {self.path} ({reason}); rebuild it with flamingo-edge build")
        self.stream.synchronize()
        for name, nbytes in self._largest_bytes().items():
            self.buffers[name] = self.cuda.DeviceBuffer(nbytes)
            if name not in self.past:  # the past stays on the device (copied from where it lies when it must be)
                self.staging[name] = self.cuda.PinnedBuffer(nbytes)
            else:  # slots a run reads but masks must hold numbers: a masked NaN still poisons its row's softmax
                self.cuda.zero(self.buffers[name], self.stream)
        for context in self.contexts:
            for name, buffer in self.buffers.items():
                context.set_tensor_address(name, buffer.ptr)
        decode = len(self.profiles) - 1 if self.spec.name == "decoder" and len(self.profiles) > 1 else None
        if cuda_graph and decode is not None:
            self.graph_profile = decode if self._capturable(self.contexts[decode]) else None

    def _capturable(self, context) -> bool:
        """Whether TensorRT can capture this context's runs on the session's stream (TensorRT 10+ and RTX say so;
        RTX needs engines built for it). Older TensorRT cannot tell: the first capture will."""
        check = getattr(context, "is_stream_capturable", None)
        if check is None or check(self.stream.ptr):
            return True
        logger.warning("%s: TensorRT cannot capture %s's runs in a CUDA graph on this stream; running without "
                       "CUDA graphs", self.spec.name, self.path.name)
        return False

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (asked for, and possible)."""
        return self.graph_profile is not None

    def attach_cache(self, cache) -> None:
        """Read the past from `cache` (a runtime.kv_cache.SelfAttentionCache) where it lies: its buffers are mirrored
        in the device buffers the engine reads, and every run feeds them whole (`whole_past`)."""
        if not self.past:
            return
        with self.lock:
            if self.cache is None or self.cache() is not cache:
                self.cache, self.mirrored = weakref.ref(cache), None
            cache.whole_past = True

    @property
    def device_bytes(self) -> int:
        """Device memory this session allocated (its I/O buffers; TensorRT's own activations are not counted)."""
        return sum(buffer.nbytes for buffer in self.buffers.values())

    def _check_io(self, module) -> dict[str, np.dtype]:
        """The engine's dtype of every tensor, after checking its I/O against the contract. TensorRT 8.5 turns int64
        inputs into int32; those are accepted and cast when fed."""
        declared = {"input": [], "output": []}
        dtypes = {}
        wanted = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name))
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
        """Run the engine (the feed is checked), one thread at a time.

        Raises:
            PromptTooLongError: the feed exceeds the engine's shape limits.
            CudaError: TensorRT or CUDA failed.
        """
        with self.lock:
            if self.closed:  # closed by another thread while this one waited
                raise UsageError(f"{self.spec.name}: this session was closed; {self.closed_hint}")
            return self._run_locked(feed)

    def _pick_profile(self, shapes: dict[str, Shape]) -> int:
        """`select_profile`, except that shapes the decode graph was not captured for go to another profile that
        admits them (a one-token prefill after a prefix-cache hit), so the graph is kept, not captured again."""
        index = select_profile(self.profiles, shapes)
        if index == self.graph_profile and self.graph is not None and tuple(shapes.values()) != self.graph_shapes:
            others = [i for i, profile in enumerate(self.profiles) if i != index and admits(profile, shapes)]
            if others:
                return others[0]
        return index

    def _run_locked(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: tuple(feed[name].shape) for name in self.spec.input_names}
        index = self._pick_profile(shapes)
        context = self.contexts[index]
        cache = self._resident_cache(feed)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise GraphContractError(f"{self.spec.name}: TensorRT refused shape {format_dims(shape)} for {name}")
            if name in self.past or self.on_device.get(name) is feed[name]:
                continue
            staged = self.staging[name].view(self.dtypes[name], shape)
            np.copyto(staged, feed[name], casting="same_kind" if staged.dtype == feed[name].dtype else "unsafe")
            self.on_device.pop(name, None)
            self.cuda.copy_to_device(self.buffers[name], self.staging[name], staged.nbytes, self.stream)
            if not feed[name].flags.writeable:  # cannot change: kept (the reference keeps its id unique)
                self.on_device[name] = feed[name]
        self._feed_past(feed, cache)
        outputs = {t.name: tuple(context.get_tensor_shape(t.name)) for t in self.spec.outputs}
        self._execute(index, context, shapes)
        if cache is not None:
            self._write_new_slots(cache, shapes["input_ids"][1])
        for name, shape in outputs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
            self.cuda.copy_to_host(self.staging[name], self.buffers[name], nbytes, self.stream)
        self.stream.synchronize()
        return {t.name: self.staging[t.name].view(self.dtypes[t.name], outputs[t.name]).astype(t.np_dtype, copy=True)
                for t in self.spec.outputs}

    def _resident_cache(self, feed: Mapping[str, np.ndarray]):
        """The attached cache, if this feed's past is its whole buffers (fed by `SelfAttentionCache.feed`)."""
        cache = self.cache() if self.cache is not None else None
        if cache is None or not self.past:
            return None
        layers = len(cache.keys)
        for layer in range(layers):
            if feed[past_key(layer)] is not cache.keys[layer] or feed[past_value(layer)] is not cache.values[layer]:
                return None
        return cache

    def _feed_past(self, feed: Mapping[str, np.ndarray], cache) -> None:
        """Bring the past device buffers up to what the run reads: nothing while they mirror `cache`; the cache's
        used slots when it was loaded or reset; a past that is not an attached cache's, copied whole."""
        if cache is None:
            self.mirrored = None
            for name in self.past:
                array = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
                self.cuda.copy_from_host(self.buffers[name], array, self.stream)
            return
        if self.mirrored == (cache.epoch, cache.length):
            return
        batch, heads, capacity, head_dim = cache.keys[0].shape
        row = capacity * head_dim * cache.keys[0].itemsize  # one (b, h)'s slots; the used ones are its first bytes
        used = cache.length * head_dim * cache.keys[0].itemsize
        if used:
            for layer in range(len(cache.keys)):
                for name, array in ((past_key(layer), cache.keys[layer]), (past_value(layer), cache.values[layer])):
                    self.cuda.copy_2d_from_host(self.buffers[name].ptr, row, array, row, used, batch * heads,
                                                self.stream)
        self.mirrored = (cache.epoch, cache.length)

    def _write_new_slots(self, cache, new: int) -> None:
        """Copy the new tokens' K/V [B, H, S, Dh] into slots P..P+S-1 of the past buffers, on the device: the mirror
        then holds what `cache.update` is about to write on the host."""
        batch, heads, capacity, head_dim = cache.keys[0].shape
        itemsize = cache.keys[0].itemsize
        offset, width = cache.length * head_dim * itemsize, new * head_dim * itemsize
        for name, produced in self.past.items():
            self.cuda.copy_2d_on_device(self.buffers[name].ptr + offset, capacity * head_dim * itemsize,
                                        self.buffers[produced].ptr, width, width, batch * heads, self.stream)
        self.mirrored = (cache.epoch, cache.length + new)

    def _execute(self, index: int, context, shapes: dict[str, Shape]) -> None:
        """Enqueue the engine: a plain `execute_async_v3`, or for the decode profile with CUDA graphs, its graph.

        A captured graph belongs to its context's state, so the decode context keeps one graph, for the shapes it
        was captured with. Shapes seen for the first time get a plain run (TensorRT finishes its shape-dependent
        setup there, and the capture must not see it); the same shapes again in the next run are captured, so
        shapes that do not recur are never captured. If a capture fails, graphs are turned off for the session and
        it goes on with plain runs.
        """
        key = tuple(shapes.values())
        if index == self.graph_profile and self.graph is not None and key == self.graph_shapes:
            self.graph.launch(self.stream)
            return
        recurring = key == self.seen_shapes
        self.seen_shapes = key if index == self.graph_profile else self.seen_shapes
        self._enqueue(context)
        if index != self.graph_profile or not recurring:
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

    def close(self) -> None:
        """Release the engine once no run is in progress (another thread may be running it)."""
        with self.lock:
            super().close()

    def _release(self) -> None:
        """Free the graph, the device memory, the pinned staging, the stream and the engine (also after a failed
        open: whatever exists)."""
        if self.graph is not None:
            self.graph.close()
        for buffer in (*self.buffers.values(), *self.staging.values()):
            buffer.close()
        self.graph, self.buffers, self.staging = None, {}, {}
        if self.stream is not None:
            self.stream.close()
        self.stream, self.contexts, self.engine = None, [], None


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
    manifest = read_manifest(engines_dir, export_dir)
    missing = [name for name in specs if name not in manifest.engines]
    if missing:
        raise EngineMismatchError(f"{engines_dir} has no engines for {missing}; run flamingo-edge build again")
    trt, key = runtime_key(manifest)
    check_runtime(manifest, key, engines_dir, export_dir)
    sessions: dict[str, TensorRTSession] = {}
    try:
        for name, spec in specs.items():
            sessions[name] = TensorRTSession(Path(engines_dir) / manifest.engines[name]["file"], spec, trt,
                                             cuda_graph=cuda_graph, host_code_allowed=manifest.version_compatible,
                                             dla_core=manifest.dla_core if name in DLA_GRAPHS else None)
    except BaseException:
        for session in sessions.values():
            session.close()
        raise
    logger.info("opened %s: %s engines for %s on %s", engines_dir, manifest.precision, manifest.compute_capability,
                key.describe())
    return manifest, sessions
