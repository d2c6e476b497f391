"""`flamingo-edge build EXPORT -o ENGINES --target T`: TensorRT engines for every graph, and manifest.json."""

from __future__ import annotations

import argparse

HELP = "build a TensorRT engine per graph of an export for a target GPU, with a manifest of what it was built for"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.engines.build import TARGETS

    parser.add_argument("export_dir", metavar="EXPORT", help="an export folder (fp32, fp16 or int8)")
    parser.add_argument("-o", "--output", required=True, metavar="ENGINES", help="folder to write (must not exist)")
    parser.add_argument("--target", required=True, choices=TARGETS,
                        help="; ".join(f"{name}: {t.note}" for name, t in TARGETS.items()))
    for name, default_help in (("max-batch", "sequences per run"), ("max-prompt", "tokens in one prefill"),
                               ("max-context", "prompt + generated tokens"), ("max-images", "images per sequence")):
        parser.add_argument(f"--{name}", type=int, help=f"{default_help} (default: the target's preset, within the "
                                                        "model's positions)")
    parser.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace cap (default: the target's)")


def main(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from flamingo_edge.engines.build import TARGETS, build_engines

    limits = None
    given = {k: getattr(args, k) for k in ("max_batch", "max_prompt", "max_context", "max_images")
             if getattr(args, k) is not None}
    if given:
        limits = replace(TARGETS[args.target].limits, **given)
    with tqdm(total=4, desc=f"build ({args.target})", unit="graph") as bar:
        manifest = build_engines(args.export_dir, args.output, args.target, limits=limits,
                                 workspace_mib=args.workspace,
                                 on_graph=lambda name: (bar.set_postfix_str(name), bar.update(1)))
    for name, entry in manifest.engines.items():
        print(f"  {name:10} {entry['bytes'] / 2**20:8.2f} MiB  built in {entry['build_seconds']:.1f} s")
    print(f"wrote {args.output}: {manifest.precision} engines for {manifest.compute_capability} with "
          f"{manifest.tensorrt['flavour']} {manifest.tensorrt['version']}")
    return 0
