"""The ONNX Runtime backend: one `InferenceSession` per graph, fed and read by name (after Polygraphy's ORT runner).

On the CPU it calls `InferenceSession.run`. With CUDA it binds inputs from numpy and outputs to CPU memory through
IO binding, so each run makes one host-to-device copy per input and one device-to-host copy per output.

A decoder graph that writes the cache itself (`graphs.in_place_decoder`: the int4 / int8-weights exports for ONNX
Runtime, whose attention is GroupQueryAttention over the cache) runs through IO binding on the CPU: the pipeline's
cache is attached (`attach_cache`), its buffers are bound as the past inputs and as the present outputs at once,
and the graph writes the new tokens' K/V into them. The session still answers with the contract's outputs (the new
tokens' K/V as views of the slots the graph wrote, which `SelfAttentionCache.update` leaves as they are), so the
pipeline cannot tell the two kinds of decoder apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from flamingo_edge.errors import FeatureUnavailableError, GraphContractError
from flamingo_edge.graphs import (SEQLENS_K, TOTAL_LENGTH, GraphSpec, TensorSpec, in_place_decoder, new_key,
                                  new_value, past_key, past_value, present_key, present_value)
from flamingo_edge.runtime.backend import BaseSession, Device, check_model_io, parse_choice

logger = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# What ONNX Runtime raises when it cannot load a model file (they derive from Exception only).
_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
                ort_state.NoSuchFile)
# NodeArg.type -> numpy dtype name; others are kept as ORT spells them, so a mismatch message shows them.
_ORT_TO_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                 "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _declared(args) -> list[TensorSpec]:
    """The graph file's inputs or outputs (onnxruntime NodeArgs) as TensorSpecs."""
    return [TensorSpec(arg.name, _ORT_TO_NUMPY.get(arg.type, arg.type), tuple(arg.shape)) for arg in args]


# glibc's mallopt parameter; its starting mmap threshold (128 KiB) and the most its dynamic threshold grows to (32 MiB
# on 64-bit), which is where a long-running process's threshold ends up.
_M_MMAP_THRESHOLD, _LOADING_THRESHOLD, _RUNNING_THRESHOLD = -3, 128 << 10, 32 << 20


@functools.cache
def _glibc():
    """libc through ctypes where it is glibc and the user has not set the threshold, else None."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def loading_memory_returned():
    """While a session loads, large blocks that are freed go back to the system at once; afterwards they come from the
    heap and are reused, as in any long-running glibc process.

    glibc raises its mmap threshold each time a large mmapped block is freed, and later blocks of that size then come
    from the heap. Loading a session does exactly that: ONNX Runtime pre-packs each fp32 MatMul weight (and
    MatMulNBits its blocks) and frees the original, and what it frees stayed in the process. The 100m preset's decoder
    alone peaked at 462 MiB in some runs and 535-553 MiB in others; with the threshold held at glibc's starting
    128 KiB while it loads, 460 MiB in every run. Held there for good, every later allocation over 128 KiB would be
    a fresh mapping: copying a 320x240 camera frame took 167 us instead of 12 us. So the threshold is then set to
    32 MiB, the most glibc's own dynamic threshold grows to. (Setting it turns glibc's adjustment off for good.)

    A process that sets MALLOC_MMAP_THRESHOLD_ itself, or that does not run on glibc, is left as it is.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOADING_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _RUNNING_THRESHOLD)


def _providers(device: Device) -> list[str]:
    """The execution providers to ask for; CUDA first when it is wanted and this onnxruntime build has it."""
    available = onnxruntime.get_available_providers()
    if device is Device.CUDA and CUDA not in available:
        raise FeatureUnavailableError(
            f"device 'cuda' needs onnxruntime with the {CUDA}; this onnxruntime {onnxruntime.__version__} offers "
            f"{available}: install onnxruntime-gpu (in place of onnxruntime) or use device 'cpu'")
    return [CUDA, CPU] if device is not Device.CPU and CUDA in available else [CPU]


def in_place_feed(feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """A contract feed made without a cache (a P-slot past), as an in-place decoder's inputs: each layer's past in a
    new buffer with room for the S new tokens after it, `attention_mask` over the buffer then the new tokens
    [B, (P + S) + S], and `seqlens_k` / `total_sequence_length`. Returns (the inputs, P)."""
    batch, new = feed["input_ids"].shape
    used = feed[past_key(0)].shape[2]
    inputs = dict(feed)
    for name, past in feed.items():
        if name.startswith(("past_key.", "past_value.")):
            inputs[name] = np.concatenate([past, np.zeros((*past.shape[:2], new, past.shape[3]), past.dtype)], axis=2)
    given = feed["attention_mask"]  # [B, P + S]: the buffers' S empty slots are masked
    inputs["attention_mask"] = np.concatenate([given[:, :used], np.zeros((batch, new), given.dtype), given[:, used:]],
                                              axis=1)
    inputs[SEQLENS_K] = np.full(batch, used + new - 1, np.int32)
    inputs[TOTAL_LENGTH] = np.array(used + new, np.int32)
    return inputs, used


class OnnxRuntimeSession(BaseSession):
    """One ONNX graph on ONNX Runtime, checked against its contract when opened and at every run.

    `run` returns fresh arrays on every call; they belong to the caller.
    """

    def __init__(self, path: str | Path, spec: GraphSpec, *, device: str | Device = Device.AUTO):
        """Open `path` with the CPU provider, or CUDA (device "cuda", or "auto" when CUDA is available).

        Args:
            path: an .onnx file written by `flamingo-edge export`.
            spec: the graph's contract.
            device: "auto", "cpu" or "cuda".

        Raises:
            GraphContractError: the file is missing or cannot be loaded, or its inputs/outputs differ from `spec`.
            FeatureUnavailableError: device "cuda" but CUDA is not available or did not load.
        """
        self.path, self.spec = Path(path), spec
        device = parse_choice(Device, device, "device")
        if not self.path.is_file():
            raise GraphContractError(f"{spec.name}: graph file {self.path} does not exist; "
                                     "re-run `flamingo-edge export`")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A pipeline runs its sessions one after another, each with its own thread pool. By default a pool's threads
        # spin-wait after a run and take the cores from the next session: on 2 cores the prefill after vision took
        # 3x longer and time to first token 2.8x (100m preset, `flamingo-edge bench`). Stop spinning when a run
        # returns; it restarts with the next run. (A process-wide shared pool would also do, but it forces every
        # other ONNX Runtime session in the user's process onto it.)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            with loading_memory_returned():
                self.session = onnxruntime.InferenceSession(str(self.path), options, providers=_providers(device))
        except _LOAD_ERRORS as error:
            raise GraphContractError(f"{spec.name}: ONNX Runtime cannot load {self.path} ({error}); "
                                     "re-run `flamingo-edge export`") from None
        self.on_cuda = self._check_cuda_active(device)
        self.in_place = SEQLENS_K in {value.name for value in self.session.get_inputs()}
        if self.in_place and self.on_cuda:
            if device is Device.CUDA:
                raise FeatureUnavailableError(
                    f"{spec.name}: {self.path} writes the KV cache in place, which flamingo-edge runs on the CPU "
                    "only; use device 'cpu', or for a GPU quantize with --no-fusions or --target tensorrt")
            logger.warning("%s: %s writes the KV cache in place, which runs on the CPU only: using the CPU",
                           spec.name, self.path)
            with loading_memory_returned():
                self.session = onnxruntime.InferenceSession(str(self.path), options, providers=[CPU])
            self.on_cuda = False
        check_model_io(in_place_decoder(spec) if self.in_place else spec, self.path,
                       _declared(self.session.get_inputs()), _declared(self.session.get_outputs()))
        self._cache = None  # the attached SelfAttentionCache of an in-place decoder
        # the kept IO binding (_binding_for) and the cache buffers it points into
        self._binding = self._bound_buffers = None
        self._in_place_lock = threading.Lock()  # the kept binding is one per session: one in-place run at a time
        self._vocab = spec.outputs[spec.output_names.index("logits")].dims[-1] if self.in_place else None
        logger.debug("%s: %s on %s", spec.name, self.path, self.session.get_providers())

    def _check_cuda_active(self, device: Device) -> bool:
        """Whether CUDA really runs the graph: ONNX Runtime silently falls back to the CPU when CUDA cannot load."""
        active = self.session.get_providers()
        if device is Device.CPU or CUDA in active:
            return CUDA in active
        if device is Device.CUDA:
            raise FeatureUnavailableError(
                f"{self.spec.name}: device 'cuda' was asked for, but ONNX Runtime could not load its {CUDA} (it runs "
                f"on {active}); check the CUDA and cuDNN versions onnxruntime-gpu {onnxruntime.__version__} needs, "
                "or use device 'cpu'")
        if CUDA in onnxruntime.get_available_providers():
            logger.warning("%s: ONNX Runtime could not load CUDA and runs on %s", self.spec.name, active)
        return False

    @property
    def closed(self) -> bool:
        return self.session is None

    def attach_cache(self, cache) -> None:
        """An in-place decoder is told the cache it writes: every run then feeds its whole buffers (`whole_past`),
        which are bound as both the past and the present. Other graphs ignore it."""
        if self.in_place:
            self._cache = cache
            cache.whole_past = True

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.in_place:
            with self._in_place_lock:
                return self._run_in_place(feed)
        if not self.on_cuda:
            values = self.session.run(self.spec.output_names, dict(feed))
            return dict(zip(self.spec.output_names, values))
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.spec.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        # copy_outputs_to_cpu returns the outputs in the order they were bound.
        return dict(zip(self.spec.output_names, binding.copy_outputs_to_cpu()))

    def _run_in_place(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run an in-place decoder on a contract feed: on the attached cache's own buffers when the feed's past is
        them, else on copies of the feed's past with room for the new tokens (a feed made without a cache)."""
        layers = sum(1 for name in feed if name.startswith("past_key."))
        batch, new = feed["input_ids"].shape
        cache = self._cache
        attached = cache is not None and all(feed[past_key(l)] is cache.keys[l] and feed[past_value(l)] is
                                             cache.values[l] for l in range(layers))
        if attached:
            keys, values, used, mask = cache.keys, cache.values, cache.length, feed["attention_mask"]
        else:
            inputs, used = in_place_feed(feed)
            keys = [inputs[past_key(l)] for l in range(layers)]
            values = [inputs[past_value(l)] for l in range(layers)]
            mask = inputs["attention_mask"]
        if new > 1 and used and batch > 1:
            raise GraphContractError(f"{self.spec.name}: {self.path} (GroupQueryAttention) runs several new tokens "
                                     "after a cached past one row at a time; feed the rows of the batch separately")
        total = used + new
        binding, bound, kept = self._binding_for(keys, values, batch)
        kept[SEQLENS_K][:] = total - 1
        kept[TOTAL_LENGTH][...] = total
        shape = (batch, new)
        if shape not in kept:  # per shape (a prefill, a decode step): token ids copied in, logits written out
            kept[shape] = (np.empty(shape, np.int64), np.empty((*shape, self._vocab), np.float32))
        ids, logits = kept[shape]
        np.copyto(ids, feed["input_ids"])

        def bind(name, array):  # only what is not bound already: a decode step rebinds nothing
            if bound.get(name) is not array:
                binding.bind_cpu_input(name, array)
                bound[name] = array

        bind("input_ids", ids)
        bind("attention_mask", mask)
        for name, array in feed.items():
            if name not in ("input_ids", "attention_mask") and not name.startswith(("past_key.", "past_value.")):
                bind(name, np.ascontiguousarray(array))
        if bound.get("logits") is not logits:
            binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            bound["logits"] = logits
        self.session.run_with_iobinding(binding)
        outputs = {"logits": logits.copy()}
        # The attached cache gets views of the slots the graph wrote (SelfAttentionCache.update skips them);
        # a feed without a cache gets copies.
        slots = (lambda buffer: buffer[:, :, used:total]) if attached else (lambda b: b[:, :, used:total].copy())
        for layer in range(layers):
            outputs[new_key(layer)], outputs[new_value(layer)] = slots(keys[layer]), slots(values[layer])
        return outputs

    def _binding_for(self, keys: list, values: list, batch: int):
        """The IO binding of these cache buffers, kept from run to run: the buffers are bound once as the past and
        the present, and so are the feed arrays that stay the same objects (a decode step's mask, images, cross
        K/V) and the arrays kept for token ids and logits. Returns (binding, the arrays bound by name, the kept
        arrays: `seqlens_k` / `total_sequence_length`, written before each run, and per (B, S) the token ids and
        logits buffers)."""
        if self._bound_buffers is None or self._bound_buffers[0][0] is not keys[0]:  # (their batch comes with them)
            binding = self.session.io_binding()
            lengths = {SEQLENS_K: np.zeros(batch, np.int32), TOTAL_LENGTH: np.zeros((), np.int32)}
            for name, array in lengths.items():
                binding.bind_cpu_input(name, array)
            for layer, (key_buffer, value_buffer) in enumerate(zip(keys, values)):
                for past, present, buffer in ((past_key(layer), present_key(layer), key_buffer),
                                              (past_value(layer), present_value(layer), value_buffer)):
                    binding.bind_cpu_input(past, buffer)
                    binding.bind_output(present, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
            # the bound buffers stay referenced as long as the binding that points into them
            self._binding, self._bound, self._kept = binding, dict(lengths), lengths
            self._bound_buffers = (keys, values)
        return self._binding, self._bound, self._kept

    def _release(self) -> None:
        """Drop the ONNX Runtime session (and its device memory), and an in-place decoder's binding and cache."""
        self.session = self._cache = self._binding = self._bound_buffers = None
