"""The four exported graphs: valid ONNX, no control flow, the contract's names, ONNX Runtime equal to PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from flamingo_edge.artifacts import read_export_record
from flamingo_edge.errors import ExportError, GraphContractError
from flamingo_edge.export.checks import check_graph
from flamingo_edge.export.export import CHECK_SIZES, export_all, verify_graph
from flamingo_edge.export.wrappers import WRAPPERS
from flamingo_edge.graphs import GRAPH_NAMES, build_graphs, example_feed
from flamingo_edge.models import FlamingoConfig, load_checkpoint
from flamingo_edge.tolerances import LOGITS_REL_TOL


@pytest.fixture(scope="module")
def exported(idefics_checkpoint, idefics_export):
    return idefics_checkpoint, idefics_export


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_follows_the_contract_and_matches_pytorch(exported, graph, seed):
    checkpoint, out = exported
    model = load_checkpoint(checkpoint)
    spec = build_graphs(model.config)[graph]
    path = out / f"{graph}.onnx"
    check_graph(path, spec)  # onnx.checker (full shape inference), no If/Loop/Scan, names/dtypes/ranks in order
    loaded = onnx.load(str(path))
    assert [i.name for i in loaded.graph.input] == spec.input_names
    assert [o.name for o in loaded.graph.output] == spec.output_names
    assert not {n.op_type for n in loaded.graph.node} & {"If", "Loop", "Scan", "Tanh", "CumSum", "Einsum"}
    rng = np.random.default_rng([seed, GRAPH_NAMES.index(graph)])
    sizes = [{**s, "L": model.config.visual_tokens_per_image} for s in CHECK_SIZES]
    feeds = [example_feed(spec, s, rng=rng, vocab_size=model.config.decoder.total_vocab_size) for s in sizes]
    worst = verify_graph(path, spec, WRAPPERS[graph](model).eval(), feeds)  # raises ParityError beyond the tolerance
    assert worst <= LOGITS_REL_TOL


def test_export_record(exported):
    checkpoint, out = exported
    record = read_export_record(out)
    assert set(record.graphs) == set(GRAPH_NAMES) and record.opset == 17
    assert "tokenizer.json" in record.tokenizer_files and (out / "tokenizer.json").is_file()
    assert FlamingoConfig.from_dict(record.config) == load_checkpoint(checkpoint).config


def test_modified_or_missing_graph_is_refused(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "resampler.onnx").write_bytes((copy / "resampler.onnx").read_bytes()[:-10])
    with pytest.raises(ExportError, match=r"resampler\.onnx: sha256 differs from export\.json"):
        read_export_record(copy)
    (copy / "resampler.onnx").unlink()
    with pytest.raises(ExportError, match=r"resampler\.onnx \(resampler graph\) is missing"):
        read_export_record(copy)
    (copy / "export.json").unlink()
    with pytest.raises(ExportError, match="no export.json; this is not a complete export"):
        read_export_record(copy)


def test_record_with_unknown_keys_is_refused(exported, tmp_path):
    _, out = exported
    data = json.loads((out / "export.json").read_text())
    (tmp_path / "export.json").write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(ExportError, match=r"unknown keys \['surprise'\]"):
        read_export_record(tmp_path)


def test_graph_that_breaks_the_contract_is_named(exported):
    checkpoint, out = exported
    specs = build_graphs(load_checkpoint(checkpoint).config)
    expected = r"vision: .*resampler\.onnx breaks the graph contract: input 'pixel_values' is missing"
    with pytest.raises(GraphContractError, match=expected):
        check_graph(out / "resampler.onnx", specs["vision"])


@pytest.mark.slow
def test_interrupted_export_leaves_nothing(idefics_checkpoint, tmp_path, monkeypatch):
    """Ctrl-C while the decoder is being checked: no folder at OUT, no temporary sibling."""
    import flamingo_edge.export.export as export_module

    real_check = export_module.check_graph

    def interrupt_on_decoder(path, spec):
        if spec.name == "decoder":
            raise KeyboardInterrupt
        return real_check(path, spec)

    monkeypatch.setattr(export_module, "check_graph", interrupt_on_decoder)
    with pytest.raises(KeyboardInterrupt):
        export_all(idefics_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the export is written under a temporary name, removed on the interrupt


def test_external_data(idefics_checkpoint, tmp_path):
    """Graphs over the threshold (2 GB by default) keep their weights in <graph>.onnx.data; forced here at 0."""
    out = tmp_path / "out"
    record = export_all(idefics_checkpoint, out, external_data_threshold=0)
    assert all(graph.data_file == f"{name}.onnx.data" for name, graph in record.graphs.items()
               if name != "resampler" or graph.data_file)
    assert (out / "decoder.onnx.data").stat().st_size > (out / "decoder.onnx").stat().st_size
    read_export_record(out)


def test_graph_whose_outputs_are_out_of_order_is_named(exported):
    import dataclasses

    checkpoint, out = exported
    spec = build_graphs(load_checkpoint(checkpoint).config)["xattn_kv"]
    swapped = dataclasses.replace(spec, outputs=(spec.outputs[1], spec.outputs[0], *spec.outputs[2:]))
    with pytest.raises(GraphContractError, match=r"xattn_kv: .*outputs are in the order \['cross_key\.0'"):
        check_graph(out / "xattn_kv.onnx", swapped)
