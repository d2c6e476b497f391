"""`flamingo-edge plan`: parameter counts against the PyTorch reference, the table and JSON, fitting, the build's
refusal. The peak-RSS check against ONNX Runtime is tests/engines/test_plan_rss.py (slow)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import onnx
import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.engines.plan import (BLOCK_SIZE, IMAGE_CACHE, IMAGE_CACHE_BYTES, INT8_GRAPHS, PREFIX_CACHE_BYTES,
                                        WEIGHT_ONLY_GRAPHS, cross_kv_bytes, parameter_counts, plan_for, read_source)
from flamingo_edge.engines.profiles import ShapeLimits
from flamingo_edge.errors import CheckpointError, MemoryPlanError, UsageError

CONFIGS = Path(__file__).resolve().parents[2] / "docs" / "configs"
PUBLIC = sorted(CONFIGS.glob("*.json"))


def reference_counts(config) -> dict[str, int]:
    """Parameters per graph of the PyTorch reference (built on the meta device: no memory, any size)."""
    torch = pytest.importorskip("torch")
    from flamingo_edge.models.flamingo import FlamingoModel

    with torch.device("meta"):
        model = FlamingoModel(config=config)
    counts = dict.fromkeys(("vision", "resampler", "xattn_kv", "decoder"), 0)
    for name, tensor in model.state_dict().items():
        graph = name.split(".")[0]
        if name.startswith("decoder.cross_blocks") and name.rsplit(".", 2)[-2] in ("k", "v", "k_norm"):
            graph = "xattn_kv"  # what project_visual computes: the xattn_kv graph's weights
        counts[graph] += tensor.numel()
    return counts


@pytest.mark.parametrize("path", PUBLIC, ids=[p.stem for p in PUBLIC])
def test_parameter_counts_equal_the_reference(path):
    config = read_source(path).config
    assert {name: p.total for name, p in parameter_counts(config).items()} == reference_counts(config)


def test_public_configs_have_their_published_sizes():
    totals = {p.stem: sum(g.total for g in parameter_counts(read_source(p).config).values()) / 1e9 for p in PUBLIC}
    assert round(totals["idefics-9b"], 1) == 8.9 and round(totals["idefics-80b"]) == 80
    assert 2.5 < totals["openflamingo-3b"] < 3.3 and 3.5 < totals["openflamingo-4b"] < 4.5
    assert 8 < totals["openflamingo-9b"] < 9
    # Llama 3.2 Vision: 10.67 B and 88.59 B (transformers' own count, tests/cli/test_mllama_plan.py)
    assert round(totals["llama-3.2-11b-vision"], 2) == 10.67 and round(totals["llama-3.2-90b-vision"], 2) == 88.59


def test_the_plans_defaults_are_quantizes_and_the_pipelines():
    from flamingo_edge.calibration import quantize
    from flamingo_edge.config_reader import ACTIVATION_NAMES
    from flamingo_edge.runtime.pipeline import Pipeline

    assert tuple(quantize.WEIGHT_DEFAULT_GRAPHS) == WEIGHT_ONLY_GRAPHS
    assert tuple(quantize.INT8_DEFAULT_GRAPHS) == INT8_GRAPHS
    assert quantize.DEFAULT_BLOCK_SIZE == BLOCK_SIZE
    assert inspect.signature(Pipeline.open).parameters["image_cache_size"].default == IMAGE_CACHE
    assert inspect.signature(Pipeline.open).parameters["image_cache_bytes"].default == IMAGE_CACHE_BYTES
    assert inspect.signature(Pipeline.open).parameters["prefix_cache_bytes"].default == PREFIX_CACHE_BYTES
    if pytest.importorskip("torch"):
        from flamingo_edge.models.layers import ACTIVATIONS

        assert sorted(ACTIVATIONS) == sorted(ACTIVATION_NAMES)


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime-cpu"])
def test_both_runtimes_count_the_pipelines_caches(runtime):
    """The prefix cache counts full, on its own line; the image cache counts the images it keeps, for ONNX Runtime
    as for TensorRT (a camera app or a server fills both)."""
    source = read_source(CONFIGS / "idefics-9b.json")
    limits = ShapeLimits(1, 128, 1024, 2)

    def plan(**caches):
        return plan_for(source, "int4", limits, runtime=runtime, **caches)

    default, bare = plan(), plan(image_cache=0, prefix_cache_bytes=0)
    assert default.item("prefix cache") == PREFIX_CACHE_BYTES and bare.item("prefix cache") == 0
    assert plan(image_cache=0, prefix_cache_bytes=3 << 20).total - bare.total == 3 << 20
    per_image = cross_kv_bytes(source.config, 1)  # 16.8 MB for IDEFICS-9B: all 64 fit within IMAGE_CACHE_BYTES
    assert default.total - bare.total == PREFIX_CACHE_BYTES + IMAGE_CACHE * per_image
    assert plan(image_cache=5, prefix_cache_bytes=0).total - bare.total == 5 * per_image
    with pytest.raises(UsageError, match="prefix cache -1 bytes"):
        plan(prefix_cache_bytes=-1)


def test_plan_prints_and_reports_its_caches(capsys):
    config = str(CONFIGS / "openflamingo-3b.json")
    assert main(["plan", config, "--precision", "int4", "--target", "16", "--image-cache", "2",
                 "--prefix-cache", "0"]) == 0
    assert "2 cached image(s), 0 MiB prefix cache" in capsys.readouterr().out
    assert main(["plan", config, "--precision", "int4", "--target", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix_cache_bytes"] == PREFIX_CACHE_BYTES
    assert {"name": "prefix cache", "bytes": PREFIX_CACHE_BYTES} in [
        {k: item[k] for k in ("name", "bytes")} for item in report["plans"][0]["items"]]


def test_weight_bytes_per_precision():
    source = read_source(CONFIGS / "idefics-9b.json")
    limits = ShapeLimits(1, 128, 256, 1)
    layers = {p: plan_for(source, p, limits).item("decoder: layers") for p in ("fp32", "fp16", "int8-weights", "int4")}
    assert layers["fp16"] / layers["fp32"] == pytest.approx(0.5, abs=1e-3)
    # int4: 4 bits + an fp32 scale per 128 weights = 0.53125 bytes a weight; int8-weights: 1 + 4/128
    assert layers["int4"] / layers["fp32"] == pytest.approx(0.53125 / 4, rel=1e-3)
    assert layers["int8-weights"] / layers["fp32"] == pytest.approx(1.03125 / 4, rel=1e-3)
    embedding = {p: plan_for(source, p, limits).item("decoder: embedding") for p in ("fp32", "int4")}
    assert embedding["int4"] == embedding["fp32"]  # a Gather: never quantized


def test_the_plan_of_a_weight_only_form_is_what_quantize_writes(demo_export, tmp_path, capsys):
    """Counted from the config (not the files), the weights of int4 with --float fp16 --embeddings are, byte for
    byte, the tensors quantize writes for the demo."""
    out = tmp_path / "int4"
    assert main(["quantize", str(demo_export), "--precision", "int4", "--float", "fp16", "--embeddings",
                 "--target", "tensorrt", "--trt-version", "11.1", "-o", str(out)]) == 0
    source = read_source(demo_export)  # its own precision is fp32: int4 is counted, not read
    limits = ShapeLimits(1, 16, 32, 1)
    plan = plan_for(source, "int4", limits, float16=True, embeddings=True)
    counted = {name: sum(i.bytes for i in plan.items if i.graph == name) for name in ("xattn_kv", "decoder")}
    for name, size in counted.items():  # the weights the graph holds, as stored (INT4: two per byte; not the
        stored = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes  # int64 sizes of its Splits)
                     for t in onnx.load(str(out / f"{name}.onnx")).graph.initializer
                     if t.data_type != onnx.TensorProto.INT64)
        assert size == stored, name
    plain = plan_for(source, "int4", limits)
    assert plain.item("decoder: embedding") == 2 * plan_for(source, "fp16", limits).item("decoder: embedding")
    assert plan.item("decoder: embedding") < plain.item("decoder: embedding") / 5
    assert plan.item("weights: vision") == plain.item("weights: vision") / 2  # fp16 float parts


def test_tensorrt_8_is_planned_without_weight_only_precisions(capsys):
    arguments = ["plan", str(CONFIGS / "openflamingo-9b.json"), "--target", "orin-nx-16gb", "--max-context", "1024"]
    assert main([*arguments, "--trt-version", "8.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["precision"] for p in report["plans"]] == ["fp32", "fp16", "int8"]
    assert "has no INT4" in report["notes"][0] and report["targets"][0]["recommended"] != "int4"
    assert main([*arguments, "--trt-version", "10.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"][0]["recommended"] == "int4"
    assert main([*arguments, "--trt-version", "8.5", "--precision", "int4"]) == 2
    assert "cannot build any" in capsys.readouterr().err


def test_self_attention_cache_grows_with_the_context():
    source = read_source(CONFIGS / "idefics-9b.json")
    at = {p: plan_for(source, "int4", ShapeLimits(1, 128, p, 1)).item("self-attention K/V") for p in (512, 1024)}
    per_token = 2 * 32 * 32 * 128 * 4  # K and V x 32 layers x 32 heads x 128 x 4 bytes
    # the cache at P on the host and its mirror on the device; the new K/V of a 128-token prefill (device + pinned)
    assert at[512] == per_token * (2 * 512 + 2 * 128)
    assert at[1024] - at[512] == per_token * 2 * 512


def test_plan_table_and_json(capsys):
    assert main(["plan", str(CONFIGS / "idefics-9b.json"), "--target", "orin-nano-8gb", "--max-context", "512"]) == 0
    table = capsys.readouterr().out
    assert "decoder: LM head" in table and "orin-nano-8gb" in table and "recommended: none fits" in table
    assert main(["plan", str(CONFIGS / "openflamingo-3b.json"), "--target", "orin-nx-16gb", "--max-images", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (target,) = report["targets"]
    # 2.7 B parameters: 10.6 GiB in fp32 + the K/V at 2048 tokens and 4 images > 13.2 GiB; fp16 fits
    assert target["recommended"] == "fp16"
    rows = {row["precision"]: row for row in target["precisions"]}
    assert rows["int4"]["max_images"] > rows["fp16"]["max_images"] > rows["fp32"]["max_images"] > 0
    assert 0 < rows["fp32"]["max_context"] < 2048 == rows["fp16"]["max_context"]
    assert main(["plan", str(CONFIGS / "openflamingo-9b.json"), "--target", "orin-nx-16gb", "--max-context", "1024",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"][0]["recommended"] == "int4"


def test_plan_of_an_export_uses_its_files(demo_export, capsys):
    assert main(["plan", str(demo_export), "--precision", "fp32", "--target", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    items = {item["name"]: item["bytes"] for item in report["plans"][0]["items"]}
    stored = sum((demo_export / f).stat().st_size for f in ("vision.onnx", "resampler.onnx", "xattn_kv.onnx",
                                                            "decoder.onnx"))
    weights = sum(v for k, v in items.items() if k.startswith(("weights: ", "decoder: ")))
    assert weights == pytest.approx(stored, abs=8)  # the files' sizes, rounded per line
    assert report["export_precision"] == "fp32" and report["kind"] == "export"


def test_plan_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        read_source(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither an export"):
        read_source(tmp_path)
    with pytest.raises(UsageError, match="give one of orin-nano-8gb"):
        from flamingo_edge.engines.plan import budget_bytes

        budget_bytes("orin-tiny")
    assert main(["plan", str(CONFIGS / "idefics-9b.json"), "--target", "-1"]) == 2
    assert "memory size in GiB" in capsys.readouterr().err


def test_build_refuses_what_the_board_cannot_hold(demo_export, tmp_path, capsys):
    args = ["build", str(demo_export), "-o", str(tmp_path / "engines"), "--target", "orin-nano", "--max-batch",
            "4096", "--max-images", "8", "--max-context", "64", "--max-prompt", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Jetson Orin Nano 8 GB cannot hold these fp32 engines" in err and "--force" in err
    from flamingo_edge.engines.build import build_engines

    with pytest.raises(MemoryPlanError, match="a process gets 6.0 GiB"):
        build_engines(demo_export, tmp_path / "engines", "orin-nano", limits=ShapeLimits(4096, 64, 64, 8))
    # --force goes past the plan to the next check (here: TensorRT itself, or the GPU)
    assert main(args + ["--force"]) == 2
    assert "cannot hold" not in capsys.readouterr().err
    assert not (tmp_path / "engines").exists()


def test_plan_needs_neither_torch_nor_tensorrt():
    """What a base install (or a Jetson without torch) runs: a checkpoint's config.json read and planned."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "  # importing them fails
            "from flamingo_edge.cli.main import main; "
            f"sys.exit(main(['plan', {str(CONFIGS / 'idefics-9b.json')!r}, '--target', 'thor', '--json']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"][0]["recommended"] == "fp32"
