"""`flamingo-edge generate OUT --prompt TEXT [--image PATH ...]`: run an export, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = ("generate text from an export (ONNX Runtime, or its TensorRT engines); '<image>' in the prompt marks where "
        "each --image goes")
IMAGE_MARKER = "<image>"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.backends import add_backend_arguments

    parser.add_argument("export_dir", help="a folder written by flamingo-edge export")
    parser.add_argument("--prompt", required=True,
                        help="the prompt; each '<image>' is replaced, in order, by the next --image")
    parser.add_argument("--image", action="append", default=[], dest="images", metavar="PATH",
                        help="an image file (repeat for several; default: none, a text-only prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: fresh)")
    parser.add_argument("--stop", action="append", default=[], dest="stop_strings", metavar="TEXT",
                        help="stop once this text is generated (repeatable; the model's stop token always ends "
                             "it: EOS, or <|endofchunk|> for OpenFlamingo)")
    add_backend_arguments(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, token_ids, timings) instead of streaming text")


def prompt_items(prompt: str, images: list) -> list:
    """'A<image>B' with one image -> ["A", image, "B"], as IdeficsProcessor takes it; empty pieces are dropped.

    Raises:
        PromptError: the number of markers differs from the number of images.
    """
    from flamingo_edge.errors import PromptError

    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise PromptError(f"the prompt has {len(pieces) - 1} '{IMAGE_MARKER}' markers but {len(images)} --image "
                          f"were given; put one '{IMAGE_MARKER}' where each image goes")
    items = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        items += [image, piece]
    return [item for item in items if not (isinstance(item, str) and item == "")]


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.cli.backends import pipeline_options
    from flamingo_edge.runtime.pipeline import Pipeline
    from flamingo_edge.runtime.processor import load_image

    options = pipeline_options(args)
    prompt = prompt_items(args.prompt, [load_image(path) for path in args.images])
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop_strings=tuple(args.stop_strings))
    with Pipeline.open(args.export_dir, device=args.device, **options) as pipeline:
        text, ids, first, start = "", [], None, time.perf_counter()
        for step in pipeline.generate([prompt], **settings):
            first = first if first is not None else step.seconds
            text += step.text[0]
            ids.append(int(step.tokens[0]))
            if not args.json:
                sys.stdout.write(step.text[0])
                sys.stdout.flush()
        total = time.perf_counter() - start
    decode = (len(ids) - 1) / (total - first) if len(ids) > 1 and total > first else None
    if args.json:
        print(json.dumps({"text": text, "token_ids": ids, "time_to_first_token_s": first,
                          "decode_tokens_per_s": decode}))
    else:
        print()
    return 0
