"""`flamingo-edge plan SOURCE [--target T]`: the memory a model needs per precision, and what fits the target."""

from __future__ import annotations

import argparse
import json

HELP = "memory per component and precision, the largest context/images that fit a Jetson (or GPU_GB), the precision"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, mebibytes, natural
    from flamingo_edge.engines.plan import DEVICES, IMAGE_CACHE, PREFIX_CACHE_BYTES, RUNTIMES
    from flamingo_edge.precision import EXPORT_PRECISIONS

    parser.add_argument("source", metavar="CHECKPOINT_OR_EXPORT",
                        help="an export folder, a checkpoint folder, or a config.json (no weights needed)")
    parser.add_argument("--target", default=None,
                        help=f"{', '.join(DEVICES)}, or a memory size in GiB (default: every Jetson)")
    parser.add_argument("--precision", choices=[p.value for p in EXPORT_PRECISIONS], action="append",
                        help="plan this precision (repeatable; default: all of them)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="tensorrt",
                        help="tensorrt engines on the device, or ONNX Runtime's CPU provider (peak RSS of the "
                             "process; default: tensorrt)")
    for name, default, what in (("max-context", "the model's positions", "prompt + generated tokens"),
                                ("max-images", 1, "images per sequence"), ("max-batch", 1, "sequences per run"),
                                ("max-prompt", 512, "tokens in one prefill, within the context")):
        parser.add_argument(f"--{name}", type=count, default=None, help=f"{what} (default: {default})")
    parser.add_argument("--image-cache", type=natural, default=IMAGE_CACHE, metavar="N",
                        help="images whose cross-attention K/V the pipeline keeps (Pipeline.open's image_cache_size; "
                             f"default: {IMAGE_CACHE})")
    parser.add_argument("--prefix-cache", dest="prefix_cache_bytes", type=mebibytes, default=PREFIX_CACHE_BYTES,
                        metavar="MiB", help="memory for earlier prompts' self-attention K/V, counted full "
                                            "(Pipeline.open's prefix_cache_bytes; default: "
                                            f"{PREFIX_CACHE_BYTES >> 20}; 0: none)")
    parser.add_argument("--workspace", dest="workspace_mib", type=count, metavar="MiB",
                        help="TensorRT builder workspace cap (default: none)")
    parser.add_argument("--float", choices=("fp32", "fp16"), default="fp32",
                        help="int4 / int8-weights: what is not quantized in fp32 or fp16, as quantize --float makes "
                             "it (default: fp32)")
    parser.add_argument("--embeddings", action="store_true",
                        help="int4 / int8-weights: the token embedding quantized too, as quantize --embeddings")
    parser.add_argument("--trt-version", dest="tensorrt_version", metavar="VERSION",
                        help="the TensorRT that will build (e.g. 8.5 on JetPack 5, which has no int4 or int8-weights: "
                             "they are left out)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _gib(value: int) -> str:
    return f"{value / 2**30:7.2f}"


def _print_table(report: dict) -> None:
    plans = report["plans"]
    names = list(dict.fromkeys(item["name"] for plan in plans for item in plan["items"]))
    limits = report["limits"]
    weight_only = report["weight_only"]
    how = f"; int4/int8-weights with {weight_only['float']} float parts" + (
        " and quantized embeddings" if weight_only["embeddings"] else "")
    print(f"{report['source']} ({report['kind']}), {report['runtime']}: context {limits['max_context']}, "
          f"{limits['max_images']} image(s), batch {limits['max_batch']}, "
          f"{report['image_cache_kept']} cached image(s), {report['prefix_cache_bytes'] // 2**20} MiB prefix cache"
          f"{how}; GiB")
    print(f"  {'':26}" + "".join(f"{plan['precision']:>13}" for plan in plans))
    for name in names:
        row = [sum(i["bytes"] for i in plan["items"] if i["name"] == name) for plan in plans]
        print(f"  {name:26}" + "".join(f"{_gib(v):>13}" for v in row))
    print(f"  {'total':26}" + "".join(f"{_gib(plan['total']):>13}" for plan in plans))
    for note in report["notes"]:
        print(f"note: {note}")
    for target in report["targets"]:
        print(f"{target['target']} ({target['budget'] / 2**30:.1f} GiB for the process):")
        for row in target["precisions"]:
            status = "fits" if row["fits"] else "does not fit"
            print(f"  {row['precision']:13} {status:13} largest context {row['max_context']:5}, "
                  f"most images {row['max_images']}")
        print(f"  recommended: {target['recommended'] or 'none fits; lower --max-context/--max-images'}")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.engines.plan import plan_report

    source = resolve_export(args.source) if args.source == "demo" else args.source
    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "source", "json", "float")}
    options["float16"] = args.float == "fp16"
    report = plan_report(source, **options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0
