"""Samplers: callables that pick the next token of every row from the decoder's last logits.

    logits [B, V] ─repetition penalty─▶ ─temperature─▶ ─top-k─▶ ─top-p─▶ softmax ─▶ draw (numpy Generator)
                                    └── temperature 0: argmax (greedy)

Each step follows transformers' logits processor of the same name (transformers/generation/logits_process.py:
`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, applied in
the order of `GenerationMixin._get_logits_processor`), so a setting means what it means in `generate()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from flamingo_edge.errors import UsageError

logger = logging.getLogger(__name__)

# (logits [B, V] float32, history [B, T] int64) -> next tokens [B] int64
Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


class SeenTokens:
    """The ids each row's history holds, kept from one call of a sampler to the next: when the history is the last
    one grown by one column (a generation's preallocated history, seen through a longer view at each step), only
    that column is added, so a step costs O(V) whatever the context. Any other history is read whole."""

    def __init__(self):
        self.mask: np.ndarray | None = None  # [B, V+1]; column V collects out-of-range ids
        self.source, self.length = None, 0

    def of(self, history: np.ndarray, vocab: int) -> np.ndarray:
        """bool [B, V]: which ids occur in each row of `history` [B, T]."""
        source = history.base if history.base is not None else history
        batch, length = history.shape
        grown = (self.mask is not None and source is self.source and length == self.length + 1
                 and self.mask.shape == (batch, vocab + 1))
        if not grown:
            self.mask = np.zeros((batch, vocab + 1), dtype=bool)
        new = history[:, -1:] if grown else history
        np.put_along_axis(self.mask, np.where((new >= 0) & (new < vocab), new, vocab), True, axis=1)
        self.source, self.length = source, length
        return self.mask[:, :vocab]


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float,
                             seen: SeenTokens | None = None) -> np.ndarray:
    """Make every token already in `history` less likely: logit < 0 -> logit * penalty, else logit / penalty.

    As in transformers, every id in `history` counts once, however often it occurs, and pad ids are penalised too
    (pass only real tokens to avoid that); ids outside [0, V) are ignored.

    Args:
        logits: float [B, V].
        history: int [B, T], the ids so far (prompt and generated).
        penalty: > 1 penalises, < 1 rewards, 1 changes nothing.
        seen: a sampler's SeenTokens, kept across its calls (None: read the whole history).

    Returns:
        New logits [B, V], same dtype.
    """
    vocab = logits.shape[-1]
    mask = (seen or SeenTokens()).of(history, vocab)
    penalised = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(mask, penalised, logits).astype(logits.dtype, copy=False)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the `top_k` largest logits of each row (and any tied with the k-th), the rest -> -inf.

    Returns:
        New logits [B, V].
    """
    k = min(max(top_k, 1), logits.shape[-1])
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]  # [B, 1], the k-th largest
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability adds up to at least `top_p` (at least one).

    As transformers does it: sort ascending, drop every token whose cumulative probability is <= 1 - top_p.

    Returns:
        New logits [B, V], the dropped ones -inf.
    """
    order = np.argsort(logits, axis=-1, kind="stable")  # [B, V], ascending
    cumulative = np.cumsum(_softmax(np.take_along_axis(logits, order, axis=-1)), axis=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    return np.where(drop, -np.inf, logits).astype(logits.dtype, copy=False)


def check_settings(*, temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Refuse sampling settings that mean nothing.

    Raises:
        UsageError: temperature < 0, top_k not an int >= 0, top_p outside (0, 1], repetition_penalty <= 0.
    """
    problems = []
    if not temperature >= 0:
        problems.append(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        problems.append(f"top_k must be an integer >= 0 (0 = off); got {top_k!r}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (1 = off); got {top_p}")
    if not repetition_penalty > 0:
        problems.append(f"repetition_penalty must be > 0 (1 = off); got {repetition_penalty}")
    if problems:
        raise UsageError("invalid sampling settings: " + "; ".join(problems))


def _filtered_logits(logits: np.ndarray, history: np.ndarray, *, temperature: float, top_k: int = 0,
                     top_p: float = 1.0, repetition_penalty: float = 1.0,
                     seen: SeenTokens | None = None) -> np.ndarray:
    """The logits a sampler draws from: penalised, divided by the temperature, top-k and top-p filtered (-inf).

    Args:
        logits: float32 [B, V], the decoder's last position.
        history: int64 [B, T], the ids so far.
        temperature: > 0 (greedy, temperature 0, has no distribution; see `sampling_probabilities`).
        top_k, top_p, repetition_penalty: as in `make_sampler`.
        seen: the sampler's SeenTokens (None: read the whole history).

    Returns:
        float32 [B, V].
    """
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, repetition_penalty, seen)
    logits = logits / np.float32(temperature)
    if top_k > 0:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return logits


def sampling_probabilities(logits: np.ndarray, history: np.ndarray, *, temperature: float = 0.0, top_k: int = 0,
                           top_p: float = 1.0, repetition_penalty: float = 1.0) -> np.ndarray:
    """The distribution `make_sampler` with these settings draws the next tokens from.

    Args:
        logits: float32 [B, V]; history: int64 [B, T]; settings as in `make_sampler`.

    Returns:
        float32 [B, V], rows summing to 1, 0 for filtered tokens; temperature 0 gives one-hot rows at the argmax.

    Raises:
        UsageError: invalid settings.
    """
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if temperature == 0:
        tokens = greedy(repetition_penalty)(logits, history)
        return np.eye(logits.shape[-1], dtype=np.float32)[tokens]
    filtered = _filtered_logits(logits, history, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
    return _softmax(filtered).astype(np.float32)


def greedy(repetition_penalty: float = 1.0) -> Sampler:
    """The most likely token of every row (after the repetition penalty, as transformers' greedy search does)."""

    seen = SeenTokens()

    def sample(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, repetition_penalty, seen)
        return logits.argmax(axis=-1).astype(np.int64)

    return sample


def _draw(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from probabilities [B, V] by inverse CDF; a token of probability 0 is never drawn."""
    cdf = np.cumsum(probabilities.astype(np.float64), axis=-1)  # [B, V]
    u = (1.0 - rng.random(len(cdf)))[:, None] * cdf[:, -1:]  # in (0, total], so the first cdf >= u has mass
    return np.minimum((cdf < u).sum(axis=-1), cdf.shape[-1] - 1).astype(np.int64)


def make_sampler(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None) -> Sampler:
    """A sampler with transformers' semantics for each setting.

    Args:
        temperature: 0 = greedy (argmax after the repetition penalty; the other settings then do nothing).
        top_k: keep the k most likely tokens; 0 = off.
        top_p: keep the smallest set of most likely tokens with probability >= top_p; 1 = off.
        repetition_penalty: applied to every id in the history (pads included, as in transformers); 1 = off.
        seed: of the sampler's own `numpy.random.Generator` (None = fresh entropy); the same seed and inputs give
            the same tokens.

    Returns:
        A Sampler: (logits [B, V] float32, history [B, T] int64) -> tokens [B] int64.

    Raises:
        UsageError: invalid settings (see `check_settings`).
    """
    check_settings(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if temperature == 0:
        if top_k or top_p < 1.0:
            logger.warning("top_k=%s and top_p=%s do nothing with temperature 0 (greedy); set a temperature > 0 to "
                           "sample", top_k, top_p)
        return greedy(repetition_penalty)
    rng, seen = np.random.default_rng(seed), SeenTokens()

    def sample(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        filtered = _filtered_logits(logits, history, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, seen=seen)
        return _draw(_softmax(filtered), rng)

    return sample
