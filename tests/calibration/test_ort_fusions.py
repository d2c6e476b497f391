"""ONNX Runtime fusions of the weight-only target (calibration/ort_fusions.py): the fused decoder graph gives every
output of the exported one, on every family's rotary layout (full, GPT-NeoX's partial) and leaves ALiBi alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flamingo_edge.calibration.ort_fusions import fuse_rotary
from flamingo_edge.tolerances import LOGITS_REL_TOL


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def _feeds(session, rng, vocab: int):
    """A prefill with left padding (P = 0), a decode step after 7 slots of which the first 2 are padding, and a
    3-token prefill after a 4-token prefix: batches of 2."""
    for batch, new, past, pad in ((2, 6, 0, 2), (2, 1, 7, 2), (2, 3, 4, 1)):
        dims = {"B": batch, "S": new, "P": past, "M": 2}
        feed = {}
        for value in session.get_inputs():
            shape = [d if isinstance(d, int) else eval(d.replace("M*L", "M*3"), {}, dims) for d in value.shape]
            if value.name == "input_ids":
                feed[value.name] = rng.integers(0, vocab, shape)
            elif value.name == "attention_mask":
                mask = np.ones(shape, np.int64)
                mask[0, :pad] = 0  # row 0 is left-padded
                feed[value.name] = mask
            elif value.type == "tensor(int64)":
                feed[value.name] = rng.integers(0, 2, shape)
            else:
                feed[value.name] = rng.standard_normal(shape).astype(np.float32)
        yield feed


def _check_fused_graph_matches(export, rng, expected_fused: int):
    source = export / "decoder.onnx"
    config = json.loads((export / "export.json").read_text())["config"]["decoder"]
    model = onnx.load(str(source))
    assert fuse_rotary(model, config["max_positions"]) == expected_fused
    ops = {node.op_type for node in model.graph.node}
    assert ("RotaryEmbedding" in ops) == bool(expected_fused)
    if expected_fused:
        assert not ops & {"Cos", "Sin"}  # the per-step cos/sin subgraph went with the rotations
    exported = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in exported.get_outputs()]
    assert [o.name for o in fused.get_outputs()] == names  # the same contract
    for feed in _feeds(exported, rng, config["vocab_size"]):
        for name, want, got in zip(names, exported.run(names, feed), fused.run(names, feed)):
            scale = max(np.abs(want).max(), 1.0)
            assert np.abs(got - want).max() <= LOGITS_REL_TOL * scale, (name, np.abs(got - want).max(), scale)


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
