"""`flamingo-edge export CHECKPOINT -o OUT`: the four ONNX graphs, tokenizer files and export.json."""

from __future__ import annotations

import argparse

HELP = "export a checkpoint to ONNX graphs (vision, resampler, xattn_kv, decoder), each checked against PyTorch"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import natural
    from flamingo_edge.graphs import DEFAULT_OPSET

    parser.add_argument("checkpoint", help="an IDEFICS or Llama 3.2 Vision (mllama) save_pretrained folder, a "
                                           "folder written by flamingo-edge convert, or `demo` (the bundled "
                                           "checkpoint)")
    parser.add_argument("-o", "--out-dir", required=True,
                        help="export folder to write (must not exist; written under a temporary name and renamed "
                             "when complete)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export at --out-dir, once the new one is complete (default: refuse)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, 13 to 20 (default: {DEFAULT_OPSET}, the newest TensorRT 8.5 parses)")
    parser.add_argument("--decompose-layernorm", action="store_true",
                        help="write LayerNormalization with primitive ops: TensorRT 8.5 (JetPack 5) cannot import it")
    parser.add_argument("--seed", type=natural, default=None, help="seed of the random check inputs (default: fresh)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.export.export import export_all
    from flamingo_edge.graphs import GRAPH_NAMES

    with Progress(total=len(GRAPH_NAMES), unit="graph", desc="export") as bar:
        def on_graph(name: str) -> None:
            if bar.n or name != GRAPH_NAMES[0]:
                bar.update(1)
            bar.set_postfix_str(name)

        record = export_all(args.checkpoint, args.out_dir, opset=args.opset, seed=args.seed, on_graph=on_graph,
                            decompose_layernorm=args.decompose_layernorm, overwrite=args.overwrite)
        bar.update(bar.total - bar.n)
    for name, graph in record.graphs.items():
        print(f"{name:<10} {args.out_dir}/{graph.file}  sha256 {graph.sha256[:16]}")
    print(f"wrote {args.out_dir}/export.json (contract v{record.contract_version}, opset {record.opset})")
    return 0
