"""An mllama export on the ONNX Runtime pipeline against transformers' `MllamaForConditionalGeneration` and
`MllamaProcessor`: the same prompts, given to us as items (`<image>` becomes `<|image|>`) and to transformers as text
and PIL images. Logits of every real position within the tolerance, and greedy tokens equal to transformers'
`generate`, for one image with text before it, two images of different tile counts, and a left-padded batch whose
rows have different image counts (a row's missing image is computed from zero pixels, as transformers does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.tolerances import LOGITS_REL_TOL

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")
from PIL import Image  # noqa: E402

# prompts as items: text, or the (height, width) of a random image (tiles at 28 px: 1, 2 (1x2) and 4 (2x2))
CASES = {
    "text_before_the_image": [["A photo: ", (20, 24), " What is in it?"]],
    "two_images_of_different_shapes": [[(30, 60), (50, 55), "Compare the two pictures."]],
    "left_padded_batch": [[(40, 80), "Describe it."],
                          ["Two views ", (56, 56), " and ", (20, 30), ", which is larger?"]],
    "a_row_without_an_image": [["Describe a cat."], [(30, 60), "Describe it."]],
    "text_only": [["Describe a cat."]],  # transformers skips the cross-attention layers; our zero K/V add exactly 0
}


def _prompts(case: str, rng) -> list[list]:
    return [[item if isinstance(item, str) else rng.integers(0, 256, (*item, 3), dtype=np.uint8) for item in row]
            for row in CASES[case]]


def _upstream_inputs(processor, prompts: list[list]):
    texts = ["".join(item if isinstance(item, str) else "<|image|>" for item in row) for row in prompts]
    images = [[Image.fromarray(item) for item in row if not isinstance(item, str)] for row in prompts]
    if not any(images):
        return processor(text=texts, padding=True, return_tensors="pt")
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_equals_transformers(mllama_export, case, seed):
    checkpoint, export = mllama_export
    upstream = transformers.MllamaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = transformers.MllamaProcessor.from_pretrained(checkpoint)
    prompts = _prompts(case, np.random.default_rng([seed, len(case)]))
    batch = _upstream_inputs(processor, prompts)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them for left padding
    with torch.no_grad():
        expected = upstream(**batch, position_ids=positions).logits.numpy()
        generated = upstream.generate(**batch, max_new_tokens=10, do_sample=False)[:, mask.shape[1]:].numpy()
    eos, pad = upstream.config.text_config.eos_token_id, upstream.config.text_config.pad_token_id
    with Pipeline.open(export) as pipeline:
        ours = pipeline.processor.tokenize(prompts)
        np.testing.assert_array_equal(ours.input_ids, batch["input_ids"].numpy())
        actual = pipeline.logits(prompts)
        completions = pipeline.complete(prompts, max_new_tokens=10, stop_token_ids=[eos])
    real = mask.numpy().astype(bool)
    scale = np.abs(expected[real]).max()
    assert scale > 1.0, "weights too small for a meaningful comparison"
    assert np.abs(actual[real] - expected[real]).max() <= LOGITS_REL_TOL * scale
    for row, completion in enumerate(completions):
        expected_ids = [int(t) for t in generated[row]]
        if eos in expected_ids:
            expected_ids = expected_ids[: expected_ids.index(eos) + 1]
        assert completion.token_ids == expected_ids, f"row {row}"
        assert all(t == pad for t in generated[row][len(expected_ids):])


def test_caches_and_in_flight_batching_keep_the_tokens(mllama_export, seed):
    """The image cache, the prefix cache (a repeated prompt reuses its K/V) and in-flight batching of requests with
    different image and tile counts give every request the tokens it gets alone, uncached."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_scheduler import run_schedule

    from flamingo_edge.runtime.scheduler import Scheduler

    rng = np.random.default_rng(seed)
    prompts = [row for case in sorted(CASES) for row in _prompts(case, rng)]
    settings = dict(max_new_tokens=8, stop_token_ids=[])
    with Pipeline.open(mllama_export[1], prefix_cache_bytes=0, image_cache_size=0) as plain:
        alone = [plain.complete([prompt], **settings)[0] for prompt in prompts]
    with Pipeline.open(mllama_export[1]) as pipeline:
        first = [pipeline.complete([prompt], **settings)[0] for prompt in prompts]
        again = [pipeline.complete([prompt], **settings)[0] for prompt in prompts]
        assert pipeline.stats["image_cache_hits"] > 0 and pipeline.stats["prefix_tokens_reused"] > 0
        order = rng.permutation(len(prompts))
        jobs = [(prompts[i], settings) for i in order]
        scheduler = Scheduler(pipeline, max_batch=3, prefill_chunk=int(rng.integers(2, 6)))
        batched = run_schedule(scheduler, jobs, rng)
        assert scheduler.stats["rows_stepped"] > scheduler.stats["steps"], "no two requests were ever batched"
    assert first == alone and again == alone
    assert batched == [alone[i] for i in order]


def test_processor_files_of_another_tile_count_are_refused(mllama_export, tmp_path):
    """The processor's tiles per image and the model's must agree: a hand-edited processor_config.json is refused
    at open, with the fix, instead of failing inside a graph."""
    import json
    import shutil

    from flamingo_edge.errors import ExportError

    export = tmp_path / "export"
    shutil.copytree(mllama_export[1], export)
    path = export / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["max_image_tiles"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"gives 2 cross-attention slots per image \(tiles\), its model takes 4"):
        Pipeline.open(export)
