"""`flamingo-edge serve EXPORT`: serve an export with Triton Inference Server (PyTriton) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

HELP = ("serve an export with Triton Inference Server over HTTP and gRPC: models `flamingo` (one response) and "
        "`flamingo_stream` (gRPC, a response per token), in-flight batching; needs the [serve] extra in a venv of "
        "its own (docs/serving.md)")


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    from flamingo_edge.cli.arguments import count

    value = count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count
    from flamingo_edge.cli.backends import add_backend_arguments

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="a folder written by flamingo-edge export (`demo`: the bundled checkpoint's cached "
                             "export)")
    add_backend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address every endpoint binds to (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--http-port", type=port, default=8000, help="Triton's HTTP port (default: 8000)")
    parser.add_argument("--grpc-port", type=port, default=8001, help="Triton's gRPC port (default: 8001)")
    parser.add_argument("--metrics-port", type=port, default=8002,
                        help="Triton's Prometheus metrics port; flamingo-edge's own metrics are on the next port "
                             "(default: 8002, and 8003)")
    parser.add_argument("--max-batch", type=count, default=8,
                        help="requests decoded together; also the instances of the `flamingo` model, each a "
                             "process (default: 8)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.extras import require

    require("pytriton", "serve", "flamingo-edge serve")
    from flamingo_edge.cli.backends import pipeline_options
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.serving.triton import MODEL, STREAM_MODEL, serve

    signals = []

    def stop(signum, frame):  # PyTriton stops the server on KeyboardInterrupt; a second signal must not cut that short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signals.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started ignoring it (`cmd &`)
        signal.signal(signal.SIGINT, stop)
    export = resolve_export(args.export_dir)
    host = args.host

    def ready():
        print(f"flamingo-edge serve: {export}: models {MODEL} and {STREAM_MODEL} ready; HTTP {host}:{args.http_port}, "
              f"gRPC {host}:{args.grpc_port}, metrics http://{host}:{args.metrics_port}/metrics (Triton) and "
              f"http://{host}:{args.metrics_port + 1}/metrics (flamingo-edge); Ctrl-C or SIGTERM stops", flush=True)

    serve(export, **pipeline_options(args), host=host, http_port=args.http_port, grpc_port=args.grpc_port,
          metrics_port=args.metrics_port, max_batch=args.max_batch, on_ready=ready)
    if not signals:
        print("flamingo-edge serve: the Triton server stopped on its own; its log is above", file=sys.stderr)
        return 1
    print("flamingo-edge serve: stopped", flush=True)
    return 0
