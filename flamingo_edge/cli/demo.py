"""`flamingo-edge demo`: the whole toolkit on the bundled demo checkpoint, offline, on the CPU."""

from __future__ import annotations

import argparse

HELP = ("export the bundled demo checkpoint (cached), then caption, answer, run a few-shot prompt with prefix reuse, "
        "and compare held-out accuracy of PyTorch and ONNX Runtime")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, natural

    parser.add_argument("--n", type=count, default=500, help="held-out scenes for the accuracy check (default: 500)")
    parser.add_argument("--seed", type=natural, default=2024, help="seed of the scenes shown (default: 2024)")


def _generate(pipeline, prompt, max_new_tokens=12):
    """Greedy text, time to first token and decode tokens/s for one prompt."""
    from flamingo_edge.runtime.generation import step_speed

    steps = list(pipeline.generate([prompt], max_new_tokens=max_new_tokens))
    return "".join(step.text[0] for step in steps).strip(), *step_speed(steps)


def _mark(ok: bool) -> str:
    return "ok" if ok else "WRONG"


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo import scenes
    from flamingo_edge.demo.bundle import demo_export
    from flamingo_edge.demo.evaluate import evaluate, pipeline_answerer, pytorch_answerer
    from flamingo_edge.runtime.pipeline import Pipeline

    with Progress(total=4, unit="graph", desc="export (cached)", leave=False) as bar:
        export = demo_export(on_graph=lambda name: (bar.set_postfix_str(name), bar.update(1)))
    print(f"demo export: {export}")
    rng = np.random.default_rng(args.seed)
    ttfts, decodes = [], []
    with Pipeline.open(export) as pipeline:
        print("\n1. captions (ONNX Runtime, CPU)")
        for index in range(3):
            scene = scenes.make_scene(rng)
            text, ttft, decode = _generate(pipeline, scenes.caption_prompt(scene))
            ttfts.append(ttft), decodes.append(decode)
            print(f"   scene {index}: {text!r:45} truth {scene.caption!r} [{_mark(text == scene.caption)}]")
        print("\n2. a question")
        scene = scenes.make_scene(rng)
        question, answer = scene.questions()[0]
        text, _, _ = _generate(pipeline, scenes.question_prompt(scene, question))
        print(f"   {question} -> {text!r} (truth {answer!r}) [{_mark(text == answer)}]")
        print("\n3. few-shot: two in-context examples, then two queries that reuse their work")
        shots = []
        for _ in range(2):
            example = scenes.make_scene(rng)
            shots += [example.image, f"{scenes.CAPTION_PROMPT} {example.caption}</s>"]
        for index in range(2):
            query = scenes.make_scene(rng)
            before = dict(pipeline.stats)
            text, ttft, _ = _generate(pipeline, [*shots, *scenes.caption_prompt(query)])
            reused = pipeline.stats["prefix_tokens_reused"] - before.get("prefix_tokens_reused", 0)
            hits = pipeline.stats["image_cache_hits"] - before.get("image_cache_hits", 0)
            print(f"   query {index}: {text!r:45} truth {query.caption!r} [{_mark(text == query.caption)}]  "
                  f"first token {ttft * 1000:.1f} ms, reused {reused} prompt tokens' K/V and {hits} images' "
                  f"cross-attention K/V")
    print(f"\n4. held-out accuracy on {args.n} new scenes")
    backends = (("PyTorch", lambda: pytorch_answerer("demo")), ("ONNX Runtime", lambda: pipeline_answerer(export)))
    for name, answerer in backends:
        with Progress(total=2 * args.n, unit="prompt", desc=name, leave=False) as bar:
            report = evaluate(answerer(), n=args.n, on_batch=bar.update)
        print(f"   {name:13} answers {report.answer_accuracy:6.1%}   captions {report.caption_accuracy:6.1%}")
    print(f"\n5. speed (ONNX Runtime, CPU, one caption prompt): time to first token "
          f"{np.median(ttfts) * 1000:.1f} ms, decode {np.median(decodes):.0f} tokens/s")
    return 0
