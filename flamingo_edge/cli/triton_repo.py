"""`flamingo-edge triton-repo EXPORT -o REPO [--engines ENGINES | --python-only]`: a Triton model repository."""

from __future__ import annotations

import argparse

HELP = ("write a Triton Inference Server model repository for an export: its graphs (ONNX Runtime, TensorRT engines, "
        "or Python-backend models) and the `flamingo` generation model that runs them through BLS")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count
    from flamingo_edge.serving.repository import DEFAULT_MAX_BATCH

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="a folder written by flamingo-edge export (`demo`: the bundled checkpoint's cached "
                             "export)")
    parser.add_argument("-o", "--output", metavar="REPO", required=True,
                        help="repository folder to write (must not exist)")
    parser.add_argument("--engines", metavar="ENGINES",
                        help="serve the graphs as tensorrt_plan models: the folder flamingo-edge build wrote from "
                             "EXPORT (TensorRT, not TensorRT for RTX; default: onnxruntime models of the .onnx)")
    parser.add_argument("--python-only", action="store_true",
                        help="every model on the Python backend (the graphs run ONNX Runtime inside it): what the "
                             "tritonserver bundled with PyTriton runs")
    parser.add_argument("--max-batch", type=count, default=DEFAULT_MAX_BATCH,
                        help=f"requests decoded together (default: {DEFAULT_MAX_BATCH}; with --engines at most what "
                             "they were built for)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import check_new_folder
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.serving.repository import check_options, write_repository

    check_options(engines=args.engines, python_only=args.python_only, max_batch=args.max_batch)
    check_new_folder(args.output)  # both before `demo` is exported
    kinds = write_repository(resolve_export(args.export_dir), args.output, engines=args.engines,
                             python_only=args.python_only, max_batch=args.max_batch)
    for name, kind in kinds.items():
        print(f"  {name:10} {kind}")
    print(f"wrote {args.output}; serve it with: tritonserver --model-repository {args.output} "
          "(flamingo-edge must be importable by the Python backend: docs/triton_repo.md)")
    return 0
