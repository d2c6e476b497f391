"""`flamingo-edge quantize`: fp16 and int8 (Q/DQ) exports of the demo checkpoint that the pipeline, eval and compare
accept; their accuracy against fp32 on ONNX Runtime CPU (the calibration issue's acceptance); bad input."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from flamingo_edge.artifacts import read_export_record, sha256_of
from flamingo_edge.cli.main import main
from flamingo_edge.models.checkpoint import DEMO_OVERRIDE
from flamingo_edge.tolerances import FP16_TOP1_AGREEMENT, INT8_TASK_METRIC_DROP


@pytest.fixture(autouse=True)
def bundled_demo(monkeypatch):
    monkeypatch.delenv(DEMO_OVERRIDE, raising=False)


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def eval_json(export, capsys, n=500) -> dict:
    assert main(["eval", str(export), "--n", str(n), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fp16_export_keeps_top1_agreement(demo_export, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(out)]) == 0
    record = read_export_record(out)
    assert record.precision == "fp16" and record.quantization["graphs"] == ["vision", "resampler", "xattn_kv",
                                                                             "decoder"]
    model = onnx.load(str(out / "decoder.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in model.graph.input)  # contract dtypes
    report_path = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["compare", "demo", str(out), "--task-n", "0", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["precision"] == "fp16" and report["end_to_end"]["top1_agreement"] >= FP16_TOP1_AGREEMENT
    assert report["tolerance"]["top1_agreement"] == FP16_TOP1_AGREEMENT


@pytest.mark.slow
def test_int8_qdq_export_keeps_task_accuracy_on_500_scenes(demo_export, demo_calibration, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(demo_export), "--precision", "int8", "--calibration", str(demo_calibration),
                 "--method", "minmax", "-o", str(out)]) == 0
    record = read_export_record(out)
    assert record.precision == "int8" and record.quantization["calibration_images"] == 24
    for graph in ("vision", "resampler", "xattn_kv"):
        assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(out / f"{graph}.onnx"), graph
    assert sha256_of(out / "decoder.onnx") == sha256_of(demo_export / "decoder.onnx")  # not asked for: copied
    capsys.readouterr()
    fp32, int8 = eval_json(demo_export, capsys), eval_json(out, capsys)
    for metric in ("answer_accuracy", "caption_accuracy"):
        assert int8[metric] >= fp32[metric] - INT8_TASK_METRIC_DROP, (metric, fp32, int8)
    assert main(["compare", "demo", str(out), "--task-n", "50"]) == 0
    assert f"int8 export; judged on: task metric drop {INT8_TASK_METRIC_DROP}" in capsys.readouterr().out


def test_bad_quantize_input_exits_2_and_leaves_nothing(demo_export, demo_calibration, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(demo_export), "--precision", "int8", "-o", str(out)]) == 2
    assert "int8 needs --calibration" in capsys.readouterr().err
    other = tmp_path / "other"  # the same graphs re-saved: another export as far as the hashes go
    shutil.copytree(demo_export, other)
    model = onnx.load(str(other / "vision.onnx"))
    model.producer_name = "someone else"
    onnx.save(model, str(other / "vision.onnx"))
    record = json.loads((other / "export.json").read_text())
    record["graphs"]["vision"]["sha256"] = sha256_of(other / "vision.onnx")
    (other / "export.json").write_text(json.dumps(record))
    assert main(["quantize", str(other), "--precision", "int8", "--calibration", str(demo_calibration), "-o",
                 str(out)]) == 2
    assert "was recorded on another export" in capsys.readouterr().err
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(out)]) == 0
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(out), "--precision", "fp16", "-o", str(tmp_path / "twice")]) == 2
    assert "already fp16" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.partial-*"))


@pytest.mark.slow
def test_eval_compare_and_bench_side_by_side(demo_export, demo_calibration, tmp_path, capsys):
    fp16, int8 = tmp_path / "fp16", tmp_path / "int8"
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(fp16)]) == 0
    assert main(["quantize", str(demo_export), "--precision", "int8", "--calibration", str(demo_calibration),
                 "-o", str(int8)]) == 0
    capsys.readouterr()
    assert main(["eval", str(demo_export), str(fp16), str(int8), "--n", "20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["precision"] for row in rows] == ["fp32", "fp16", "int8"] and all(row["n"] == 20 for row in rows)
    report_path = tmp_path / "compare.json"
    assert main(["compare", "demo", str(demo_export), str(fp16), str(int8), "--task-n", "10",
                 "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "side by side" in out and all(f"\n{p} " in out for p in ("fp32", "fp16", "int8"))
    reports = json.loads(report_path.read_text())["reports"]
    assert [r["precision"] for r in reports] == ["fp32", "fp16", "int8"]
    assert reports[0]["graphs"]["vision"]["max_rel"] < reports[2]["graphs"]["vision"]["max_rel"]  # int8 is coarser
    assert main(["compare", "demo", str(demo_export), str(fp16), "--plot", str(tmp_path / "x.png")]) == 2
    bench_path = tmp_path / "bench.json"
    assert main(["bench", str(int8), "--baseline", str(demo_export), "--runs", "1", "--new-tokens", "4",
                 "--prompt-tokens", "8", "--json", str(bench_path)]) == 0
    bench = json.loads(bench_path.read_text())
    assert bench["precision"] == "int8" and bench["baseline_precision"] == "fp32"
    assert set(bench["speedup_vs_baseline"]) == {"decode", "ttft"}


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(demo_export, demo_calibration, tmp_path, capsys, method):
    out = tmp_path / method
    assert main(["quantize", str(demo_export), "--precision", "int8", "--calibration", str(demo_calibration),
                 "--method", method, "-o", str(out)]) == 0
    assert read_export_record(out).quantization["method"] == method
    assert "QuantizeLinear" in op_types(out / "vision.onnx")
    capsys.readouterr()
    fp32, int8 = eval_json(demo_export, capsys, n=100), eval_json(out, capsys, n=100)
    assert int8["answer_accuracy"] >= fp32["answer_accuracy"] - INT8_TASK_METRIC_DROP
    assert int8["caption_accuracy"] >= fp32["caption_accuracy"] - INT8_TASK_METRIC_DROP
