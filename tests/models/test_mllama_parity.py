"""The whole mllama model (load_checkpoint of a Llama 3.2 Vision save_pretrained folder) against transformers'
`MllamaForConditionalGeneration`: tiny config, random weights, non-zero gates, inputs from transformers' own
`MllamaProcessor` (so nothing of ours prepares them). Cases: one image with text before it, two images of different
aspect ratios (different tile counts), and a left-padded batch of two whose rows have different image counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flamingo_edge.errors import CheckpointError
from flamingo_edge.models import load_checkpoint
from flamingo_edge.models.generate import greedy_generate
from flamingo_edge.tolerances import LOGITS_REL_TOL

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")
from flamingo_edge.models.random_mllama import save_random_mllama  # noqa: E402
from PIL import Image  # noqa: E402

# (text, image sizes (height, width)): tile counts 1, 2 (1x2) and 4 (2x2) at the 28-px tile
CASES = {
    "text_before_the_image": [("A photo: <|image|> What is in it?", [(20, 24)])],
    "two_images_of_different_shapes": [("<|image|><|image|>Compare the two pictures.", [(30, 60), (50, 55)])],
    "left_padded_batch": [("<|image|>Describe it.", [(40, 80)]),
                          ("Two views <|image|> and <|image|>, which is larger?", [(56, 56), (20, 30)])],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_mllama(tmp_path_factory.mktemp("mllama") / "checkpoint", preset="tiny", seed=11)


def _inputs(processor, case: str, rng) -> dict:
    texts = [text for text, _ in CASES[case]]
    images = [[Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in sizes]
              for _, sizes in CASES[case]]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _ours(batch) -> dict[str, np.ndarray]:
    """transformers' inputs as our model takes them: one image slot per tile."""
    mask = batch["cross_attention_mask"]
    return {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy(),
            "pixel_values": batch["pixel_values"].numpy(), "aspect_ratio_ids": batch["aspect_ratio_ids"].numpy(),
            "aspect_ratio_mask": batch["aspect_ratio_mask"].numpy(),
            "image_attention_mask": mask.reshape(*mask.shape[:2], -1).numpy()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_equal_transformers(checkpoint, case, seed):
    upstream = transformers.MllamaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = transformers.MllamaProcessor.from_pretrained(checkpoint)
    batch = _inputs(processor, case, np.random.default_rng([seed, len(case)]))
    tiles = batch["aspect_ratio_mask"].sum(-1)
    if case == "two_images_of_different_shapes":
        assert tiles[0, 0] != tiles[0, 1], "the two images must have different tile counts"
    ours = load_checkpoint(checkpoint)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate computes them for left padding
    with torch.no_grad():
        expected = upstream(**batch, position_ids=positions).logits  # [B, S, V]
        inputs = {k: torch.from_numpy(v) for k, v in _ours(batch).items()}
        actual = ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                      inputs["image_attention_mask"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
        generated = upstream.generate(**batch, max_new_tokens=12, do_sample=False)[:, mask.shape[1]:]
    real = mask.bool()
    scale = expected[real].abs().max().item()
    assert scale > 1.0, "weights too small for a meaningful comparison"
    assert (actual[real] - expected[real]).abs().max().item() <= LOGITS_REL_TOL * scale
    assert (~(batch["cross_attention_mask"].sum((2, 3)).bool()) & real).any() or case == "two_images_of_different_shapes"
    config = upstream.config.text_config
    tokens = greedy_generate(ours, _ours(batch), max_new_tokens=12, stop_token_ids=[config.eos_token_id],
                             pad_token_id=config.pad_token_id)
    np.testing.assert_array_equal(tokens[:, : generated.shape[1]], generated.numpy())


def test_a_checkpoint_whose_weights_disagree_with_its_config_is_refused(checkpoint, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \(96, 64\), expected \(80, 64\)"):
        load_checkpoint(broken)


def test_a_text_only_prompt_equals_transformers_without_images(checkpoint):
    """transformers skips the cross-attention layers when no image is given; our reference, fed the processor's one
    padding slot, gives the same logits and tokens (a batch with no image gets zero cross K/V)."""
    from flamingo_edge.runtime.processor import Processor

    upstream = transformers.MllamaForConditionalGeneration.from_pretrained(checkpoint).eval()
    batch = transformers.MllamaProcessor.from_pretrained(checkpoint)(text=["Describe a cat."], return_tensors="pt")
    ours = Processor.from_pretrained(checkpoint)([["Describe a cat."]])
    np.testing.assert_array_equal(ours["input_ids"], batch["input_ids"].numpy())
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = upstream(**batch).logits
        generated = upstream.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
        actual = model(*(torch.from_numpy(ours[k]) for k in ("input_ids", "attention_mask", "pixel_values",
                                                             "image_attention_mask", "aspect_ratio_ids",
                                                             "aspect_ratio_mask")))
    assert (actual - expected).abs().max().item() <= LOGITS_REL_TOL * expected.abs().max().item()
    config = upstream.config.text_config
    tokens = greedy_generate(model, ours, max_new_tokens=8, stop_token_ids=[config.eos_token_id],
                             pad_token_id=config.pad_token_id)
    np.testing.assert_array_equal(tokens[:, : generated.shape[1]], generated.numpy())
