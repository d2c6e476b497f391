"""TensorRT calibration caches written from our statistics: the text format, the round trip, and agreement with the
scales of the Q/DQ graphs quantize writes from the same calibration."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from flamingo_edge.calibration.trt_cache import (for_tensorrt, header, int8_calibrator, qdq_scales, read_cache,
                                                 write_cache)
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
    # build reads them for the TensorRT that builds: its header, the same scales (TensorRT ignores another header)
    from flamingo_edge.engines.build import read_int8_caches

    for version, first in (("10.3.0.26", "TRT-100300-EntropyCalibration2"),
                           ("8.5.2.2", "TRT-8502-EntropyCalibration2")):
        caches = read_int8_caches(out, demo_export, version)
        assert set(caches) == {"vision", "resampler", "xattn_kv"}
        for graph, cache in caches.items():
            assert read_cache(cache) == (first, read_cache((out / f"{graph}.int8-calib.cache").read_bytes())[1])


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


def test_a_cache_gets_the_header_of_the_tensorrt_that_builds():
    """The scales are ours and version-free; only the header names the TensorRT, and TensorRT ignores a cache whose
    header is another version's (NVIDIA/TensorRT#1378): implicit INT8 would then get no ranges at all."""
    cache = write_cache({"pixel_values": 2.1316772, "/vision/Conv_output_0": 0.5}, "10.3")
    rewritten = for_tensorrt(cache, "10.7.0.23")
    assert rewritten.split(b"\n", 1) == [b"TRT-100700-EntropyCalibration2", cache.split(b"\n", 1)[1]]
    assert for_tensorrt(cache, "10.3.0.26") is cache  # already this TensorRT's: untouched
    with pytest.raises(CalibrationError, match="first line"):
        for_tensorrt(b"pixel_values: 3c898a9d\n", "10.3")


class _Calibrator:
    """TensorRT's IInt8EntropyCalibrator2 as far as the factory uses it (TensorRT 8.5-10 cannot be installed here)."""

    def __init__(self):
        pass


def _tensorrt(version: str) -> SimpleNamespace:
    return SimpleNamespace(__version__=version, IInt8EntropyCalibrator2=_Calibrator)


def test_the_calibrator_refuses_a_cache_its_tensorrt_would_ignore():
    cache = write_cache({"pixel_values": 2.0}, "10.3")
    calibrator = int8_calibrator(cache, trt=_tensorrt("10.3.0.26"))
    assert calibrator.read_calibration_cache() == cache and calibrator.get_batch(["pixel_values"]) is None
    with pytest.raises(CalibrationError, match=r"header is TRT-100300-EntropyCalibration2 and TensorRT 8\.5\.2\.2 "
                                               r"reads only TRT-8502-EntropyCalibration2: it would ignore the cache"
                                               r".*for_tensorrt\(cache, trt.__version__\)"):
        int8_calibrator(cache, trt=_tensorrt("8.5.2.2"))


class _Cudart:
    """cuda-python's runtime module as far as the calibrator calls it; records the bytes copied."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1

    def __init__(self):
        self.copied, self.next = [], 4096

    def cudaMalloc(self, nbytes):
        self.next += nbytes
        return 0, self.next

    def cudaMemcpy(self, dst, src, nbytes, kind):
        self.copied.append(nbytes)
        return (0,)

    def cudaFree(self, pointer):
        return (0,)


def test_feeds_of_other_shapes_than_the_calibration_profile_are_never_handed_to_tensorrt(monkeypatch, caplog):
    """TensorRT calibrates at the calibration profile's opt shapes and is given pointers only: a recorded decoder
    feed of another sequence or past length would be read as the opt shape (garbage, or past the buffer's end)."""
    from flamingo_edge.runtime import cuda

    cudart = _Cudart()
    monkeypatch.setattr(cuda, "runtime_module", lambda: cudart)
    opt = {"x": (1, 4, 8), "past": (1, 2, 6, 4)}

    def feed(s, p):  # one recorded decoder-like feed: S new tokens after P past ones
        return {"x": np.zeros((1, s, 8), np.float32), "past": np.zeros((1, 2, p, 4), np.float32)}

    samples = [feed(4, 6), feed(1, 9), feed(7, 0), feed(4, 6)]
    with pytest.raises(UsageError, match="samples need opt_shapes"):
        int8_calibrator(samples=iter(samples), trt=_tensorrt("10.3.0.26"))
    calibrator = int8_calibrator(samples=iter(samples), trt=_tensorrt("10.3.0.26"), opt_shapes=opt)
    batches = []
    while (pointers := calibrator.get_batch(["x", "past"])) is not None:
        batches.append(pointers)
    assert len(batches) == 2 and (calibrator.used, calibrator.skipped) == (2, 2)
    assert cudart.copied == [4 * 8 * 4, 2 * 6 * 4 * 4] * 2  # only opt-shaped bytes ever reach the GPU
    assert "skipping calibration feeds whose shapes are not the calibration profile's opt shapes" in caplog.text
    none_fit = int8_calibrator(samples=iter([feed(1, 9)]), trt=_tensorrt("10.3.0.26"), opt_shapes=opt)
    with caplog.at_level("ERROR"):
        assert none_fit.get_batch(["x", "past"]) is None
    assert "no calibration feed has the calibration profile's opt shapes" in caplog.text
