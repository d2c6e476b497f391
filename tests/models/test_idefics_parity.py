"""Our FlamingoModel, loaded from an IDEFICS save_pretrained folder, against transformers' IdeficsForVisionText2Text.

The checkpoints are the presets of `flamingo_edge.models.random_idefics` (random O(1) weights, random non-zero gates),
which together cover cross_layer_interval 1/2/3, qk_layer_norms on/off, alpha_type float/vector, resampler on/off
with different depths and latent counts, additional_vocab_size 0/2/3, and three image/patch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")
from conftest import PROMPT_CASES, make_prompts, upstream_inputs  # noqa: E402
from flamingo_edge.models import load_checkpoint  # noqa: E402
from flamingo_edge.tolerances import LOGITS_REL_TOL, relative_error  # noqa: E402

CASES = PROMPT_CASES


@pytest.fixture(scope="module")
def models(idefics_checkpoint):
    upstream = transformers.IdeficsForVisionText2Text.from_pretrained(idefics_checkpoint).eval()
    processor = transformers.AutoProcessor.from_pretrained(idefics_checkpoint)
    return upstream, load_checkpoint(idefics_checkpoint), processor


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(models, case, seed):
    upstream, ours, processor = models
    inputs = upstream_inputs(processor, make_prompts(case, np.random.default_rng([seed, len(case)])))
    with torch.no_grad():
        expected = upstream(**inputs).logits
        actual = ours(**inputs)
    real = inputs["attention_mask"].bool()  # padding positions are not defined by either model
    assert actual.shape == expected.shape
    error = relative_error(actual[real], expected[real])
    assert error <= LOGITS_REL_TOL, f"max abs error {error:.2e} x max|logit| > {LOGITS_REL_TOL}"


def test_images_reach_the_logits(models, seed):
    """The comparison above is not vacuous: pixels move the logits after the first image, and only there."""
    _, ours, processor = models
    inputs = upstream_inputs(processor, make_prompts("text_before_first_image", np.random.default_rng(seed)))
    first_image = int((inputs["image_attention_mask"][0].sum(-1) > 0).nonzero()[0])
    with torch.no_grad():
        logits = ours(**inputs)
        other = ours(**{**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])})
    assert torch.equal(logits[:, :first_image], other[:, :first_image])  # exactly: gated to zero, not just small
    assert (logits[:, first_image:] - other[:, first_image:]).abs().max() > 1e-3


def greedy_generate(model, inputs, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Greedy decoding with a full forward per step, mirroring transformers' generate for IDEFICS.

    New tokens keep the image mask of the prompt's last position, and rows that produced EOS continue with padding.
    """
    ids, mask, image_mask = inputs["input_ids"], inputs["attention_mask"], inputs["image_attention_mask"]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(ids, mask, inputs["pixel_values"], image_mask)
        token = logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        image_mask = torch.cat([image_mask, image_mask[:, -1:]], dim=1)
    return ids


def test_greedy_generation_matches_transformers(models, seed):
    upstream, ours, processor = models
    inputs = upstream_inputs(processor, make_prompts("batch_of_two_with_padding", np.random.default_rng(seed + 1)))
    config = upstream.config
    with torch.no_grad():
        expected = upstream.generate(**inputs, max_new_tokens=20, do_sample=False)
    actual = greedy_generate(
        ours, inputs, max_new_tokens=20, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    # transformers stops early once every row has produced EOS; up to there the sequences must be identical.
    prompt_length = inputs["input_ids"].shape[1]
    assert prompt_length < expected.shape[1] <= actual.shape[1] == prompt_length + 20
    if expected.shape[1] < actual.shape[1]:
        assert (expected[:, prompt_length:] == config.eos_token_id).any(dim=1).all()
    actual = actual[:, : expected.shape[1]]
    assert torch.equal(actual, expected), f"ours {actual[:, prompt_length:].tolist()} vs {expected[:, prompt_length:].tolist()}"
