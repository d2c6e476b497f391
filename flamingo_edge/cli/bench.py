"""`flamingo-edge bench EXPORT`: per-stage latency, time to first token, decode tokens/s, memory; with --reference,
the same workload through transformers and our PyTorch reference in the same run, as ratios."""

from __future__ import annotations

import argparse
import json

HELP = ("time an export on a backend per stage (preprocess, vision, resampler, xattn_kv, prefill, decode), with "
        "ratios against transformers and the PyTorch reference measured in the same run")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, counts, natural
    from flamingo_edge.cli.backends import add_backend_arguments

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="the export folder (`demo`: the bundled checkpoint's cached export)")
    add_backend_arguments(parser)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    parser.add_argument("--reference", metavar="CHECKPOINT",
                        help="also run the workload through transformers' generate (IDEFICS and Llama 3.2 Vision "
                             "checkpoints; skipped for converted ones) and our PyTorch reference on this checkpoint (`demo`: the bundled "
                             "one); needs transformers")
    parser.add_argument("--baseline", metavar="EXPORT",
                        help="also run the workload on this export of the same checkpoint (e.g. the fp32 one a "
                             "quantized export came from), its runs interleaved with EXPORT's on the same images, "
                             "and print the ratios (TTFT, decode, each stage); `demo`: the bundled checkpoint's export")
    parser.add_argument("--prompt-tokens", type=counts, default=[32], metavar="N[,N...]",
                        help="prompt length in tokens, or several, comma-separated (32,128,512,1024): each is "
                             "benched in turn, references included, and a table compares them (default: 32)")
    parser.add_argument("--new-tokens", type=count, default=32, help="tokens generated per run (default: 32)")
    parser.add_argument("--images", type=count, default=1, help="images per prompt, new every run (default: 1)")
    parser.add_argument("--runs", type=count, default=5, help="timed runs after one warm-up (default: 5)")
    parser.add_argument("--seed", type=natural, default=0, help="seed of the random images (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (docs/bench.md)")


def _ms(spread: dict) -> str:
    return f"{spread['median'] * 1000:9.2f} ms  ({spread['min'] * 1000:.2f}–{spread['max'] * 1000:.2f})"


def _bandwidth(floor: dict) -> str:
    spread = floor["copy_bytes_per_s_spread"]
    return f"{spread['median'] / 1e9:.1f} GB/s ({spread['min'] / 1e9:.1f}–{spread['max'] / 1e9:.1f}, before each run)"


def _reached(floor: dict) -> str:
    spread = floor["fraction_of_floor_spread"]
    return (f"reached {floor['fraction_of_floor_reached']:.1%} of it ({spread['min']:.1%}–{spread['max']:.1%} over "
            "the runs)")


def print_report(report: dict) -> None:
    ours = report["backend_result"]
    load = report["workload"]
    print(f"{report['precision']} export, {report['backend']} ({report['device']}), {load['images']} image(s), "
          f"{ours['prompt_tokens']} prompt tokens, {load['new_tokens']} new tokens; median (min–max) of "
          f"{load['runs']} runs after a warm-up")
    for stage, spread in ours["stages_s"].items():
        print(f"  {stage:18} {_ms(spread)}")
    print(f"  {'time to first token':18} {_ms(ours['ttft_s'])}")
    decode = ours["decode_tokens_per_s"]
    print(f"  {'decode':18} {decode['median']:9.1f} tokens/s  ({decode['min']:.1f}–{decode['max']:.1f})")
    print(f"  {'peak RSS':18} {ours['peak_rss_bytes'] / 2**20:9.1f} MiB")
    band = report["memory_bandwidth"]
    print(f"  decode floor: {ours['decode_bytes_per_token'] / 2**20:.2f} MiB read per token at "
          f"{_bandwidth(band)} copy bandwidth = {band['decode_floor_s'] * 1000:.3f} ms; {_reached(band)}")
    if "speedup_vs_baseline" in report:
        theirs, ratio = report["baseline_result"], report["speedup_vs_baseline"]
        print(f"  vs {report['baseline_precision']} baseline   TTFT {theirs['ttft_s']['median'] * 1000:.2f} ms, decode "
              f"{theirs['decode_tokens_per_s']['median']:.1f} tokens/s -> this {report['precision']} export is "
              f"x{ratio['ttft']:.2f} (TTFT), x{ratio['decode']:.2f} (decode)")
        stages = report["stage_speedup_vs_baseline"]
        print("    per stage (baseline / this): " + ", ".join(f"{s} x{r:.2f}" for s, r in stages.items()))
        floor = report["baseline_memory_bandwidth"]
        print(f"    baseline decode floor: {theirs['decode_bytes_per_token'] / 2**20:.2f} MiB read per token at "
              f"{_bandwidth(floor)} = {floor['decode_floor_s'] * 1000:.3f} ms; {_reached(floor)}")
    print(f"  {'outside the graphs':18} {ours['host_per_token_s']['median'] * 1000:9.2f} ms per decode token "
          f"(feeding, cache update, sampling, stop checks, text); end-to-end decode runs at "
          f"{ours['decode_rate_vs_step_rate']:.0%} of the decoder's own step rate")
    if "speedup_vs_transformers" in report:
        if report.get("transformers_skipped"):
            print(f"  vs transformers      skipped: {report['transformers_skipped']}")
        for name, key in (("transformers", "transformers"), ("PyTorch reference", "pytorch_reference")):
            theirs, ratio = report[key], report[f"speedup_vs_{key}"]
            if theirs is None:
                continue
            print(f"  vs {name:18} TTFT {theirs['ttft_s']['median'] * 1000:.2f} ms, decode "
                  f"{theirs['decode_tokens_per_s']['median']:.1f} tokens/s -> ours is x{ratio['ttft']:.2f} (TTFT, "
                  f"theirs / ours), x{ratio['decode']:.2f} (decode, ours / theirs)")


def print_lengths(report: dict) -> None:
    """The table of a several-length report: one row per prompt length."""
    print("\nprompt tokens | TTFT | decode tokens/s | decoder step | outside the graphs per token | decode rate / "
          "step rate | vs transformers (TTFT, decode) | vs PyTorch reference (TTFT, decode)")
    for one in report["reports"]:
        ours = one["backend_result"]

        def versus(key: str) -> str:
            ratio = one.get(f"speedup_vs_{key}")
            return f"x{ratio['ttft']:.2f}, x{ratio['decode']:.2f}" if ratio else "-"

        print(f"{ours['prompt_tokens']:13d} | {ours['ttft_s']['median'] * 1000:.1f} ms | "
              f"{ours['decode_tokens_per_s']['median']:.1f} | "
              f"{ours['stages_s']['decode_per_token']['median'] * 1000:.2f} ms | "
              f"{ours['host_per_token_s']['median'] * 1000:.2f} ms | {ours['decode_rate_vs_step_rate']:.0%} | "
              f"{versus('transformers')} | {versus('pytorch_reference')}")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import atomic_write, check_output_file
    from flamingo_edge.cli.backends import pipeline_options
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.errors import UsageError
    from flamingo_edge.tools.bench import Workload, bench, bench_lengths

    if args.new_tokens < 2:
        raise UsageError("--new-tokens must be at least 2 to measure decode speed")
    if args.json:
        check_output_file(args.json)  # before the work
    export_dir = resolve_export(args.export_dir)
    lengths = args.prompt_tokens
    workload = Workload(images=args.images, prompt_tokens=lengths[0], new_tokens=args.new_tokens, runs=args.runs)
    stages = 1 + 2 * bool(args.reference)  # the backend (with the baseline interleaved), the references
    options = dict(**pipeline_options(args), device=args.device, reference=args.reference,
                   baseline=resolve_export(args.baseline) if args.baseline else None, seed=args.seed)
    with Progress(desc="bench", unit="stage", total=stages * len(lengths), leave=False) as bar:
        def on_stage(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        if len(lengths) == 1:
            report = bench(export_dir, workload, on_stage=on_stage, **options)
        else:
            report = bench_lengths(export_dir, workload, lengths, on_stage=on_stage, **options)
    for one in report.get("reports", [report]):
        print_report(one)
    if len(lengths) > 1:
        print_lengths(report)
    if args.json:
        atomic_write(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0
