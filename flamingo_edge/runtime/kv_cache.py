"""The runtime's two caches: the decoder's self-attention K/V, and the cross-attention K/V of each image.

    decoder step: feed() ──past_key.l / past_value.l [B, H, P, Dh]──▶ decoder ──present_* [B, H, P+S, Dh]──▶ update()
    image:        key_of(pixels) ──get──▶ hit: cross_key.i / cross_value.i [1, Hx, L, Dh]
                                        └─ miss: vision → resampler → xattn_kv ──put──▶

Plain numpy, no torch. Tensor names come from `graphs.py`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from flamingo_edge.errors import GraphContractError, PromptTooLongError, UsageError
from flamingo_edge.graphs import past_key, past_value, present_key, present_value


class SelfAttentionCache:
    """Every decoder layer's past keys and values, preallocated for `capacity` tokens per row.

    The decoder graph takes the past as plain tensors [B, H, P, Dh] (P may be 0) and returns it extended by the S new
    tokens; the cache keeps only the new positions, so nothing is stored twice.
    """

    def __init__(self, *, layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: np.dtype | type = np.float32):
        """Preallocate [B, H, capacity, Dh] key and value buffers for every layer.

        Args:
            layers: decoder layers (one key and one value buffer each).
            batch, heads, head_dim: B, H and Dh of the decoder graph.
            capacity: the most tokens (prompt + generated) a row may hold.
            dtype: of the buffers (the decoder's K/V dtype).
        """
        self.capacity, self.length = capacity, 0  # length = P, the tokens cached so far
        shape = (batch, heads, capacity, head_dim)  # [B, H, capacity, Dh]
        self.keys = [np.zeros(shape, dtype) for _ in range(layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(layers)]

    def feed(self) -> dict[str, np.ndarray]:
        """The decoder's past inputs: `past_key.{l}` / `past_value.{l}` [B, H, P, Dh], contiguous copies."""
        feed = {}
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            # A [:, :, :P] slice of the buffer is strided; backends want contiguous memory, and callers may keep it.
            feed[past_key(layer)] = np.ascontiguousarray(keys[:, :, : self.length])
            feed[past_value(layer)] = np.ascontiguousarray(values[:, :, : self.length])
        return feed

    def update(self, outputs: Mapping[str, np.ndarray], new_tokens: int) -> None:
        """Store the K/V of `new_tokens` new positions from the decoder's outputs.

        Args:
            outputs: the decoder's outputs by name; `present_key.{l}` / `present_value.{l}` are [B, H, P+S, Dh].
            new_tokens: S, the tokens this decoder run added.

        Raises:
            PromptTooLongError: P + S exceeds the capacity (checked before anything is written).
            GraphContractError: a present tensor is missing or its shape is not [B, H, P+S, Dh].
        """
        needed = self.length + new_tokens
        if needed > self.capacity:
            raise PromptTooLongError(
                f"the self-attention cache needs {needed} tokens ({self.length} cached + {new_tokens} new) but holds "
                f"{self.capacity}; shorten the prompt, generate fewer tokens, or make the cache larger")
        pairs = [(buffer, name(layer)) for layer in range(len(self.keys))
                 for buffer, name in ((self.keys[layer], present_key), (self.values[layer], present_value))]
        for buffer, name in pairs:
            self._check_present(outputs, name, buffer.shape, needed)
        for buffer, name in pairs:
            buffer[:, :, self.length : needed] = outputs[name][:, :, self.length :]
        self.length = needed

    def _check_present(self, outputs: Mapping[str, np.ndarray], name: str, shape: tuple, needed: int) -> None:
        batch, heads, _, head_dim = shape
        expected = (batch, heads, needed, head_dim)
        got = outputs[name].shape if name in outputs else None
        if got != expected:
            raise GraphContractError(f"decoder output {name!r} has shape {got}; the self-attention cache expects "
                                     f"{expected} [B, H, P+S, Dh] (P={self.length}); the cache and the decoder graph "
                                     "disagree on the model's sizes")

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept)."""
        self.length = 0


class CrossAttentionCache:
    """Cross-attention K/V per image, keyed by the image's content, least recently used dropped beyond `capacity`.

    An entry is one image's `xattn_kv` outputs as the graph returns them for N = 1: `cross_key.{i}` /
    `cross_value.{i}` -> [1, Hx, L, Dh]. `get` returns read-only views: entries are shared by every prompt that shows
    the same image, so no caller may write into them.
    """

    def __init__(self, *, capacity: int = 64):
        """An empty cache.

        Args:
            capacity: the most images kept; 0 keeps none (every image is recomputed).

        Raises:
            UsageError: a negative capacity.
        """
        if capacity < 0:
            raise UsageError(f"the image cache capacity must be >= 0 (0 = no cache); got {capacity}")
        self.capacity, self.hits, self.misses = capacity, 0, 0
        self._entries: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # oldest use first

    @staticmethod
    def key_of(image: np.ndarray) -> str:
        """The content key of an image: sha256 over its dtype, shape and bytes (equal pixels, equal key)."""
        image = np.ascontiguousarray(image)
        digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
        digest.update(image.data)
        return digest.hexdigest()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The entry for `key` (marked most recently used), or None; counts a hit or a miss."""
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
        self._entries[key] = frozen
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Whether `key` is cached (neither counted nor marked as used)."""
        return key in self._entries
