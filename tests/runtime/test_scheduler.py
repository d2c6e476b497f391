"""In-flight batching (`runtime/scheduler.py`): every request gets the tokens it gets alone, whatever arrives with it
and whenever; cancelled requests free their row; bad requests fail at submit; the caches are shared."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import make_prompts
from flamingo_edge.demo.evaluate import held_out_prompts
from flamingo_edge.errors import PromptTooLongError, UsageError
from flamingo_edge.runtime.kv_cache import SelfAttentionCache
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.scheduler import CANCELLED, Scheduler


def alone(pipeline: Pipeline, prompt: list, **settings):
    return pipeline.complete([prompt], **settings)[0]


def run_schedule(scheduler: Scheduler, jobs: list[tuple[list, dict]], rng) -> list:
    """Submit the jobs at random token boundaries (a random number of scheduler iterations between arrivals), driving
    the scheduler by hand, and return their completions in job order."""
    requests = []
    for prompt, settings in jobs:
        for _ in range(int(rng.integers(0, 4))):
            scheduler.step()
        requests.append(scheduler.submit(prompt, **settings))
    for _ in range(10_000):
        if all(request.done for request in requests):
            break
        scheduler.step()
    return [request.result(0) for request in requests]


def test_demo_requests_get_their_alone_tokens_whatever_the_arrival_order(demo_export, seed):
    """Demo captions and answers with random lengths, batch limits, prefill chunks and arrival times: every request's
    tokens, text and finish reason are those of the same prompt run alone."""
    rng = np.random.default_rng(seed)
    prompts = [prompt for _, prompt, _ in held_out_prompts(10, seed=int(rng.integers(1 << 30)))]
    with Pipeline.open(demo_export) as pipeline:
        for max_batch, chunk in ((int(rng.integers(2, 5)), None), (8, int(rng.integers(1, 4)))):
            order = rng.permutation(len(prompts))
            jobs = [(prompts[i], dict(max_new_tokens=int(rng.integers(1, 10)))) for i in order]
            want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
            scheduler = Scheduler(pipeline, max_batch=max_batch, prefill_chunk=chunk)
            got = run_schedule(scheduler, jobs, rng)
            assert got == want, f"max_batch {max_batch}, prefill_chunk {chunk}"
            assert scheduler.stats["requests_done"] == len(jobs)
            assert max(1, scheduler.stats["rows_stepped"]) >= scheduler.stats["steps"]  # rows shared steps
            assert scheduler.stats["rows_stepped"] > scheduler.stats["steps"], "no two requests were ever batched"


def test_random_idefics_rows_of_different_lengths_and_images(idefics_export, seed):
    """Random IDEFICS weights (no stop token, so every request runs its full length): prompts with 1-3 images of
    different lengths join a running batch, the batch's KV rows are right-aligned at every join and leave."""
    rng = np.random.default_rng(seed)
    cases = ["text_before_first_image", "two_images", "three_images_two_adjacent"]
    prompts = [make_prompts(cases[i % 3], rng)[0] for i in range(7)]
    with Pipeline.open(idefics_export) as pipeline:
        jobs = [(prompt, dict(max_new_tokens=int(rng.integers(2, 9)), stop_token_ids=[])) for prompt in prompts]
        want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
        got = run_schedule(Scheduler(pipeline, max_batch=3, prefill_chunk=int(rng.integers(2, 6))), jobs, rng)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert all(len(c.token_ids) == settings["max_new_tokens"] for c, (_, settings) in zip(got, jobs))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_openflamingo_alibi_and_partial_rotary_rows(openflamingo_export, family, seed):
    """MPT's ALiBi scores depend on slot distances, GPT-NeoX rotates part of each head: rows of different prompt
    lengths joining at different times still get their alone tokens."""
    from test_openflamingo_end_to_end import cases, items

    rng = np.random.default_rng(seed)
    _, export = openflamingo_export(family)
    fixtures = [items(p, i) for case in cases(family)["cases"] for p, i in zip(case["prompts"], case["images"])]
    prompts = [fixtures[int(i)] for i in rng.integers(0, len(fixtures), 6)]
    with Pipeline.open(export) as pipeline:
        jobs = [(prompt, dict(max_new_tokens=int(rng.integers(2, 8)), stop_token_ids=[])) for prompt in prompts]
        want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
        got = run_schedule(Scheduler(pipeline, max_batch=4), jobs, rng)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_sampled_requests_keep_their_own_seeds(demo_export, seed):
    """temperature > 0: a request with a seed draws what it draws alone, however the batch around it changes."""
    rng = np.random.default_rng(seed)
    prompts = [prompt for _, prompt, _ in held_out_prompts(4, seed=int(rng.integers(1 << 30)))]
    with Pipeline.open(demo_export) as pipeline:
        jobs = [(prompt, dict(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=int(rng.integers(1 << 30)),
                              stop_token_ids=[])) for prompt in prompts]
        want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
        got = run_schedule(Scheduler(pipeline, max_batch=4), jobs, rng)
    assert got == want


def test_stop_strings_and_stop_tokens_are_per_request(demo_export):
    prompt = next(prompt for kind, prompt, _ in held_out_prompts(1) if kind == "caption")
    with Pipeline.open(demo_export) as pipeline:
        full = alone(pipeline, prompt, max_new_tokens=12)
        word = full.text.split()[1]
        jobs = [(prompt, dict(max_new_tokens=12)), (prompt, dict(max_new_tokens=12, stop_strings=(word,))),
                (prompt, dict(max_new_tokens=2))]
        want = [alone(pipeline, p, **s) for p, s in jobs]
        got = run_schedule(Scheduler(pipeline), jobs, np.random.default_rng(0))
    assert got == want
    assert [c.finish_reason for c in got] == ["stop_token", "stop_string", "length"]


def test_a_cancelled_request_frees_its_row_and_the_others_are_unchanged(demo_export, seed):
    rng = np.random.default_rng(seed)
    prompts = [prompt for _, prompt, _ in held_out_prompts(3, seed=int(rng.integers(1 << 30)))]
    with Pipeline.open(demo_export) as pipeline:
        settings = dict(max_new_tokens=10, stop_token_ids=[])
        want = [alone(pipeline, prompt, **settings) for prompt in prompts]
        scheduler = Scheduler(pipeline, max_batch=2)
        first, doomed = (scheduler.submit(prompt, **settings) for prompt in prompts[:2])
        for _ in range(4):
            scheduler.step()
        doomed.cancel()
        last = scheduler.submit(prompts[2], **settings)  # waits for a free row: the cancelled one's
        for _ in range(100):
            if first.done and last.done:
                break
            scheduler.step()
        pieces = list(doomed)
        assert pieces[-1].finished and pieces[-1].finish_reason == CANCELLED
        assert doomed.result(0).finish_reason == CANCELLED and len(doomed.result(0).token_ids) < 10
        assert [first.result(0), last.result(0)] == [want[0], want[2]]
        assert scheduler.stats["requests_cancelled"] == 1


def test_bad_requests_fail_at_submit_and_the_scheduler_keeps_serving(demo_export):
    prompt = next(prompt for _, prompt, _ in held_out_prompts(1))
    with Pipeline.open(demo_export, max_context=40) as pipeline, Scheduler(pipeline) as scheduler:
        with pytest.raises(PromptTooLongError, match="max_new_tokens"):
            scheduler.submit(prompt, max_new_tokens=40)
        with pytest.raises(UsageError, match="max_new_tokens"):
            scheduler.submit(prompt, max_new_tokens=0)
        with pytest.raises(UsageError, match="temperature"):
            scheduler.submit(prompt, temperature=-1.0)
        with pytest.raises(UsageError, match="seed"):
            scheduler.submit(prompt, seed="seven")
        assert scheduler.submit(prompt, max_new_tokens=6).result(60) == alone(pipeline, prompt, max_new_tokens=6)
    with pytest.raises(UsageError, match="closed"):
        scheduler.submit(prompt)
    with pytest.raises(UsageError, match="max_batch"):
        Scheduler(pipeline, max_batch=0)


def test_threads_submit_at_once_and_share_the_image_and_prefix_caches(demo_export, seed):
    """16 requests from 4 threads on a started scheduler: alone tokens, each distinct image encoded once, and the
    shared few-shot preamble's K/V reused from the prefix cache."""
    rng = np.random.default_rng(seed)
    held = list(held_out_prompts(9, seed=int(rng.integers(1 << 30))))
    preamble = [*held[0][1], " " + held[0][2] + "\n"]  # a solved example before every prompt
    prompts = [preamble + prompt for _, prompt, _ in held[1:]] * 2
    with Pipeline.open(demo_export) as pipeline:
        want = [alone(pipeline, prompt, max_new_tokens=8) for prompt in prompts]
        pipeline.image_cache = type(pipeline.image_cache)(capacity=64)  # encode every image afresh below
        runs = dict(pipeline.stats)
        results = [None] * len(prompts)
        with Scheduler(pipeline, max_batch=8) as scheduler:
            def client(indices):
                for i in indices:
                    results[i] = scheduler.submit(prompts[i], max_new_tokens=8)
            threads = [threading.Thread(target=client, args=(range(k, len(prompts), 4),)) for k in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            got = [request.result(120) for request in results]
        assert got == want
        assert pipeline.stats["vision_runs"] - runs["vision_runs"] == 9  # the preamble's image and 8 queries
        assert pipeline.stats["prefix_tokens_reused"] > runs.get("prefix_tokens_reused", 0)
        assert scheduler.stats["rows_stepped"] > scheduler.stats["steps"]


def test_gather_right_aligns_rows_and_keeps_their_tokens():
    rng = np.random.default_rng(0)
    caches = []
    for batch, length in ((2, 5), (1, 3)):
        cache = SelfAttentionCache(layers=2, batch=batch, heads=2, head_dim=4, capacity=8)
        for layer in range(2):
            cache.keys[layer][:, :, :length] = rng.standard_normal((batch, 2, length, 4))
            cache.values[layer][:, :, :length] = rng.standard_normal((batch, 2, length, 4))
        cache.length = length
        cache.mask[:, :length] = 1
        caches.append(cache)
    gathered = SelfAttentionCache.gather([(caches[0], 1, 4), (caches[1], 0, 3)], capacity=6)
    assert gathered.length == 4 and gathered.capacity == 6 and gathered.keys[0].shape == (2, 2, 6, 4)
    np.testing.assert_array_equal(gathered.mask[:, :7], [[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0]])
    for layer in range(2):
        np.testing.assert_array_equal(gathered.keys[layer][0, :, :4], caches[0].keys[layer][1, :, 1:5])
        np.testing.assert_array_equal(gathered.values[layer][1, :, 1:4], caches[1].values[layer][0, :, :3])
    with pytest.raises(PromptTooLongError):
        SelfAttentionCache.gather([(caches[0], 0, 5)], capacity=4)


@pytest.mark.slow
def test_an_int4_decoder_writing_the_cache_in_place_batches_in_flight(idefics_export, tmp_path, seed):
    """quantize's default ONNX Runtime int4 export: its GroupQueryAttention writes the KV cache in place and reads the
    gathered, right-aligned rows through its attention bias; every request still gets its alone tokens."""
    from flamingo_edge.calibration.quantize import quantize_export

    export = quantize_export(idefics_export, tmp_path / "int4", "int4", accuracy_level=0)
    rng = np.random.default_rng(seed)
    cases = ["text_before_first_image", "two_images", "batch_of_two_with_padding"]
    prompts = [make_prompts(cases[i % 3], rng)[0] for i in range(6)]
    with Pipeline.open(export) as pipeline:
        assert pipeline.sessions["decoder"].in_place
        jobs = [(prompt, dict(max_new_tokens=int(rng.integers(2, 9)), stop_token_ids=[])) for prompt in prompts]
        want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
        got = run_schedule(Scheduler(pipeline, max_batch=3), jobs, rng)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_auto_prefill_chunks_a_long_prompt_that_joins_a_running_batch(demo_export, seed):
    """prefill_chunk="auto": a long few-shot prompt arriving while others decode is prefilled in chunks sized from
    the measured times (at least 16 tokens), alone in one go; either way its tokens are its alone tokens."""
    from flamingo_edge.runtime.scheduler import MIN_AUTO_CHUNK

    rng = np.random.default_rng(seed)
    held = list(held_out_prompts(6, seed=int(rng.integers(1 << 30))))
    shots = [item for kind, prompt, answer in held[:8:2] for item in (*prompt, f" {answer}\n")]
    long_prompt = shots + held[-2][1]
    with Pipeline.open(demo_export, prefix_cache_bytes=0) as pipeline:  # every prompt token is prefilled here
        scheduler = Scheduler(pipeline, max_batch=4)
        assert scheduler._chunk() is None  # nobody decoding: whole prompts
        tokens = pipeline.processor.tokenize([long_prompt]).input_ids.shape[1]
        jobs = [(held[1][1], dict(max_new_tokens=8, stop_token_ids=[])),
                (long_prompt, dict(max_new_tokens=6, stop_token_ids=[]))]
        want = [alone(pipeline, prompt, **settings) for prompt, settings in jobs]
        first = scheduler.submit(*jobs[0][:1], **jobs[0][1])
        for _ in range(3):
            scheduler.step()  # the first request is decoding now
        scheduler._step_s, scheduler._token_s = 1.0, 1.0  # a step costs one token: the smallest chunk
        assert scheduler._chunk() == MIN_AUTO_CHUNK
        chunks = scheduler.stats["prefill_chunks"]
        second = scheduler.submit(*jobs[1][:1], **jobs[1][1])
        scheduler.step()
        assert scheduler.stats["prefill_chunks"] == chunks + 1 and scheduler._prefilling is not None
        while not (first.done and second.done):
            scheduler.step()
        assert [first.result(0), second.result(0)] == want
        assert tokens > 2 * MIN_AUTO_CHUNK and scheduler.stats["prefill_chunks"] >= 3  # the first, then 2+ chunks
