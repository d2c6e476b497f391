"""`flamingo-edge build`: one TensorRT engine per graph of an export, and `manifest.json`.

    ENGINES/
      manifest.json        what each engine was built from and for (the compatibility key)
      vision.engine  resampler.engine  xattn_kv.engine  decoder.engine

The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from flamingo_edge.artifacts import atomic_folder, atomic_write, check_new_folder, read_export_record, sha256_of
from flamingo_edge.engines.profiles import ShapeLimits, graph_profiles
from flamingo_edge.engines.trt_compat import TensorRT, load
from flamingo_edge.errors import EngineBuildError, FeatureUnavailableError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES, build_graphs
from flamingo_edge.models.config import FlamingoConfig

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Target:
    flavour: str  # the TensorRT that builds for it
    compute_capability: str | None  # a TensorRT-RTX ComputeCapability name; None: the GPU the build runs on
    workspace_mib: int | None  # default workspace cap (Jetson boards share memory with the CPU)
    limits: ShapeLimits  # default shape limits for the board
    note: str


TARGETS = {
    "rtx-sm80": Target("tensorrt_rtx", "SM80", None, ShapeLimits(), "TensorRT for RTX, Ampere A100-class (CPU build)"),
    "rtx-sm86": Target("tensorrt_rtx", "SM86", None, ShapeLimits(), "TensorRT for RTX, RTX 30xx (CPU build)"),
    "rtx-sm89": Target("tensorrt_rtx", "SM89", None, ShapeLimits(), "TensorRT for RTX, RTX 40xx (CPU build)"),
    "orin-nano": Target("tensorrt", None, 1024, ShapeLimits(1, 128, 256, 2), "Jetson Orin Nano 8 GB, on the device"),
    "orin-nx": Target("tensorrt", None, 2048, ShapeLimits(1, 256, 512, 4), "Jetson Orin NX 16 GB, on the device"),
    "agx-orin": Target("tensorrt", None, 4096, ShapeLimits(2, 512, 1024, 8), "Jetson AGX Orin 32/64 GB, on the device"),
    "thor": Target("tensorrt", None, 8192, ShapeLimits(4, 1024, 2048, 8), "Jetson Thor, on the device"),
    "datacenter": Target("tensorrt", None, None, ShapeLimits(8, 1024, 2048, 16), "a datacenter GPU, on that GPU"),
}


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
    precision: str
    tensorrt: dict  # {"flavour", "version"}
    target: str
    compute_capability: str
    limits: dict
    workspace_mib: int | None
    build_flags: list[str]
    profiles: dict = field(default_factory=dict)  # graph -> [{input: [min, opt, max]}]
    engines: dict = field(default_factory=dict)  # graph -> EngineEntry


def _configure_precision(trt: TensorRT, config, precision: str) -> list[str]:
    """Weakly typed TensorRT (<= 10 without STRONGLY_TYPED) needs builder flags for what the ONNX holds."""
    if not trt.precision_flags or trt.can_strongly_type:
        return []  # strongly typed: the precision is the graph's
    flags = {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}.get(precision, [])
    for name in flags:
        config.set_flag(getattr(trt.module.BuilderFlag, name))
    return flags


def build_graph(trt: TensorRT, onnx_path: Path, profiles, *, precision: str, target: Target,
                workspace_mib: int | None) -> tuple[bytes, list[str]]:
    """One serialized engine, and the builder flags that were set."""
    module = trt.module
    logger = module.Logger(module.Logger.ERROR)
    builder = module.Builder(logger)
    network = builder.create_network(trt.network_flags(strongly_typed=True))
    parser = module.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{trt.flavour} {trt.version} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    if workspace_mib:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    flags = _configure_precision(trt, config, precision)
    if target.compute_capability:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(module.ComputeCapability, target.compute_capability), 0)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{trt.flavour} {trt.version} could not build {onnx_path.name} for "
                               f"{target.compute_capability or 'this GPU'} ({precision}); run with -v for "
                               "TensorRT's log")
    return bytes(plan), flags


def build_engines(export_dir: str | Path, out_dir: str | Path, target_name: str, *,
                  limits: ShapeLimits | None = None, workspace_mib: int | None = None,
                  on_graph: Callable[[str], None] | None = None) -> Manifest:
    """Build every graph of an export for a target and write the engines and the manifest.

    Raises:
        UsageError: an unknown target, bad limits, or an existing `out_dir`.
        FeatureUnavailableError: the target's TensorRT is not installed, or cannot target it from here.
        EngineBuildError: TensorRT refused a graph.
    """
    if target_name not in TARGETS:
        raise UsageError(f"unknown target {target_name!r}; choose one of {', '.join(TARGETS)}")
    target = TARGETS[target_name]
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    check_new_folder(out_dir)
    record = read_export_record(export_dir)
    config = FlamingoConfig.from_dict(record.config)
    if limits is None:  # the board's defaults, within the model's positions
        context = min(target.limits.max_context, config.decoder.max_positions)
        limits = replace(target.limits, max_context=context, max_prompt=min(target.limits.max_prompt, context))
    limits.check(config.decoder.max_positions)
    workspace_mib = workspace_mib if workspace_mib is not None else target.workspace_mib
    trt = load(target.flavour)
    if target.compute_capability and not trt.targets_compute_capability:
        raise FeatureUnavailableError(f"{trt.flavour} {trt.version} cannot build for {target.compute_capability} "
                                      "without that GPU")
    specs = build_graphs(config)
    manifest = Manifest(MANIFEST_VERSION, str(export_dir.resolve()), record.precision,
                        {"flavour": trt.flavour, "version": trt.version}, target_name,
                        target.compute_capability or "the build GPU", asdict(limits), workspace_mib, [])
    with atomic_folder(out_dir) as partial:
        for name in GRAPH_NAMES:
            if on_graph:
                on_graph(name)
            profiles = graph_profiles(specs[name], limits, config.visual_tokens_per_image)
            onnx_path = export_dir / record.graphs[name].file
            start = time.perf_counter()
            plan, flags = build_graph(trt, onnx_path, profiles, precision=record.precision, target=target,
                                      workspace_mib=workspace_mib)
            seconds = time.perf_counter() - start
            file = partial / f"{name}.engine"
            atomic_write(file, plan)
            manifest.build_flags = sorted(set(manifest.build_flags) | set(flags))
            manifest.profiles[name] = [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]
            manifest.engines[name] = asdict(EngineEntry(file.name, sha256_of(file), record.graphs[name].sha256,
                                                        len(plan), round(seconds, 3)))
        atomic_write(partial / MANIFEST, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
    return manifest


def read_manifest(engines_dir: str | Path, export_dir: str | Path | None = None) -> Manifest:
    """The manifest of an engines folder, every engine checked against its hash, and (given the export) every
    engine's ONNX against the export's current graph.

    Raises:
        EngineBuildError: no manifest, a missing or modified engine, or an export whose graphs changed since the build.
    """
    engines_dir = Path(engines_dir)
    try:
        manifest = Manifest(**json.loads((engines_dir / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise EngineBuildError(f"{engines_dir} is not a complete engines folder ({error}); run flamingo-edge build") \
            from None
    for name, entry in manifest.engines.items():
        path = engines_dir / entry["file"]
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            raise EngineBuildError(f"{path} is missing or was modified; run flamingo-edge build again")
    if export_dir is not None:
        record = read_export_record(export_dir)
        stale = [n for n, e in manifest.engines.items() if record.graphs[n].sha256 != e["onnx_sha256"]]
        if stale:
            raise EngineBuildError(f"the engines for {stale} were built from other ONNX graphs than {export_dir} "
                                   f"holds now; rebuild: flamingo-edge build {export_dir} -o {engines_dir} "
                                   f"--target {manifest.target}")
    return manifest
