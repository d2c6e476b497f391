"""ONNX Runtime fusions of the weight-only target (calibration/ort_fusions.py): the fused decoder graph gives every
output of the exported one, on every family's rotary layout (full, GPT-NeoX's partial) and leaves ALiBi alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flamingo_edge.calibration.ort_fusions import fuse_rotary
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.graphs import build_graphs, example_feed
from flamingo_edge.tolerances import LOGITS_REL_TOL


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def _feeds(config, rng):
    """Contract feeds (graphs.example_feed: every row but the first left-padded over the first third of its slots):
    a prefill (P = 0), a decode step after 7 slots, and a 3-token prompt after a 4-token prefix; batches of 2."""
    spec = build_graphs(config)["decoder"]
    for batch, new, past in ((2, 6, 0), (2, 1, 7), (2, 3, 4)):
        sizes = {"B": batch, "S": new, "P": past, "M": 2, "L": config.visual_tokens_per_image}
        yield example_feed(spec, sizes, rng=rng, vocab_size=config.decoder.vocab_size)


def _check_fused_graph_matches(export, rng, expected_fused: int):
    source = export / "decoder.onnx"
    config = FlamingoConfig.from_dict(json.loads((export / "export.json").read_text())["config"])
    model = onnx.load(str(source))
    assert fuse_rotary(model, config.decoder.max_positions) == expected_fused
    ops = {node.op_type for node in model.graph.node}
    assert ("RotaryEmbedding" in ops) == bool(expected_fused)
    if expected_fused:
        assert not ops & {"Cos", "Sin"}  # the per-step cos/sin subgraph went with the rotations
    exported = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in exported.get_outputs()]
    assert [o.name for o in fused.get_outputs()] == names  # the same contract
    for feed in _feeds(config, rng):
        for name, want, got in zip(names, exported.run(names, feed), fused.run(names, feed)):
            _real_positions_match(name, want, got, feed["attention_mask"])


def test_rotary_fusion_keeps_every_output_of_idefics(idefics_export, rng):
    layers = json.loads((idefics_export / "export.json").read_text())["config"]["decoder"]["layers"]
    _check_fused_graph_matches(idefics_export, rng, 2 * layers)  # the queries and keys of every layer


@pytest.mark.parametrize("family, rotary", [("llama", True), ("gpt_neox", True), ("mpt", False)])
def test_rotary_fusion_on_openflamingo_families(openflamingo_export, rng, family, rotary):
    """llama: full rotary; gpt_neox: rotary_pct 0.25 (the first quarter of each head turns); mpt: ALiBi, nothing to
    fuse."""
    _, export = openflamingo_export(family)
    layers = json.loads((export / "export.json").read_text())["config"]["decoder"]["layers"]
    _check_fused_graph_matches(export, rng, 2 * layers if rotary else 0)


def _real_positions_match(name, want, got, mask):
    """Outputs at the new tokens that are real (a padding position's output is never read)."""
    real = mask[:, -want.shape[1 if name == "logits" else 2]:].astype(bool)  # [B, S]
    if name != "logits":
        want, got = want.transpose(0, 2, 1, 3), got.transpose(0, 2, 1, 3)  # [B, S, H, Dh]
    scale = max(np.abs(want[real]).max(), 1.0)
    assert np.abs(got[real] - want[real]).max() <= LOGITS_REL_TOL * scale, (name, np.abs(got[real] - want[real]).max())


def test_attention_in_place_gives_the_exported_outputs_of_idefics(idefics_export, rng):
    _check_in_place(idefics_export, rng, fused=True)


@pytest.mark.parametrize("family, fused", [("llama", True), ("gpt_neox", False), ("mpt", False)])
def test_attention_in_place_on_openflamingo_families(openflamingo_export, rng, family, fused):
    _check_in_place(openflamingo_export(family)[1], rng, fused=fused)


def _check_in_place(export, rng, *, fused: bool):
    """GroupQueryAttention over the cache in place (fuse_attention), run by the ONNX Runtime session on contract
    feeds made without a cache: the exported graph's logits and new K/V at every real position, for a left-padded
    prefill, a decode step after a padded past and a prompt after a cached prefix. Partial rotary (gpt_neox) and
    ALiBi (mpt) are left as exported."""
    from flamingo_edge.calibration.ort_fusions import fuse_attention, fuse_cross_attention
    from flamingo_edge.errors import GraphContractError
    from flamingo_edge.runtime.onnxruntime_backend import OnnxRuntimeSession

    record = json.loads((export / "export.json").read_text())
    config = FlamingoConfig.from_dict(record["config"])
    model = onnx.load(str(export / "decoder.onnx"))
    fuse_rotary(model, config.decoder.max_positions)
    assert fuse_attention(model) == (config.decoder.layers if fused else 0)
    # every family's gated blocks, unless they normalize the queries (IDEFICS' qk_layer_norms)
    assert fuse_cross_attention(model) == (0 if config.decoder.cross_qk_norms else len(config.decoder.cross_layers))
    if not fused:
        return
    path = export.parent / "decoder-in-place.onnx"
    onnx.save(model, str(path))
    spec = build_graphs(config)["decoder"]
    session = OnnxRuntimeSession(path, spec, device="cpu")
    assert session.in_place
    exported = ort.InferenceSession(str(export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = list(_feeds(config, rng))
    feeds[2] = {name: value[:1] for name, value in feeds[2].items()}  # a prompt after a prefix: one row
    for feed in feeds:
        want = dict(zip(spec.output_names, exported.run(spec.output_names, feed)))
        got = session.run(feed)
        for name in spec.output_names:
            _real_positions_match(name, want[name], got[name], feed["attention_mask"])
    two_rows_after_a_prefix = list(_feeds(config, rng))[2]
    with pytest.raises(GraphContractError, match="one row at a time"):
        session.run(two_rows_after_a_prefix)


def test_int4_pipeline_with_the_cache_written_in_place_generates_the_same_tokens(idefics_export, tmp_path, seed):
    """quantize's default ONNX Runtime int4 export (rotary and attention fused, the cache written in place by the
    graph) against the same weights with --no-fusions, both with float32 compute: the same greedy tokens for a
    left-padded batch, a prompt whose prefix is cached, and fixed-shape decode steps."""
    from conftest import make_prompts
    from flamingo_edge.calibration.quantize import quantize_export
    from flamingo_edge.runtime.pipeline import Pipeline

    exports = {fusions: quantize_export(idefics_export, tmp_path / f"int4-{fusions}", "int4", accuracy_level=0,
                                        fusions=fusions) for fusions in (True, False)}
    record = json.loads((exports[True] / "export.json").read_text())["quantization"]
    decoder = record["weights"]["decoder"]
    assert decoder["fused_attention"] == decoder["fused_rotary"] // 2 > 0
    rng = np.random.default_rng(seed)
    batch = make_prompts("batch_of_two_with_padding", rng)
    shots = make_prompts("two_images", rng)[0]
    queries = [[rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "what colour is it"] for _ in range(2)]
    tokens = {}
    for fusions, export in exports.items():
        with Pipeline.open(export) as pipeline:
            assert pipeline.sessions["decoder"].in_place == fusions
            runs = [pipeline.complete(batch, max_new_tokens=10, stop_token_ids=[]),
                    *(pipeline.complete([shots + query], max_new_tokens=8, stop_token_ids=[]) for query in queries)]
            # the second query ran after the preamble's K/V from the first: several tokens after a cached past
            assert pipeline.prefix_cache.hits == 1
            tokens[fusions] = [[c.token_ids for c in run] for run in runs]
            context = pipeline.processor.tokenize(batch).input_ids.shape[1] + 10 + 3
        with Pipeline.open(export, static_decode=True, max_context=context) as fixed:
            tokens[fusions].append([c.token_ids for c in fixed.complete(batch, max_new_tokens=10,
                                                                        stop_token_ids=[])])
    assert tokens[True] == tokens[False]
