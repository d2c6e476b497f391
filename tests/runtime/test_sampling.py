"""Samplers against transformers' logits processors: the same tokens survive, with the same probabilities."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from flamingo_edge.errors import UsageError
from flamingo_edge.runtime.sampling import (apply_repetition_penalty, apply_top_k, apply_top_p, greedy, make_sampler,
                                            sampling_probabilities)

torch = pytest.importorskip("torch", reason="the reference: pip install -e '.[test]'")
logits_process = pytest.importorskip("transformers.generation.logits_process",
                                     reason="the reference: pip install -e '.[test]'")

BATCH, VOCAB, HISTORY = 4, 64, 12


def _inputs(rng):
    logits = (3 * rng.standard_normal((BATCH, VOCAB))).astype(np.float32)  # [B, V]
    history = rng.integers(0, VOCAB, size=(BATCH, HISTORY), dtype=np.int64)  # [B, T], with repeats
    history[:, 0] = history[:, 1]  # a repeated id is penalised once
    history[0, -1] = VOCAB + 3  # an id beyond the logits (transformers ignores it)
    return logits, history


def _reference(logits, history, *, temperature, top_k, top_p, repetition_penalty):
    """transformers' distribution: the processors `generate(do_sample=True)` builds for these settings."""
    processors = []
    if repetition_penalty != 1.0:
        processors.append(logits_process.RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if temperature != 1.0:
        processors.append(logits_process.TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(logits_process.TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(logits_process.TopPLogitsWarper(top_p=top_p))
    scores, ids = torch.from_numpy(logits.copy()), torch.from_numpy(history)
    for processor in processors:
        scores = processor(ids, scores)
    return torch.softmax(scores, dim=-1).numpy()


SETTINGS = [  # temperature, top_k, top_p, repetition_penalty
    (1.0, 0, 1.0, 1.0),
    (0.7, 0, 1.0, 1.3),
    (1.5, 10, 1.0, 1.0),
    (0.8, 0, 0.9, 1.0),
    (0.9, 20, 0.8, 1.2),
    (1.2, 5, 0.5, 0.8),  # a penalty < 1 rewards repeats
    (0.6, 200, 0.3, 2.0),  # top_k beyond the vocabulary; a top_p that keeps few tokens
    (1.0, 1, 1.0, 1.0),
    (2.0, 0, 0.01, 1.0),  # top_p so small only the most likely token stays
]


@pytest.mark.parametrize("temperature, top_k, top_p, repetition_penalty", SETTINGS)
def test_probabilities_match_transformers(seed, temperature, top_k, top_p, repetition_penalty):
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    logits, history = _inputs(np.random.default_rng([seed, int(100 * temperature), top_k]))
    expected = _reference(logits, history, **settings)
    actual = sampling_probabilities(logits, history, **settings)
    np.testing.assert_array_equal(actual > 0, expected > 0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(actual.sum(axis=-1), 1, atol=1e-6)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(seed, penalty):
    logits, history = _inputs(np.random.default_rng(seed))
    processor = logits_process.RepetitionPenaltyLogitsProcessor(penalty=penalty)
    expected = processor(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(logits, history, penalty), expected, rtol=1e-7, atol=0)
    empty = np.zeros((BATCH, 0), np.int64)  # nothing generated yet, no prompt: nothing changes
    np.testing.assert_array_equal(apply_repetition_penalty(logits, empty, penalty), logits)


def test_a_samplers_penalty_reads_one_new_column_per_step_and_equals_transformers(seed):
    """A generation's history is one preallocated array, seen through a view one column longer at each step: the
    sampler's SeenTokens then adds only that column (a step's cost does not grow with the context), and every step's
    penalised logits still equal transformers'. A history that is not the last one grown by one is read whole."""
    from flamingo_edge.runtime.sampling import SeenTokens

    rng = np.random.default_rng(seed)
    logits, prompt = _inputs(rng)
    history = np.empty((BATCH, prompt.shape[1] + 6), np.int64)
    history[:, : prompt.shape[1]] = prompt
    processor = logits_process.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    seen, reads = SeenTokens(), []
    put = np.put_along_axis
    with mock.patch.object(np, "put_along_axis", lambda a, i, v, axis: (reads.append(i.shape[1]), put(a, i, v, axis))):
        for step in range(6):
            length = prompt.shape[1] + step
            view = history[:, :length]
            expected = processor(torch.from_numpy(view.copy()), torch.from_numpy(logits.copy())).numpy()
            np.testing.assert_allclose(apply_repetition_penalty(logits, view, 1.7, seen), expected, rtol=1e-7, atol=0)
            history[:, length] = rng.integers(0, logits.shape[-1], BATCH)
        other = history[:, : prompt.shape[1] + 2].copy()  # another array: read whole
        apply_repetition_penalty(logits, other, 1.7, seen)
    assert reads == [prompt.shape[1], 1, 1, 1, 1, 1, other.shape[1]]


def test_top_k_keeps_ties_like_transformers(seed):
    logits, history = _inputs(np.random.default_rng(seed))
    logits[:, 5:9] = logits.max(axis=-1, keepdims=True) + 1  # four tokens tied for first place
    expected = logits_process.TopKLogitsWarper(top_k=2)(torch.from_numpy(history), torch.from_numpy(logits)).numpy()
    actual = apply_top_k(logits, 2)
    np.testing.assert_array_equal(actual, expected)
    assert (np.isfinite(actual).sum(axis=-1) == 4).all()


def test_top_p_keeps_the_smallest_set_reaching_p(seed):
    rng = np.random.default_rng(seed)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)) + rng.standard_normal(1).astype(np.float32)
    # ascending cumulative: 0.05, 0.2, 0.5, 1.0; dropped are the tokens up to 1 - top_p
    assert np.isfinite(apply_top_p(logits, 0.75)).tolist() == [[True, True, False, False]]
    assert np.isfinite(apply_top_p(logits, 0.9)).tolist() == [[True, True, True, False]]
    assert np.isfinite(apply_top_p(logits, 0.4)).tolist() == [[True, False, False, False]]
    for top_p in (0.75, 0.9, 0.4):
        warper = logits_process.TopPLogitsWarper(top_p=top_p)
        np.testing.assert_array_equal(apply_top_p(logits, top_p), warper(None, torch.from_numpy(logits)).numpy())


def test_greedy_is_the_argmax_after_the_penalty(seed, caplog):
    logits, history = _inputs(np.random.default_rng(seed))
    tokens = greedy()(logits, history)
    assert tokens.dtype == np.int64 and tokens.shape == (BATCH,)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=-1))
    np.testing.assert_array_equal(make_sampler()(logits, history), tokens)
    penalised = logits_process.RepetitionPenaltyLogitsProcessor(penalty=1.5)(
        torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
    sampler = make_sampler(temperature=0.0, repetition_penalty=1.5, top_k=3, top_p=0.5)  # greedy ignores k, p
    np.testing.assert_array_equal(sampler(logits, history), penalised.argmax(axis=-1))
    assert "top_k=3 and top_p=0.5 do nothing with temperature 0 (greedy)" in caplog.text
    probabilities = sampling_probabilities(logits, history, repetition_penalty=1.5)
    np.testing.assert_array_equal(probabilities, np.eye(VOCAB, dtype=np.float32)[penalised.argmax(axis=-1)])


def test_seeded_sampler_is_reproducible_and_draws_only_kept_tokens(seed):
    logits, history = _inputs(np.random.default_rng(seed))
    settings = dict(temperature=0.8, top_k=12, top_p=0.9, repetition_penalty=1.2)
    first = make_sampler(**settings, seed=seed)
    second = make_sampler(**settings, seed=seed)
    draws = [first(logits, history) for _ in range(200)]  # [200 x B]
    assert all(np.array_equal(draw, second(logits, history)) for draw in draws)
    assert all(draw.dtype == np.int64 and draw.shape == (BATCH,) for draw in draws)
    kept = sampling_probabilities(logits, history, **settings) > 0  # [B, V]
    assert kept[np.arange(BATCH)[None], np.stack(draws)].all()
    assert len({tuple(draw) for draw in draws}) > 1  # it samples, it does not always take the argmax


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.5), r"temperature must be >= 0 \(0 = greedy\); got -0.5"),
    (dict(temperature=float("nan")), r"temperature must be >= 0 \(0 = greedy\); got nan"),
    (dict(top_k=-1), r"top_k must be an integer >= 0 \(0 = off\); got -1"),
    (dict(top_k=2.5), r"top_k must be an integer >= 0 \(0 = off\); got 2.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] \(1 = off\); got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] \(1 = off\); got 1.5"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be > 0 \(1 = off\); got 0.0"),
    (dict(temperature=-1.0, top_p=2.0), r"^invalid sampling settings: temperature .*; top_p must be in"),
])
def test_invalid_settings_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        make_sampler(**settings)
    with pytest.raises(UsageError, match=message):
        sampling_probabilities(np.zeros((1, 3), np.float32), np.zeros((1, 0), np.int64), **settings)
