"""Time to first token and decode tokens/s: our ONNX Runtime pipeline vs transformers' generate, in one run.

    python benchmarks/generate_vs_transformers.py [--preset 100m] [--new-tokens 64] [--runs 3] [--json PATH]

Builds a random IDEFICS checkpoint offline (flamingo_edge.models.random_idefics), exports it, then runs the same
prompt (one image of a new random picture per run, ~30 text tokens) through both. transformers: TTFT is
generate(max_new_tokens=1); decode tokens/s is (N - 1) / (time(N) - time(1)). Ours: the first GenerationStep's time
and the rest. Both generate exactly N tokens (EOS ignored). Median over --runs after one warm-up run.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, IdeficsForVisionText2Text

from flamingo_edge.export.export import export_all
from flamingo_edge.models.random_idefics import save_random_idefics
from flamingo_edge.models.summary import summarize
from flamingo_edge.models import load_config
from flamingo_edge.runtime.generation import step_speed
from flamingo_edge.runtime.pipeline import Pipeline

TEXT = "User: describe the picture in detail, then say what colour the square is and how many circles there are."


def time_transformers(model, processor, image, new_tokens):
    inputs = processor(text=[[TEXT, Image.fromarray(image), "Assistant:"]], return_tensors="pt")
    timings = {}
    for n in (1, new_tokens):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        timings[n] = time.perf_counter() - start
        assert out.shape[1] - inputs["input_ids"].shape[1] == n
    return timings[1], (new_tokens - 1) / (timings[new_tokens] - timings[1])


def time_pipeline(pipeline, image, new_tokens):
    steps = list(pipeline.generate([[TEXT, image, "Assistant:"]], max_new_tokens=new_tokens, stop_token_ids=[]))
    assert len(steps) == new_tokens
    return step_speed(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="100m", help="random checkpoint preset (default: 100m)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_random_idefics(Path(tmp) / "ckpt", preset=args.preset)
        export_all(checkpoint, Path(tmp) / "export")
        model = IdeficsForVisionText2Text.from_pretrained(checkpoint).eval()
        processor = AutoProcessor.from_pretrained(checkpoint)
        results = {"transformers": [], "flamingo_edge_onnxruntime": []}
        with Pipeline.open(Path(tmp) / "export") as pipeline:
            for run in range(args.runs + 1):
                image = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)  # new each run: no cache hits
                theirs, ours = time_transformers(model, processor, image, args.new_tokens), time_pipeline(
                    pipeline, image, args.new_tokens)
                if run:  # run 0 warms up
                    results["transformers"].append(theirs)
                    results["flamingo_edge_onnxruntime"].append(ours)
        parameters = summarize(load_config(checkpoint)).parameters["total"]
    report = {"preset": args.preset, "parameters": parameters, "new_tokens": args.new_tokens, "runs": args.runs,
              "torch_threads": torch.get_num_threads()}
    for name, runs in results.items():
        report[name] = {"ttft_s": statistics.median(r[0] for r in runs),
                        "decode_tokens_per_s": statistics.median(r[1] for r in runs)}
    ours, theirs = report["flamingo_edge_onnxruntime"], report["transformers"]
    report["speedup_vs_transformers"] = {"ttft": theirs["ttft_s"] / ours["ttft_s"],
                                         "decode": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
