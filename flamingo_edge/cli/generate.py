"""`flamingo-edge generate OUT --prompt TEXT [--image PATH ...]`: run an export, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys

HELP = ("generate text from an export (ONNX Runtime, or its TensorRT engines); '<image>' in the prompt marks where "
        "each --image goes")

def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, natural, text
    from flamingo_edge.cli.backends import add_backend_arguments

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="a folder written by flamingo-edge export (`demo`: the bundled checkpoint's cached "
                             "export)")
    parser.add_argument("--prompt", required=True, type=text,
                        help="the prompt; each '<image>' is replaced, in order, by the next --image")
    parser.add_argument("--image", action="append", default=[], dest="images", metavar="PATH",
                        help="an image file (repeat for several; default: none, a text-only prompt)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as one user message through the checkpoint's chat template (instruct "
                             "models such as Llama 3.2 Vision Instruct; needs jinja2: pip install "
                             "'flamingo-edge[chat]')")
    parser.add_argument("--max-new-tokens", type=count, default=32, help="most tokens to generate (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    parser.add_argument("--top-k", type=natural, default=0,
                        help="sample from the k most likely tokens (default: 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0 = off)")
    parser.add_argument("--seed", type=natural, default=None, help="sampling seed (default: fresh)")
    parser.add_argument("--stop", action="append", default=[], dest="stop_strings", metavar="TEXT", type=text,
                        help="stop once this text is generated (repeatable; the model's stop token always ends "
                             "it: EOS, or <|endofchunk|> for OpenFlamingo)")
    add_backend_arguments(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, token_ids, timings) instead of streaming text")


def user_message(items: list) -> dict:
    """Prompt items (text and images, in order) as one chat message of the user."""
    content = [{"type": "text", "text": item} if isinstance(item, str) else {"type": "image", "image": item}
               for item in items]
    return {"role": "user", "content": content}


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.cli.backends import pipeline_options
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.runtime.pipeline import Pipeline
    from flamingo_edge.runtime.processor import load_image, prompt_items

    options = pipeline_options(args)
    prompt = prompt_items(args.prompt, [load_image(path) for path in args.images])
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop_strings=tuple(args.stop_strings))
    from flamingo_edge.runtime.generation import step_speed

    with Pipeline.open(resolve_export(args.export_dir), device=args.device, **options) as pipeline:
        if args.chat:
            prompt = pipeline.processor.apply_chat_template([user_message(prompt)])
        steps = []
        for step in pipeline.generate([prompt], **settings):
            steps.append(step)
            if not args.json:
                sys.stdout.write(step.text[0])
                sys.stdout.flush()
    first, decode = step_speed(steps)
    if args.json:
        print(json.dumps({"text": "".join(s.text[0] for s in steps), "token_ids": [int(s.tokens[0]) for s in steps],
                          "finish_reason": steps[-1].finish_reason[0], "time_to_first_token_s": first,
                          "decode_tokens_per_s": None if decode != decode else decode}))
    else:
        print()
    return 0
