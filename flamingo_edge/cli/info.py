"""`flamingo-edge info CHECKPOINT`: the architecture of a checkpoint, from its config alone.
`flamingo-edge info ENGINES`: what an engines folder was built for, and whether this machine can run it."""

from __future__ import annotations

import argparse
import json

HELP = ("print a checkpoint's architecture (parameters per component, layers, heads, latents, image size, "
        "vocabulary), or what an engines folder was built for and whether it runs on this machine")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_ENGINES",
                        help="an IDEFICS or Llama 3.2 Vision (mllama) save_pretrained folder (config.json + weights), "
                             "a folder written by flamingo-edge convert, an export folder, or an engines folder "
                             "written by flamingo-edge build; `demo`: the bundled checkpoint, and where its export is "
                             "cached")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")


def _millions(count: int) -> str:
    return f"{count / 1e6:10.3f} M"


def _vision_line(s) -> str:
    if s.tiles > 1:  # a tiled tower (mllama)
        return (f"vision      tiled ViT, {s.tiles} tiles of {s.image_size}x{s.image_size} px, patch {s.patch_size} -> "
                f"{s.tokens_per_tile} tokens per tile, {s.vision_tokens_per_image} per image; {s.vision_layers} local "
                f"+ {s.vision_global_layers} gated global layers, {s.vision_heads} heads, width {s.vision_width}")
    return (f"vision      {s.vision_kind}, {s.image_size}x{s.image_size} px, patch {s.patch_size} -> "
            f"{s.vision_tokens_per_image} tokens; {s.vision_layers} layers, {s.vision_heads} heads, "
            f"width {s.vision_width}")


def format_summary(checkpoint: str, summary) -> str:
    p = summary.parameters
    cross = ", ".join(map(str, summary.cross_attention_layers))
    placement = "as decoder layers" if summary.cross_attention_replaces else "before decoder layers"
    kv_heads = f" ({summary.decoder_kv_heads} K/V)" if summary.decoder_kv_heads != summary.decoder_heads else ""
    vocabulary = f"vocabulary  {summary.vocab_size} + {summary.additional_vocab_size} additional"
    if summary.input_only_vocab_size:
        vocabulary += f" (+ {summary.input_only_vocab_size} embedding rows that are never predicted)"
    lines = [
        f"checkpoint  {checkpoint} ({summary.family})",
        "parameters",
        *(f"  {name:<24}{_millions(count)}  ({count:,})" for name, count in p.items()),
        _vision_line(summary),
        f"resampler   {summary.resampler} -> {summary.visual_tokens_per_image} visual tokens per image",
        f"decoder     {summary.decoder_layers} layers, {summary.decoder_heads} heads{kv_heads}, width "
        f"{summary.decoder_width}; {summary.decoder_blocks}",
        f"gated xattn {placement} {cross} ({len(summary.cross_attention_layers)} blocks, "
        f"{summary.cross_attention_heads} heads)",
        vocabulary,
    ]
    return "\n".join(lines)


def engines_report(engines_dir: str) -> dict:
    """The manifest of an engines folder (its engines checked against their hashes), and whether this machine can
    run them: "yes", "no" (another TensorRT or GPU) or "unknown" (no TensorRT, cuda-python or GPU here)."""
    from dataclasses import asdict

    from flamingo_edge.manifest import check_runtime, read_manifest
    from flamingo_edge.errors import EngineMismatchError, FeatureUnavailableError
    from flamingo_edge.runtime.tensorrt_backend import runtime_key

    manifest = read_manifest(engines_dir)
    try:
        _, key = runtime_key(manifest)
        check_runtime(manifest, key, engines_dir)
        runs_here, why = "yes", key.describe()
    except EngineMismatchError as error:
        runs_here, why = "no", str(error)
    except FeatureUnavailableError as error:
        runs_here, why = "unknown", str(error)
    return {"folder": engines_dir, **asdict(manifest), "runs_here": runs_here, "why": why}


def format_engines(report: dict) -> str:
    lines = [f"engines     {report['folder']} ({report['precision']}, from {report['export']})",
             f"built with  {report['tensorrt']['flavour']} {report['tensorrt']['version']}"
             + (f" (CUDA {report['cuda_major']} build)" if report.get("cuda_major") else "") + " for "
             f"{report['compute_capability']}" + (f" ({report['device']})" if report["device"] else "")
             + f", target {report['target']}",
             "limits      " + ", ".join(f"{k.replace('max_', '')} {v}" for k, v in report["limits"].items())]
    lines += [f"  {name:<10}{entry['bytes'] / 2**20:8.2f} MiB" for name, entry in report["engines"].items()]
    lines.append(f"runs here   {report['runs_here']}: {report['why']}")
    return "\n".join(lines)


def _demo_export_line() -> tuple[str, dict]:
    """Where `demo` (as an export) is cached, and whether it is there yet."""
    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.demo.bundle import demo_export_folder
    from flamingo_edge.errors import ExportError

    folder = demo_export_folder()
    try:
        read_export_record(folder)
        exported = True
    except ExportError:
        exported = False
    state = "exported" if exported else "not exported yet; the first command given `demo` as its export writes it"
    return f"demo export {folder} ({state})", {"folder": str(folder), "exported": exported}


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flamingo_edge.artifacts import EXPORT_RECORD, read_export_record
    from flamingo_edge.config import FlamingoConfig
    from flamingo_edge.artifacts import DEMO
    from flamingo_edge.manifest import MANIFEST

    folder = Path(args.checkpoint)
    if (folder / MANIFEST).is_file():
        report = engines_report(args.checkpoint)
        print(json.dumps(report, indent=2) if args.json else format_engines(report))
        return 0
    from flamingo_edge.models import load_config
    from flamingo_edge.models.summary import summarize

    extra, before, after = {}, [], []
    if args.checkpoint != DEMO and (folder / EXPORT_RECORD).is_file():  # an export: the model it holds
        record = read_export_record(folder, verify_hashes=False)
        summary, checkpoint = summarize(FlamingoConfig.from_dict(record.config)), record.checkpoint
        extra = {"export": str(folder), "precision": record.precision, "opset": record.opset}
        before = [f"export      {folder} ({record.precision}, opset {record.opset}) of:"]
    else:
        summary, checkpoint = summarize(load_config(args.checkpoint)), args.checkpoint
    if args.checkpoint == DEMO:
        line, extra["demo_export"] = _demo_export_line()
        after = [line]
    if args.json:
        print(json.dumps({"checkpoint": checkpoint, **summary.to_dict(), **extra}, indent=2))
    else:
        print("\n".join([*before, format_summary(checkpoint, summary), *after]))
    return 0
