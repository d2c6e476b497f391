"""Greedy generation with the PyTorch reference and its KV cache equals transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import as_pil, make_prompts
from flamingo_edge.models import load_checkpoint
from flamingo_edge.models.generate import greedy_generate
from flamingo_edge.runtime.processor import Processor

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")


def test_cached_greedy_generation_equals_transformers(idefics_checkpoint, seed):
    prompts = make_prompts("batch_of_two_with_padding", np.random.default_rng([seed, 3]))
    upstream = transformers.IdeficsForVisionText2Text.from_pretrained(idefics_checkpoint).eval()
    batch = transformers.AutoProcessor.from_pretrained(idefics_checkpoint)(text=as_pil(prompts), return_tensors="pt")
    with torch.no_grad():
        expected = upstream.generate(**batch, max_new_tokens=15, do_sample=False)[:, batch["input_ids"].shape[1]:]
    config = upstream.config
    actual = greedy_generate(load_checkpoint(idefics_checkpoint), Processor.from_pretrained(idefics_checkpoint)(prompts),
                             max_new_tokens=15, stop_token_ids=[config.eos_token_id], pad_token_id=config.pad_token_id)
    np.testing.assert_array_equal(actual[:, : expected.shape[1]], expected.numpy())
