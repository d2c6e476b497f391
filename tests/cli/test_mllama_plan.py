"""`flamingo-edge plan` and `info` on Llama 3.2 Vision (mllama): parameter counts against transformers'
`MllamaForConditionalGeneration` and our PyTorch reference (the presets and the public 11B and 90B configs), the
memory terms mllama changes (grouped K/V heads, cross-attention layers without self-attention K/V, every tile's
tokens in the cross K/V, the vision tower's attention over all tiles a head at a time), a checkpoint, its export,
and the peak RSS that ONNX Runtime really takes for the tiny export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.config import VISION_SCORES_BYTES
from flamingo_edge.engines.plan import (FLOAT_BYTES, IMAGE_CACHE_BYTES, TRT_STAGING_COPIES, cross_kv_bytes, parameter_counts,
                                        plan_for, read_source)
from flamingo_edge.engines.profiles import ShapeLimits
from flamingo_edge.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")
torch = pytest.importorskip("torch")
from flamingo_edge.models.random_mllama import build_random_mllama  # noqa: E402
from test_plan import reference_counts  # noqa: E402  (tests/cli/test_plan.py: per graph, on the meta device)

CONFIGS = Path(__file__).resolve().parents[2] / "docs" / "configs"
PUBLIC = {"11b": CONFIGS / "llama-3.2-11b-vision.json", "90b": CONFIGS / "llama-3.2-90b-vision.json"}


@pytest.fixture
def checkpoint(mllama_export):
    return mllama_export[0]  # tests/conftest.py: the tiny preset, saved by transformers


@pytest.fixture
def export(mllama_export):
    return mllama_export[1]


def _upstream_count(hf_config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.MllamaForConditionalGeneration(hf_config).parameters())


def _hf_config(path: Path):
    data = json.loads(path.read_text())
    return transformers.MllamaConfig(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})


@pytest.mark.parametrize("preset", ["tiny", "100m"])
def test_preset_counts_equal_the_reference_and_transformers(preset):
    from flamingo_edge.mllama_config import config_from_hf

    model, _ = build_random_mllama(preset)
    config = config_from_hf(model.config.to_dict())
    counts = {name: p.total for name, p in parameter_counts(config).items()}
    assert counts == reference_counts(config)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", sorted(PUBLIC))
def test_public_config_counts_equal_transformers(size):
    counts = parameter_counts(read_source(PUBLIC[size]).config)
    assert sum(p.total for p in counts.values()) == _upstream_count(_hf_config(PUBLIC[size]))


def test_public_configs_are_read_as_published():
    """Llama 3.1's RoPE scaling, grouped K/V heads, cross-attention layers in place of decoder layers, 8
    input-only embedding rows, 4 tiles of 1601 tokens (1608 padded) per image."""
    for size, (width, layers, blocks) in {"11b": (4096, 40, 8), "90b": (8192, 100, 20)}.items():
        config = read_source(PUBLIC[size]).config
        text, vision = config.decoder, config.vision
        assert (text.width, text.layers, len(text.cross_layers), text.self_attention_layers) == (
            width, layers, blocks, layers - blocks)
        assert text.cross_layers == tuple(range(3, layers, 5))
        assert (text.kv_head_count, text.cross_kv_head_count, text.head_dim) == (8, 8, 128)
        assert (text.rope_type, text.rope_factor, text.rope_theta, text.rope_original_max_positions) == (
            "llama3", 8.0, 500000.0, 8192)
        assert (text.vocab_size, text.input_only_vocab, text.eos_token_id) == (128256, 8, 128001)
        assert (vision.max_num_tiles, vision.patches_per_tile, vision.padded_patches_per_tile) == (4, 1601, 1608)
        assert config.visual_tokens_per_image == 6404 and vision.kept_layers == (3, 7, 15, 23, 30)


def test_caches_count_grouped_heads_self_attention_layers_and_every_tile():
    """11B: 32 self-attention layers (8 of the 40 are cross-attention layers, with no K/V cache) of 8 K/V heads;
    8 cross-attention layers of 8 K/V heads over 4 x 1601 tokens per image."""
    source = read_source(PUBLIC["11b"])
    per_token = 2 * 32 * 8 * 128 * FLOAT_BYTES
    per_image = 2 * 8 * 8 * 128 * 4 * 1601 * FLOAT_BYTES  # 420 MB
    assert cross_kv_bytes(source.config, 1) == per_image
    at = {cache: plan_for(source, "int4", ShapeLimits(1, 256, 1024, 1), image_cache=cache) for cache in (0, 1, 64)}
    assert at[0].item("self-attention K/V") == per_token * (2 * 1024 + 2 * 256)
    assert at[0].item("cross-attention K/V") == TRT_STAGING_COPIES * 2 * per_image
    # 64 images asked, but the cache keeps at most IMAGE_CACHE_BYTES of them: 2 of the 11B's
    assert IMAGE_CACHE_BYTES // per_image == 2
    assert at[64].item("cross-attention K/V") - at[1].item("cross-attention K/V") == per_image


def test_vision_attention_over_all_tiles_is_counted_a_head_at_a_time():
    """The 11B's local and global transformers attend over 4 x 1608 padded tokens a head at a time: one head's
    scores [N, 1, 6432, 6432] are 165 MB an image, within VISION_SCORES_BYTES, all 16 would be 2.6 GB. The vision
    graph's largest tensor is then its output [N, 4, 1601, 7680], held with the 5 kept local layers' outputs
    [N, 6432, 1280], and it is the largest of all (the workspace). xattn_kv's context holds its input [N, 6404, 4096],
    wider than one block's K and V; its outputs, every block's K and V, are the cross-attention K/V line."""
    source = read_source(PUBLIC["11b"])
    assert source.config.vision.heads_per_chunk() == 1
    assert 6432 ** 2 * FLOAT_BYTES <= VISION_SCORES_BYTES < 2 * 6432 ** 2 * FLOAT_BYTES
    vision = max(1 * 6432 ** 2, 4 * 1601 * 7680) + 5 * 6432 * 1280
    projector = 4 * 1601 * 7680  # its input, wider than its output [N, 4, 1601, 4096]
    for images in (1, 2):
        plan = plan_for(source, "fp16", ShapeLimits(1, 256, 1024, images), image_cache=0)
        cross_input = 6404 * 4096 * images  # the projector's output; one block's K and V: 2 x 8 x 6404 x 128
        prefill, decode = 32 * 256 * 6404 * images, 32 * 6404 * images  # cross-attention scores [1, 32, S, M*6404]
        assert plan.item("activations") == 3 * FLOAT_BYTES * (images * (vision + projector) + cross_input + prefill
                                                              + decode)
        assert plan.item("workspace") == images * vision * FLOAT_BYTES
        # xattn_kv's outputs and the decoder's inputs, each on the device and the host
        assert plan.item("cross-attention K/V") == 2 * TRT_STAGING_COPIES * cross_kv_bytes(source.config, images)
    assert round(3 * vision * FLOAT_BYTES / 2 ** 30, 2) == 1.01  # the vision context at one image (16 heads: 7.86)


def test_plan_of_the_11b_on_jetsons(capsys):
    """The figures docs/plan.md quotes. With one image, one cached image, 512-token prompts and 1024 tokens, no
    precision fits an Orin NX 16 GB and fp16 fits the AGX Orin 32 and 64 GB. With 256-token prompts, int4 in the
    Jetson form (fp16 float parts, quantized embeddings) fits the NX: up to 2905 tokens with one cached image, 3706
    with none, 2105 with the default cache (2 of the 11B's images, by its byte bound), each with the default 64 MiB
    prefix cache."""
    args = ["plan", str(PUBLIC["11b"]), "--max-context", "1024", "--max-images", "1", "--image-cache", "1",
            "--precision", "fp16", "--precision", "int8-weights", "--precision", "int4", "--json"]
    recommended = {}
    for target in ("orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"):
        assert main([*args, "--target", target]) == 0
        recommended[target] = json.loads(capsys.readouterr().out)["targets"][0]["recommended"]
    assert recommended == {"orin-nx-16gb": None, "agx-orin-32gb": "fp16", "agx-orin-64gb": "fp16"}
    assert main(args[:-1] + ["--target", "orin-nx-16gb"]) == 0
    table = capsys.readouterr().out
    assert "1 cached image(s)" in table and "recommended: none fits" in table
    jetson = ["plan", str(PUBLIC["11b"]), "--target", "orin-nx-16gb", "--max-context", "1024", "--max-images", "1",
              "--max-prompt", "256", "--precision", "int4", "--float", "fp16", "--embeddings", "--json"]
    totals = {}
    for cache, fits, context in ((0, True, 3706), (1, True, 2905), (64, True, 2105)):
        assert main(jetson + ["--image-cache", str(cache)]) == 0
        report = json.loads(capsys.readouterr().out)
        (precision,) = report["targets"][0]["precisions"]
        assert (precision["fits"], precision["max_context"]) == (fits, context)
        totals[cache] = report["plans"][0]["total"]
    per_image = cross_kv_bytes(read_source(PUBLIC["11b"]).config, 1)
    assert (totals[1] - totals[0], totals[64] - totals[0]) == (per_image, 2 * per_image)


def test_plan_and_info_of_a_checkpoint(checkpoint, capsys):
    source = read_source(checkpoint)
    assert source.kind == "checkpoint" and source.config.tiled
    assert main(["plan", str(checkpoint), "--target", "4", "--max-images", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (target,) = report["targets"]
    assert target["recommended"] == "fp32" and report["image_cache"] == 64
    items = {item["name"] for item in report["plans"][0]["items"]}
    assert {"weights: vision", "weights: resampler", "decoder: embedding", "cross-attention K/V"} <= items
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "tiled ViT, 4 tiles of 28x28 px, patch 14 -> 5 tokens per tile, 20 per image" in text
    assert "3 local + 1 gated global layers" in text and "-> 20 visual tokens per image" in text
    assert "5 layers, 4 heads (2 K/V)" in text and "gated xattn as decoder layers 1, 3" in text
    assert main(["info", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameters"]["total"] == _upstream_count(transformers.MllamaConfig.from_pretrained(checkpoint))
    assert (summary["tiles"], summary["tokens_per_tile"], summary["visual_tokens_per_image"]) == (4, 5, 20)
    assert summary["input_only_vocab_size"] == 8 and summary["cross_attention_replaces"] is True


def test_plan_and_info_of_an_export(export, capsys):
    assert main(["plan", str(export), "--precision", "fp32", "--target", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "export" and report["export_precision"] == "fp32"
    weights = sum(item["bytes"] for item in report["plans"][0]["items"] if item["graph"])
    stored = sum((export / f"{name}.onnx").stat().st_size for name in ("vision", "resampler", "xattn_kv", "decoder"))
    assert weights == pytest.approx(stored, abs=8)  # the files' sizes, rounded per line
    assert main(["info", str(export)]) == 0
    assert "tiled ViT, 4 tiles" in capsys.readouterr().out


def test_tiny_export_peak_rss_is_predicted(export):
    """The ONNX Runtime CPU prediction against a fresh process's peak RSS (tests/engines/test_plan_rss.py's check;
    about a second)."""
    from engines.test_plan_rss import check  # tests/ is on sys.path (its conftest.py)

    check(export)


@pytest.mark.parametrize("section, key", [("text_config", "cross_attention_layers"), ("text_config", "hidden_size"),
                                          ("vision_config", "supported_aspect_ratios")])
def test_an_incomplete_mllama_config_is_refused(tmp_path, section, key):
    data = json.loads(PUBLIC["11b"].read_text())
    del data[section][key]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"required key '{section}\.{key}' is missing; the file is not a "
                                              r"complete Llama 3\.2 Vision \(mllama\) config"):
        read_source(tmp_path / "config.json")


@pytest.mark.parametrize("key, value, match", [
    ("factor", "x", r"text_config\.rope_scaling\.factor is 'x', expected a positive number"),
    ("original_max_position_embeddings", None, r"original_max_position_embeddings is null, expected a positive "
                                               r"integer"),
    ("rope_theta", -1, r"text_config\.rope_scaling\.rope_theta is -1, expected a positive number"),
])
def test_a_bad_rope_value_is_refused(tmp_path, key, value, match):
    """Llama 3.1's RoPE scaling values are read with their kinds (a string factor was a ValueError traceback)."""
    data = json.loads(PUBLIC["11b"].read_text())
    data["text_config"]["rope_scaling"][key] = value  # the published config's transformers 4.x key
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=match):
        read_source(tmp_path / "config.json")


def test_plan_of_an_mllama_config_needs_neither_torch_nor_tensorrt():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "
            "from flamingo_edge.cli.main import main; "
            f"sys.exit(main(['plan', {str(PUBLIC['90b'])!r}, '--target', 'thor', '--max-context', '1024', "
            "'--image-cache', '1', '--json']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"][0]["recommended"] == "int8-weights"
