"""The TensorRT backend up to the GPU: manifests of real engines (built on the CPU by TensorRT for RTX) checked
against machine keys (the same, another GPU, another TensorRT version or flavour, changed ONNX), the engines' own
profiles picked for prefill and decode feeds, and what opening the engines does on this machine. Where an NVIDIA GPU
that TensorRT for RTX supports is present, the engines are run and compared with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.manifest import RuntimeKey, check_runtime, read_manifest
from flamingo_edge.errors import (EngineMismatchError, FeatureUnavailableError, PromptError, PromptTooLongError,
                                  UsageError)
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.tensorrt_backend import select_profile

pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
LIMITS = ["--max-context", "48", "--max-prompt", "32", "--max-images", "3"]


@pytest.fixture(scope="module")
def engines(demo_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "engines-sm86"
    assert main(["build", str(demo_export), "-o", str(out), "--target", "rtx-sm86", *LIMITS]) == 0
    return out


def _key(manifest, **change) -> RuntimeKey:
    fields = {"flavour": "tensorrt_rtx", "version": manifest.tensorrt["version"], "compute_capability": "SM86",
              "device": "NVIDIA GeForce RTX 3090", **change}
    return RuntimeKey(**fields)


def test_engines_run_only_where_they_were_built_for(engines, demo_export):
    manifest = read_manifest(engines, demo_export)
    check_runtime(manifest, _key(manifest), engines, demo_export)  # the same key: no error
    with pytest.raises(EngineMismatchError) as error:
        check_runtime(manifest, _key(manifest, compute_capability="SM89", device="NVIDIA GeForce RTX 4090"),
                      engines, demo_export)
    message = str(error.value)
    assert "built for SM86 and this GPU, NVIDIA GeForce RTX 4090, is SM89" in message
    assert f"Rebuild: flamingo-edge build {demo_export} -o engines-sm86-sm89 --target rtx-sm89" in message
    assert "--max-context 48 --max-images 3" in message
    with pytest.raises(EngineMismatchError,
                       match=r"is SM90\..*--target datacenter .*\(on this machine, with TensorRT\)"):
        check_runtime(manifest, _key(manifest, compute_capability="SM90", device="NVIDIA H100"), engines)
    with pytest.raises(EngineMismatchError, match=r"built with tensorrt_rtx 1\.7\S* and this machine has 9\.9\.9"):
        check_runtime(manifest, _key(manifest, version="9.9.9"), engines)
    with pytest.raises(EngineMismatchError, match=r"they are tensorrt_rtx engines and this process loaded tensorrt; "
                                                  r"they were built for SM86 .* Orin, is SM87"):
        check_runtime(manifest, _key(manifest, flavour="tensorrt", version="10.3.0.30", compute_capability="SM87",
                                     device="Orin"), engines)


def test_portable_engines_run_on_later_tensorrt_and_other_ampere_gpus(engines):
    """Version-compatible engines load on a later TensorRT up to the next major release (8 -> 9, 10; 10 -> 11), never
    an older one; hardware-compatible engines run on any GPU from SM80 on. (The manifest is a real build's, with the
    flavour and flags changed as a TensorRT 10.3 build with those options would write them.)"""
    from dataclasses import replace

    built = read_manifest(engines)
    full = replace(built, tensorrt={"flavour": "tensorrt", "version": "10.3.0.26"}, compute_capability="SM86")
    key = RuntimeKey("tensorrt", "10.3.0.26", "SM86", "NVIDIA A10")
    check_runtime(full, key, engines)
    with pytest.raises(EngineMismatchError, match=r"they are engines built with tensorrt 10\.3\.0\.26 and this machine "
                                                  r"has 10\.8\.0\.43"):
        check_runtime(full, replace(key, version="10.8.0.43"), engines)
    portable = replace(full, version_compatible=True, hardware_compatible=True)
    for version in ("10.3.0.26", "10.8.0.43", "11.1.0.5"):
        check_runtime(portable, replace(key, version=version, compute_capability="SM90", device="H100"), engines)
    for version in ("10.2.0.19", "12.0.0.1"):
        with pytest.raises(EngineMismatchError, match="they are version-compatible engines built with tensorrt 10.3"):
            check_runtime(portable, replace(key, version=version), engines)
    with pytest.raises(EngineMismatchError, match="this GPU, T4, is SM75"):
        check_runtime(portable, replace(key, compute_capability="SM75", device="T4"), engines)


def test_engines_of_other_onnx_graphs_are_refused(engines, demo_export, tmp_path):
    other = tmp_path / "fp16"
    assert main(["quantize", str(demo_export), "--precision", "fp16", "-o", str(other)]) == 0
    with pytest.raises(EngineMismatchError, match=r"were built from other ONNX graphs than .*fp16 holds now; "
                                                  r"rebuild: flamingo-edge build"):
        read_manifest(engines, other)
    with pytest.raises(EngineMismatchError, match="other ONNX graphs"):
        Pipeline.open(other, backend="tensorrt", engines=engines)


def test_feeds_pick_the_prefill_or_the_decode_profile(engines):
    manifest = read_manifest(engines)
    profiles = [{name: tuple(tuple(s) for s in shapes) for name, shapes in p.items()}
                for p in manifest.profiles["decoder"]]
    (low, _, high) = profiles[0]["past_key.0"]

    def shapes(batch, new, past, images):
        result = {}
        for name, (lows, _, _) in profiles[0].items():
            sizes = {"input_ids": (batch, new), "attention_mask": (batch, past + new),
                     "image_attention_mask": (batch, new, images)}
            if name in sizes:
                result[name] = sizes[name]
            elif name.startswith(("past_key", "past_value")):
                result[name] = (batch, lows[1], past, lows[3])
            else:  # cross K/V: [B, Hx, M*L, Dh]
                latents = lows[2]
                result[name] = (batch, lows[1], images * latents, lows[3])
        return result

    assert select_profile(profiles, shapes(1, 20, 0, 1)) == 0  # a prefill
    assert select_profile(profiles, shapes(1, 5, 30, 2)) == 0  # a prefill after a reused prefix
    assert select_profile(profiles, shapes(1, 1, 25, 1)) == 1  # a decode step
    # the limit quoted is the prefill profile's 32 prompt tokens (the most any profile takes), not decode's 1
    with pytest.raises(PromptTooLongError, match=r"input_ids \(1, 40\) > \(1, 32\).*rebuild with larger --max-prompt"):
        select_profile(profiles, shapes(1, 40, 0, 1))
    assert high[2] == 47 and low[2] == 0


def test_opening_the_engines_here(engines, demo_export, capsys):
    """No GPU: a clear error before anything is deserialized. A GPU TensorRT for RTX supports: the engines run and
    agree with ONNX Runtime."""
    from flamingo_edge.runtime.cuda import device_info

    with pytest.raises(UsageError, match="give their folder"):
        Pipeline.open(demo_export, backend="tensorrt")
    assert main(["generate", str(demo_export), "--prompt", "hi", "--backend", "tensorrt"]) == 2
    assert "give their folder (--engines ENGINES)" in capsys.readouterr().err
    assert main(["generate", str(demo_export), "--prompt", "hi", "--engines", str(engines)]) == 2
    assert "(--engines, --cuda-graph) go with backend 'tensorrt'" in capsys.readouterr().err
    try:
        device = device_info()
    except FeatureUnavailableError as error:
        assert "no usable one" in str(error) and "use backend 'onnxruntime'" in str(error)
        with pytest.raises(FeatureUnavailableError, match="no usable one"):
            Pipeline.open(demo_export, backend="tensorrt", engines=engines)
        assert main(["generate", str(demo_export), "--prompt", "hi", "--backend", "tensorrt",
                     "--engines", str(engines)]) == 2
        return
    if device.compute_capability != "SM86":
        with pytest.raises(EngineMismatchError, match=f"this GPU, .*, is {device.compute_capability}"):
            Pipeline.open(demo_export, backend="tensorrt", engines=engines)
        return
    prompts = [["a photo of", np.full((96, 96, 3), 200, np.uint8), "the shapes are"]]
    with Pipeline.open(demo_export) as reference, \
            Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=True) as ours:
        np.testing.assert_allclose(ours.logits(prompts), reference.logits(prompts), rtol=0, atol=1e-3)
        for _ in range(2):  # the second run replays the captured decode steps
            assert ours.complete(prompts, max_new_tokens=8) == reference.complete(prompts, max_new_tokens=8)


def test_the_engines_limits_are_checked_before_any_graph_runs(demo_export):
    with Pipeline.open(demo_export) as pipeline:
        pipeline.max_prompt, pipeline.max_batch = 4, 1  # as open() sets them from an engines manifest
        with pytest.raises(PromptTooLongError, match="the engines take at most 4"):
            pipeline.complete([["a long prompt with many words in it"]])
        with pytest.raises(PromptError, match="2 prompts in one batch; the engines take at most 1"):
            pipeline.complete([["a"], ["b"]])
        assert pipeline.stats["vision_runs"] == 0 and pipeline.stats["prefill_runs"] == 0


def test_tensorrt_data_types_map_to_numpy_without_nptype():
    """Our own map, not `tensorrt.nptype` (which names np.bool on TensorRT 8.5.1/8.5.2 and raises with numpy >= 1.24):
    every type the contract uses, from the installed TensorRT's own enum, and a refusal for one it cannot hold."""
    import tensorrt_rtx as trt

    from flamingo_edge.errors import GraphContractError
    from flamingo_edge.runtime.tensorrt_backend import numpy_dtype

    expected = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
                trt.DataType.INT64: np.int64, trt.DataType.BOOL: np.bool_, trt.DataType.INT8: np.int8}
    for trt_type, numpy_type in expected.items():
        assert numpy_dtype(trt_type) == np.dtype(numpy_type)
    with pytest.raises(GraphContractError, match="data type BF16 has no numpy type"):
        numpy_dtype(trt.DataType.BF16)
