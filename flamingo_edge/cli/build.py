"""`flamingo-edge build EXPORT -o ENGINES --target T`: TensorRT engines for every graph, and manifest.json."""

from __future__ import annotations

import argparse

HELP = "build a TensorRT engine per graph of an export for a target GPU, with a manifest of what it was built for"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, mebibytes, natural
    from flamingo_edge.engines.build import TARGETS
    from flamingo_edge.engines.plan import IMAGE_CACHE, PREFIX_CACHE_BYTES

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="an export folder (fp32, fp16, int8, or int4 / int8-weights quantized with --target "
                             "tensorrt; `demo`: the bundled checkpoint's cached export)")
    parser.add_argument("-o", "--output", metavar="ENGINES", help="folder to write (must not exist)")
    parser.add_argument("--target", choices=TARGETS,
                        help="; ".join(f"{name}: {t.note}" for name, t in TARGETS.items()))
    for name, default_help in (("max-batch", "sequences per run"), ("max-prompt", "tokens in one prefill"),
                               ("max-context", "prompt + generated tokens"), ("max-images", "images per sequence")):
        parser.add_argument(f"--{name}", type=count, help=f"{default_help} (default: the target's preset, within the "
                                                        "model's positions)")
    parser.add_argument("--image-cache", type=natural, default=IMAGE_CACHE, metavar="N",
                        help="Jetson targets: the images whose cross-attention K/V the pipeline will keep "
                             f"(Pipeline.open's image_cache_size), for the memory check (default: {IMAGE_CACHE})")
    parser.add_argument("--prefix-cache", dest="prefix_cache_bytes", type=mebibytes, default=PREFIX_CACHE_BYTES,
                        metavar="MiB", help="Jetson targets: the pipeline's prefix cache (Pipeline.open's "
                                            "prefix_cache_bytes), for the memory check (default: "
                                            f"{PREFIX_CACHE_BYTES >> 20})")
    parser.add_argument("--workspace", type=count, metavar="MiB", help="builder workspace cap (default: the target's)")
    parser.add_argument("--dla-core", type=natural, metavar="N",
                        help="Jetson Orin: build the vision graph for DLA core N with GPU fallback (fp16/int8 exports)")
    parser.add_argument("--timing-cache", metavar="PATH",
                        help="TensorRT timing cache: read if present, written after the build (faster rebuilds on "
                             "the same GPU and TensorRT; ignored by TensorRT for RTX)")
    parser.add_argument("--version-compatible", action="store_true",
                        help="TensorRT 8.6+: engines that later TensorRT runtimes load (may be slower)")
    parser.add_argument("--hardware-compatible", action="store_true",
                        help="TensorRT 8.6+, --target datacenter: engines every Ampere-or-newer discrete GPU runs")
    parser.add_argument("--check-ops", metavar="VERSION",
                        help="only check every graph against the ONNX operators and opset TensorRT VERSION imports "
                             "(e.g. 8.5 for JetPack 5, 10.3 for JetPack 6); exit 1 if one cannot be imported")
    parser.add_argument("--force", action="store_true",
                        help="build even when the memory plan (flamingo-edge plan) says the Jetson cannot hold the "
                             "engines")
    parser.add_argument("--int8-calibration", metavar="INT8_EXPORT",
                        help="TensorRT <= 10: implicit INT8 of this fp32 export with the calibration caches of the "
                             "int8 export flamingo-edge quantize made from it")


def check_ops(export_dir: str, version: str) -> int:
    from flamingo_edge.engines.operators import check_export, support_for

    support = support_for(version)
    problems = check_export(export_dir, version)
    for name, found in problems.items():
        print(f"  {name:10} " + ("ok" if not found else "; ".join(found)))
    refused = [name for name, found in problems.items() if found]
    print(f"TensorRT {version} (operator list of {support.version}, opset <= {support.max_opset}): "
          + (f"cannot import {', '.join(refused)}" if refused else "every graph imports"))
    return 1 if refused else 0


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from flamingo_edge.artifacts import check_new_folder
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.engines.build import TARGETS, build_engines
    from flamingo_edge.errors import UsageError
    from flamingo_edge.graphs import GRAPH_NAMES

    if args.check_ops:
        return check_ops(resolve_export(args.export_dir), args.check_ops)
    if not args.output or not args.target:
        raise UsageError("flamingo-edge build needs -o ENGINES and --target (or only --check-ops VERSION)")
    check_new_folder(args.output)  # before `demo` is exported
    export_dir = resolve_export(args.export_dir)

    limits = None
    given = {k: getattr(args, k) for k in ("max_batch", "max_prompt", "max_context", "max_images")
             if getattr(args, k) is not None}
    if given:
        limits = replace(TARGETS[args.target].limits, **given)
    with Progress(total=len(GRAPH_NAMES), desc=f"build ({args.target})", unit="graph") as bar:
        current = []  # the graph being built

        def on_graph(name: str) -> None:  # a bar step per finished graph, the one being built named
            if current:
                bar.update(1)
            current[:] = [name]
            bar.set_postfix_str(name)

        manifest = build_engines(export_dir, args.output, args.target, limits=limits,
                                 workspace_mib=args.workspace, dla_core=args.dla_core,
                                 int8_calibration=args.int8_calibration, timing_cache=args.timing_cache,
                                 version_compatible=args.version_compatible,
                                 hardware_compatible=args.hardware_compatible, force=args.force,
                                 image_cache=args.image_cache, prefix_cache_bytes=args.prefix_cache_bytes,
                                 on_graph=on_graph,
                                 on_progress=lambda phase: bar.set_postfix_str(f"{current[0]}: {phase}"))
        bar.update(bar.total - bar.n)
    for name, entry in manifest.engines.items():
        print(f"  {name:10} {entry['bytes'] / 2**20:8.2f} MiB  built in {entry['build_seconds']:.1f} s")
    print(f"wrote {args.output}: {manifest.precision} engines for {manifest.compute_capability} with "
          f"{manifest.tensorrt['flavour']} {manifest.tensorrt['version']}")
    return 0
