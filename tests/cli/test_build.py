"""`flamingo-edge build` with TensorRT for RTX on the CPU: real engines for every graph of the demo export, in fp32,
fp16 and int8 Q/DQ, for two compute capabilities; the manifest is written and checked. (No engine is run: that needs
a GPU.)"""

from __future__ import annotations

import json

import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.engines.manifest import read_manifest
from flamingo_edge.engines.profiles import ShapeLimits, graph_profiles
from flamingo_edge.errors import EngineBuildError
from flamingo_edge.graphs import build_graphs
from flamingo_edge.models.config import FlamingoConfig

pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")


@pytest.fixture(scope="module")
def precisions(demo_export, tmp_path_factory):
    """The demo export in fp32, fp16 and int8 (vision, resampler, xattn_kv as Q/DQ)."""
    root = tmp_path_factory.mktemp("precisions")
    assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "8", "-o", str(root / "calib")]) == 0
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(root / "fp16")]) == 0
    assert main(["quantize", str(demo_export), "--precision", "int8", "--calibration", str(root / "calib"),
                 "-o", str(root / "int8")]) == 0
    return {"fp32": demo_export, "fp16": root / "fp16", "int8": root / "int8"}


@pytest.mark.parametrize("target", ["rtx-sm86", "rtx-sm89"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_graph_builds_and_the_manifest_holds(precisions, tmp_path, capsys, target, precision):
    export, out = precisions[precision], tmp_path / "engines"
    assert main(["build", str(export), "-o", str(out), "--target", target, "--max-context", "48",
                 "--max-prompt", "32", "--max-images", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = read_manifest(out, export)
    assert manifest.precision == precision and manifest.target == target
    assert manifest.compute_capability == target.split("-")[1].upper()
    assert manifest.tensorrt["flavour"] == "tensorrt_rtx"
    assert set(manifest.engines) == {"vision", "resampler", "xattn_kv", "decoder"}
    assert all(entry["bytes"] > 10_000 for entry in manifest.engines.values())
    assert len(manifest.profiles["decoder"]) == 2  # prefill and decode
    assert manifest.limits == {"max_batch": 1, "max_prompt": 32, "max_context": 48, "max_images": 3}


def test_decoder_profiles_allow_an_empty_past_and_fill_the_context(demo_export):
    config = FlamingoConfig.from_dict(json.loads((demo_export / "export.json").read_text())["config"])
    spec = build_graphs(config)["decoder"]
    prefill, decode = graph_profiles(spec, ShapeLimits(2, 16, 40, 3), config.visual_tokens_per_image)
    assert prefill["past_key.0"][0][2] == 0 and decode["past_key.0"][0][2] == 0  # P = 0 allowed
    assert prefill["input_ids"][2] == (2, 16) and decode["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode["attention_mask"][2] == (2, 40)
    # a prefill after a reused prompt prefix of any length up to the context
    assert prefill["past_key.0"][2][2] == 39 and prefill["attention_mask"][2] == (2, 39 + 16)
    latents = config.visual_tokens_per_image
    assert decode["cross_key.0"][2][2] == 3 * latents and decode["image_attention_mask"][2] == (2, 1, 3)


def test_bad_builds_fail_clearly(demo_export, tmp_path, capsys):
    assert main(["build", str(demo_export), "-o", str(tmp_path / "e"), "--target", "rtx-sm86",
                 "--max-context", "1000"]) == 2
    assert "the model's position limit" in capsys.readouterr().err
    out = tmp_path / "ok"
    assert main(["build", str(demo_export), "-o", str(out), "--target", "rtx-sm86"]) == 0
    (out / "vision.engine").write_bytes(b"broken")
    with pytest.raises(EngineBuildError, match="missing or was modified"):
        read_manifest(out)
    assert main(["build", str(demo_export), "-o", str(out), "--target", "rtx-sm86"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.partial-*"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # Jetson and datacenter targets build on the device, with full TensorRT
        assert main(["build", str(demo_export), "-o", str(tmp_path / "j"), "--target", "orin-nano"]) == 2
        assert "no TensorRT is installed" in capsys.readouterr().err
