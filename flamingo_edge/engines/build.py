"""`flamingo-edge build`: one TensorRT engine per graph of an export, and `manifest.json`.

    ENGINES/
      manifest.json        what each engine was built from and for (the compatibility key)
      vision.engine  resampler.engine  xattn_kv.engine  decoder.engine

Precision comes from the export: fp32, fp16 graphs, or Q/DQ INT8 (strongly typed where TensorRT can, FP16/INT8 builder
flags where it is weakly typed). On TensorRT <= 10, `int8_calibration` adds the other INT8 path: implicit
quantization of fp32 graphs with the FP16/INT8 flags and our calibration caches (calibration/trt_cache.py).

The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flamingo_edge.artifacts import atomic_folder, atomic_write, check_new_folder, read_export_record, sha256_of
from flamingo_edge.precision import BUILDER_FLAGS, Precision
from flamingo_edge.manifest import DLA_GRAPHS, MANIFEST, MANIFEST_VERSION, EngineEntry, Manifest
from flamingo_edge.engines.plan import IMAGE_CACHE, PREFIX_CACHE_BYTES, check_build_fits
from flamingo_edge.engines.profiles import ShapeLimits, graph_profiles
from flamingo_edge.trt_compat import HeldInterrupt, TensorRT, collecting_logger, load, progress_monitor
from flamingo_edge.errors import EngineBuildError, FeatureUnavailableError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES, build_graphs
from flamingo_edge.config import FlamingoConfig

logger = logging.getLogger(__name__)
# Graphs a Jetson DLA may take (with GPU fallback for the layers it cannot run): the convolutional vision stem.

@dataclass(frozen=True)
class Target:
    flavour: str  # the TensorRT that builds for it
    compute_capability: str | None  # a TensorRT-RTX ComputeCapability name; None: the GPU the build runs on
    workspace_mib: int | None  # default workspace cap (Jetson boards share memory with the CPU)
    limits: ShapeLimits  # default shape limits for the board
    note: str
    jetson: bool = False


TARGETS = {
    "rtx-sm80": Target("tensorrt_rtx", "SM80", None, ShapeLimits(), "TensorRT for RTX, Ampere A100-class (CPU build)"),
    "rtx-sm86": Target("tensorrt_rtx", "SM86", None, ShapeLimits(), "TensorRT for RTX, RTX 30xx (CPU build)"),
    "rtx-sm89": Target("tensorrt_rtx", "SM89", None, ShapeLimits(), "TensorRT for RTX, RTX 40xx (CPU build)"),
    "orin-nano": Target("tensorrt", None, 1024, ShapeLimits(1, 128, 256, 2), "Jetson Orin Nano 8 GB, on the device",
                        jetson=True),
    "orin-nx": Target("tensorrt", None, 2048, ShapeLimits(1, 256, 512, 4), "Jetson Orin NX 16 GB, on the device",
                      jetson=True),
    "agx-orin": Target("tensorrt", None, 4096, ShapeLimits(2, 512, 1024, 8), "Jetson AGX Orin 32/64 GB, on the device",
                       jetson=True),
    "thor": Target("tensorrt", None, 8192, ShapeLimits(4, 1024, 2048, 8), "Jetson Thor, on the device", jetson=True),
    "datacenter": Target("tensorrt", None, None, ShapeLimits(8, 1024, 2048, 16), "a datacenter GPU, on that GPU"),
}



@dataclass(frozen=True)
class BuildOptions:
    precision: Precision  # the export's
    target: Target
    workspace_mib: int | None = None
    dla_core: int | None = None  # Jetson DLA core for DLA_GRAPHS (GPU fallback for what it cannot run)
    int8_caches: dict[str, bytes] | None = None  # graph -> TensorRT calibration cache, for implicit INT8
    version_compatible: bool = False  # TensorRT 8.6+: later runtimes load the engines (the lean runtime is inside)
    hardware_compatible: bool = False  # TensorRT 8.6+: every Ampere-or-newer discrete GPU runs the engines


def _configure_precision(trt: TensorRT, config, precision: str, *, strongly_typed: bool, implicit_int8: bool) \
        -> list[str]:
    """Weakly typed TensorRT (8.5, or 10.x asked for implicit INT8) needs builder flags for what it should use."""
    if strongly_typed or not trt.precision_flags:
        return []  # the precision is the graph's
    flags = list(BUILDER_FLAGS[Precision.INT8_IMPLICIT if implicit_int8 else Precision(precision)])
    for name in flags:
        config.set_flag(getattr(trt.module.BuilderFlag, name))
    return flags


def _configure_dla(trt: TensorRT, config, core: int) -> list[str]:
    module = trt.module
    config.default_device_type = module.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(module.BuilderFlag.GPU_FALLBACK)
    return [f"DLA:{core}", "GPU_FALLBACK"]


def _parse(trt: TensorRT, builder, log, onnx_path: Path, *, strongly_typed: bool):
    network = builder.create_network(trt.network_flags(strongly_typed=strongly_typed))
    parser = trt.module.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineBuildError(f"{trt.flavour} {trt.version} cannot parse {onnx_path}: {errors}")
    return network, parser  # the parser must outlive the network's build


def _add_profiles(builder, config, profiles) -> None:
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for input_name, (low, opt, high) in profile.items():
            optimization.set_shape(input_name, low, opt, high)
        config.add_optimization_profile(optimization)


def _configure(trt: TensorRT, config, options: BuildOptions, name: str, *, strongly_typed: bool,
               int8_cache: bytes | None) -> list[str]:
    """Workspace, precision, calibrator, DLA, portability and target GPU; returns the flags set."""
    module = trt.module
    if options.workspace_mib:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    flags = _configure_precision(trt, config, options.precision, strongly_typed=strongly_typed,
                                 implicit_int8=int8_cache is not None)
    if int8_cache is not None:
        from flamingo_edge.calibration.trt_cache import int8_calibrator

        config.int8_calibrator = int8_calibrator(cache=int8_cache, trt=module)
        flags.append("int8_calibrator")
    if options.dla_core is not None and name in DLA_GRAPHS:
        flags += _configure_dla(trt, config, options.dla_core)
    if options.version_compatible:
        config.set_flag(module.BuilderFlag.VERSION_COMPATIBLE)
        flags.append("VERSION_COMPATIBLE")
    if options.hardware_compatible:
        config.hardware_compatibility_level = module.HardwareCompatibilityLevel.AMPERE_PLUS
        flags.append("AMPERE_PLUS")
    if name == "decoder" and trt.flavour == "tensorrt_rtx" and hasattr(module.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        # TensorRT for RTX (1.2+) captures a context's runs in a CUDA graph only when the engine uses memory the
        # application gave it: without this flag `--cuda-graph` would find is_stream_capturable() false and turn
        # graphs off (the backend checks it)
        config.set_flag(module.BuilderFlag.REQUIRE_USER_ALLOCATION)
        flags.append("REQUIRE_USER_ALLOCATION")
    if options.target.compute_capability:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(module.ComputeCapability, options.target.compute_capability), 0)
    return flags


def _use_timing_cache(config, holder: dict) -> None:
    """Make the shared ITimingCache from holder["data"] on the first graph, and set it on `config`."""
    if "cache" not in holder:
        cache = config.create_timing_cache(holder["data"])
        if cache is None and holder["data"]:  # another TensorRT's or a damaged file: start afresh
            logger.warning("TensorRT cannot read the timing cache; starting a new one")
            cache = config.create_timing_cache(b"")
        holder["cache"] = cache
    if not config.set_timing_cache(holder["cache"], False):
        logger.warning("TensorRT did not take the timing cache (built on another GPU?); building without it")


def build_graph(trt: TensorRT, onnx_path: Path, profiles, options: BuildOptions, *, name: str,
                timing_cache: dict | None = None, on_progress: Callable[[str], None] | None = None,
                ) -> tuple[bytes, list[str]]:
    """One serialized engine, and the builder flags that were set. `on_progress` gets TensorRT's optimizer phases
    ("Building engine 3/7"; TensorRT 10+ and RTX).

    `timing_cache` is {"data": bytes} on the first graph; the ITimingCache made from it is kept there under "cache"
    and shared by the following graphs.
    """
    log = collecting_logger(trt.module)
    builder = trt.module.Builder(log)
    int8_cache = (options.int8_caches or {}).get(name)
    strongly_typed = int8_cache is None and (trt.can_strongly_type or trt.strongly_typed_only)
    with HeldInterrupt() as held:  # TensorRT would swallow a Ctrl-C that lands in our logger or progress monitor
        network, _parser = _parse(trt, builder, log, onnx_path, strongly_typed=strongly_typed)
        config = builder.create_builder_config()
        _add_profiles(builder, config, profiles)
        flags = _configure(trt, config, options, name, strongly_typed=strongly_typed, int8_cache=int8_cache)
        if timing_cache is not None:
            _use_timing_cache(config, timing_cache)
        monitor = progress_monitor(trt.module, on_progress, held.pending_now) if on_progress else None
        if monitor is not None:
            config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        said = "; ".join(log.errors[-3:]) or "no message"
        raise EngineBuildError(f"{trt.flavour} {trt.version} could not build {onnx_path.name} for "
                               f"{options.target.compute_capability or 'this GPU'} ({options.precision}): {said}")
    return bytes(plan), flags


def _check_options(trt: TensorRT, options: BuildOptions, precision: str) -> None:
    """Refuse, before any build, what this TensorRT cannot do.

    Raises:
        FeatureUnavailableError, UsageError.
    """
    target = options.target
    if target.compute_capability and not trt.targets_compute_capability:
        raise FeatureUnavailableError(f"{trt.flavour} {trt.version} cannot build for {target.compute_capability} "
                                      "without that GPU")
    if options.int8_caches is not None:
        if not (trt.implicit_int8 and trt.precision_flags):
            raise FeatureUnavailableError(
                f"{trt.flavour} {trt.version} has no implicit INT8 calibration (TensorRT 8.5-10.x has); build the "
                "Q/DQ int8 export (flamingo-edge quantize --precision int8) instead")
        if precision != Precision.FP32:
            raise UsageError(f"implicit INT8 quantizes the fp32 graphs; this export is {precision}")
    if options.version_compatible and not trt.version_compatible:
        raise FeatureUnavailableError(f"{trt.flavour} {trt.version} cannot build version-compatible engines (TensorRT "
                                      "8.6+ can; TensorRT for RTX engines are tied to their release)")
    if options.hardware_compatible:
        if not trt.hardware_compatible:
            raise FeatureUnavailableError(f"{trt.flavour} {trt.version} cannot build hardware-compatible engines "
                                          "(TensorRT 8.6+ can, for discrete GPUs)")
        if target.jetson:
            raise UsageError("hardware-compatible engines are for Ampere-or-newer discrete GPUs, not JetPack: use "
                             "--target datacenter")
    if options.dla_core is not None:
        if trt.flavour != "tensorrt" or not hasattr(trt.module, "DeviceType"):
            raise FeatureUnavailableError(f"{trt.flavour} {trt.version} has no DLA; DLA cores are on Jetson Orin "
                                          "(TensorRT 8.5-10.7, or 11.4.1+)")
        if precision == Precision.FP32 and options.int8_caches is None:
            raise UsageError("the DLA runs fp16 and int8 only: build an fp16 or int8 export for --dla-core")
        cores = trt.module.Builder(trt.module.Logger(trt.module.Logger.ERROR)).num_DLA_cores
        if options.dla_core >= cores:
            raise FeatureUnavailableError(f"--dla-core {options.dla_core}: this device has {cores} DLA core(s)")


def read_int8_caches(calibration: str | Path, export_dir: Path, tensorrt_version: str) -> dict[str, bytes]:
    """The TensorRT calibration caches `flamingo-edge quantize --precision int8` wrote next to its graphs, for
    implicit INT8 of the fp32 export they were computed from, with the header of TensorRT `tensorrt_version` (the
    one that builds): TensorRT ignores a cache with another version's header, and quantize wrote the one of
    --trt-version (10.3 by default). The scales are ours and version-free, so only the header is rewritten.

    Raises:
        UsageError: not an int8 export of `export_dir`, or no caches in it.
        CalibrationError: a cache file that is not a TensorRT calibration cache.
    """
    calibration = Path(calibration)
    record = read_export_record(calibration)
    provenance = record.quantization or {}
    caches = provenance.get("tensorrt_calibration_caches") or {}
    if record.precision != Precision.INT8 or not caches:
        raise UsageError(f"{calibration} holds no TensorRT calibration caches; give the int8 export that "
                         "flamingo-edge quantize --precision int8 wrote")
    if Path(provenance["source_export"]).resolve() != export_dir.resolve():
        raise UsageError(f"the caches in {calibration} were computed for {provenance['source_export']}, not "
                         f"{export_dir}")
    from flamingo_edge.calibration.trt_cache import for_tensorrt

    return {name: for_tensorrt((calibration / file).read_bytes(), tensorrt_version) for name, file in caches.items()}


def _limits_for(target: Target, limits: ShapeLimits | None, max_positions: int) -> ShapeLimits:
    """The limits asked for, or the board's defaults within the model's positions; checked."""
    if limits is None:
        context = min(target.limits.max_context, max_positions)
        limits = replace(target.limits, max_context=context, max_prompt=min(target.limits.max_prompt, context))
    limits.check(max_positions)
    return limits


def _built_for(target: Target) -> tuple[str, str | None]:
    """(compute capability, GPU name): the target's for RTX; full TensorRT builds for the GPU it runs on."""
    if target.compute_capability:
        return target.compute_capability, None
    from flamingo_edge.runtime.cuda import device_info

    info = device_info()
    return info.compute_capability, info.name


def _timing_holder(trt: TensorRT, path: str | Path | None) -> dict | None:
    if path is None:
        return None
    if trt.flavour == "tensorrt_rtx":
        logger.warning("TensorRT for RTX ignores timing caches; %s is left as it is", path)
        return None
    return {"data": Path(path).read_bytes() if Path(path).is_file() else b""}


def build_engines(export_dir: str | Path, out_dir: str | Path, target_name: str, *,
                  limits: ShapeLimits | None = None, workspace_mib: int | None = None, dla_core: int | None = None,
                  int8_calibration: str | Path | None = None, timing_cache: str | Path | None = None,
                  version_compatible: bool = False, hardware_compatible: bool = False, force: bool = False,
                  image_cache: int = IMAGE_CACHE, prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
                  on_graph: Callable[[str], None] | None = None,
                  on_progress: Callable[[str], None] | None = None) -> Manifest:
    """Build every graph of an export for a target and write the engines and the manifest.

    Args:
        export_dir: an export folder (fp32, fp16, int8, or int4 / int8-weights quantized with --target tensorrt).
        out_dir: the engines folder to write (must not exist).
        target_name: a key of TARGETS.
        limits: shape limits (default: the target's preset, within the model's positions).
        workspace_mib: builder workspace cap (default: the target's).
        dla_core: build DLA_GRAPHS for this Jetson DLA core, with GPU fallback (TensorRT on Orin only).
        int8_calibration: an int8 export whose TensorRT calibration caches quantize this fp32 export implicitly
            (TensorRT 8.5-10.x only).
        timing_cache: a TensorRT timing cache file, read if present and written back after the build (builds of
            the same graphs on the same GPU and TensorRT then skip most tactic timing; TensorRT for RTX ignores it).
        version_compatible: engines later TensorRT runtimes load (TensorRT 8.6+; may be slower).
        hardware_compatible: engines every Ampere-or-newer discrete GPU runs (TensorRT 8.6+, target datacenter).
        force: build even when the memory plan (engines/plan.py) says the Jetson target cannot hold the engines.
        image_cache: the images whose cross-attention K/V the pipeline will keep (Pipeline.open's
            image_cache_size), for that plan.
        prefix_cache_bytes: the pipeline's prefix cache (Pipeline.open's prefix_cache_bytes), for that plan.
        on_graph: called with each graph's name before it is built (progress display).
        on_progress: called with TensorRT's optimizer phase within a graph's build (TensorRT 10+ and RTX).

    Raises:
        UsageError: an unknown target, bad limits, or an existing `out_dir`.
        FeatureUnavailableError: the target's TensorRT is not installed, or cannot do what was asked from here.
        EngineBuildError: TensorRT refused a graph (its own error messages are quoted).
        MemoryPlanError: the plan says the Jetson target cannot hold the engines (and not `force`).
    """
    if target_name not in TARGETS:
        raise UsageError(f"unknown target {target_name!r}; choose one of {', '.join(TARGETS)}")
    target = TARGETS[target_name]
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    check_new_folder(out_dir)
    record = read_export_record(export_dir)
    encoding = (record.quantization or {}).get("encoding")
    if encoding == "MatMulNBits":
        raise UsageError(f"{export_dir} is {record.precision} encoded for ONNX Runtime (MatMulNBits, an operator "
                         "TensorRT does not import): quantize the fp32 export again with --target tensorrt "
                         "--trt-version VERSION for engines")
    config = FlamingoConfig.from_dict(record.config)
    limits = _limits_for(target, limits, config.decoder.max_positions)
    if not force:
        check_build_fits(export_dir, target_name, limits, workspace_mib or target.workspace_mib,
                         image_cache=image_cache, prefix_cache_bytes=prefix_cache_bytes)
    options = BuildOptions(record.precision, target,
                           workspace_mib if workspace_mib is not None else target.workspace_mib, dla_core,
                           {} if int8_calibration is not None else None, version_compatible, hardware_compatible)
    trt = load(target.flavour)
    _check_options(trt, options, record.precision)
    if int8_calibration is not None:
        options = replace(options, int8_caches=read_int8_caches(int8_calibration, export_dir, trt.version))
    if trt.flavour == "tensorrt":  # TensorRT for RTX's parser is newer than any list; it is its own check
        from flamingo_edge.engines.operators import check_export

        refused = {name: found for name, found in check_export(export_dir, trt.version).items() if found}
        if refused:
            raise EngineBuildError(f"TensorRT {trt.version} cannot import " + "; ".join(
                f"{name}: {', '.join(found)}" for name, found in refused.items()))
    compute_capability, device = _built_for(target)
    timing = _timing_holder(trt, timing_cache)
    specs = build_graphs(config)
    precision = "int8-implicit" if options.int8_caches else record.precision
    manifest = Manifest(MANIFEST_VERSION, str(export_dir.resolve()), precision,
                        {"flavour": trt.flavour, "version": trt.version}, target_name, compute_capability,
                        asdict(limits), options.workspace_mib, {}, device=device, dla_core=dla_core,
                        version_compatible=version_compatible, hardware_compatible=hardware_compatible,
                        cuda_major=trt.cuda_major)
    with atomic_folder(out_dir) as partial:
        for name in GRAPH_NAMES:
            if on_graph:
                on_graph(name)
            profiles = graph_profiles(specs[name], limits, config.visual_tokens_per_slot, config.slots_per_image)
            if dla_core is not None and name in DLA_GRAPHS:  # the DLA takes static shapes only: one image a run
                profiles = [{tensor: (low, low, low) for tensor, (low, _, _) in p.items()} for p in profiles]
            onnx_path = export_dir / record.graphs[name].file
            start = time.perf_counter()
            plan, flags = build_graph(trt, onnx_path, profiles, options, name=name, timing_cache=timing,
                                      on_progress=on_progress)
            seconds = time.perf_counter() - start
            file = partial / f"{name}.engine"
            atomic_write(file, plan)
            manifest.build_flags[name] = flags
            manifest.profiles[name] = [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]
            manifest.engines[name] = asdict(EngineEntry(file.name, sha256_of(file), record.graphs[name].sha256,
                                                        len(plan), round(seconds, 3)))
        atomic_write(partial / MANIFEST, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
    if timing is not None and "cache" in timing:
        atomic_write(Path(timing_cache), bytes(timing["cache"].serialize()))
    return manifest
