"""Invariants of our model that the graph contract relies on: caches, per-image cross K/V, gating, frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flamingo_edge.models import FlamingoModel, load_checkpoint
from flamingo_edge.models.decoder import append_kv
from flamingo_edge.models.flamingo import images_to_rows
from flamingo_edge.tolerances import LOGITS_REL_TOL, relative_error


@pytest.fixture(scope="module")
def model(idefics_checkpoint) -> FlamingoModel:
    return load_checkpoint(idefics_checkpoint)


def _random_inputs(model: FlamingoModel, rng, *, batch=2, length=12, images=2):
    config = model.config
    size = config.vision.image_size
    ids = torch.as_tensor(rng.integers(3, config.decoder.vocab_size, size=(batch, length)))
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, :3] = 0  # left padding on the second row
    # Image m is "most recent" from position 2 + 4m on; the first two tokens see no image.
    image_mask = torch.zeros(batch, length, images, dtype=torch.int64)
    for m in range(images):
        image_mask[:, 2 + 4 * m :, :] = 0
        image_mask[:, 2 + 4 * m :, m] = 1
    pixels = torch.as_tensor(rng.standard_normal((batch, images, 3, size, size)), dtype=torch.float32)
    return ids, mask, pixels, image_mask


def test_prefill_then_stepwise_decode_equals_full_forward(model, seed):
    """The self-attention cache: prefill k tokens, then one token at a time with past K/V, equals one full pass."""
    ids, mask, pixels, image_mask = _random_inputs(model, np.random.default_rng(seed))
    with torch.no_grad():
        full = model(ids, mask, pixels, image_mask)
        keys, values = model.cross_attention_kv(model.encode_images(pixels.flatten(0, 1)))
        keys = [images_to_rows(k, ids.shape[0]) for k in keys]
        values = [images_to_rows(v, ids.shape[0]) for v in values]
        past_k, past_v = model.decoder.empty_cache(ids.shape[0])
        prefill = 5
        steps, past_k, past_v = model.decoder(
            ids[:, :prefill], mask[:, :prefill], past_k, past_v, keys, values, image_mask[:, :prefill]
        )
        pieces = [steps]
        for t in range(prefill, ids.shape[1]):
            step, new_k, new_v = model.decoder(
                ids[:, t : t + 1], mask[:, : t + 1], past_k, past_v, keys, values, image_mask[:, t : t + 1]
            )
            past_k, past_v = append_kv(past_k, new_k), append_kv(past_v, new_v)
            pieces.append(step)
    stepwise = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert past_k[0].shape[2] == ids.shape[1]
    assert relative_error(stepwise[real], full[real]) <= LOGITS_REL_TOL


def test_cross_kv_per_image_is_reusable(model, seed):
    """K/V of an image do not depend on the other images or the batch: computing them once per image is exact."""
    ids, mask, pixels, image_mask = _random_inputs(model, np.random.default_rng(seed))
    with torch.no_grad():
        together, _ = model.cross_attention_kv(model.encode_images(pixels.flatten(0, 1)))
        alone, _ = model.cross_attention_kv(model.encode_images(pixels[1, 1:2]))
    for block_together, block_alone in zip(together, alone):
        torch.testing.assert_close(block_together[3:4], block_alone, rtol=1e-5, atol=1e-6)


def test_rows_without_image_get_exactly_zero_cross_attention(model, seed):
    block = model.decoder.cross_blocks[0]
    rng = torch.Generator().manual_seed(seed)
    config = model.config.decoder
    hidden = torch.randn(2, 4, config.width, generator=rng)
    shape = (2, config.cross_heads, 3 * 5, config.cross_head_dim)
    image_mask = torch.zeros(2, 4, 3, dtype=torch.int64)
    image_mask[0, 2:, 1] = 1  # only row 0, positions 2 and 3, see an image
    with torch.no_grad():
        first = block(hidden, torch.randn(shape, generator=rng), torch.randn(shape, generator=rng), image_mask)
        second = block(hidden, torch.randn(shape, generator=rng), torch.randn(shape, generator=rng), image_mask)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0, :2], second[0, :2])
    assert not torch.allclose(first[0, 2:], second[0, 2:])


def test_frame_embeddings_follow_open_flamingo(seed):
    """Frames: each frame's tokens get that frame's learned embedding, then all frames form one media context.

    Checked against transformers' IdeficsPerceiverResampler (the upstream resampler) fed that context, which is what
    open_flamingo's PerceiverResampler does with `frame_embs` (rearrange "b T F v d -> b T (F v) d").
    """
    transformers = pytest.importorskip("transformers")
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    from flamingo_edge.config import ResamplerConfig
    from flamingo_edge.models.importers.idefics import upstream_names
    from flamingo_edge.models.resampler import PerceiverResampler

    width, frames, tokens = 16, 3, 5
    config = ResamplerConfig(enabled=True, latents=4, depth=2, heads=2, head_dim=8, mlp_width=4 * width,
                             max_frames=4, qk_layer_norms=True)
    hf_config = transformers.IdeficsConfig(
        vision_config={"embed_dim": width},
        perceiver_config={"qk_layer_norms_perceiver": True},
    )
    upstream = IdeficsPerceiverResampler(hf_config, width, config.depth, config.heads, config.head_dim, config.latents)
    ours = PerceiverResampler(width=width, config=config)
    torch.manual_seed(seed)
    hf_state = {name: torch.randn_like(p) for name, p in upstream.state_dict().items()}
    upstream.load_state_dict(hf_state)
    prefix = "model.perceiver_resampler."
    for name, param in ours.named_parameters():
        if name == "frame_embeddings":
            param.data.normal_()
        else:
            param.data.copy_(hf_state[upstream_names(f"resampler.{name}")[0].removeprefix(prefix)])
    features = torch.randn(2, frames, tokens, width)
    with torch.no_grad():
        context = (features + ours.frame_embeddings[:frames, None]).reshape(2, frames * tokens, width)
        expected = upstream(context)
        actual = ours(features)
        without_frames = ours(features - ours.frame_embeddings[:frames, None])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(actual, without_frames)
