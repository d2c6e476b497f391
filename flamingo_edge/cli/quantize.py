"""`flamingo-edge quantize EXPORT --precision fp16|int8 -o OUT`: FP16 or INT8 (Q/DQ) graphs as a complete export."""

from __future__ import annotations

import argparse

HELP = ("write an fp16 or int8 (explicit Q/DQ, calibrated) copy of an fp32 export that generate, eval, compare and "
        "bench accept unchanged")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.calibration.quantize import METHODS, PRECISIONS
    from flamingo_edge.graphs import GRAPH_NAMES

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="the fp32 export folder (`demo`: the bundled checkpoint's cached export)")
    parser.add_argument("--precision", required=True, choices=PRECISIONS)
    parser.add_argument("--calibration", metavar="CALIB",
                        help="int8: a flamingo-edge calibrate folder recorded on this export")
    parser.add_argument("--method", choices=METHODS, default="minmax",
                        help="int8 activation ranges (default: minmax)")
    parser.add_argument("--graphs", nargs="+", choices=GRAPH_NAMES, metavar="GRAPH",
                        help="graphs to convert (default: all for fp16; vision resampler xattn_kv for int8)")
    parser.add_argument("--exclude-ops", nargs="+", default=[], metavar="OP",
                        help="ONNX op types to keep in float besides the defaults (docs/calibration.md)")
    parser.add_argument("--trt-version", default="10.3",
                        help="int8: the TensorRT (8.5-10.x) whose implicit INT8 reads the calibration caches written "
                             "next to the graphs; the cache header must match it (default: 10.3, JetPack 6)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write (must not exist)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import check_new_folder
    from flamingo_edge.calibration.quantize import quantize_export
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export

    check_new_folder(args.output)  # before `demo` is exported
    export_dir = resolve_export(args.export_dir)
    with Progress(desc=f"quantize ({args.precision})", unit="graph", leave=False) as bar:
        out = quantize_export(export_dir, args.output, args.precision, calibration=args.calibration,
                              method=args.method, graphs=args.graphs, exclude_ops=args.exclude_ops,
                              on_graph=lambda name: (bar.set_postfix_str(name), bar.update(1)),
                              tensorrt_version=args.trt_version)
    print(f"wrote {out} ({args.precision})")
    return 0
