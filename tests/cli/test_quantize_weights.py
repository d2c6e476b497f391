"""`flamingo-edge quantize --precision int4|int8-weights`: weight-only block quantization of the language model.

The integers and scales against numpy, GPTQ against round-to-nearest, the two ONNX Runtime-runnable encodings
(MatMulNBits and block-quantized DequantizeLinear) against each other, the demo's task accuracy on 500 held-out
scenes against fp32 (the issue's acceptance), and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from flamingo_edge.artifacts import read_export_record
from flamingo_edge.calibration.weights import (find_embeddings, find_matmuls, gptq, matmulnbits_tensors,
                                               quantize_graph, rtn)
from flamingo_edge.cli.main import main
from flamingo_edge.models.checkpoint import DEMO_OVERRIDE
from flamingo_edge.tolerances import INT8_TASK_METRIC_DROP


@pytest.fixture(autouse=True)
def bundled_demo(monkeypatch):
    monkeypatch.delenv(DEMO_OVERRIDE, raising=False)


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_against_numpy(rng, bits):
    top = 2 ** (bits - 1) - 1
    k, n, block = 96, 40, 32  # three blocks per column
    q = rng.integers(-top, top + 1, (k, n))
    scales = rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32)
    q[::block] = top  # every block reaches qmax, so its scale is exactly max|W| / qmax
    weight = q * np.repeat(scales, block, axis=0)
    quantized = rtn(weight.astype(np.float32), bits, block)
    assert np.array_equal(quantized.q, q) and np.allclose(quantized.scales, scales, rtol=1e-6)
    assert quantized.q.min() >= -top and quantized.q.max() <= top  # symmetric: no zero point anywhere
    noisy = rng.standard_normal((k + 5, n)).astype(np.float32)  # K not a multiple of the block: the tail pads
    error = np.abs(rtn(noisy, bits, block).dequantize() - noisy)
    per_row_scale = np.repeat(rtn(noisy, bits, block).scales, block, axis=0)[: k + 5]
    assert np.all(error <= per_row_scale / 2 + 1e-6)  # round to nearest: at most half a step


def test_matmulnbits_packing_holds_the_integers(rng):
    weight = rng.standard_normal((64, 24)).astype(np.float32)
    quantized = rtn(weight, 4, 32)
    packed, scales = matmulnbits_tensors(quantized)
    assert packed.shape == (24, 2, 16) and scales.shape == (48,)
    low, high = packed & 0x0F, packed >> 4
    unpacked = np.stack([low, high], axis=-1).reshape(24, 64).T.astype(np.int16) - 8  # zero point 8
    assert np.array_equal(unpacked, quantized.q)


def test_gptq_lowers_the_output_error_of_round_to_nearest(rng):
    x = rng.standard_normal((2048, 128)) @ rng.standard_normal((128, 128))  # correlated inputs, as in a model
    weight = rng.standard_normal((128, 64)).astype(np.float32)
    errors = {}
    for name, quantized in (("rtn", rtn(weight, 4, 32)), ("gptq", gptq(weight, x.T @ x, 4, 32))):
        errors[name] = np.linalg.norm(x @ weight - x @ quantized.dequantize())
        assert quantized.q.min() >= -7 and quantized.q.max() <= 7
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def _feed(session, rng, vocab):
    dims = {"B": 2, "S": 5, "P": 3, "M": 1}
    feed = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else eval(d.replace("M*L", "M*4"), {}, dims) for d in value.shape]
        if value.name == "input_ids":
            feed[value.name] = rng.integers(0, vocab, shape)
        elif value.type == "tensor(int64)":
            feed[value.name] = np.ones(shape, np.int64)
        else:
            feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def test_both_encodings_compute_the_same_product(demo_export, rng):
    """MatMulNBits and the opset-21 DequantizeLinear form hold the same integers and scales: on ONNX Runtime with
    float32 compute they give the same logits, and they follow the fp32 graph's."""
    source = demo_export / "decoder.onnx"
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    vocab = read_export_record(demo_export).config["decoder"]["vocab_size"]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # ORT may fuse DQ+MatMul
    sessions = {}
    for encoding in ("MatMulNBits", "DequantizeLinear"):
        model, summary = quantize_graph(source, bits=4, block_size=32, method="rtn", encoding=encoding,
                                        accuracy_level=0)
        assert summary["weights"] + summary["merged"] == len(find_matmuls(onnx.load(str(source))))
        assert summary["merged"] > 0 and summary["lm_head"]
        assert not find_matmuls(model)  # every float MatMul weight went
        sessions[encoding] = ort.InferenceSession(model.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"])
    correlations = []
    for _ in range(5):
        feed = _feed(reference, rng, vocab)
        expected = reference.run(["logits"], feed)[0]
        logits = {encoding: session.run(["logits"], feed)[0] for encoding, session in sessions.items()}
        assert np.abs(logits["MatMulNBits"] - logits["DequantizeLinear"]).max() <= 1e-5 * np.abs(expected).max()
        correlations.append(np.corrcoef(logits["MatMulNBits"].ravel(), expected.ravel())[0, 1])
    # 4-bit weights are coarse, not wrong. These random feeds (random past and image K/V) are far from what the model
    # was trained on: over 300 draws the correlation had a median of 0.997 and fell below 0.9 in 1.7 % of them, so
    # the median of 5 draws is judged (a wrong encoding, e.g. swapped nibbles, is near 0 on every draw).
    assert np.median(correlations) > 0.9, correlations
    kept, _ = quantize_graph(source, bits=4, block_size=32, method="rtn", encoding="MatMulNBits", lm_head=False)
    assert [t.lm_head for t in find_matmuls(kept)] == [True]
    # q/k/v and gate/up merged into one product each, or not: the same numbers
    apart, _ = quantize_graph(source, bits=4, block_size=32, method="rtn", encoding="MatMulNBits", accuracy_level=0,
                              merge=False)
    separate = ort.InferenceSession(apart.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    assert np.abs(separate - logits["MatMulNBits"]).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embeddings_look_up_the_same_rows(idefics_export, rng, bits):
    """--embeddings on every IDEFICS preset (preset c has the decoupled embedding: two tables): only the token
    tables are found, and GatherBlockQuantized (ONNX Runtime) and DequantizeLinear → Gather (TensorRT's form) give
    the same logits."""
    source = idefics_export / "decoder.onnx"
    config = read_export_record(idefics_export).config["decoder"]
    tables = find_embeddings(onnx.load(str(source)))
    rows = {name: [i.dims[0] for i in onnx.load(str(source)).graph.initializer if i.name == name][0]
            for _, name in tables}
    assert sum(rows.values()) == config["vocab_size"] + config["additional_vocab_size"], rows
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    feed = _feed(reference, rng, config["vocab_size"] + config["additional_vocab_size"])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    logits = {}
    for encoding in ("MatMulNBits", "DequantizeLinear"):
        model, summary = quantize_graph(source, bits=bits, block_size=16, method="rtn", encoding=encoding,
                                        embeddings=True, accuracy_level=0)
        assert summary["embeddings"] == len(tables) and not find_embeddings(model)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        logits[encoding] = session.run(["logits"], feed)[0]
    expected = reference.run(["logits"], feed)[0]
    if bits == 4:  # the same integers and scales in both forms
        scale = np.abs(expected).max()
        assert np.abs(logits["MatMulNBits"] - logits["DequantizeLinear"]).max() <= 1e-5 * scale
    else:  # TensorRT's int8 MatMul weights are per channel (other integers): both closer to fp32 than int4 is
        model, _ = quantize_graph(source, bits=4, block_size=16, method="rtn", encoding="MatMulNBits",
                                  embeddings=True, accuracy_level=0)
        int4 = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
        for encoding, values in logits.items():
            assert np.abs(values - expected).max() < np.abs(int4 - expected).max(), encoding


def eval_json(export, capsys, n=500) -> dict:
    capsys.readouterr()
    assert main(["eval", str(export), "--n", str(n), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_weight_only_exports_keep_task_accuracy_on_500_scenes(demo_export, demo_calibration, tmp_path, capsys):
    """The issue's acceptance: int4 (RTN and GPTQ) and int8-weights within 1 point of fp32 on 500 held-out
    scenes, answers and captions; also int4 with dynamic int8 vision (--vision-int8) and int4 with fp16 float
    parts and quantized embeddings."""
    fp32 = eval_json(demo_export, capsys)
    runs = {"int4-rtn": ["--precision", "int4"],
            "int4-gptq": ["--precision", "int4", "--method", "gptq", "--calibration", str(demo_calibration)],
            "int8-weights": ["--precision", "int8-weights"],
            "int4-vision-int8": ["--precision", "int4", "--vision-int8"],
            "int4-fp16": ["--precision", "int4", "--float", "fp16", "--embeddings"]}
    for name, arguments in runs.items():
        out = tmp_path / name
        assert main(["quantize", str(demo_export), *arguments, "-o", str(out)]) == 0
        record = read_export_record(out)
        assert record.precision == ("int8-weights" if name == "int8-weights" else "int4")
        assert record.quantization["encoding"] == "MatMulNBits" and record.quantization["graphs"] == ["xattn_kv",
                                                                                                    "decoder"]
        assert record.quantization["method"] == ("gptq" if "gptq" in name else "rtn")
        decoder = onnx.load(str(out / "decoder.onnx"))
        assert sum(node.op_type == "MatMulNBits" for node in decoder.graph.node) == record.quantization[
            "weights"]["decoder"]["weights"] > 0
        assert (out / "decoder.onnx").stat().st_size < 0.5 * (demo_export / "decoder.onnx").stat().st_size
        ours = eval_json(out, capsys)
        for metric in ("answer_accuracy", "caption_accuracy"):
            assert ours[metric] >= fp32[metric] - INT8_TASK_METRIC_DROP, (name, metric, fp32, ours)
    assert read_export_record(tmp_path / "int4-gptq").quantization["calibration_images"] == 24
    vision = onnx.load(str(tmp_path / "int4-vision-int8" / "vision.onnx"))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in vision.graph.node}
    assert not find_matmuls(vision)  # no float weight left (attention's activation products stay float)
    fp16 = onnx.load(str(tmp_path / "int4-fp16" / "vision.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert read_export_record(tmp_path / "int4-fp16").quantization["weights"]["decoder"]["embeddings"] == 1


def test_the_tensorrt_encodings(demo_export, tmp_path, capsys):
    """--target tensorrt: opset-21 block DQ for a TensorRT that imports it, TensorRT's own INT4 operator for 10.x
    before that (which ONNX Runtime cannot run, and says so), per-channel INT8 DQ for int8-weights, and no INT4 for
    TensorRT 8.x."""
    forms = {"dq": ["--precision", "int4", "--trt-version", "11.1"],
             "custom": ["--precision", "int4", "--trt-version", "10.3"],
             "int8": ["--precision", "int8-weights"]}
    for name, arguments in forms.items():
        assert main(["quantize", str(demo_export), "--target", "tensorrt", *arguments, "-o",
                     str(tmp_path / name)]) == 0
    nodes = {name: [n for n in onnx.load(str(tmp_path / name / "decoder.onnx")).graph.node
                    if n.op_type.endswith("DequantizeLinear")] for name in forms}
    assert {n.domain for n in nodes["custom"]} == {"trt"} and {n.domain for n in nodes["dq"]} == {""}
    assert all({a.name for a in n.attribute} == {"axis", "block_size"} for n in nodes["dq"])
    assert all({a.name: a.i for a in n.attribute} == {"axis": 1} for n in nodes["int8"])  # per output column
    assert onnx.load(str(tmp_path / "dq" / "decoder.onnx")).opset_import[0].version == 21
    assert read_export_record(tmp_path / "custom").quantization["encoding"] == "TRT_INT4DequantizeLinear"
    capsys.readouterr()
    for name in ("dq", "int8"):  # ONNX Runtime runs the standard forms: their accuracy is measured here
        assert eval_json(tmp_path / name, capsys, n=50)["answer_accuracy"] > 0.9
    assert main(["eval", str(tmp_path / "custom"), "--n", "5"]) == 2
    assert "only TensorRT runs" in capsys.readouterr().err
    assert main(["quantize", str(demo_export), "--target", "tensorrt", "--precision", "int4", "--vision-int8",
                 "-o", str(tmp_path / "vision")]) == 2
    assert "--vision-int8 is ONNX Runtime's" in capsys.readouterr().err
    assert main(["quantize", str(demo_export), "--target", "tensorrt", "--precision", "int4", "--trt-version", "8.6",
                 "-o", str(tmp_path / "jp5")]) == 2
    assert "has no INT4" in capsys.readouterr().err and not (tmp_path / "jp5").exists()


def test_bad_weight_only_input_exits_2_and_leaves_nothing(demo_export, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(demo_export), "--precision", "int4", "--method", "gptq", "-o", str(out)]) == 2
    assert "with gptq needs --calibration" in capsys.readouterr().err
    assert main(["quantize", str(demo_export), "--precision", "int4", "--method", "entropy", "-o", str(out)]) == 2
    assert "choose one of rtn, gptq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(demo_export), "--precision", "int4", "--block-size", "48", "-o", str(out)])
    assert main(["quantize", str(demo_export), "--precision", "int4", "-o", str(out)]) == 0
    assert main(["quantize", str(out), "--precision", "int4", "-o", str(tmp_path / "twice")]) == 2
    assert "already int4" in capsys.readouterr().err
    assert main(["build", str(out), "-o", str(tmp_path / "engines"), "--target", "rtx-sm86"]) == 2
    assert "--target tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "engines").exists() and not list(tmp_path.glob(".*.partial-*"))


def test_the_int4_step_benchmark_runs(demo_export, tmp_path):
    """benchmarks/int4_step.py on the demo's int4 export: every session timed (a tiny run: figures are not judged);
    an export without an in-place MatMulNBits decoder is refused with exit status 2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "int4_step.py"
    out = tmp_path / "int4"
    assert main(["quantize", str(demo_export), "--precision", "int4", "-o", str(out)]) == 0
    run = subprocess.run([sys.executable, str(script), str(out), "--rounds", "1", "--steps", "1",
                          "--without", "RotaryEmbedding,SimplifiedLayerNormalization"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for line in ("MatMulNBits reading", "step (control)", "step, 1 thread", "weights, 1 thread",
                 "step without RotaryEmbedding,SimplifiedLayerNormalization", "weights' floor"):
        assert line in run.stdout
    refused = subprocess.run([sys.executable, str(script), str(demo_export), "--rounds", "1"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not an in-place MatMulNBits decoder" in refused.stderr
