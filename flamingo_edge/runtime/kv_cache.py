"""The runtime's two caches: the decoder's self-attention K/V, and the cross-attention K/V of each image.

    decode step: feed() ──past_key.l / past_value.l [B, H, C, Dh] (the whole buffer, zero-copy)──▶ decoder
                 decoder ──new_key.l / new_value.l [B, H, 1, Dh]──▶ update(): written in place at slot P
    image:       key_of(pixels) ──get──▶ hit: cross_key.i / cross_value.i [1, Hx, L, Dh]
                                       └─ miss: vision → resampler → xattn_kv ──put──▶

Plain numpy, no torch. Tensor names come from `graphs.py`.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flamingo_edge.errors import GraphContractError, PromptTooLongError, UsageError
from flamingo_edge.graphs import new_key, new_value, past_key, past_value

_EPOCHS = itertools.count(1)  # process-wide: two caches, or one cache before and after a reset, never share one


class SelfAttentionCache:
    """Every decoder layer's keys and values in one preallocated [B, H, C, Dh] buffer per layer, written in place.

    C is the capacity: the most tokens a row may hold. Slots 0..P-1 hold the cached tokens (P = `length`), the rest is
    room. A decode step (S = 1) feeds the *whole* buffers as the past, without copying them (ONNX Runtime reads a
    contiguous numpy array where it lies; TensorRT binds it once), and an attention mask [B, C + 1] kept next to them
    that marks the slots in use; the decoder returns only the new token's K/V, which `update` writes at slot P. So a
    step's host work does not grow with the context: one column of the mask and one slot per layer are written.

    A prefill (S > 1) feeds the cached prefix (often empty) as a P-token past: once per prompt, a prompt-sized copy
    instead of attention over the unused slots for every prompt token. A backend that reads the past where it lies
    sets `whole_past` (TensorRT's device mirror; ONNX Runtime's in-place decoder, which also writes the new K/V into
    the buffers itself): prefills then feed the whole buffers too.

    `epoch` changes whenever the contents change other than by `update` (a new cache, `reset`, `load`): a backend
    that mirrors the buffers on a device knows its copy is current while (epoch, length) are what it last wrote.
    """

    def __init__(self, *, layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: np.dtype | type = np.float32):
        """Preallocate [B, H, capacity, Dh] key and value buffers for every layer.

        Args:
            layers: decoder layers (one key and one value buffer each).
            batch, heads, head_dim: B, H and Dh of the decoder graph.
            capacity: the most tokens (prompt + generated) a row may hold; decode steps feed this many past slots.
            dtype: of the buffers (the decoder's K/V dtype).
        """
        self.capacity, self.length = capacity, 0  # length = P, the tokens cached so far
        shape = (batch, heads, capacity, head_dim)  # [B, H, capacity, Dh]
        self.keys = [np.zeros(shape, dtype) for _ in range(layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(layers)]
        # 1 for the slots in use by a real token; the last column is a decode step's new token: fed as it is.
        self.mask = np.zeros((batch, capacity + 1), np.int64)
        self.whole_past = False  # prefills feed the whole buffers too (a backend that reads the past in place)
        self.epoch = next(_EPOCHS)

    def feed(self, new_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's past inputs and its `attention_mask`, for S new tokens whose mask is `new_mask` [B, S].

        S = 1 (a decode step): the whole buffers (P = capacity, unused slots masked) and the kept mask, no copies.
        S > 1 (a prefill): the P cached tokens, contiguous copies, and their mask followed by `new_mask`; with
        `whole_past`, the whole buffers and the kept mask's C columns followed by `new_mask`.

        Raises:
            PromptTooLongError: the S new tokens do not fit (checked before anything runs).
        """
        new = new_mask.shape[1]
        self._check_room(new)
        if new == 1 or self.whole_past:
            if new == 1:
                self.mask[:, -1] = new_mask[:, 0]
                mask = self.mask
            else:
                mask = np.concatenate([self.mask[:, : self.capacity], new_mask], axis=1)
            feed = {"attention_mask": mask}
            for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
                feed[past_key(layer)], feed[past_value(layer)] = keys, values
            return feed
        feed = {"attention_mask": np.concatenate([self.mask[:, : self.length], new_mask], axis=1)}
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            # A [:, :, :P] slice of the buffer is strided; backends want contiguous memory.
            feed[past_key(layer)] = np.ascontiguousarray(keys[:, :, : self.length])
            feed[past_value(layer)] = np.ascontiguousarray(values[:, :, : self.length])
        return feed

    def update(self, outputs: Mapping[str, np.ndarray], new_mask: np.ndarray) -> None:
        """Write the new tokens' K/V from the decoder's outputs at the next slots (and their mask).

        Args:
            outputs: the decoder's outputs by name; `new_key.{l}` / `new_value.{l}` are [B, H, S, Dh] (views of
                this cache's slots P..P+S-1 when the decoder wrote them there itself: ONNX Runtime's in-place
                decoder).
            new_mask: [B, S], the new tokens' attention mask as fed.

        Raises:
            PromptTooLongError: P + S exceeds the capacity (checked before anything is written).
            GraphContractError: a new K/V tensor is missing or its shape is not [B, H, S, Dh].
        """
        new = new_mask.shape[1]
        self._check_room(new)
        needed = self.length + new
        pairs = [(buffer, name(layer)) for layer in range(len(self.keys))
                 for buffer, name in ((self.keys[layer], new_key), (self.values[layer], new_value))]
        for buffer, name in pairs:
            self._check_new(outputs, name, buffer.shape, new)
        for buffer, name in pairs:
            if outputs[name].base is not buffer:  # else a view of these very slots: a decoder that wrote them in place
                buffer[:, :, self.length : needed] = outputs[name]
        self.mask[:, self.length : needed] = new_mask
        self.length = needed

    def _check_room(self, new: int) -> None:
        """Refuse `new` tokens that do not fit after the cached ones (before anything runs or is written)."""
        if self.length + new > self.capacity:
            raise PromptTooLongError(
                f"the self-attention cache needs {self.length + new} tokens ({self.length} cached + {new} new) but "
                f"holds {self.capacity}; shorten the prompt, generate fewer tokens, or make the cache larger")

    def _check_new(self, outputs: Mapping[str, np.ndarray], name: str, shape: tuple, new: int) -> None:
        batch, heads, _, head_dim = shape
        expected = (batch, heads, new, head_dim)
        got = outputs[name].shape if name in outputs else None
        if got != expected:
            raise GraphContractError(f"decoder output {name!r} has shape {got}; the self-attention cache expects "
                                     f"{expected} [B, H, S, Dh] (S={new}); the cache and the decoder graph disagree "
                                     "on the model's sizes")

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept)."""
        self.length = 0
        self.mask[:] = 0
        self.epoch = next(_EPOCHS)

    def snapshot(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Copies of the cached keys and values, one [B, H, P, Dh] per layer."""
        return ([k[:, :, : self.length].copy() for k in self.keys],
                [v[:, :, : self.length].copy() for v in self.values])

    @classmethod
    def gather(cls, rows: list[tuple[SelfAttentionCache, int, int]], capacity: int) -> SelfAttentionCache:
        """A new cache of len(rows) rows, row i holding the last `used` tokens of row `r` of `cache` for each
        (cache, r, used) in `rows`, right-aligned at P = the largest `used` (the slots before a shorter row's tokens
        are masked, as left padding is). In-flight batching builds its batch this way when requests join or leave.

        Right alignment is left padding, which every family's decoder handles exactly (rotary positions count a
        row's real tokens; ALiBi's slot distances are those of the row alone): the row's next tokens follow its last
        one with no gap. Gaps between a row's tokens are not part of the graph contract.

        Raises:
            PromptTooLongError: P exceeds `capacity`.
            UsageError: no rows, or a row asks for more tokens than its cache holds.
        """
        if not rows:
            raise UsageError("a cache gathered from no rows")
        first = rows[0][0]
        length = max(used for _, _, used in rows)
        if length > capacity:
            raise PromptTooLongError(f"a gathered cache needs {length} slots but holds {capacity}")
        layers, (_, heads, _, head_dim) = len(first.keys), first.keys[0].shape
        cache = cls(layers=layers, batch=len(rows), heads=heads, head_dim=head_dim, capacity=capacity,
                    dtype=first.keys[0].dtype)
        for index, (source, row, used) in enumerate(rows):
            if used > source.length:
                raise UsageError(f"row {row} of a cache holding {source.length} tokens cannot give {used}")
            start = source.length - used
            for target, stored in (*zip(cache.keys, source.keys), *zip(cache.values, source.values)):
                target[index, :, length - used : length] = stored[row, :, start : source.length]
            cache.mask[index, length - used : length] = 1
        cache.length = length
        return cache

    def load(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Start from stored keys and values ([B, H, P, Dh] per layer of real tokens, e.g. a prompt prefix),
        replacing the cache.

        Raises:
            PromptTooLongError: P exceeds the capacity.
        """
        length = keys[0].shape[2]
        if length > self.capacity:
            raise PromptTooLongError(f"a cached prefix of {length} tokens does not fit a cache of {self.capacity}")
        for buffer, stored in (*zip(self.keys, keys), *zip(self.values, values)):
            buffer[:, :, :length] = stored
        self.mask[:] = 0
        self.mask[:, :length] = 1
        self.length = length
        self.epoch = next(_EPOCHS)


@dataclass(frozen=True)
class CachedPrefix:
    """A prompt's self-attention K/V (batch of one) and what it depends on: its tokens and its images."""

    token_ids: tuple[int, ...]
    images: tuple[tuple[int, str], ...]  # (position of the <image> token, content key of the image), in order
    keys: list[np.ndarray]  # [1, H, P, Dh] per layer
    values: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (*self.keys, *self.values))


class PrefixCache:
    """Self-attention K/V of earlier prompts, reused when a new prompt begins with the same tokens and images.

    A token's K/V depend only on the tokens before it and the images at or before it, so the longest common prefix
    of two prompts (same token ids, same image content at every <image> position in it) has the same K/V in both.
    Least recently used prompts are dropped beyond `max_bytes`.
    """

    def __init__(self, *, max_bytes: int):
        if max_bytes < 0:
            raise UsageError(f"the prefix cache size must be >= 0 bytes (0 = no cache); got {max_bytes}")
        self.max_bytes, self.hits, self.tokens_reused, self.nbytes = max_bytes, 0, 0, 0
        self._entries: OrderedDict[tuple, CachedPrefix] = OrderedDict()

    def _common(self, entry: CachedPrefix, token_ids: tuple[int, ...], images) -> int:
        length = 0
        for ours, theirs in zip(entry.token_ids, token_ids):
            if ours != theirs:
                break
            length += 1
        for (position, key), (_, other) in zip(entry.images, images):
            if position < length and key != other:
                length = position  # the image differs: only the tokens before it can be reused
        return length

    def lookup(self, token_ids: tuple[int, ...], images: tuple[tuple[int, str], ...]) -> tuple[int, CachedPrefix | None]:
        """The longest reusable prefix, at most len(token_ids) - 1 tokens (one token must run to give logits)."""
        best, best_entry = 0, None
        for key, entry in self._entries.items():
            length = min(self._common(entry, token_ids, images), len(token_ids) - 1)
            if length > best:
                best, best_entry = length, key
        if best_entry is None:
            return 0, None
        self._entries.move_to_end(best_entry)
        self.hits += 1
        self.tokens_reused += best
        return best, self._entries[best_entry]

    def store(self, prefix: CachedPrefix) -> None:
        if prefix.nbytes > self.max_bytes:
            return
        key = (prefix.token_ids, prefix.images)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        self._entries[key] = prefix
        self.nbytes += prefix.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def __len__(self) -> int:
        return len(self._entries)


class CrossAttentionCache:
    """Cross-attention K/V per image, keyed by the image's content, least recently used dropped beyond `capacity`
    images or `max_bytes` (one mllama 11B image is 0.4 GiB of K/V: a count alone does not bound the memory).

    An entry is one image's `xattn_kv` outputs as the graph returns them for N = 1: `cross_key.{i}` /
    `cross_value.{i}` -> [1, Hx, L, Dh]. `get` returns read-only views: entries are shared by every prompt that shows
    the same image, so no caller may write into them. Safe to share between threads (a camera stream encodes frames
    on one thread while another generates).
    """

    def __init__(self, *, capacity: int = 64, max_bytes: int | None = None):
        """An empty cache.

        Args:
            capacity: the most images kept; 0 keeps none (every image is recomputed).
            max_bytes: the most bytes of K/V kept (None: no bound but `capacity`); an image larger than that is not
                kept.

        Raises:
            UsageError: a negative capacity or size.
        """
        if capacity < 0:
            raise UsageError(f"the image cache capacity must be >= 0 (0 = no cache); got {capacity}")
        if max_bytes is not None and max_bytes < 0:
            raise UsageError(f"the image cache size must be >= 0 bytes (0 = no cache); got {max_bytes}")
        self.capacity, self.max_bytes, self.hits, self.misses, self.nbytes = capacity, max_bytes, 0, 0, 0
        self._entries: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()

    @staticmethod
    def key_of(image: np.ndarray) -> str:
        """The content key of an image: sha256 over its dtype, shape and bytes (equal pixels, equal key)."""
        image = np.ascontiguousarray(image)
        digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
        digest.update(image.data)
        return digest.hexdigest()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The entry for `key` (marked most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: Mapping[str, np.ndarray]) -> None:
        """Store one image's cross K/V (each [1, Hx, L, Dh]), dropping the least recently used beyond capacity.

        Raises:
            GraphContractError: an array is not [1, Hx, L, Dh] (e.g. the K/V of several images at once).
        """
        frozen = {}
        for name, array in entry.items():
            if array.ndim != 4 or array.shape[0] != 1:
                raise GraphContractError(f"the image cache stores one image's xattn_kv outputs [1, Hx, L, Dh]; "
                                         f"{name!r} has shape {array.shape}")
            frozen[name] = array.view()
            frozen[name].flags.writeable = False
        size = sum(array.nbytes for array in frozen.values())
        with self._lock:
            if key in self._entries:
                self.nbytes -= sum(array.nbytes for array in self._entries.pop(key).values())
            self._entries[key] = frozen
            self.nbytes += size
            while self._entries and (len(self._entries) > self.capacity
                                     or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
                dropped = self._entries.popitem(last=False)[1]
                self.nbytes -= sum(array.nbytes for array in dropped.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Whether `key` is cached (neither counted nor marked as used)."""
        return key in self._entries
