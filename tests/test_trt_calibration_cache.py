"""TensorRT calibration caches written from our statistics: the text format, the round trip, and agreement with the
scales of the Q/DQ graphs quantize writes from the same calibration."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_edge.calibration.trt_cache import header, int8_calibrator, qdq_scales, read_cache, write_cache
from flamingo_edge.cli.main import main
from flamingo_edge.errors import CalibrationError, FeatureUnavailableError, UsageError


def test_header_follows_nv_tensorrt_version():
    assert header("8.5.2") == "TRT-8502-EntropyCalibration2"  # JetPack 5
    assert header("10.3") == "TRT-100300-EntropyCalibration2"  # JetPack 6
    assert header("10.13.3") == "TRT-101303-EntropyCalibration2"
    for bad in ("11.0", "6.0", "ten"):
        with pytest.raises(UsageError):
            header(bad)


def test_round_trip_keeps_float32_scales_exactly(seed):
    rng = np.random.default_rng(seed)
    amax = {f"/decoder/layers.{i}/Add_output_0": float(v) for i, v in enumerate(rng.uniform(1e-3, 300, 50))}
    amax["pixel_values"] = 2.1316772
    text = write_cache(amax, "8.5.2")
    lines = text.decode().splitlines()
    assert lines[0] == "TRT-8502-EntropyCalibration2" and lines[-1].startswith("pixel_values: ")
    assert all(len(line.rsplit(": ", 1)[1]) == 8 for line in lines[1:])
    first, scales = read_cache(text)
    assert first == lines[0] and list(scales) == list(amax)
    for name, value in amax.items():
        assert scales[name] == np.float32(value / 127.0)  # bit for bit
    with pytest.raises(CalibrationError, match="first line"):
        read_cache(b"pixel_values: 3c898a9d\n")
    with pytest.raises(CalibrationError, match="line 2"):
        read_cache(b"TRT-8502-EntropyCalibration2\npixel_values: zz\n")


def test_quantize_writes_caches_that_match_its_qdq_scales(demo_export, tmp_path, monkeypatch):
    monkeypatch.delenv("FLAMINGO_EDGE_DEMO_CHECKPOINT", raising=False)
    calib, out = tmp_path / "calib", tmp_path / "int8"
    assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "12", "-o", str(calib)]) == 0
    assert main(["quantize", str(demo_export), "--precision", "int8", "--calibration", str(calib),
                 "--trt-version", "8.5.2", "-o", str(out)]) == 0
    for graph in ("vision", "resampler", "xattn_kv"):
        first, cached = read_cache((out / f"{graph}.int8-calib.cache").read_bytes())
        assert first == "TRT-8502-EntropyCalibration2"
        in_graph = qdq_scales(out / f"{graph}.onnx")
        assert in_graph and set(in_graph) <= set(cached)  # the cache covers every tensor the Q/DQ graph quantizes
        for name, scale in in_graph.items():
            assert cached[name] == pytest.approx(scale, rel=1e-6), name
    assert not (out / "decoder.int8-calib.cache").exists()


def test_the_implicit_calibrator_needs_a_tensorrt_that_has_it():
    """TensorRT is not installable on these machines; the factory must say so clearly."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(FeatureUnavailableError, match="needs TensorRT 8.5-10.x"):
            int8_calibrator(b"TRT-100300-EntropyCalibration2\n")
        with pytest.raises(UsageError, match="needs a calibration cache or calibration samples"):
            int8_calibrator()
    else:
        pytest.skip("TensorRT is installed: this test is for machines without it")
