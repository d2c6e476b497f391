"""`flamingo-edge convert openflamingo CHECKPOINT --lm LM_DIR --vision VISION --cross-attn-every-n-layers N -o OUT`."""

from __future__ import annotations

import argparse

HELP = "convert another family's checkpoint (OpenFlamingo) into a checkpoint folder every command accepts"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count

    families = parser.add_subparsers(dest="family", required=True, metavar="FAMILY")
    of = families.add_parser(
        "openflamingo", help="an open_flamingo 2.x checkpoint with its language model and open_clip vision tower",
        description="Convert an OpenFlamingo model: its checkpoint.pt (the whole model, or only what OpenFlamingo "
                    "trains), the Hugging Face folder of its language model (LLaMA, MPT, GPT-NeoX) and its "
                    "open_clip vision tower. docs/models.md lists each release's flags.")
    of.add_argument("checkpoint", help="checkpoint.pt (read with weights_only=True) or a safetensors state dict")
    of.add_argument("--lm", required=True, dest="lm_dir", metavar="LM_DIR",
                    help="the language model's Hugging Face folder (config.json, weights, tokenizer.json)")
    of.add_argument("--vision", required=True,
                    help="an open_clip model name (ViT-L-14, ViT-B-32, ViT-B-16; OpenAI weights, QuickGELU) or an "
                         "open_clip model config JSON")
    of.add_argument("--vision-weights", default=None, metavar="FILE",
                    help="open_clip (visual.* or whole CLIP) or HF CLIP weights of the vision tower; needed when "
                         "the checkpoint has no vision_encoder.* tensors (released checkpoints have none)")
    of.add_argument("--cross-attn-every-n-layers", type=count, required=True, metavar="N",
                    help="a gated cross-attention block before decoder layer i where (i + 1) %% N == 0, as the "
                         "release was trained (3B: 1, 4B: 2, 9B: 4)")
    of.add_argument("-o", "--out-dir", required=True, help="checkpoint folder to write (must not exist)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.models.convert import convert_openflamingo

    print(f"converting {args.checkpoint} ({args.family}) ...", flush=True)
    result = convert_openflamingo(args.checkpoint, lm_dir=args.lm_dir, vision=args.vision,
                                  cross_attn_every_n_layers=args.cross_attn_every_n_layers, out_dir=args.out_dir,
                                  vision_weights=args.vision_weights)
    decoder = result.config.decoder
    print(f"wrote {result.folder}: {result.parameters / 1e6:.1f}M parameters in {result.tensors} tensors; "
          f"{decoder.layers} decoder layers, gated cross-attention before {list(decoder.cross_layers)}")
    return 0
