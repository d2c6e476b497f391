"""MllamaVision / MllamaProjector against transformers' MllamaForConditionalGeneration (tiny configs, random weights),
and the vision module through torch.onnx.export + ONNX Runtime with a dynamic image count."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flamingo_edge.errors import CheckpointError
from flamingo_edge.graphs import DEFAULT_OPSET
from flamingo_edge.config import TiledVisionConfig
from flamingo_edge.mllama_config import config_from_hf
from flamingo_edge.models.mllama_vision import UPSTREAM_PREFIXES, MllamaProjector, MllamaVision, load_from_transformers
from flamingo_edge.tolerances import LOGITS_REL_TOL, relative_error

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")

# Two tile sizes (P = 5 -> P8 = 8, P = 17 -> P8 = 24), local/global depths, kept layers in and out of order.
VISION_CONFIGS = {
    "28px": dict(image_size=28, num_hidden_layers=3, num_global_layers=1, intermediate_layers_indices=[0, 2]),
    "56px": dict(image_size=56, num_hidden_layers=2, num_global_layers=2, intermediate_layers_indices=[-1, 0, 0]),
}
SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
# aspect_ratio_id (1-based index into SUPPORTED_ASPECT_RATIOS) -> tiles: 1 tile, 1x2, 2x1, 2x2.
TILES_BY_ID = {1: 1, 2: 2, 5: 2, 6: 4}
TEXT_WIDTH = 48


def tiny_mllama(name: str, seed: int):
    """A MllamaForConditionalGeneration with every weight random and O(1), the tanh gates non-zero."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=32, attention_heads=4, intermediate_size=64, patch_size=14, max_num_tiles=4,
                  supported_aspect_ratios=SUPPORTED_ASPECT_RATIOS, **VISION_CONFIGS[name])
    vision["vision_output_dim"] = 32 * (1 + len(vision["intermediate_layers_indices"]))
    text = dict(hidden_size=TEXT_WIDTH, num_hidden_layers=2, cross_attention_layers=[1], num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, vocab_size=100, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    config = MllamaConfig(vision_config=vision, text_config=text)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.model.vision_model.named_parameters():
            if "gate" in key:  # upstream starts some gates at 0, which would hide the tile embeddings
                p.copy_(torch.empty_like(p).uniform_(0.3, 1.2, generator=generator))
            elif "embedding" in key and "patch" not in key:
                p.normal_(0.0, 1.0, generator=generator)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator) if "norm" in key and key.endswith(
                    "weight") else 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
        model.model.multi_modal_projector.weight.normal_(0.0, 0.2, generator=generator)
        model.model.multi_modal_projector.bias.normal_(0.0, 0.2, generator=generator)
    return model


def random_images(settings: TiledVisionConfig, ids: list[int], rng) -> tuple[torch.Tensor, ...]:
    """pixel_values [N, T, C, S, S] (padding tiles random too: real tokens attend to them upstream), ids [N],
    aspect_ratio_mask [N, T] with the first TILES_BY_ID[id] tiles set."""
    shape = (len(ids), settings.max_num_tiles, settings.num_channels, settings.image_size, settings.image_size)
    pixels = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    mask = torch.tensor([[int(t < TILES_BY_ID[i]) for t in range(settings.max_num_tiles)] for i in ids])
    return pixels, torch.tensor(ids, dtype=torch.int64), mask


def ours_from(model) -> tuple[MllamaVision, MllamaProjector]:
    settings = config_from_hf(model.config.to_dict()).vision
    vision, projector = MllamaVision(settings=settings).eval(), MllamaProjector(settings=settings).eval()
    state = model.state_dict()
    load_from_transformers(vision, state, prefix=UPSTREAM_PREFIXES["vision"])
    load_from_transformers(projector, state, prefix=UPSTREAM_PREFIXES["projector"])
    return vision, projector


@pytest.fixture(scope="module", params=sorted(VISION_CONFIGS))
def upstream(request, seed):
    return tiny_mllama(request.param, seed)


@torch.no_grad()
def test_vision_and_projector_match_transformers(upstream, seed):
    vision, projector = ours_from(upstream)
    s = vision.settings
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.permutation(sorted(TILES_BY_ID))]  # 1, 2 (both orientations) and 4 tiles
    pixels, ratio_ids, ratio_mask = random_images(s, ids, rng)
    # Upstream: 2 prompts of 2 images each, [B, M, T, ...]; ours: N = B*M images.
    batch = dict(pixel_values=pixels.reshape(2, 2, *pixels.shape[1:]), aspect_ratio_ids=ratio_ids.reshape(2, 2),
                 aspect_ratio_mask=ratio_mask.reshape(2, 2, -1))
    expected = upstream.model.vision_model(**batch).last_hidden_state  # [B, M, T, P, Dout]
    # MllamaModel.forward: project, reshape to [B*M*T, P, W]; the cross-attention reads it as [B, M*T*P, W].
    tokens = upstream.model.multi_modal_projector(expected).reshape(-1, expected.shape[-2], TEXT_WIDTH)
    tokens = tokens.reshape(2, -1, TEXT_WIDTH)

    features = vision(pixels, ratio_ids, ratio_mask)
    assert features.shape == (4, s.max_num_tiles, s.patches_per_tile, s.vision_output_dim)
    assert relative_error(features, expected.reshape(features.shape)) <= LOGITS_REL_TOL
    visual = projector(features)
    assert visual.shape == (4, s.max_num_tiles * s.patches_per_tile, TEXT_WIDTH)
    assert relative_error(visual.reshape(2, -1, TEXT_WIDTH), tokens) <= LOGITS_REL_TOL


@torch.no_grad()
def test_attention_a_few_heads_at_a_time_is_the_same(upstream, seed, monkeypatch, tmp_path):
    """With the scores' bound so low that one head runs at a time (as the 11B's 16 heads over 6432 tokens do), the
    tower equals transformers and exports: one Softmax per head and layer."""
    import flamingo_edge.config as config_module

    s = ours_from(upstream)[0].settings
    tokens = s.max_num_tiles * s.padded_patches_per_tile
    monkeypatch.setattr(config_module, "VISION_SCORES_BYTES", tokens * tokens * 4)
    assert s.heads_per_chunk() == 1
    vision = ours_from(upstream)[0]
    assert all(block.attn.chunk == 1 for block in [*vision.local_blocks, *vision.global_blocks])
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.permutation(sorted(TILES_BY_ID))]
    pixels, ratio_ids, ratio_mask = random_images(s, ids, rng)
    expected = upstream.model.vision_model(pixel_values=pixels[:, None], aspect_ratio_ids=ratio_ids[:, None],
                                           aspect_ratio_mask=ratio_mask[:, None]).last_hidden_state
    features = vision(pixels, ratio_ids, ratio_mask)
    assert relative_error(features, expected.reshape(features.shape)) <= LOGITS_REL_TOL
    path = tmp_path / "vision.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(vision, (pixels, ratio_ids, ratio_mask), str(path), opset_version=DEFAULT_OPSET,
                          dynamo=False)
    softmaxes = sum(node.op_type == "Softmax" for node in onnx.load(str(path)).graph.node)
    assert softmaxes == s.attention_heads * (s.num_hidden_layers + s.num_global_layers)


@torch.no_grad()
def test_vision_exports_with_dynamic_image_count(upstream, seed, tmp_path):
    vision, _ = ours_from(upstream)
    rng = np.random.default_rng(seed + 1)
    names = ["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"]
    path = tmp_path / "vision.onnx"
    with warnings.catch_warnings():  # the same exporter as export/export.py: TorchScript, DEFAULT_OPSET
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(vision, random_images(vision.settings, [6, 1], rng), str(path), input_names=names,
                          output_names=["image_features"], opset_version=DEFAULT_OPSET, dynamo=False,
                          dynamic_axes={name: {0: "N"} for name in [*names, "image_features"]})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert not ops & {"If", "Loop", "Einsum", "NonZero", "CumSum", "ScatterND"}, sorted(ops)

    inputs = random_images(vision.settings, [2, 5, 6, 1, 5], rng)  # another N than traced
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})
    assert relative_error(actual, vision(*inputs).numpy()) <= LOGITS_REL_TOL


def test_load_rejects_a_checkpoint_of_another_size(upstream):
    settings = config_from_hf(upstream.config.to_dict()).vision
    other = MllamaVision(settings=dataclasses.replace(settings, intermediate_size=40))
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.0\.mlp\.fc1\.weight' has shape \(64, 32\), "
                                              r"expected \(40, 32\) from config\.json; config\.json and the weights "
                                              r"disagree"):
        load_from_transformers(other, upstream.state_dict(), prefix=UPSTREAM_PREFIXES["vision"])


def test_config_rejects_an_inconsistent_output_width(upstream):
    data = upstream.config.to_dict()
    data["vision_config"]["vision_output_dim"] = 7680
    with pytest.raises(CheckpointError, match=r"vision_output_dim is 7680; hidden_size \* \(1 \+ "):
        config_from_hf(data)
