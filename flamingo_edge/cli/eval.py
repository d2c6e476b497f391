"""`flamingo-edge eval CHECKPOINT_OR_EXPORT`: exact-match accuracy on held-out demo scenes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "exact-match caption and answer accuracy on freshly generated held-out shape scenes (the demo task)"
BACKENDS = ("pytorch", "onnxruntime")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, natural
    from flamingo_edge.demo.evaluate import EVAL_SEED

    parser.add_argument("paths", nargs="+", metavar="CHECKPOINT_OR_EXPORT",
                        help="a checkpoint folder (pytorch backend) or an export folder (onnxruntime backend); "
                        "`demo` names the bundled checkpoint (its cached export for onnxruntime); several exports "
                        "(e.g. fp32, fp16, int8) are scored side by side on the same scenes")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="(default: onnxruntime)")
    parser.add_argument("--n", type=count, default=200, help="held-out scenes (default: 200)")
    parser.add_argument("--seed", type=natural, default=EVAL_SEED,
                        help=f"seed of the held-out scenes; training used 0 (default: {EVAL_SEED})")
    parser.add_argument("--json", action="store_true", help="print one JSON object (n, answer_accuracy, "
                        "caption_accuracy) instead of text; with several paths, a list of them with path and "
                        "precision")


def _answerer(path: Path, backend: str):
    from flamingo_edge.demo.evaluate import pipeline_answerer, pytorch_answerer
    from flamingo_edge.errors import ExportError
    from flamingo_edge.artifacts import DEMO, resolve_checkpoint

    if str(path) == DEMO:  # the bundled checkpoint, or for onnxruntime its cached export
        if backend == "pytorch":
            return pytorch_answerer(resolve_checkpoint(path))
        from flamingo_edge.demo.bundle import demo_export

        return pipeline_answerer(demo_export())
    is_export = (path / "export.json").is_file()
    if backend == "pytorch":
        if is_export:
            raise ExportError(f"{path} is an export; the pytorch backend needs the checkpoint it was exported from "
                              "(its path is in export.json under 'checkpoint')")
        return pytorch_answerer(path)
    if not is_export and (path / "config.json").is_file():
        raise ExportError(f"{path} is not an export folder (no export.json); export it first: "
                          f"flamingo-edge export {path} -o OUT, then flamingo-edge eval OUT")
    return pipeline_answerer(path)  # anything else that is not an export: Pipeline.open says what it is


def _precision(path: str, backend: str) -> str:
    from flamingo_edge.artifacts import read_export_record

    if backend == "pytorch" or path == "demo":
        return "fp32"
    return read_export_record(path).precision


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.evaluate import evaluate

    answerers = [(path, _answerer(Path(path), args.backend)) for path in args.paths]  # every path checked first
    results = []
    for path, answer in answerers:
        with Progress(total=2 * args.n, unit="prompt", desc=f"eval ({args.backend})", disable=args.json) as bar:
            report = evaluate(answer, n=args.n, seed=args.seed, on_batch=bar.update)
        results.append({"path": path, "precision": _precision(path, args.backend), **report.to_dict()})
    if args.json:
        single = {k: v for k, v in results[0].items() if k not in ("path", "precision")}
        print(json.dumps(single if len(results) == 1 else results))
        return 0
    for result in results:
        print(f"{args.backend} {result['precision']:5} {result['n']} scenes, answers {result['answer_accuracy']:6.1%}, "
              f"captions {result['caption_accuracy']:6.1%}  {result['path']}")
    return 0
