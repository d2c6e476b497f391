"""A decoder with grouped-query attention and Llama 3.1's RoPE scaling (Llama 3's text model, mllama's) through
everything downstream of `models/`: the exported graphs' K/V cache has the key/value heads only, and the ONNX Runtime
pipeline (fp32, and int4 whose attention fusion leaves such layers as exported) gives the PyTorch reference's
logits and greedy tokens. (The decoder itself against transformers' LlamaForCausalLM:
tests/models/test_language_models_parity.py.)"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_prompts
from flamingo_edge.graphs import build_graphs, past_key
from flamingo_edge.models.checkpoint import OWN_MODEL_TYPE, load_checkpoint
from flamingo_edge.models.convert import WEIGHTS
from flamingo_edge.models.flamingo import FlamingoModel
from flamingo_edge.models.generate import greedy_generate
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import Processor
from flamingo_edge.tolerances import LOGITS_REL_TOL


@pytest.fixture(scope="module")
def gqa_checkpoint(idefics_checkpoint, tmp_path_factory, seed):
    """The IDEFICS test checkpoint made grouped-query (its query heads share K/V heads in pairs or threes) with
    Llama 3.1 RoPE scaling, random weights, saved in flamingo-edge's own checkpoint format."""
    from safetensors.torch import save_file

    base = load_checkpoint(idefics_checkpoint)
    text = base.config.decoder
    kv_heads = next(k for k in (text.heads // 3, text.heads // 2, 1) if k and text.heads % k == 0 and k < text.heads)
    decoder = dataclasses.replace(text, kv_heads=kv_heads, rope_type="llama3", rope_theta=500000.0, rope_factor=8.0,
                                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                                  rope_original_max_positions=16)
    config = dataclasses.replace(base.config, decoder=decoder)
    torch.manual_seed(seed)
    model = FlamingoModel(config=config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # O(1) logits: differences show
            parameter.copy_(torch.randn(parameter.shape) * (parameter.shape[-1] ** -0.5 if parameter.ndim > 1 else 0.1)
                            + (1.0 if name.endswith("norm.weight") else 0.0))
    folder = tmp_path_factory.mktemp("gqa") / "checkpoint"
    shutil.copytree(idefics_checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json"):
        if (idefics_checkpoint / name).is_file():
            shutil.copy2(idefics_checkpoint / name, folder / name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / "config.json").write_text(json.dumps({"model_type": OWN_MODEL_TYPE, "config": config.to_dict()}))
    return folder


def test_grouped_query_export_and_pipeline_match_the_reference(gqa_checkpoint, tmp_path, seed):
    from flamingo_edge.calibration.quantize import quantize_export
    from flamingo_edge.export.export import export_all

    model = load_checkpoint(gqa_checkpoint)
    text = model.config.decoder
    assert text.kv_head_count < text.heads
    export = tmp_path / "export"
    export_all(gqa_checkpoint, export, seed=seed)
    spec = build_graphs(model.config)["decoder"]
    assert spec.inputs[spec.input_names.index(past_key(0))].dims[1] == text.kv_head_count  # the cache: K/V heads
    rng = np.random.default_rng(seed)
    prompts = make_prompts("batch_of_two_with_padding", rng)
    processor = Processor.from_pretrained(gqa_checkpoint)
    inputs = processor(prompts)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    steps = 8
    tokens = greedy_generate(model, inputs, max_new_tokens=steps, stop_token_ids=[], pad_token_id=0)
    with Pipeline.open(export) as pipeline:
        logits = pipeline.logits(prompts)
        real = inputs["attention_mask"].astype(bool)
        scale = np.abs(expected[real]).max()
        assert np.abs(logits[real] - expected[real]).max() <= LOGITS_REL_TOL * scale
        got = [c.token_ids for c in pipeline.complete(prompts, max_new_tokens=steps, stop_token_ids=[])]
    assert got == tokens.tolist()
    # int4 for ONNX Runtime: GroupQueryAttention takes the grouped layers (kv_num_heads < num_heads) and writes the
    # cache in place; the same weights without the fusions give the same logits and tokens
    int4 = quantize_export(export, tmp_path / "int4", "int4", accuracy_level=0)
    plain = quantize_export(export, tmp_path / "int4-plain", "int4", accuracy_level=0, fusions=False)
    decoder = json.loads((int4 / "export.json").read_text())["quantization"]["weights"]["decoder"]
    assert decoder["fused_rotary"] > 0 and decoder["fused_attention"] == text.self_attention_layers
    with Pipeline.open(int4) as fused, Pipeline.open(plain) as unfused:
        logits, reference = fused.logits(prompts), unfused.logits(prompts)
        assert np.abs(logits[real] - reference[real]).max() <= LOGITS_REL_TOL * np.abs(reference[real]).max()
        settings = dict(max_new_tokens=steps, stop_token_ids=[])
        assert [c.token_ids for c in fused.complete(prompts, **settings)] == [
            c.token_ids for c in unfused.complete(prompts, **settings)]
