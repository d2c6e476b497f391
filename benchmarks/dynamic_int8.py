"""Dynamic int8 activations (MatMulInteger / DynamicQuantizeMatMul on VNNI) for the vision and decoder graphs: speed
against fp32 in the same run, and, on the demo checkpoint, whether the task accuracy holds (issue 15, point 3).

    python benchmarks/dynamic_int8.py EXPORT [EXPORT ...] [--accuracy] [--n 500] [--runs 20] [--warmup 3]
                                      [--threads 2] [--variants ...] [--no-basic]
                                      [--work /tmp/dq/work] [--json OUT.json]

EXPORT is an fp32 export folder (`flamingo-edge export`), or the word `demo`: the bundled demo checkpoint, exported
into WORK/demo-onnx first (needs torch) unless it is already there. The commands behind the figures in the report:

    flamingo-edge export demo -o /tmp/dq/demo-onnx
    python benchmarks/dynamic_int8.py /tmp/w/100m-onnx /tmp/dq/demo-onnx --accuracy --runs 20

For each export it writes, under WORK/<export name>/ (never into the export itself):

- `<variant>/`: a complete export copy whose vision and decoder graphs are
  `onnxruntime.quantization.quantize_dynamic` outputs (QOperator form: DynamicQuantizeLinear + MatMulInteger + Mul,
  which ONNX Runtime fuses into DynamicQuantizeMatMul when it loads the graph). Only MatMul/Gemm with a constant
  weight are quantized (Gemm has no dynamic integer kernel, so in practice MatMul); LayerNorm/RMSNorm, softmax,
  attention's activation x activation products, gates and residual adds stay float32. Variants:
    - `s8-per-channel`: int8 weights, one scale per output column (the default; the one scored for accuracy);
    - `s8-per-tensor`: int8 weights, one scale per matrix.
  Its export.json records precision "int8" and a `quantization` entry saying it is dynamic: it is this benchmark's
  private copy, not something `flamingo-edge quantize` writes.
- for the accuracy runs (demo only), the copies `vision-only/`, `decoder-only/`, `both/` of the default variant.

It prints, per export:

1. the op counts after ONNX Runtime's optimizer (which kernels really run: DynamicQuantizeMatMul or MatMulInteger);
2. per-graph latency, median of --runs after --warmup runs, fp32 and each variant interleaved in the same loop
   (same machine state), with intra_op_num_threads=--threads and the pipeline's session settings:
     vision (1 image), decoder prefill at S = 32, 128, 512 (P = 0, one image),
     decoder decode step (S = 1) at P = 128;
   unless --no-basic, each variant and fp32 also with ONNX Runtime's graph optimizations at "basic" (for int8: the
   unfused MatMulInteger path; for fp32: the graph without the extended fusions, a control for where a gain
   comes from);
   "ratio" is fp32 ms / int8 ms: above 1, int8 is faster;
3. fidelity against fp32 on the same feeds: vision features max |diff| / max |fp32|, decoder logits the same and
   top-1 agreement over positions;
4. with --accuracy on a demo-checkpoint export: answers and captions on --n held-out scenes
   (`flamingo_edge.demo.evaluate`) for fp32, dynamic int8 vision only, decoder only, both, and whether each keeps
   both metrics within 1 point of fp32 (DESIGN.md's INT8 rule).

Exit status: 0 done; 2 a bad argument or an EXPORT that is not an fp32 export (the message says which).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> quantize_dynamic's per_channel
    "s8-per-channel": True,
    "s8-per-tensor": False,
}
DEFAULT_VARIANT = "s8-per-channel"
QUANTIZED_GRAPHS = ("vision", "decoder")
OP_TYPES = ["MatMul", "Gemm"]
PREFILL_LENGTHS = (32, 128, 512)
DECODE_PAST = 128
ACCURACY_POINTS = 1.0  # DESIGN.md: INT8 keeps the task metric within 1 point of fp32


class BenchError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------------------------
# Exports and their quantized copies


def resolve_export(name: str, work: Path) -> Path:
    """An export folder from the command line (`demo`: the bundled checkpoint's, exported under WORK if needed)."""
    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.errors import FlamingoEdgeError

    folder = Path(name)
    if name == "demo" and not folder.exists():
        folder = work / "demo-onnx"
        if not (folder / "export.json").is_file():
            from flamingo_edge.export.export import export_all

            print(f"exporting the demo checkpoint to {folder}", flush=True)
            export_all("demo", folder, overwrite=folder.exists())
    try:
        record = read_export_record(folder)
    except FlamingoEdgeError as error:
        raise BenchError(f"{name}: not a usable export ({error})") from None
    if record.precision != "fp32":
        raise BenchError(f"{folder} is a {record.precision} export; pass the fp32 export (flamingo-edge export)")
    return folder


@contextmanager
def _quiet_root_logger():
    """quantize_dynamic warns on the root logger once per graph ("consider pre-processing"): not actionable here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(source: Path, target: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=OP_TYPES, per_channel=per_channel,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})


def make_copy(export: Path, out: Path, graphs: dict[str, Path], description: str) -> Path:
    """A complete export at `out`: `graphs` (name -> quantized file) replace the export's, the rest is copied, and
    export.json is rewritten with their sha256 (the pipeline refuses a changed graph otherwise)."""
    from flamingo_edge.artifacts import atomic_folder, atomic_write, read_export_record, sha256_of

    record = read_export_record(export)
    if out.exists():
        shutil.rmtree(out)
    with atomic_folder(out) as partial:
        for name in record.tokenizer_files:
            shutil.copy2(export / name, partial / name)
        files = {}
        for name, entry in record.graphs.items():
            if name in graphs:
                shutil.copy2(graphs[name], partial / entry.file)
                files[name] = replace(entry, sha256=sha256_of(partial / entry.file), data_file=None, data_sha256=None)
            else:
                shutil.copy2(export / entry.file, partial / entry.file)
                if entry.data_file:
                    shutil.copy2(export / entry.data_file, partial / entry.data_file)
                files[name] = entry
        provenance = {"source_export": str(export.resolve()), "graphs": sorted(graphs),
                      "kept_in_float": "every op except MatMul with a constant weight",
                      "method": description}
        new = replace(record, graphs=files, precision="int8", quantization=provenance)
        atomic_write(partial / "export.json", new.to_json().encode())
    return out


def quantize_variants(export: Path, work: Path, variants: list[str]) -> dict[str, dict[str, Path]]:
    """variant -> graph -> quantized .onnx file (in WORK/<variant>/, a complete export copy)."""
    from flamingo_edge.artifacts import read_export_record

    record = read_export_record(export)
    for name in QUANTIZED_GRAPHS:
        if record.graphs[name].data_file:
            raise BenchError(f"{export}: the {name} graph has external data (> 2 GB); this benchmark quantizes "
                             "single-file graphs only")
    out = {}
    scratch = work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        files = {}
        for name in QUANTIZED_GRAPHS:
            target = scratch / f"{variant}.{name}.onnx"
            start = time.perf_counter()
            quantize_graph(export / record.graphs[name].file, target, VARIANTS[variant])
            print(f"  quantized {name:8s} {variant:15s} in {time.perf_counter() - start:5.1f} s "
                  f"({target.stat().st_size / 2**20:.1f} MiB, fp32 "
                  f"{(export / record.graphs[name].file).stat().st_size / 2**20:.1f} MiB)", flush=True)
            files[name] = target
        copy = make_copy(export, work / variant, files, describe(variant))
        out[variant] = {name: copy / record.graphs[name].file for name in QUANTIZED_GRAPHS}
    shutil.rmtree(scratch)
    return out


def describe(variant: str) -> str:
    scale = "per-channel" if VARIANTS[variant] else "per-tensor"
    return (f"dynamic (onnxruntime.quantization.quantize_dynamic, QOperator: int8 {scale} weights, uint8 activations "
            "quantized per tensor at run time); written by benchmarks/dynamic_int8.py for its own measurements")


# --------------------------------------------------------------------------------------------------------------------
# Sessions and feeds


def open_session(path: Path, threads: int, level: str = "all"):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = {"all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the pipeline does
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: Path, work: Path, level: str = "all") -> dict[str, int]:
    """The op types ONNX Runtime really runs: the graph after its optimizer, counted (matrix products only)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = {"all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
    target = work / f"optimized.{path.parent.name}.{path.stem}.{level}.onnx"
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # not the warning that an optimized model is specific to this machine: it is
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(target)).graph.node:
        if "MatMul" in node.op_type or "Gemm" in node.op_type or "Quantize" in node.op_type:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    target.unlink()
    return dict(sorted(counts.items()))


def realistic_feeds(export: Path, threads: int) -> dict[str, dict[str, np.ndarray]]:
    """Feeds the pipeline would pass: a demo scene image through the export's own preprocessing; a prompt with that
    image then text, tokenized by the export's tokenizer; cross K/V from the fp32 vision, resampler and xattn_kv
    graphs; for decode, past K/V from an fp32 prefill of 128 tokens."""
    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.demo import scenes
    from flamingo_edge.graphs import cross_key, cross_value, new_key, new_value, past_key, past_value
    from flamingo_edge.config import FlamingoConfig
    from flamingo_edge.runtime.processor import Processor

    record = read_export_record(export)
    config = FlamingoConfig.from_dict(record.config)
    text = config.decoder
    processor = Processor.from_pretrained(export)
    scene = scenes.make_scene(np.random.default_rng(7))
    words = ("question: how many red circles are there in the picture, and where is the blue square? answer: two, "
             "and it is at the top left. ")
    longest = max(PREFILL_LENGTHS + (DECODE_PAST,))
    inputs = processor([[scene.image, words * (4 * longest // len(words) + 1)]])
    if inputs["input_ids"].shape[1] < longest + 1:
        raise BenchError(f"{export}: the prompt tokenized to {inputs['input_ids'].shape[1]} tokens, fewer than "
                         f"{longest + 1}")
    pixel_values = inputs["pixel_values"][:, 0]  # [1, 3, H, W]: the prompt's one image

    sessions = {name: open_session(export / record.graphs[name].file, threads)
                for name in ("vision", "resampler", "xattn_kv", "decoder")}
    features = sessions["vision"].run(None, {"pixel_values": pixel_values})[0]
    tokens = sessions["resampler"].run(None, {"image_features": features[:, None]})[0]
    cross = sessions["xattn_kv"].run(None, {"visual_tokens": tokens})
    blocks = range(len(text.cross_layers))
    cross_names = [name(i) for i in blocks for name in (cross_key, cross_value)]
    cross_feed = dict(zip(cross_names, cross))
    empty = np.zeros((1, text.heads, 0, text.head_dim), np.float32)

    def prefill(length: int) -> dict[str, np.ndarray]:
        feed = {"input_ids": inputs["input_ids"][:, :length], "attention_mask": np.ones((1, length), np.int64)}
        for layer in range(text.layers):
            feed[past_key(layer)], feed[past_value(layer)] = empty, empty
        feed.update(cross_feed)
        feed["image_attention_mask"] = np.ascontiguousarray(inputs["image_attention_mask"][:, :length])
        return feed

    feeds = {"vision": {"pixel_values": pixel_values}}
    for length in PREFILL_LENGTHS:
        feeds[f"prefill S={length}"] = prefill(length)
    names = [o.name for o in sessions["decoder"].get_outputs()]
    outputs = dict(zip(names, sessions["decoder"].run(None, prefill(DECODE_PAST))))
    step = {"input_ids": inputs["input_ids"][:, DECODE_PAST : DECODE_PAST + 1],
            "attention_mask": np.ones((1, DECODE_PAST + 1), np.int64)}
    for layer in range(text.layers):
        step[past_key(layer)], step[past_value(layer)] = outputs[new_key(layer)], outputs[new_value(layer)]
    step.update(cross_feed)
    step["image_attention_mask"] = np.ascontiguousarray(
        inputs["image_attention_mask"][:, DECODE_PAST : DECODE_PAST + 1])
    feeds[f"decode P={DECODE_PAST}"] = step
    return feeds


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def time_interleaved(sessions: dict[str, object], feed: dict, runs: int, warmup: int) -> dict[str, tuple[float, float]]:
    """(median, min) ms per session. The sessions take turns within each round (rotating who goes first), so slow
    phases of a shared machine fall on all of them alike; the min shows what a run costs when nothing else runs."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_ in range(runs):
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def fidelity(reference: np.ndarray, other: np.ndarray, logits: bool) -> dict[str, float]:
    scale = float(np.abs(reference).max()) or 1.0
    out = {"max_rel": float(np.abs(reference - other).max()) / scale}
    if logits:
        out["top1"] = float((reference.argmax(-1) == other.argmax(-1)).mean())
    return out


def benchmark_export(export: Path, work: Path, variants: list[str], runs: int, warmup: int,
                     threads: int, basic: bool = True) -> tuple[dict, dict[str, dict[str, Path]]]:
    from flamingo_edge.artifacts import read_export_record

    record = read_export_record(export)
    print(f"\n=== {export}  ({record.checkpoint})", flush=True)
    quantized = quantize_variants(export, work, variants)
    fp32 = {name: export / record.graphs[name].file for name in QUANTIZED_GRAPHS}

    levels = ("all", "basic") if basic else ("all",)
    ops = {}
    for kind, files in (("fp32", fp32), *((variant, quantized[variant]) for variant in variants)):
        for level in levels:
            label = kind if level == "all" else f"{kind} basic"
            ops[label] = {g: optimized_op_counts(files[g], work, level) for g in QUANTIZED_GRAPHS}
    print("\nmatrix-product kernels after ONNX Runtime's optimizer:")
    for kind, per_graph in ops.items():
        for graph, counts in per_graph.items():
            print(f"  {kind:22s} {graph:8s} {counts}")

    feeds = realistic_feeds(export, threads)
    results = {}
    print(f"\nlatency (load average before: {os.getloadavg()[0]:.2f}; ratio = fp32 / this, above 1 faster; err = max "
          "|diff| / max |fp32| of the first output; top1 = argmax agreement of the logits)")
    print(f"  {'case':14s} {'graph':22s} {'median ms':>9s} {'min ms':>9s} {'ratio':>7s} {'r(min)':>7s} {'err':>9s} "
          f"{'top1':>6s}")
    for graph in QUANTIZED_GRAPHS:
        sessions = {}
        for kind, files in (("fp32", fp32), *((variant, quantized[variant]) for variant in variants)):
            for level in levels:
                sessions[kind if level == "all" else f"{kind} basic"] = open_session(files[graph], threads, level)
        cases = [c for c in feeds if (c == "vision") == (graph == "vision")]
        for case in cases:
            feed = feeds[case]
            timed = time_interleaved(sessions, feed, runs, warmup)
            reference = sessions["fp32"].run(None, feed)[0]
            base_median, base_min = timed["fp32"]
            row = {}
            for kind, (median, fastest) in timed.items():
                entry = {"median_ms": median, "min_ms": fastest, "ratio": base_median / median,
                         "ratio_min": base_min / fastest}
                if kind in variants:
                    entry.update(fidelity(reference, sessions[kind].run(None, feed)[0], graph == "decoder"))
                row[kind] = entry
            results[case] = row
            print_row(case, row)
        del sessions
    return {"export": str(export), "checkpoint": record.checkpoint, "ops": ops, "latency": results}, quantized


def print_row(case: str, row: dict) -> None:
    for kind, entry in row.items():
        error = f"{entry['max_rel']:9.1e}" if "max_rel" in entry else ""
        top1 = f"{entry['top1']:6.3f}" if "top1" in entry else ""
        print(f"  {case:14s} {kind:22s} {entry['median_ms']:9.2f} {entry['min_ms']:9.2f} {entry['ratio']:7.2f} "
              f"{entry['ratio_min']:7.2f} {error:>9s} {top1:>6s}", flush=True)
    print()


def is_demo_export(export: Path) -> bool:
    from flamingo_edge.artifacts import DEMO_CHECKPOINT, read_export_record

    return Path(read_export_record(export).checkpoint).resolve() == DEMO_CHECKPOINT.resolve()


def task_accuracy(export: Path, quantized: dict[str, Path], work: Path, n: int) -> dict[str, dict]:
    """Answers and captions on n held-out scenes for fp32 and the three dynamic-int8 combinations."""
    from flamingo_edge.demo.evaluate import evaluate, pipeline_answerer

    copies = {"fp32": export}
    for label, graphs in (("vision-only", ["vision"]), ("decoder-only", ["decoder"]),
                          ("both", ["vision", "decoder"])):
        copies[label] = make_copy(export, work / label, {g: quantized[g] for g in graphs},
                                  describe(DEFAULT_VARIANT))
    out = {}
    print(f"\ntask accuracy, {n} held-out scenes, dynamic int8 = {DEFAULT_VARIANT}:")
    for label, folder in copies.items():
        start = time.perf_counter()
        report = evaluate(pipeline_answerer(folder, device="cpu"), n=n)
        out[label] = {"answers": report.answer_accuracy, "captions": report.caption_accuracy,
                      "seconds": time.perf_counter() - start}
    base = out["fp32"]
    for label, entry in out.items():
        drop = max(100 * (base["answers"] - entry["answers"]), 100 * (base["captions"] - entry["captions"]))
        entry["holds"] = drop <= ACCURACY_POINTS
        print(f"  {label:13s} answers {100 * entry['answers']:6.1f} %  captions {100 * entry['captions']:6.1f} %  "
              f"({entry['seconds']:.0f} s){'' if label == 'fp32' else '  holds' if entry['holds'] else '  FAILS'}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", metavar="EXPORT", help="fp32 export folder, or `demo`")
    parser.add_argument("--accuracy", action="store_true",
                        help="score the demo task (exports of the demo checkpoint only)")
    parser.add_argument("--n", type=int, default=500, help="held-out scenes for --accuracy (default 500)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per graph and feed (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-basic", action="store_true",
                        help="time only ONNX Runtime's full optimization level (fewer sessions, quicker)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dq/work"),
                        help="where the quantized copies go (default /tmp/dq/work)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    try:
        for name, value, minimum in (("--n", args.n, 1), ("--runs", args.runs, 1), ("--warmup", args.warmup, 0),
                                     ("--threads", args.threads, 1)):
            if value < minimum:
                raise BenchError(f"{name} must be >= {minimum}; got {value}")
        if DEFAULT_VARIANT not in args.variants and args.accuracy:
            raise BenchError(f"--accuracy scores {DEFAULT_VARIANT}; keep it in --variants")
        exports = [resolve_export(name, args.work) for name in args.exports]
        if args.accuracy and not any(is_demo_export(e) for e in exports):
            raise BenchError("--accuracy scores the demo task: pass an export of the demo checkpoint (or `demo`)")
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}, intra_op_num_threads={args.threads}, median of {args.runs} "
              f"runs after {args.warmup} warm-up; ratio = fp32 ms / int8 ms (above 1: int8 faster)")
        report = []
        for export in exports:
            work = args.work / export.resolve().name
            entry, quantized = benchmark_export(export, work, args.variants, args.runs, args.warmup, args.threads,
                                               basic=not args.no_basic)
            if args.accuracy and is_demo_export(export):
                entry["accuracy"] = task_accuracy(export, quantized[DEFAULT_VARIANT], work, args.n)
            report.append(entry)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nwrote {args.json}")
    except BenchError as error:
        print(f"dynamic_int8.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
