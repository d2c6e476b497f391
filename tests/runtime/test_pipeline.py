"""The ONNX Runtime pipeline against transformers' IDEFICS, its caches, its limits and its errors."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPT_CASES, make_prompts, upstream_inputs
from flamingo_edge.artifacts import read_export_record, sha256_of
from flamingo_edge.errors import ExportError, GraphContractError, PromptError, PromptTooLongError
from flamingo_edge.runtime.generation import run_decoder
from flamingo_edge.runtime.kv_cache import SelfAttentionCache
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.tolerances import LOGITS_REL_TOL, relative_error


@pytest.fixture(scope="module")
def exported(idefics_checkpoint, idefics_export):
    return idefics_checkpoint, idefics_export


@pytest.fixture(scope="module")
def upstream(exported):
    transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")
    checkpoint, _ = exported
    model = transformers.IdeficsForVisionText2Text.from_pretrained(checkpoint).eval()
    return model, transformers.AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture
def pipeline(exported):
    with Pipeline.open(exported[1]) as pipeline:
        yield pipeline


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_greedy_tokens_and_prefill_logits_match_transformers(pipeline, upstream, case, seed):
    import torch

    model, processor = upstream
    prompts = make_prompts(case, np.random.default_rng([seed, len(case), 7]))
    inputs = upstream_inputs(processor, prompts)
    with torch.no_grad():
        expected_logits = model(**inputs).logits.numpy()
        expected = model.generate(**inputs, max_new_tokens=20, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    real = inputs["attention_mask"].numpy().astype(bool)
    assert relative_error(pipeline.logits(prompts)[real], expected_logits[real]) <= LOGITS_REL_TOL
    actual = np.stack([step.tokens for step in pipeline.generate(prompts, max_new_tokens=20)], axis=1)
    # transformers stops once every row has produced EOS (then pads); up to there the tokens must be identical.
    assert actual.shape[1] >= expected.shape[1] >= 1
    np.testing.assert_array_equal(actual[:, : expected.shape[1]], expected.numpy())


def test_prefill_then_stepwise_decode_equals_full_prefill(pipeline, seed):
    prompts = make_prompts("two_images", np.random.default_rng(seed))
    full = pipeline.logits(prompts)
    batch = pipeline.processor.tokenize(prompts)
    cross = pipeline.rows_kv(batch.images, batch.image_attention_mask.shape[2])
    text = pipeline.config.decoder
    cache = SelfAttentionCache(layers=text.layers, batch=1, heads=text.heads, head_dim=text.head_dim,
                               capacity=batch.input_ids.shape[1])
    split = 4
    pieces = [run_decoder(pipeline.sessions["decoder"], batch.input_ids[:, :split], batch.attention_mask[:, :split],
                          cache, cross, batch.image_attention_mask[:, :split])]
    for t in range(split, batch.input_ids.shape[1]):  # each step feeds the whole cache, its unused slots masked
        pieces.append(run_decoder(pipeline.sessions["decoder"], batch.input_ids[:, t : t + 1],
                                  batch.attention_mask[:, t : t + 1], cache, cross,
                                  batch.image_attention_mask[:, t : t + 1]))
    assert relative_error(np.concatenate(pieces, axis=1), full) <= LOGITS_REL_TOL


def test_cached_image_costs_no_vision_work_and_gives_the_same_logits(exported, seed):
    prompts = make_prompts("two_images", np.random.default_rng(seed))
    with Pipeline.open(exported[1]) as pipeline:
        first = pipeline.logits(prompts)
        runs = dict(pipeline.stats)
        again = pipeline.logits(prompts)  # same images: cross K/V from the cache
        assert pipeline.stats["vision_runs"] == runs["vision_runs"] == 2
        assert pipeline.stats["resampler_runs"] == 2 and pipeline.stats["xattn_kv_runs"] == 2
        assert pipeline.stats["image_cache_hits"] == 2
        np.testing.assert_array_equal(again, first)
    with Pipeline.open(exported[1], image_cache_size=0) as fresh:  # recomputed every time
        recomputed = fresh.logits(prompts)
    np.testing.assert_allclose(recomputed, first, rtol=0, atol=1e-6 * np.abs(first).max())


def test_prompt_over_the_context_is_refused_before_any_work(exported, seed):
    prompts = make_prompts("text_before_first_image", np.random.default_rng(seed))
    with Pipeline.open(exported[1], max_context=12) as pipeline:
        length = pipeline.processor.tokenize(prompts).input_ids.shape[1]
        with pytest.raises(PromptTooLongError, match=rf"the prompt has {length} tokens and 20 new tokens.*"
                                                       rf"{length + 20} > 12"):
            next(pipeline.generate(prompts, max_new_tokens=20))
        assert not pipeline.stats


def test_more_images_than_allowed(exported, seed):
    prompts = make_prompts("three_images_two_adjacent", np.random.default_rng(seed))
    with Pipeline.open(exported[1], max_images=2) as pipeline:
        with pytest.raises(PromptError, match="prompt 0 has 3 images; at most 2 are allowed"):
            next(pipeline.generate(prompts))


def test_text_only_prompt(pipeline):
    completion = pipeline.complete([["hello there, what colour is the square"]], max_new_tokens=5)[0]
    assert len(completion.token_ids) >= 1 and pipeline.stats["vision_runs"] == 0


def test_incomplete_or_modified_export_is_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[1], copy)
    (copy / "decoder.onnx").unlink()
    with pytest.raises(ExportError, match=r"decoder\.onnx \(decoder graph\) is missing"):
        Pipeline.open(copy)


def test_graph_that_breaks_the_contract_is_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[1], copy)
    shutil.copy(copy / "vision.onnx", copy / "resampler.onnx")  # a valid ONNX, but not the resampler
    record = json.loads((copy / "export.json").read_text())
    record["graphs"]["resampler"]["sha256"] = sha256_of(copy / "resampler.onnx")
    (copy / "export.json").write_text(json.dumps(record))
    read_export_record(copy)  # the record itself is consistent again
    with pytest.raises(GraphContractError, match="resampler"):
        Pipeline.open(copy)


def test_generation_imports_neither_torch_nor_transformers(exported):
    code = (
        "import sys, numpy as np\n"
        "from flamingo_edge.runtime.pipeline import Pipeline\n"
        f"pipeline = Pipeline.open({str(exported[1])!r})\n"
        "image = np.zeros((20, 30, 3), np.uint8)\n"
        "print(pipeline.complete([['a photo', image, 'of']], max_new_tokens=3)[0].token_ids)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stop_strings_stop_tokens_and_seeded_sampling(pipeline, seed):
    prompts = make_prompts("two_images", np.random.default_rng(seed))
    free = pipeline.complete(prompts, max_new_tokens=12, stop_token_ids=[])[0]
    assert len(free.token_ids) == 12
    # A stop string ends the row at the first step whose streamed text contains it.
    steps = list(pipeline.generate(prompts, max_new_tokens=12, stop_token_ids=[]))
    streamed = list(itertools.accumulate(step.text[0] for step in steps))
    assert streamed[-1] == free.text
    stop_text = free.text[: max(1, len(free.text) // 2)]
    first = next(i for i, text in enumerate(streamed) if stop_text in text)
    stopped = pipeline.complete(prompts, max_new_tokens=12, stop_token_ids=[], stop_strings=(stop_text,))[0]
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.text == streamed[first]
    # A stop token ends the row at that token (included in token_ids).
    by_token = pipeline.complete(prompts, max_new_tokens=12, stop_token_ids=[free.token_ids[2]])[0]
    assert by_token.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]
    sampled = [pipeline.complete(prompts, max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.95, seed=s,
                                 repetition_penalty=1.3, stop_token_ids=[])[0].token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed gives the same tokens
    assert len(sampled[2]) == 8


def test_prefix_cache_reuses_a_few_shot_preamble_with_identical_results(exported, seed):
    rng = np.random.default_rng(seed)
    shots = make_prompts("two_images", rng)[0]  # text, image, text, image, text: the fixed preamble
    queries = [[rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "what colour is it"] for _ in range(2)]
    with Pipeline.open(exported[1], prefix_cache_bytes=0) as plain, Pipeline.open(exported[1]) as cached:
        for query in queries:
            expected = plain.complete([shots + query], max_new_tokens=10, stop_token_ids=[])[0]
            actual = cached.complete([shots + query], max_new_tokens=10, stop_token_ids=[])[0]
            assert actual == expected
        preamble = len(cached.processor.tokenize([shots]).input_ids[0])
        # The second query reused (at least) the whole preamble's K/V instead of recomputing it.
        assert cached.stats["prefix_tokens_reused"] >= preamble and cached.prefix_cache.hits == 1
        assert plain.stats["prefix_tokens_reused"] == 0
        # A different image inside the prefix stops the reuse at that image.
        other = [shots[0], rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), *shots[2:]] + queries[0]
        assert cached.complete([other], max_new_tokens=10, stop_token_ids=[])[0] == \
            plain.complete([other], max_new_tokens=10, stop_token_ids=[])[0]


def test_fixed_shape_decode_gives_the_same_tokens(exported, seed):
    """static_decode (what CUDA graphs need: every decode step feeds a past of max_context - 1 slots, masked after
    the cached tokens) generates exactly what the growing past does, for a left-padded batch too, with every decode
    step the same shape."""
    rng = np.random.default_rng(seed)
    prompts = make_prompts("batch_of_two_with_padding", rng)
    shapes = []
    with Pipeline.open(exported[1]) as plain:
        context = plain.processor.tokenize(prompts).input_ids.shape[1] + 12 + 5  # some slots stay unused
        expected = [c.token_ids for c in plain.complete(prompts, max_new_tokens=12, stop_token_ids=[])]
    with Pipeline.open(exported[1], static_decode=True, max_context=context) as fixed:
        run = fixed.sessions["decoder"].run
        fixed.sessions["decoder"].run = lambda feed: (shapes.append(feed["past_key.0"].shape), run(feed))[1]
        assert [c.token_ids for c in fixed.complete(prompts, max_new_tokens=12, stop_token_ids=[])] == expected
    heads, head_dim = shapes[0][1], shapes[0][3]
    assert len(shapes) == 12 and shapes[0][2] == 0 and set(shapes[1:]) == {(2, heads, context - 1, head_dim)}


def test_finish_reasons_and_a_sampler_object(demo_export):
    """Each row says why it ended; a sampler object replaces the sampling settings (and cannot be mixed with them)."""
    from flamingo_edge.errors import UsageError
    from flamingo_edge.runtime.sampling import make_sampler

    with Pipeline.open(demo_export) as pipeline:
        eos = pipeline.processor.tokenizer.eos_token_id
        greedy = pipeline.complete([["caption:"]], max_new_tokens=3)[0]
        assert greedy.finish_reason in ("length", "stop_token")
        assert (greedy.finish_reason == "stop_token") == (greedy.token_ids[-1] == eos)
        forced = pipeline.complete([["caption:"]], max_new_tokens=3, stop_token_ids=[greedy.token_ids[0]])[0]
        assert forced.finish_reason == "stop_token" and forced.token_ids == greedy.token_ids[:1]
        first = greedy.text[:1]
        if first:
            by_text = pipeline.complete([["caption:"]], max_new_tokens=3, stop_strings=(first,))[0]
            assert by_text.finish_reason in ("stop_string", "stop_token")
        with_object = pipeline.complete([["caption:"]], max_new_tokens=3, sampler=make_sampler())[0]
        assert with_object.token_ids == greedy.token_ids
        with pytest.raises(UsageError, match="either a sampler or sampling settings"):
            pipeline.complete([["caption:"]], max_new_tokens=3, sampler=make_sampler(), temperature=0.7)
        with pytest.raises(UsageError, match="sampler must be a callable"):
            pipeline.complete([["caption:"]], max_new_tokens=3, sampler="greedy")
