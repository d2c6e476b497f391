"""Exact-match accuracy on freshly generated held-out scenes: captions and answers.

Every scene gives one caption prompt and one question (drawn from its questions). The seed of the held-out scenes
must differ from training's (0): the default is 1234.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from flamingo_edge.demo import scenes

EVAL_SEED = 1234
MAX_ANSWER_TOKENS = 12  # the longest caption is 11 words


@dataclass(frozen=True)
class EvalReport:
    n: int  # scenes
    answer_accuracy: float  # fraction of exactly right answers, in [0, 1]
    caption_accuracy: float  # fraction of exactly right captions, in [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_prompts(n: int, seed: int = EVAL_SEED) -> Iterator[tuple[str, list, str]]:
    """(kind, prompt, expected) for n scenes: kind is "caption" or "answer"."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = scenes.make_scene(rng)
        yield "caption", scenes.caption_prompt(scene), scene.caption
        question, answer = scene.questions()[rng.integers(len(scene.questions()))]
        yield "answer", scenes.question_prompt(scene, question), answer


def normalize(text: str) -> str:
    return " ".join(text.split())


def evaluate(answer_batch: Callable[[list[list]], list[str]], *, n: int, seed: int = EVAL_SEED,
             batch_size: int = 32, on_batch: Callable[[int], None] | None = None) -> EvalReport:
    """Run `answer_batch` (prompts -> generated texts) on n held-out scenes and score exact matches.

    Args:
        answer_batch: greedy generation for a batch of prompts, returning each row's text.
        n: scenes (each gives a caption and a question).
        seed: seed of the held-out scenes.
        batch_size: prompts per call.
        on_batch: called with the number of prompts done after each batch (progress).

    Raises:
        UsageError: n or batch_size < 1, or a negative seed.
    """
    from flamingo_edge.errors import UsageError

    for name, value, minimum in (("n", n, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"{name} must be an integer >= {minimum}; got {value!r}")
    items = list(held_out_prompts(n, seed))
    right = {"caption": 0, "answer": 0}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for (kind, _, expected), text in zip(chunk, answer_batch([prompt for _, prompt, _ in chunk])):
            right[kind] += normalize(text) == normalize(expected)
        if on_batch:
            on_batch(len(chunk))
    return EvalReport(n=n, answer_accuracy=right["answer"] / n, caption_accuracy=right["caption"] / n)


def pytorch_answerer(checkpoint) -> Callable[[list[list]], list[str]]:
    """Greedy answers from the PyTorch reference model of a checkpoint folder."""
    from flamingo_edge.models import load_checkpoint
    from flamingo_edge.models.checkpoint import resolve_checkpoint
    from flamingo_edge.models.generate import greedy_generate
    from flamingo_edge.runtime.processor import Processor

    checkpoint = resolve_checkpoint(checkpoint)
    model, processor = load_checkpoint(checkpoint), Processor.from_pretrained(checkpoint)
    tokenizer = processor.tokenizer

    def answer(prompts: list[list]) -> list[str]:
        tokens = greedy_generate(model, processor(prompts), max_new_tokens=MAX_ANSWER_TOKENS,
                                 stop_token_ids=processor.stop_token_ids, pad_token_id=tokenizer.pad_token_id or 0)
        return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]

    return answer


def pipeline_answerer(export_dir, **open_options) -> Callable[[list[list]], list[str]]:
    """Greedy answers from the pipeline of an export folder (`Pipeline.open` options: backend, engines, device...;
    default ONNX Runtime)."""
    from flamingo_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.open(export_dir, **open_options)

    def answer(prompts: list[list]) -> list[str]:
        return [c.text for c in pipeline.complete(prompts, max_new_tokens=MAX_ANSWER_TOKENS)]

    return answer
