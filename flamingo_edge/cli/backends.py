"""The runtime-backend options every running subcommand shares: --backend, --engines, --cuda-graph."""

from __future__ import annotations

import argparse

BACKENDS = ("onnxruntime", "tensorrt")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="onnxruntime runs the export's ONNX graphs; tensorrt runs the engines of --engines on "
                             "an NVIDIA GPU (default: onnxruntime)")
    parser.add_argument("--engines", metavar="ENGINES",
                        help="with --backend tensorrt: the folder flamingo-edge build wrote from this export")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="with --backend tensorrt: replay decode steps from a CUDA graph (decoding with a "
                             "fixed-size past so that every step has the same shapes)")


def pipeline_options(args: argparse.Namespace) -> dict:
    """`Pipeline.open` keyword arguments from the parsed options (Pipeline.open checks they go together)."""
    return {"backend": args.backend, "engines": args.engines, "cuda_graph": args.cuda_graph}
