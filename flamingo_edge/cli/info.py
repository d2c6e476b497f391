"""`flamingo-edge info CHECKPOINT`: the architecture of a checkpoint, from its config alone."""

from __future__ import annotations

import argparse
import json

HELP = "print a checkpoint's architecture: parameters per component, layers, heads, latents, image size, vocabulary"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="an IDEFICS save_pretrained folder (config.json + weights)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")


def _millions(count: int) -> str:
    return f"{count / 1e6:10.3f} M"


def format_summary(checkpoint: str, summary) -> str:
    p = summary.parameters
    cross = ", ".join(map(str, summary.cross_attention_layers))
    lines = [
        f"checkpoint  {checkpoint} ({summary.family})",
        "parameters",
        *(f"  {name:<24}{_millions(count)}  ({count:,})" for name, count in p.items()),
        f"vision      CLIP ViT, {summary.image_size}x{summary.image_size} px, patch {summary.patch_size} -> "
        f"{summary.vision_tokens_per_image} tokens; {summary.vision_layers} layers, {summary.vision_heads} heads, "
        f"width {summary.vision_width}",
        f"resampler   {summary.resampler} -> {summary.visual_tokens_per_image} visual tokens per image",
        f"decoder     {summary.decoder_layers} layers, {summary.decoder_heads} heads, width {summary.decoder_width}",
        f"gated xattn before decoder layers {cross} ({len(summary.cross_attention_layers)} blocks, "
        f"{summary.cross_attention_heads} heads)",
        f"vocabulary  {summary.vocab_size} + {summary.additional_vocab_size} additional",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.models import load_config
    from flamingo_edge.models.summary import summarize

    summary = summarize(load_config(args.checkpoint))
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, **summary.to_dict()}, indent=2))
    else:
        print(format_summary(args.checkpoint, summary))
    return 0
