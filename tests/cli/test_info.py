"""`flamingo-edge info`: parameter counts equal transformers' own count, errors exit 2 with the message."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from flamingo_edge.cli.main import main
from flamingo_edge.models.importers.idefics import config_from_hf
from flamingo_edge.models.summary import summarize

transformers = pytest.importorskip("transformers", reason="the upstream reference: pip install -e '.[test]'")


def _upstream_count(hf_config) -> int:
    """transformers' parameter count, minus the vision post-layernorm that IDEFICS never applies to its tokens."""
    with torch.device("meta"):
        model = transformers.IdeficsForVisionText2Text(hf_config)
    unused = sum(p.numel() for p in model.model.vision_model.post_layernorm.parameters())
    return sum(p.numel() for p in model.parameters()) - unused


def test_info_json_counts_match_transformers(idefics_checkpoint, capsys):
    assert main(["info", str(idefics_checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hf_config = transformers.IdeficsConfig.from_pretrained(idefics_checkpoint)
    assert report["parameters"]["total"] == _upstream_count(hf_config)
    assert report["cross_attention_layers"] == list(range(0, hf_config.num_hidden_layers, hf_config.cross_layer_interval))
    assert report["additional_vocab_size"] == hf_config.additional_vocab_size


def test_idefics_9b_default_config_is_summarized_without_weights():
    hf_config = transformers.IdeficsConfig(use_resampler=True)  # the defaults are IDEFICS-9B's
    summary = summarize(config_from_hf(hf_config.to_dict()))
    assert summary.parameters["total"] == _upstream_count(hf_config)
    assert summary.visual_tokens_per_image == 64 and summary.vision_tokens_per_image == 257


def test_info_text_through_console_script(idefics_checkpoint):
    executable = shutil.which("flamingo-edge")
    assert executable, "the console script is not installed: pip install -e ."
    result = subprocess.run([executable, "info", str(idefics_checkpoint)], capture_output=True, text=True, check=True)
    assert "gated xattn before decoder layers 0" in result.stdout and "total" in result.stdout


def test_info_on_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_info_on_an_engines_folder_says_what_it_was_built_for_and_if_it_runs_here(demo_export, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
    from flamingo_edge.errors import FeatureUnavailableError
    from flamingo_edge.runtime.cuda import device_info
    from flamingo_edge.trt_compat import cuda_major

    engines = tmp_path / "engines"
    assert main(["build", str(demo_export), "-o", str(engines), "--target", "rtx-sm86", "--max-context", "24",
                 "--max-prompt", "16"]) == 0
    capsys.readouterr()
    assert main(["info", str(engines), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp32" and report["compute_capability"] == "SM86"
    assert report["cuda_major"] == cuda_major("tensorrt_rtx") is not None  # tensorrt_rtx_cu12 or _cu13 built them
    assert set(report["engines"]) == {"vision", "resampler", "xattn_kv", "decoder"}
    assert report["limits"]["max_context"] == 24
    try:
        device = device_info()
    except FeatureUnavailableError:  # no GPU here: the answer is "unknown", with CUDA's reason
        assert report["runs_here"] == "unknown" and "no usable one" in report["why"]
    else:
        assert report["runs_here"] == ("yes" if device.compute_capability == "SM86" else "no")
    assert main(["info", str(engines)]) == 0
    text = capsys.readouterr().out
    assert "built with  tensorrt_rtx" in text and "for SM86, target rtx-sm86" in text and "runs here" in text
    (engines / "decoder.engine").write_bytes(b"damaged")
    assert main(["info", str(engines)]) == 2
    assert "missing or was modified" in capsys.readouterr().err


def test_info_demo_says_where_its_export_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLAMINGO_EDGE_CACHE", str(tmp_path))
    monkeypatch.delenv("FLAMINGO_EDGE_DEMO_CHECKPOINT", raising=False)
    assert main(["info", "demo"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"demo export {tmp_path}/demo-export-") and "not exported yet" in last
    assert main(["info", "demo", "--json"]) == 0
    cached = json.loads(capsys.readouterr().out)["demo_export"]
    assert cached["folder"].startswith(str(tmp_path)) and cached["exported"] is False


def test_info_of_an_export_describes_the_model_it_holds(demo_export, capsys):
    assert main(["info", str(demo_export), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"] == str(demo_export) and report["precision"] == "fp32" and report["opset"] == 17
    assert report["family"] == "idefics" and report["checkpoint"].endswith("checkpoint")
