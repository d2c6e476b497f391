"""The self-attention cache against plain concatenation, its in-place static buffers and limits; the image cache's
content keys and LRU."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_edge.errors import GraphContractError, PromptTooLongError, UsageError
from flamingo_edge.graphs import cross_key, cross_value, new_key, new_value, past_key, past_value
from flamingo_edge.runtime.kv_cache import CrossAttentionCache, SelfAttentionCache

LAYERS, BATCH, HEADS, HEAD_DIM = 3, 2, 4, 5


def _cache(capacity: int) -> SelfAttentionCache:
    return SelfAttentionCache(layers=LAYERS, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, capacity=capacity)


def _decoder_outputs(new_kv):
    """What a decoder returns: the new tokens' K/V, [B, H, S, Dh] per layer."""
    outputs = {}
    for layer in range(LAYERS):
        outputs[new_key(layer)], outputs[new_value(layer)] = new_kv[layer]
    return outputs


def _new_kv(rng, tokens):
    shape = (BATCH, HEADS, tokens, HEAD_DIM)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
            for _ in range(LAYERS)]


def _ones(tokens):
    return np.ones((BATCH, tokens), np.int64)


def test_feed_and_update_equal_concatenation(seed):
    """Prefills see exactly the cached tokens; decode steps see the whole buffer, whose first P slots are the
    concatenation of everything written and whose unused slots are masked."""
    rng = np.random.default_rng(seed)
    chunks = [int(rng.integers(2, 6)), 1, 1, int(rng.integers(2, 4)), 1]  # a prefill, steps, a prefill, a step
    capacity = sum(chunks) + 2
    cache = _cache(capacity)
    history, masks = [], []  # every chunk's new K/V and mask, the reference
    for tokens in chunks:
        new_mask = _ones(tokens)
        if not history:
            new_mask[1, : tokens - 1] = 0  # left padding on the second row
        feed = cache.feed(new_mask)
        assert set(feed) == {"attention_mask"} | {name(layer) for layer in range(LAYERS) for name in (past_key, past_value)}
        past = cache.length
        expected_mask = np.concatenate([*masks, new_mask], axis=1)
        if tokens == 1:  # the whole buffer and the kept mask: unused slots masked, the new token last
            assert feed["attention_mask"].shape == (BATCH, capacity + 1)
            np.testing.assert_array_equal(feed["attention_mask"][:, :past], expected_mask[:, :past])
            assert not feed["attention_mask"][:, past:capacity].any()
            np.testing.assert_array_equal(feed["attention_mask"][:, capacity:], new_mask)
        else:
            np.testing.assert_array_equal(feed["attention_mask"], expected_mask)
        for layer in range(LAYERS):
            expected = [np.concatenate([kv[layer][i] for kv in history], axis=2) if history
                        else np.zeros((BATCH, HEADS, 0, HEAD_DIM), np.float32) for i in (0, 1)]
            fed = feed[past_key(layer)], feed[past_value(layer)]
            assert all(t.flags.c_contiguous and t.shape[2] == (capacity if tokens == 1 else past) for t in fed)
            np.testing.assert_array_equal(fed[0][:, :, :past], expected[0])
            np.testing.assert_array_equal(fed[1][:, :, :past], expected[1])
        new_kv = _new_kv(rng, tokens)
        cache.update(_decoder_outputs(new_kv), new_mask)
        history.append(new_kv)
        masks.append(new_mask)
        assert cache.length == sum(kv[0][0].shape[2] for kv in history)
    assert cache.length == sum(chunks)


def test_a_decode_step_copies_nothing_and_writes_one_slot(seed):
    """The host work of a step does not grow with the context: the fed arrays are the cache's own buffers (no copy),
    and an update writes the new token's slot and mask column only."""
    rng = np.random.default_rng(seed)
    cache = _cache(9)
    cache.update(_decoder_outputs(_new_kv(rng, 4)), _ones(4))
    feed = cache.feed(_ones(1))
    assert feed["attention_mask"] is cache.mask
    for layer in range(LAYERS):
        assert feed[past_key(layer)] is cache.keys[layer] and feed[past_value(layer)] is cache.values[layer]
    before = [buffer.copy() for buffer in (*cache.keys, *cache.values)]
    mask_before = cache.mask.copy()
    new_kv = _new_kv(rng, 1)
    cache.update(_decoder_outputs(new_kv), _ones(1))
    for buffer, old, written in zip((*cache.keys, *cache.values), before,
                                    [kv[0] for kv in new_kv] + [kv[1] for kv in new_kv]):
        np.testing.assert_array_equal(np.delete(buffer, 4, axis=2), np.delete(old, 4, axis=2))
        np.testing.assert_array_equal(buffer[:, :, 4:5], written)
    changed = np.argwhere(cache.mask != mask_before)
    assert set(changed[:, 1]) == {4}


def test_prefill_feeds_are_copies_the_caller_may_keep(seed):
    rng = np.random.default_rng(seed)
    cache = _cache(8)
    cache.update(_decoder_outputs(_new_kv(rng, 2)), _ones(2))
    kept = cache.feed(_ones(2))
    before = {name: value.copy() for name, value in kept.items()}
    kept[past_key(0)][...] = 0  # writing into a fed array does not touch the cache
    assert np.array_equal(cache.feed(_ones(2))[past_key(0)], before[past_key(0)])
    cache.reset()
    cache.update(_decoder_outputs(_new_kv(rng, 3)), _ones(3))  # overwrites the buffers
    np.testing.assert_array_equal(kept[past_value(1)], before[past_value(1)])


def test_reset_empties_the_cache(seed):
    cache = _cache(4)
    cache.update(_decoder_outputs(_new_kv(np.random.default_rng(seed), 3)), _ones(3))
    cache.reset()
    assert cache.length == 0 and not cache.mask.any()
    assert cache.feed(_ones(2))[past_value(2)].shape == (BATCH, HEADS, 0, HEAD_DIM)


def test_load_marks_the_prefix_in_use(seed):
    rng = np.random.default_rng(seed)
    cache = _cache(6)
    cache.update(_decoder_outputs(_new_kv(rng, 5)), _ones(5))
    prefix = _new_kv(rng, 3)
    cache.load([kv[0] for kv in prefix], [kv[1] for kv in prefix])
    mask = cache.feed(_ones(1))["attention_mask"]
    assert cache.length == 3 and mask[:, :3].all() and not mask[:, 3:6].any()
    np.testing.assert_array_equal(cache.keys[1][:, :, :3], prefix[1][0])


def test_whole_past_prefills_read_the_buffers_in_place(seed):
    """For a backend that mirrors the cache on its device: a prefill feeds the buffers themselves and a mask over all
    C slots (the unused ones 0) followed by the new tokens'."""
    rng = np.random.default_rng(seed)
    cache = _cache(7)
    cache.whole_past = True
    cache.update(_decoder_outputs(_new_kv(rng, 2)), _ones(2))
    new_mask = np.array([[0, 1, 1], [1, 1, 1]])
    feed = cache.feed(new_mask)
    assert all(feed[past_key(layer)] is cache.keys[layer] and feed[past_value(layer)] is cache.values[layer]
               for layer in range(LAYERS))
    expected = np.zeros((BATCH, 7 + 3), np.int64)
    expected[:, :2], expected[:, 7:] = 1, new_mask
    np.testing.assert_array_equal(feed["attention_mask"], expected)
    cache.update(_decoder_outputs(_new_kv(rng, 3)), new_mask)
    np.testing.assert_array_equal(cache.mask[:, :5], expected[:, [0, 1, 7, 8, 9]])


def test_the_epoch_changes_when_contents_change_other_than_by_update(seed):
    """What a device mirror keys on: (epoch, length) is the same only for the same contents."""
    rng = np.random.default_rng(seed)
    first, second = _cache(6), _cache(6)
    assert first.epoch != second.epoch
    epoch = first.epoch
    first.update(_decoder_outputs(_new_kv(rng, 2)), _ones(2))
    assert first.epoch == epoch  # update: the length says what was added
    prefix = _new_kv(rng, 2)
    first.load([kv[0] for kv in prefix], [kv[1] for kv in prefix])
    assert first.epoch != epoch and first.length == 2  # same length, other contents
    loaded = first.epoch
    first.reset()
    assert first.epoch not in (epoch, loaded, second.epoch)


def test_over_capacity_is_refused_before_anything_is_written(seed):
    rng = np.random.default_rng(seed)
    cache = _cache(5)
    cache.update(_decoder_outputs(_new_kv(rng, 4)), _ones(4))
    before = [buffer.copy() for buffer in (*cache.keys, *cache.values, cache.mask)]
    with pytest.raises(PromptTooLongError, match=r"needs 6 tokens \(4 cached \+ 2 new\) but holds 5; shorten"):
        cache.feed(_ones(2))
    with pytest.raises(PromptTooLongError, match=r"needs 6 tokens \(4 cached \+ 2 new\) but holds 5; shorten"):
        cache.update(_decoder_outputs(_new_kv(rng, 2)), _ones(2))
    assert cache.length == 4
    for buffer, old in zip((*cache.keys, *cache.values, cache.mask), before):
        np.testing.assert_array_equal(buffer, old)


def test_new_kv_of_the_wrong_shape_or_missing(seed):
    rng = np.random.default_rng(seed)
    cache = _cache(6)
    outputs = _decoder_outputs(_new_kv(rng, 2))
    with pytest.raises(GraphContractError, match=r"'new_key.0' has shape \(2, 4, 2, 5\); .*expects \(2, 4, 3, 5\)"):
        cache.update(outputs, _ones(3))  # says 3 new tokens, the decoder returned 2
    del outputs[new_value(LAYERS - 1)]
    with pytest.raises(GraphContractError, match=rf"'new_value.{LAYERS - 1}' has shape None"):
        cache.update(outputs, _ones(2))
    assert cache.length == 0  # nothing was stored by either call


def _image(rng, height=6, width=7):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_image_keys_follow_content(seed):
    rng = np.random.default_rng(seed)
    image = _image(rng)
    key = CrossAttentionCache.key_of(image)
    assert CrossAttentionCache.key_of(image.copy()) == key
    assert CrossAttentionCache.key_of(np.asfortranarray(image)) == key  # same pixels, another memory layout
    one_pixel = image.copy()
    one_pixel[3, 4, 1] ^= 1
    assert CrossAttentionCache.key_of(one_pixel) != key
    assert CrossAttentionCache.key_of(image.reshape(7, 6, 3)) != key  # same bytes, another shape
    assert CrossAttentionCache.key_of(image.view(np.int8)) != key  # same bytes, another dtype


def _entry(rng, blocks=2, heads=2, latents=3, head_dim=4):
    shape = (1, heads, latents, head_dim)  # [1, Hx, L, Dh]
    return {name(i): rng.standard_normal(shape, dtype=np.float32) for i in range(blocks)
            for name in (cross_key, cross_value)}


def test_image_cache_hits_misses_and_least_recently_used_eviction(seed):
    rng = np.random.default_rng(seed)
    cache = CrossAttentionCache(capacity=2)
    keys = [CrossAttentionCache.key_of(_image(rng)) for _ in range(3)]
    entries = [_entry(rng) for _ in keys]
    assert cache.get(keys[0]) is None and cache.misses == 1
    cache.put(keys[0], entries[0])
    cache.put(keys[1], entries[1])
    got = cache.get(keys[0])  # now keys[1] is the least recently used
    assert cache.hits == 1 and set(got) == set(entries[0])
    for name, value in got.items():
        np.testing.assert_array_equal(value, entries[0][name])
    cache.put(keys[2], entries[2])
    assert len(cache) == 2 and keys[1] not in cache and keys[0] in cache and keys[2] in cache
    assert cache.get(keys[1]) is None
    assert (cache.hits, cache.misses) == (1, 2)  # `in` counts nothing


def test_cached_entries_are_read_only(seed):
    rng = np.random.default_rng(seed)
    cache = CrossAttentionCache()
    cache.put("image", _entry(rng))
    with pytest.raises(ValueError, match="read-only"):
        cache.get("image")[cross_key(0)][0, 0, 0, 0] = 1.0


def test_image_cache_of_size_zero_keeps_nothing(seed):
    cache = CrossAttentionCache(capacity=0)
    cache.put("image", _entry(np.random.default_rng(seed)))
    assert len(cache) == 0 and cache.get("image") is None


def test_image_cache_refuses_bad_entries_and_capacity(seed):
    rng = np.random.default_rng(seed)
    two_images = {cross_key(0): rng.standard_normal((2, 2, 3, 4), dtype=np.float32)}
    with pytest.raises(GraphContractError, match=r"one image's xattn_kv outputs \[1, Hx, L, Dh\]; 'cross_key.0' has "
                                                 r"shape \(2, 2, 3, 4\)"):
        CrossAttentionCache().put("two", two_images)
    with pytest.raises(UsageError, match=r"capacity must be >= 0 \(0 = no cache\); got -1"):
        CrossAttentionCache(capacity=-1)


def test_the_image_cache_keeps_at_most_its_bytes():
    """An mllama 11B image is 0.4 GiB of K/V: the cache drops the least recently used beyond max_bytes as well as
    beyond its count, and does not keep an image larger than the whole bound."""
    entry = lambda fill: {"cross_key.0": np.full((1, 2, 4, 8), fill, np.float32)}  # noqa: E731  256 bytes
    cache = CrossAttentionCache(capacity=10, max_bytes=600)
    for key in "abc":
        cache.put(key, entry(1.0))
    assert len(cache) == 2 and "a" not in cache and cache.nbytes == 512
    cache.get("b")
    cache.put("d", entry(2.0))
    assert "b" in cache and "c" not in cache and "d" in cache
    cache.put("big", {"cross_key.0": np.zeros((1, 2, 40, 8), np.float32)})
    assert "big" not in cache and len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(UsageError, match="image cache size must be >= 0 bytes"):
        CrossAttentionCache(max_bytes=-1)
