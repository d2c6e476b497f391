"""`manifest.json`: what each engine of an engines folder was built from and for, and the checks made before an
engine is deserialized (TensorRT- and GPU-free, so the CPU suite tests them on real manifests).

A TensorRT engine runs only with the TensorRT flavour and version that built it, and only on the GPU architecture it
was built for (TensorRT for RTX: the compute capabilities named at build time; TensorRT: the GPU the build ran on).
Deserializing anything else fails deep inside TensorRT or, worse, runs wrong; the manifest lets us refuse first,
with an error that names both sides and the command that rebuilds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flamingo_edge.artifacts import MANIFEST, read_export_record, sha256_of
from flamingo_edge.trt_compat import cuda_major, version_tuple
from flamingo_edge.errors import EngineBuildError, EngineMismatchError

DLA_GRAPHS = ("vision",)  # the graphs a DLA build puts on the Jetson's DLA core (GPU fallback for the rest)

MANIFEST_VERSION = 1
# RTX compute capability -> the build target for it (engines/build.py TARGETS).
RTX_TARGETS = {"SM80": "rtx-sm80", "SM86": "rtx-sm86", "SM89": "rtx-sm89"}


@dataclass
class EngineEntry:
    file: str
    sha256: str
    onnx_sha256: str
    bytes: int
    build_seconds: float


@dataclass
class Manifest:
    version: int
    export: str
    precision: str  # the export's (a value of precision.EXPORT_PRECISIONS); implicit INT8 builds: build_flags say so
    tensorrt: dict  # {"flavour", "version"}
    target: str
    compute_capability: str  # "SM86"
    limits: dict
    workspace_mib: int | None
    build_flags: dict  # graph -> the builder flags set for it
    profiles: dict = field(default_factory=dict)  # graph -> [{input: [min, opt, max]}]
    engines: dict = field(default_factory=dict)  # graph -> EngineEntry
    device: str | None = None  # the GPU a TensorRT (not RTX) build ran on
    dla_core: int | None = None
    version_compatible: bool = False  # later TensorRT runtimes may load the engines
    hardware_compatible: bool = False  # any Ampere-or-newer GPU may run them
    # The CUDA major of the TensorRT wheels that built them (tensorrt_rtx_cu12 / _cu13 ...; one version number for
    # both builds); None: not known (JetPack's apt packages, manifests written before it was recorded).
    cuda_major: int | None = None


@dataclass(frozen=True)
class RuntimeKey:
    """What is about to deserialize the engines: the TensorRT that is imported and the GPU it runs on."""

    flavour: str
    version: str
    compute_capability: str  # "SM86"
    device: str  # the GPU's name
    cuda_major: int | None = None  # of the imported TensorRT's wheels; None: read from the installed distribution

    def describe(self) -> str:
        return f"{self.flavour} {self.version} on {self.device} ({self.compute_capability})"


def read_manifest(engines_dir: str | Path, export_dir: str | Path | None = None) -> Manifest:
    """The manifest of an engines folder, every engine checked against its hash, and (given the export) every
    engine's ONNX against the export's current graph.

    Raises:
        EngineBuildError: no manifest, or a missing or modified engine.
        EngineMismatchError: the export's graphs changed since the build.
    """
    engines_dir = Path(engines_dir)
    try:
        manifest = Manifest(**json.loads((engines_dir / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise EngineBuildError(f"{engines_dir} is not a complete engines folder ({error}); run flamingo-edge build") \
            from None
    for entry in manifest.engines.values():
        path = engines_dir / entry["file"]
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            raise EngineBuildError(f"{path} is missing or was modified; run flamingo-edge build again")
    if export_dir is not None:
        record = read_export_record(export_dir)
        stale = [n for n, e in manifest.engines.items() if n not in record.graphs
                 or record.graphs[n].sha256 != e["onnx_sha256"]]
        if stale:
            raise EngineMismatchError(
                f"the engines for {stale} in {engines_dir} were built from other ONNX graphs than {export_dir} holds "
                f"now; rebuild: {rebuild_command(manifest, export_dir, engines_dir)}")
    return manifest


def rebuild_command(manifest: Manifest, export_dir: str | Path, engines_dir: str | Path,
                    key: RuntimeKey | None = None) -> str:
    """The `flamingo-edge build` command that makes engines for `key` (default: the manifest's own target)."""
    target, on_device = manifest.target, key is not None and key.flavour == "tensorrt"
    if key is not None and key.flavour == "tensorrt_rtx":  # TensorRT for RTX has targets for some GPUs only
        target = RTX_TARGETS.get(key.compute_capability, "datacenter")
        on_device = target == "datacenter"
    limits = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in manifest.limits.items())
    suffix = f"-{key.compute_capability.lower()}" if key is not None else "-new"
    return (f"flamingo-edge build {export_dir} -o {Path(engines_dir).name}{suffix} --target {target} {limits}"
            + (" (on this machine, with TensorRT)" if on_device else ""))


def runtime_can_load(manifest: Manifest, version: str) -> bool:
    """Whether TensorRT `version` loads engines the manifest's TensorRT built: the same version, or for
    version-compatible engines (8.6+) a later one up to the next major release (8 -> 9 and 10, 10 -> 11)."""
    built = manifest.tensorrt["version"]
    if version == built:
        return True
    if not manifest.version_compatible:
        return False
    have, was = version_tuple(version), version_tuple(built)
    return have > was and have[0] <= was[0] + (2 if was[0] == 8 else 1)


def check_runtime(manifest: Manifest, key: RuntimeKey, engines_dir: str | Path,
                  export_dir: str | Path | None = None) -> None:
    """Refuse engines that `key` cannot run, before TensorRT sees them.

    Rules: the same TensorRT flavour (RTX and TensorRT plans are different formats); the same version, exactly (a
    standard engine is tied to major, minor, patch and build; so is an RTX engine), or a later one for
    version-compatible engines; the same CUDA build of it where both sides know theirs (the cu12 and cu13 wheels
    share a version number but are different builds); and the compute capability the engines were built for (any
    from SM80 on for hardware-compatible engines).

    Raises:
        EngineMismatchError: naming what the engines were built with and for, what this machine has, and the
            command that rebuilds.
    """
    built = manifest.tensorrt
    problems = []
    if built["flavour"] != key.flavour:
        problems.append(f"they are {built['flavour']} engines and this process loaded {key.flavour}")
    elif not runtime_can_load(manifest, key.version):
        kind = "version-compatible " if manifest.version_compatible else ""
        problems.append(f"they are {kind}engines built with {built['flavour']} {built['version']} and this machine "
                        f"has {key.version}")
    have_cuda = key.cuda_major if key.cuda_major is not None else cuda_major(key.flavour)
    if (built["flavour"] == key.flavour and None not in (manifest.cuda_major, have_cuda)
            and manifest.cuda_major != have_cuda):
        wheel = "tensorrt-rtx" if key.flavour == "tensorrt_rtx" else "tensorrt"
        problems.append(f"they were built with the CUDA {manifest.cuda_major} build of {built['flavour']} and this "
                        f"machine has its CUDA {have_cuda} build (pip install {wheel}-cu{manifest.cuda_major}=="
                        f"{built['version']} runs them)")
    ampere_plus = manifest.hardware_compatible and int(key.compute_capability[2:]) >= 80
    if manifest.compute_capability != key.compute_capability and not ampere_plus:
        where = f" ({manifest.device})" if manifest.device else ""
        problems.append(f"they were built for {manifest.compute_capability}{where} and this GPU, {key.device}, is "
                        f"{key.compute_capability}")
    if problems:
        export_dir = export_dir or manifest.export
        raise EngineMismatchError(
            f"{engines_dir} cannot run here: " + "; ".join(problems) + f". Engines were built with "
            f"{built['flavour']} {built['version']} for {manifest.compute_capability}; this machine has "
            f"{key.describe()}. Rebuild: {rebuild_command(manifest, export_dir, engines_dir, key)}")
