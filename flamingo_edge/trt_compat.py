"""Every difference between the TensorRT flavours and versions we build with, in one place.

TensorRT 8.5 (JetPack 5), 10.3 (JetPack 6), 10.x/11.x (datacenter, Thor) and TensorRT for RTX 1.x share the ONNX
parser, the builder, optimization profiles and `build_serialized_network`. What differs (measured and sourced in the
project's notes, shared/notes/tensorrt.md) is decided here by feature tests on the imported module, not by version
strings alone:

- network creation: TensorRT 8.x needs the EXPLICIT_BATCH flag for ONNX; 10.x ignores it; RTX lacks it.
- typing: RTX and TensorRT 11 are strongly typed only; 10.x can be asked for STRONGLY_TYPED; 8.5 is weakly typed.
- precision: weakly typed builds take the FP16/INT8 builder flags; strongly typed builds take the precision from
  the ONNX (fp16 graphs, Q/DQ) and have no flags to set.
- implicit INT8 calibrators exist up to TensorRT 10 only.
- target GPU: only RTX can build for a named compute capability without that GPU (CPU-only AOT); the others build
  for the GPU they run on.
- portable engines: TensorRT 8.6+ can build version-compatible engines (later runtimes load them) and
  hardware-compatible ones (any Ampere-or-newer discrete GPU); RTX engines are tied to their release.
- CUDA major: the pip wheels come per CUDA major (tensorrt-cu12 / tensorrt-cu13, tensorrt-rtx-cu12 / -cu13) with
  one version number for both; `cuda_major` reads it from the installed distribution's name (JetPack's apt
  packages have none: None).

TensorRT is imported by `load()` only; the package imports and the CPU suite run without it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from types import ModuleType

from flamingo_edge.errors import FeatureUnavailableError, UsageError

logger = logging.getLogger(__name__)

FLAVOURS = ("tensorrt", "tensorrt_rtx")
FLAVOUR_ENV = "FLAMINGO_EDGE_TENSORRT"  # "tensorrt" or "tensorrt_rtx": which one `load("auto")` takes


def version_tuple(version: str) -> tuple[int, ...]:
    """(10, 3, 0, 26) for "10.3.0.26": TensorRT versions compare as numbers, part by part.

    Raises:
        ValueError: a part that is not a number.
    """
    return tuple(int(part) for part in str(version).split("."))


WEIGHT_ONLY_SINCE = (10,)  # INT4 and weight-only quantization came with TensorRT 10 (none in 8.x, JetPack 5)


def has_weight_only(version: str) -> bool:
    """Whether TensorRT `version` builds weight-only (INT4 / 8-bit weight) engines.

    Raises:
        UsageError: `version` is not a TensorRT version.
    """
    try:
        return version_tuple(version) >= WEIGHT_ONLY_SINCE
    except ValueError:
        raise UsageError(f"--trt-version {version!r} is not a TensorRT version (e.g. 10.3)") from None


def cuda_major(flavour: str, distributions: dict[str, list[str]] | None = None) -> int | None:
    """The CUDA major of the installed `flavour` ("tensorrt" or "tensorrt_rtx"), from the name of the distribution
    that installs the module: tensorrt_rtx_cu13 -> 13, tensorrt_cu12_bindings -> 12. None when no distribution names
    one (JetPack's python3-libnvinfer, a source build) or several disagree. Reads package metadata only; imports
    nothing.

    Args:
        distributions: module -> distribution names (default: importlib.metadata.packages_distributions()).
    """
    names = (packages_distributions() if distributions is None else distributions).get(flavour, [])
    majors = {int(m.group(1)) for name in names if (m := re.search(r"[-_]cu(\d+)(?:[-_]|$)", name.lower()))}
    return majors.pop() if len(majors) == 1 else None


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT and what it can do."""

    module: ModuleType
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def major(self) -> int:
        return version_tuple(self.version)[0]

    @property
    def cuda_major(self) -> int | None:
        """The CUDA major of the installed wheels (None: not known, e.g. JetPack's apt packages)."""
        return cuda_major(self.flavour)

    @property
    def strongly_typed_only(self) -> bool:
        return self.flavour == "tensorrt_rtx" or self.major >= 11

    @property
    def can_strongly_type(self) -> bool:
        return hasattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")

    @property
    def precision_flags(self) -> bool:
        """Weak typing with BuilderFlag.FP16/INT8 (TensorRT <= 10)."""
        return hasattr(self.module.BuilderFlag, "FP16") and not self.strongly_typed_only

    @property
    def implicit_int8(self) -> bool:
        return hasattr(self.module, "IInt8EntropyCalibrator2")

    @property
    def version_compatible(self) -> bool:
        """Can build engines that later TensorRT runtimes load (8.6+, with the lean runtime inside the plan; RTX
        engines are tied to their release)."""
        return self.flavour == "tensorrt" and hasattr(self.module.BuilderFlag, "VERSION_COMPATIBLE")

    @property
    def hardware_compatible(self) -> bool:
        """Can build engines for every Ampere-or-newer discrete GPU (8.6+; not on JetPack)."""
        return self.flavour == "tensorrt" and hasattr(self.module, "HardwareCompatibilityLevel")

    @property
    def targets_compute_capability(self) -> bool:
        """Can build for a named GPU architecture on a machine without it (TensorRT for RTX's CPU-only AOT)."""
        return hasattr(self.module, "ComputeCapability")

    def network_flags(self, strongly_typed: bool) -> int:
        flags = 0
        creation = self.module.NetworkDefinitionCreationFlag
        if self.major < 10 and self.flavour == "tensorrt" and hasattr(creation, "EXPLICIT_BATCH"):
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        if strongly_typed and self.can_strongly_type and self.flavour == "tensorrt":
            flags |= 1 << int(creation.STRONGLY_TYPED)
        return flags


def load(flavour: str = "auto") -> TensorRT:
    """Import TensorRT ("tensorrt"), TensorRT for RTX ("tensorrt_rtx"), or whichever is installed ("auto": the one
    $FLAMINGO_EDGE_TENSORRT names, else full TensorRT first).

    Raises:
        FeatureUnavailableError: the flavour asked for is not installed, or none is.
    """
    if flavour == "auto":
        flavour = os.environ.get(FLAVOUR_ENV, "auto")
    candidates = FLAVOURS if flavour == "auto" else (flavour,)
    if any(c not in FLAVOURS for c in candidates):
        raise FeatureUnavailableError(f"unknown TensorRT flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    for name in candidates:
        try:
            module = __import__(name)
        except ImportError:
            continue
        return TensorRT(module, name, str(module.__version__))
    raise FeatureUnavailableError(
        "no TensorRT is installed: on a Jetson, JetPack's python3-libnvinfer; on a datacenter GPU, pip install "
        "tensorrt (from NVIDIA's index); for RTX GPUs and CPU-only builds, pip install tensorrt-rtx")


def collecting_logger(module):
    """A TensorRT logger that keeps the errors (for our exception when a call fails) and sends every message to
    `logging` at its own level: INTERNAL_ERROR and ERROR at ERROR, WARNING at WARNING, INFO and VERBOSE at DEBUG.
    (TensorRT reports some errors without failing the call, e.g. a calibration cache it cannot use: those must be
    seen.)"""

    class CollectingLogger(module.ILogger):
        def __init__(self):
            module.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if int(severity) <= int(module.ILogger.Severity.ERROR):
                self.errors.append(message)
                logger.error("TensorRT: %s", message)
            elif int(severity) == int(module.ILogger.Severity.WARNING):
                logger.warning("TensorRT: %s", message)
            else:
                logger.debug("TensorRT: %s", message)

    return CollectingLogger()


class HeldInterrupt:
    """Ctrl-C held while TensorRT works, raised as KeyboardInterrupt once it returns.

    TensorRT catches whatever its Python callbacks raise (our logger, our progress monitor), logs it and goes on: a
    KeyboardInterrupt that lands in one is lost, and the build runs to its end (seen in CI). So, in the main thread,
    SIGINT only sets `pending` while this is entered; a progress monitor given `cancelled=held.pending_now` cancels
    the build at its next step. Elsewhere (signals go to the main thread only) it changes nothing.

    Raises:
        KeyboardInterrupt: on exit, when Ctrl-C came meanwhile (and nothing else was raised).
    """

    def __init__(self):
        self.pending, self.previous = False, None

    def pending_now(self) -> bool:
        return self.pending

    def _hold(self, signum, frame) -> None:
        self.pending = True

    def __enter__(self) -> HeldInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
        if self.pending and kind is None:
            raise KeyboardInterrupt


def progress_monitor(module, report, cancelled=lambda: False):
    """A TensorRT progress monitor (TensorRT 10+ and RTX; None before) that calls `report(text)` with the phase being
    optimized and its step, e.g. "Building engine 3/7", and cancels the build once `cancelled()` is true (a held
    Ctrl-C, `HeldInterrupt`). TensorRT may call it from several threads."""
    if not hasattr(module, "IProgressMonitor"):
        return None

    class Monitor(module.IProgressMonitor):
        def __init__(self):
            module.IProgressMonitor.__init__(self)
            self.lock, self.steps = threading.Lock(), {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:  # the top-level phases only: nested ones come and go too fast to read
                with self.lock:
                    self.steps[phase_name] = num_steps
                    report(f"{phase_name} 0/{num_steps}")

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name in self.steps:
                    report(f"{phase_name} {step + 1}/{self.steps[phase_name]}")
            return not cancelled()  # False cancels the build

        def phase_finish(self, phase_name):
            with self.lock:
                self.steps.pop(phase_name, None)

    return Monitor()
