"""Runtime backends: the `Session` protocol, what every session shares (`BaseSession`, `RecordingSession`), and the
checks at its boundary. The one factory, `open_session`, is in `runtime/sessions.py` (it imports the backends, which
import this module).

    open_session(path, spec, kind) ──▶ Session ── run({name: array}) ──▶ {name: array}
                                          │
                                          ├─ at open: check_model_io(spec, graph file's declared inputs/outputs)
                                          └─ at run:  check_feed(spec, feed)

Tensors travel by name, never by position, and every name comes from the graph contract (`graphs.py`).
No torch, no transformers, no TensorRT at import time: the backend modules are imported when a session is opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from flamingo_edge.errors import FeatureUnavailableError, GraphContractError, UsageError
from flamingo_edge.graphs import GraphSpec, TensorSpec, format_dims, io_mismatches

logger = logging.getLogger(__name__)


class BackendKind(str, Enum):
    """The runtime backends `open_session` knows."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Device(str, Enum):
    """Where a session runs: the GPU when one is usable (auto), or exactly the one asked for."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Session(Protocol):
    """One graph, opened by a backend, run with feeds by name.

    IMPORTANT: the arrays returned by `run` are fresh on every call and belong to the caller; a session never
    reuses or overwrites them, so they may be kept (e.g. in a KV cache) across calls. One exception: a decoder
    that writes an attached SelfAttentionCache in place (ONNX Runtime's in-place decoder) returns its new K/V as
    views of the slots it wrote in that cache, which the cache owns.
    """

    spec: GraphSpec  # the contract this graph was checked against when it was opened

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `feed` (every input of `spec`, by name); return every output of `spec`, by name."""
        ...

    def close(self) -> None:
        """Release the graph and its device memory; the session cannot run afterwards."""
        ...

    def __enter__(self) -> Session: ...

    def __exit__(self, *exc) -> None: ...


class BaseSession:
    """What every backend's session shares: the contract check of every feed, the closed check, the context manager
    and `last_run_seconds`. A backend implements `_run` (the feed is already checked) and `_release`.
    """

    spec: GraphSpec
    last_run_seconds: float = 0.0  # wall time of the latest `run`'s graph (the backend's `_run`; bench reads it)
    closed_hint = "open the graph again to run it"

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on `feed` (every input of `spec`, by name); return every output of `spec`, by name.

        Raises:
            GraphContractError: the feed breaks the contract (see `check_feed`).
            UsageError: the session was closed.
        """
        if self.closed:
            raise UsageError(f"{self.spec.name}: this session was closed; {self.closed_hint}")
        check_feed(self.spec, feed)
        start = time.perf_counter()  # the graph's own time: our checks count as host work (bench)
        try:
            return self._run(feed)
        finally:
            self.last_run_seconds = time.perf_counter() - start

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the graph and its device memory; the session cannot run afterwards. Closing twice is harmless."""
        if not self.closed:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordingSession:
    """Forwards to a session and keeps copies of the feeds it runs: all of them (calibration), or the first of each
    kind (`first_per_kind`; a kind is which inputs are empty, so the decoder's prefill and its decode steps are two
    kinds: what compare checks)."""

    def __init__(self, inner: Session, *, first_per_kind: bool = False):
        self.inner, self.spec, self.first_per_kind = inner, inner.spec, first_per_kind
        self._feeds: dict = {}

    @property
    def feeds(self) -> list[dict[str, np.ndarray]]:
        return list(self._feeds.values())

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple(name for name in self.spec.input_names if 0 in np.shape(feed[name])) if self.first_per_kind \
            else len(self._feeds)
        if key not in self._feeds:
            self._feeds[key] = {name: np.array(feed[name]) for name in self.spec.input_names}
        return self.inner.run(feed)

    def __getattr__(self, name):  # everything else (close, probes, last_run_seconds) is the inner session's
        return getattr(self.inner, name)


def parse_choice(enum: type[Enum], value: str | Enum, what: str) -> Enum:
    """`value` as a member of `enum`, or a FeatureUnavailableError that lists the known values.

    Raises:
        FeatureUnavailableError: `value` is not one of `enum`'s values.
    """
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(repr(member.value) for member in enum)
        raise FeatureUnavailableError(f"unknown {what} {value!r}; this flamingo-edge knows {known}") from None


def _shape_problems(spec: GraphSpec, tensor: TensorSpec, array: np.ndarray, bound: dict) -> list[str]:
    """Dtype, rank and fixed-dim problems of one input; binds its dynamic dims in `bound` (name -> size, where)."""
    what = f"{spec.name}: input {tensor.name!r}"
    if not isinstance(array, np.ndarray):
        return [f"{what} is a {type(array).__name__}; expected a numpy array"]
    problems = []
    if array.dtype != tensor.np_dtype:
        problems.append(f"{what} has dtype {array.dtype}; expected {tensor.dtype}")
    if array.ndim != len(tensor.dims):
        return [*problems, f"{what} has shape {array.shape}; expected rank {len(tensor.dims)} {format_dims(tensor.dims)}"]
    for axis, (dim, size) in enumerate(zip(tensor.dims, array.shape)):
        if isinstance(dim, int) and size != dim:
            problems.append(f"{what} has shape {array.shape}; dim {axis} must be {dim}")
        elif isinstance(dim, str) and dim not in bound:
            bound[dim] = (size, f"input {tensor.name!r} dim {axis}")
        elif isinstance(dim, str) and bound[dim][0] != size:
            problems.append(f"{what} has {dim} = {size} (dim {axis}); {bound[dim][1]} has {dim} = {bound[dim][0]}")
    return problems


def _sum_problems(spec: GraphSpec, bound: dict) -> list[str]:
    """Dims named like "P+S" must equal the sum of their bound terms; other composite names (e.g. "M*L") are free."""
    problems = []
    for name, (size, where) in bound.items():
        terms = name.split("+")
        if len(terms) < 2 or not all(term in bound for term in terms):
            continue
        expected = sum(bound[term][0] for term in terms)
        if size != expected:
            parts = " + ".join(f"{bound[term][0]} ({term}, {bound[term][1]})" for term in terms)
            problems.append(f"{spec.name}: {where} has {name} = {size}; expected {parts} = {expected}")
    return problems


def check_feed(spec: GraphSpec, feed: Mapping[str, np.ndarray]) -> None:
    """Check a feed against the graph contract before it reaches a backend.

    Checks: every input present and no other; dtypes; ranks; fixed dims; the same dynamic dim name has the same size
    in every input (e.g. "B"); a sum name like "P+S" equals P + S.

    Args:
        spec: the graph's contract.
        feed: input name -> array.

    Raises:
        GraphContractError: listing every problem found, e.g.
            "decoder: input 'input_ids' has dtype int32; expected int64".
    """
    problems = []
    missing = [name for name in spec.input_names if name not in feed]
    unknown = [name for name in feed if name not in spec.input_names]
    if missing:
        problems.append(f"{spec.name}: missing inputs {missing}")
    if unknown:
        problems.append(f"{spec.name}: unknown inputs {unknown}; the graph takes {spec.input_names}")
    bound: dict[str, tuple[int, str]] = {}
    for tensor in spec.inputs:
        if tensor.name in feed:
            problems += _shape_problems(spec, tensor, feed[tensor.name], bound)
    problems += _sum_problems(spec, bound)
    if problems:
        raise GraphContractError("; ".join(problems))


def check_model_io(spec: GraphSpec, path: str | Path, inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec]) -> None:
    """Check a graph file's declared inputs and outputs against the contract, when it is opened.

    Args:
        spec: the graph's contract.
        path: the graph file (named in the message).
        inputs, outputs: what the file declares, as TensorSpecs (dims: ints, dynamic names, or None if unknown).

    Raises:
        GraphContractError: naming the file and at most five mismatches, and saying to re-export.
    """
    problems = io_mismatches("input", inputs, spec.inputs) + io_mismatches("output", outputs, spec.outputs)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise GraphContractError(f"{spec.name}: {path} does not match the {spec.name} graph contract: "
                                 + "; ".join(problems[:5]) + more
                                 + "; re-run `flamingo-edge export` with this flamingo-edge version")
