"""`flamingo-edge compare CHECKPOINT EXPORT`: parity of an export on a backend with the PyTorch reference."""

from __future__ import annotations

import argparse
import json

HELP = ("compare an export, run by a backend, with the checkpoint's PyTorch reference: per graph, per layer and end "
        "to end; exits 1 when it leaves the tolerance")
DEFAULT_PROMPT = "<image>caption:"
TEXT_ONLY_PROMPT = "question: what colour is the square? answer:"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, natural
    from flamingo_edge.cli.backends import add_backend_arguments

    parser.add_argument("checkpoint", help="the checkpoint folder the export was made from (`demo`: the bundled one)")
    parser.add_argument("export_dirs", nargs="+", metavar="EXPORT",
                        help="the export folder (flamingo-edge export or quantize; `demo`: the bundled checkpoint's "
                             "cached export); several (e.g. fp32, fp16, int8) are compared on the same inputs and "
                             "summed up side by side")
    add_backend_arguments(parser)
    parser.add_argument("--images", nargs="+", default=[], metavar="IMAGE",
                        help="images to feed (default: two generated demo scenes)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line, with <image> where each image goes; the images of --images are "
                             f"used in order (default: {DEFAULT_PROMPT!r} per image, plus one text-only prompt)")
    parser.add_argument("--new-tokens", type=count, default=12,
                        help="greedy tokens per prompt for the token comparisons (default: 12)")
    parser.add_argument("--task-n", type=natural, default=100,
                        help="held-out scenes scored on both sides when the checkpoint is the demo model; 0 skips "
                             "(default: 100)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (docs/compare.md)")
    parser.add_argument("--plot", metavar="PATH.png", help="plot the error per graph and per layer (needs matplotlib)")
    parser.add_argument("--polygraphy", metavar="DIR",
                        help="also write each graph's inputs and both sides' outputs as Polygraphy JSON "
                             "(<graph>_inputs.json, <graph>_outputs.json) to continue in Polygraphy; needs polygraphy")
    parser.add_argument("--seed", type=natural, default=0, help="seed of the generated scenes (default: 0)")


def build_prompts(images: list, prompts_file: str | None) -> list:
    """The prompts: from the file (markers consume the images in order), or one caption prompt per image plus a
    text-only prompt.

    Raises:
        PromptError: the markers and the images do not pair up, or the file has no prompt.
    """
    from flamingo_edge.errors import PromptError
    from flamingo_edge.runtime.processor import IMAGE_MARKER, prompt_items, read_prompt_file

    if prompts_file is None:
        return [prompt_items(DEFAULT_PROMPT, [image]) for image in images] + [[TEXT_ONLY_PROMPT]]
    lines = read_prompt_file(prompts_file)
    needed = sum(line.count(IMAGE_MARKER) for line in lines)
    if needed != len(images):
        raise PromptError(f"{prompts_file} has {needed} '{IMAGE_MARKER}' markers but {len(images)} images were given")
    prompts, used = [], 0
    for line in lines:
        count = line.count(IMAGE_MARKER)
        prompts.append(prompt_items(line, images[used:used + count]))
        used += count
    return prompts


def _default_images(seed: int, prompts_file: str | None) -> list:
    """Generated demo scenes: two, or as many as the prompts file has markers."""
    import numpy as np

    from flamingo_edge.runtime.processor import IMAGE_MARKER, read_prompt_file
    from flamingo_edge.demo import scenes

    count = 2 if prompts_file is None else sum(line.count(IMAGE_MARKER) for line in read_prompt_file(prompts_file))
    rng = np.random.default_rng(seed)
    return [scenes.make_scene(rng).image for _ in range(count)]


def print_report(report) -> None:
    from flamingo_edge.precision import Precision

    print(f"{'graph / layer':32} {'max abs':>10} {'max rel':>10} {'cosine':>10}")
    # a quantized export's graphs are not judged by the fp32 tolerance: their errors are reported, not failed
    over = "FAIL" if report.precision == Precision.FP32 else "over the fp32 tolerance"
    for name, graph in report.graphs.items():
        worst = max(graph.outputs.items(), key=lambda item: item[1].max_rel)
        print(f"{name:32} {worst[1].max_abs:10.3g} {graph.max_rel:10.3g} {worst[1].cosine:10.6f}  "
              f"{'ok' if graph.passed else over} (worst: {worst[0]})")
        for layer in graph.layers:
            print(f"  {layer.name:30} {layer.diff.max_abs:10.3g} {layer.diff.max_rel:10.3g} {layer.diff.cosine:10.6f}")
    e2e = report.end_to_end
    print(f"\nend to end: logits max rel {e2e.logits.max_rel:.3g}, cosine {e2e.logits.cosine:.6f}, top-1 agreement "
          f"{e2e.top1_agreement:.2%}; first divergent token: teacher-forced "
          f"{_token(e2e.first_divergent_token['teacher_forced'])}, free-running "
          f"{_token(e2e.first_divergent_token['free_running'])}")
    if report.task:
        ref, ours = report.task["reference"], report.task["backend"]
        print(f"demo task ({report.task['n']} scenes): PyTorch answers {ref['answer_accuracy']:.1%} captions "
              f"{ref['caption_accuracy']:.1%}; {report.backend} answers {ours['answer_accuracy']:.1%} captions "
              f"{ours['caption_accuracy']:.1%}")
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.failures)
    rules = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in report.tolerance.items()
                      if report.precision == Precision.FP32 or name != "relative_error")
    print(f"\n{verdict} ({report.precision} export; judged on: {rules})")


def print_summary(reports) -> None:
    """One row per export: precision, worst relative error per graph, logits, top-1, task accuracy, verdict."""
    from flamingo_edge.graphs import GRAPH_NAMES

    print("\nside by side (max relative error vs PyTorch fp32)")
    print(f"{'precision':10}" + "".join(f"{name:>11}" for name in GRAPH_NAMES)
          + f"{'logits':>11}{'top-1':>9}{'answers':>9}{'captions':>9}  verdict")
    for report in reports:
        task = report.task["backend"] if report.task else None
        accuracy = (f"{task['answer_accuracy']:9.1%}{task['caption_accuracy']:9.1%}" if task else f"{'-':>9}{'-':>9}")
        print(f"{report.precision:10}" + "".join(f"{report.graphs[name].max_rel:11.3g}" for name in GRAPH_NAMES)
              + f"{report.end_to_end.logits.max_rel:11.3g}{report.end_to_end.top1_agreement:9.2%}{accuracy}  "
              + ("pass" if report.passed else "FAIL"))


def _token(index) -> str:
    return "none" if index is None else f"at token {index}"


def _pyplot():
    from flamingo_edge.errors import FeatureUnavailableError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FeatureUnavailableError("--plot needs matplotlib: pip install matplotlib "
                                      "(or pip install 'flamingo-edge[plot]')") from None
    return plt


def _polygraphy() -> None:
    from flamingo_edge.errors import FeatureUnavailableError

    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise FeatureUnavailableError("--polygraphy needs Polygraphy: pip install polygraphy "
                                      "(or pip install 'flamingo-edge[polygraphy]')") from None
    G_LOGGER.module_severity = G_LOGGER.WARNING  # its own INFO lines would mix with the report


def plot_report(report, path: str) -> None:
    """Bars of the relative error per graph and per layer (log scale) with the tolerance line, as a PNG."""
    import io

    plt = _pyplot()

    from flamingo_edge.artifacts import atomic_write

    labels, values, colours = [], [], []
    for name, graph in report.graphs.items():
        labels.append(name)
        values.append(graph.max_rel)
        colours.append("tab:blue" if graph.passed else "tab:red")
        for layer in graph.layers:
            labels.append("  " + layer.name)
            values.append(layer.diff.max_rel)
            colours.append("tab:gray")
    labels.append("end to end (logits)")
    values.append(report.end_to_end.logits.max_rel)
    colours.append("tab:green")
    floor = 1e-12  # an exact match still gets a visible bar on the log scale
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
    axes.barh(range(len(labels)), [max(v, floor) for v in values], color=colours)
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(report.tolerance["relative_error"], color="black", linestyle="--", label="tolerance")
    axes.set_xlabel("max |backend - PyTorch| / max |PyTorch|")
    axes.set_title(f"{report.backend} vs PyTorch ({'pass' if report.passed else 'FAIL'})")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import atomic_write, check_output_file
    from flamingo_edge.cli.backends import pipeline_options
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.errors import UsageError
    from flamingo_edge.runtime.processor import load_image
    from flamingo_edge.tools.compare import compare

    if args.plot:
        _pyplot()  # before the work: a missing matplotlib fails now, not after the comparison
    if args.polygraphy:
        _polygraphy()
    if len(args.export_dirs) > 1 and (args.plot or args.polygraphy or args.engines):
        raise UsageError("--plot, --polygraphy and --engines take one export; run compare once per export for them")
    for path in (args.json, args.plot):
        if path:
            check_output_file(path)  # before the work
    images = [load_image(path) for path in args.images] if args.images else _default_images(args.seed, args.prompts)
    prompts = build_prompts(images, args.prompts)
    reports = []
    for export_dir in [resolve_export(path) for path in args.export_dirs]:
        with Progress(total=7, desc="compare", unit="stage", leave=False) as bar:
            def on_stage(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update(1)

            report = compare(args.checkpoint, export_dir, prompts, **pipeline_options(args),
                             new_tokens=args.new_tokens, task_n=args.task_n, on_stage=on_stage,
                             polygraphy_dir=args.polygraphy)
        if len(args.export_dirs) > 1:
            print(f"\n== {export_dir} ({report.precision})")
        print_report(report)
        reports.append(report)
    if len(reports) > 1:
        print_summary(reports)
    if args.json:
        data = reports[0].to_dict() if len(reports) == 1 else {"version": reports[0].version,
                                                                "reports": [r.to_dict() for r in reports]}
        atomic_write(args.json, (json.dumps(data, indent=2) + "\n").encode())
    if args.plot:
        plot_report(reports[0], args.plot)
    return 0 if all(r.passed for r in reports) else 1
