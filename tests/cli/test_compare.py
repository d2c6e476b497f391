"""`flamingo-edge compare`: a correct export passes; a graph broken on purpose is named, with its first divergent
layer, and the command exits non-zero; the JSON report and the plot are written; bad input exits 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flamingo_edge.artifacts import sha256_of
from flamingo_edge.cli.main import main
from flamingo_edge.models.checkpoint import DEMO_OVERRIDE
from flamingo_edge.precision import Precision
from flamingo_edge.tolerances import INT8_TASK_METRIC_DROP, LOGITS_REL_TOL, WEIGHT_ONLY_TOP1_AGREEMENT


@pytest.fixture(autouse=True)
def bundled_demo(monkeypatch):
    monkeypatch.delenv(DEMO_OVERRIDE, raising=False)


def break_graph(export, tmp_path, graph: str, scope: str, seed: int):
    """A copy of the export whose `graph` has one weight read inside `scope` perturbed, with export.json updated to
    the new file's hash (a self-consistent but wrong export, as an exporter bug would make)."""
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    path = broken / f"{graph}.onnx"
    model = onnx.load(str(path))
    readers = {name for node in model.graph.node if node.name.startswith(scope) for name in node.input}
    weight = next(init for init in model.graph.initializer
                  if init.name in readers and init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) > 1)
    array = numpy_helper.to_array(weight)
    array = array + np.random.default_rng(seed).normal(0, float(np.abs(array).mean()), array.shape).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    record = json.loads((broken / "export.json").read_text())
    record["graphs"][graph]["sha256"] = sha256_of(path)
    (broken / "export.json").write_text(json.dumps(record))
    return broken


def test_correct_export_passes_with_json_and_plot(demo_export, tmp_path, capsys):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "errors.png"
    assert main(["compare", "demo", str(demo_export), "--task-n", "10", "--json", str(report_path),
                 "--plot", str(plot_path)]) == 0
    assert "PASS" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["failures"] == [] and report["version"] == 1
    assert set(report["graphs"]) == {"vision", "resampler", "xattn_kv", "decoder"}
    for name in ("vision", "resampler", "decoder"):
        assert report["graphs"][name]["layers"], name  # every repeated block was found in the graph and compared
    layers = [layer["name"] for layer in report["graphs"]["decoder"]["layers"]]
    assert layers == ["decoder.cross_blocks.0", "decoder.layers.0", "decoder.cross_blocks.1", "decoder.layers.1",
                      "decoder.cross_blocks.2", "decoder.layers.2"]
    assert "logits@decode" in report["graphs"]["decoder"]["outputs"]  # the decode step is compared too
    e2e = report["end_to_end"]
    assert e2e["top1_agreement"] == 1.0 and e2e["logits"]["max_rel"] <= LOGITS_REL_TOL and e2e["logits"]["cosine"] > 0.999999
    assert e2e["first_divergent_token"] == {"teacher_forced": None, "free_running": None}
    assert e2e["generated"]["reference"] == e2e["generated"]["backend"]
    assert report["task"]["reference"] == report["task"]["backend"]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("graph, layer", [("decoder", "decoder.layers.1"), ("vision", "vision.blocks.1"),
                                          ("resampler", "resampler.blocks.1")])
def test_a_broken_graph_is_named_with_its_first_divergent_layer(demo_export, tmp_path, capsys, seed, graph, layer):
    scope = "/" + layer.replace(".blocks.", "/blocks.").replace(".layers.", "/layers.") + "/"
    broken = break_graph(demo_export, tmp_path, graph, scope, seed)
    report_path = tmp_path / "report.json"
    assert main(["compare", "demo", str(broken), "--task-n", "0", "--json", str(report_path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: graph {graph}:" in out and f"first at layer {layer}" in out
    report = json.loads(report_path.read_text())
    assert not report["passed"]
    failing = [name for name, g in report["graphs"].items() if not g["passed"]]
    assert failing == [graph]  # each graph is fed the reference's inputs, so the error stays where it is made
    assert report["graphs"][graph]["first_divergent_layer"] == layer
    earlier = [l for l in report["graphs"][graph]["layers"]][: [l["name"] for l in
                                                                report["graphs"][graph]["layers"]].index(layer)]
    assert all(l["diff"]["max_rel"] <= LOGITS_REL_TOL for l in earlier)


def test_prompts_file_and_bad_input(demo_export, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<image>caption:\n\nquestion: how many <image> are there?\n")
    assert main(["compare", "demo", str(demo_export), "--prompts", str(prompts), "--task-n", "0"]) == 0
    assert main(["compare", "demo", str(demo_export), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "cannot read the prompts file" in capsys.readouterr().err
    assert main(["compare", "demo", str(demo_export), "--prompts", str(prompts), "--images",
                 str(tmp_path / "missing.png")]) == 2
    assert main(["compare", "demo", str(tmp_path)]) == 2  # not an export


def test_correct_idefics_exports_pass(idefics_checkpoint, idefics_export, capsys):
    assert main(["compare", str(idefics_checkpoint), str(idefics_export), "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "decoder.layers.0" in out and "demo task" not in out  # not the demo model: no task


def test_an_mllama_export_passes_and_a_broken_one_names_its_layer(mllama_export, tmp_path, capsys, seed):
    """Llama 3.2 Vision: every graph and layer against the PyTorch reference, the decoder's layers in the model's own
    order (cross-attention layers 1 and 3 in place of decoder layers); a perturbed weight in the tiled tower's second
    local block is found there."""
    checkpoint, export = mllama_export
    report_path = tmp_path / "report.json"
    assert main(["compare", str(checkpoint), str(export), "--new-tokens", "4", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    layers = [layer["name"] for layer in report["graphs"]["decoder"]["layers"]]
    assert layers == ["decoder.layers.0", "decoder.cross_blocks.0", "decoder.layers.1", "decoder.cross_blocks.1",
                      "decoder.layers.2"]
    assert report["end_to_end"]["top1_agreement"] == 1.0
    broken = break_graph(export, tmp_path, "vision", "/vision/local_blocks.1/", seed)
    assert main(["compare", str(checkpoint), str(broken), "--new-tokens", "2", "--json", str(report_path)]) == 1
    assert json.loads(report_path.read_text())["graphs"]["vision"]["first_divergent_layer"] == "vision.local_blocks.1"


def test_polygraphy_files_continue_in_polygraphy(demo_export, tmp_path):
    """The files load as Polygraphy data, and `polygraphy run` on the graph with them passes, as a user would run it."""
    import subprocess
    import sys
    from pathlib import Path

    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    out = tmp_path / "polygraphy"
    assert main(["compare", "demo", str(demo_export), "--task-n", "0", "--polygraphy", str(out)]) == 0
    feeds = load_json(str(out / "decoder_inputs.json"))
    results = RunResults.load(str(out / "decoder_outputs.json"))
    assert list(results.keys()) == ["pytorch", "onnxruntime"]
    assert len(feeds) == len(results["pytorch"]) == 2  # prefill and a decode step
    assert feeds[0]["past_key.0"].shape[2] == 0 and feeds[1]["input_ids"].shape[1] == 1
    for name in ("vision", "resampler", "xattn_kv"):
        assert (out / f"{name}_inputs.json").is_file() and (out / f"{name}_outputs.json").is_file()
    polygraphy = Path(sys.executable).parent / "polygraphy"
    result = subprocess.run([str(polygraphy), "run", str(demo_export / "vision.onnx"), "--onnxrt", "--load-inputs",
                             str(out / "vision_inputs.json"), "--load-outputs", str(out / "vision_outputs.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.fixture(scope="module")
def weight_only_exports(demo_export, tmp_path_factory):
    """The demo export with 4-bit and 8-bit weights (round to nearest, ONNX Runtime's MatMulNBits)."""
    from flamingo_edge.calibration.quantize import quantize_export

    root = tmp_path_factory.mktemp("weight-only")
    return {precision: quantize_export(demo_export, root / precision, precision)
            for precision in ("int4", "int8-weights")}


@pytest.mark.parametrize("precision", ["int4", "int8-weights"])
def test_weight_only_exports_are_judged_by_the_task_and_top1(weight_only_exports, tmp_path, capsys, precision):
    path = tmp_path / "report.json"
    assert main(["compare", "demo", str(weight_only_exports[precision]), "--task-n", "20", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert f"PASS ({precision} export; judged on: task metric drop 0.01, top1 agreement" in out
    report = json.loads(path.read_text())
    threshold = WEIGHT_ONLY_TOP1_AGREEMENT[Precision(precision)]
    assert report["precision"] == precision and report["tolerance"] == {
        "relative_error": LOGITS_REL_TOL, "task_metric_drop": INT8_TASK_METRIC_DROP, "top1_agreement": threshold}
    e2e = report["end_to_end"]
    assert e2e["top1_agreement"] >= threshold
    # the logits error is reported: above fp32's tolerance (the weights did change), well below a broken export's
    assert LOGITS_REL_TOL < e2e["logits"]["max_rel"] < 0.2 and e2e["logits"]["cosine"] > 0.99
    assert report["graphs"]["vision"]["passed"] and not report["graphs"]["decoder"]["passed"]  # reported, not judged
    assert "over the fp32 tolerance" in out and "FAIL" not in out
    reference, backend = report["task"]["reference"], report["task"]["backend"]
    for metric in ("answer_accuracy", "caption_accuracy"):
        assert reference[metric] - backend[metric] <= INT8_TASK_METRIC_DROP


def swap_nibbles(export, out):
    """A copy of the int4 export whose decoder's packed weights have their two 4-bit halves swapped: the encoding
    bug (a wrong nibble order) that still loads and runs, with export.json updated to the new file's hash."""
    shutil.copytree(export, out)
    path = out / "decoder.onnx"
    model = onnx.load(str(path))
    nbits = {node.input[1] for node in model.graph.node if node.op_type == "MatMulNBits"}
    for tensor in model.graph.initializer:
        if tensor.name in nbits:
            packed = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(((packed >> 4) | (packed << 4)).astype(np.uint8), tensor.name))
    assert nbits
    onnx.save(model, str(path))
    record = json.loads((out / "export.json").read_text())
    record["graphs"]["decoder"]["sha256"] = sha256_of(path)
    (out / "export.json").write_text(json.dumps(record))
    return out


def test_a_broken_int4_encoding_fails_on_top1_agreement(weight_only_exports, tmp_path, capsys):
    broken = swap_nibbles(weight_only_exports["int4"], tmp_path / "broken")
    path = tmp_path / "report.json"
    assert main(["compare", "demo", str(broken), "--task-n", "0", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    threshold = WEIGHT_ONLY_TOP1_AGREEMENT[Precision.INT4]
    assert "FAIL: end to end: top-1 agreement" in out and f"< {threshold}" in out
    report = json.loads(path.read_text())
    assert report["end_to_end"]["top1_agreement"] < threshold and report["tolerance"]["top1_agreement"] == threshold
