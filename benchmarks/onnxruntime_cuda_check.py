"""ONNX Runtime on CUDA (IO binding) against ONNX Runtime on the CPU, for one export, in one run.

    python benchmarks/onnxruntime_cuda_check.py EXPORT_DIR [--new-tokens 32]

Prints the prefill logits' relative difference, whether greedy tokens are identical, and time to first token /
decode tokens/s on both devices. Needs onnxruntime-gpu and a GPU; says so and exits 1 otherwise.
"""

import argparse
import json
import sys

import numpy as np

from flamingo_edge.errors import FlamingoEdgeError
from flamingo_edge.runtime.generation import step_speed
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.tolerances import relative_error


def run(export_dir, device, prompts, new_tokens):
    with Pipeline.open(export_dir, device=device) as pipeline:
        pipeline.complete(prompts, max_new_tokens=2, stop_token_ids=[])  # warm-up
        logits = pipeline.logits(prompts)
        steps = list(pipeline.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[]))
    tokens = np.stack([s.tokens for s in steps], axis=1)
    return logits, tokens, *step_speed(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--new-tokens", type=int, default=32, help="(default: 32)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    prompts = [["User: describe the picture", image, "Assistant:"], ["what colour is the square?"]]
    try:
        cuda = run(args.export_dir, "cuda", prompts, args.new_tokens)
    except FlamingoEdgeError as error:
        print(f"no CUDA run: {error}")
        sys.exit(1)
    cpu = run(args.export_dir, "cpu", prompts, args.new_tokens)
    print(json.dumps({
        "prefill_logits_relative_difference": relative_error(cuda[0], cpu[0]),
        "greedy_tokens_identical": bool(np.array_equal(cuda[1], cpu[1])),
        "cpu": {"ttft_s": cpu[2], "decode_tokens_per_s": cpu[3]},
        "cuda": {"ttft_s": cuda[2], "decode_tokens_per_s": cuda[3]},
    }, indent=2))


if __name__ == "__main__":
    main()
