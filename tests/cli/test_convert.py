"""`flamingo-edge convert openflamingo`: a real conversion from the open_flamingo fixtures, read back by `info`;
outputs are never overwritten and a failed conversion leaves nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flamingo_edge.cli.main import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "openflamingo" / "gpt_neox"


def _argv(out: Path, *extra: str) -> list[str]:
    every = str(json.loads((FIXTURE / "cases.json").read_text())["cross_attn_every_n_layers"])
    return ["convert", "openflamingo", str(FIXTURE / "checkpoint.pt"), "--lm", str(FIXTURE / "lm"),
            "--vision", str(FIXTURE / "vision.json"), "--vision-weights", str(FIXTURE / "open_clip.safetensors"),
            "--cross-attn-every-n-layers", every, "-o", str(out), *extra]


def test_convert_then_info(tmp_path, capsys):
    out = tmp_path / "of"
    assert main(_argv(out)) == 0
    printed = capsys.readouterr().out
    assert re.search(r"wrote .*of: [\d.]+M parameters in \d+ tensors; 4 decoder layers, gated cross-attention "
                     r"before \[1, 3\]", printed)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "processor_config.json",
                                                    "special_tokens_map.json", "tokenizer.json",
                                                    "tokenizer_config.json"]
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "openflamingo" and summary["cross_attention_layers"] == [1, 3]
    assert summary["vision_tokens_per_image"] == 16  # 56 px / patch 14: patches only, no class token


def test_an_existing_output_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "of"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_argv(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failed_conversion_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "of"
    assert main(_argv(out)[:-4] + ["--cross-attn-every-n-layers", "1", "-o", str(out)]) == 2
    assert "--cross-attn-every-n-layers" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary sibling


@pytest.mark.parametrize("change, match", [
    (("--vision", "ViT-Q-99"), r"--vision 'ViT-Q-99' is neither a known open_clip model"),
    (("--lm", "/nonexistent"), r"/nonexistent"),
])
def test_bad_flags_exit_2(tmp_path, capsys, change, match):
    argv = _argv(tmp_path / "of")
    argv[argv.index(change[0]) + 1] = change[1]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "big", r"lm/config\.json: hidden_size is 'big', expected a positive integer; fix that value"),
    ("num_attention_heads", None, r"num_attention_heads is null, expected a positive integer"),
    ("rotary_pct", -0.5, r"rotary_pct is -0\.5, expected a positive number"),
    ("hidden_act", "swish", r"hidden_act='swish' is not supported; supported: \['gelu'"),
])
def test_a_bad_language_model_config_exits_2_and_names_the_key(tmp_path, capsys, key, value, match):
    """A wrong value in the language model's config.json is a CheckpointError naming the file and the key (it was a
    TypeError deep in the reader for a string where a size goes)."""
    lm = tmp_path / "lm"
    lm.mkdir()
    for file in (FIXTURE / "lm").iterdir():
        (lm / file.name).write_bytes(file.read_bytes())
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, key: value}))
    argv = _argv(tmp_path / "of")
    argv[argv.index("--lm") + 1] = str(lm)
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "of").exists()


@pytest.mark.parametrize("key, value, shown", [("image_size", "big", "'big'"), ("width", "big", "'big'"),
                                               ("layers", 0, "0"), ("mlp_ratio", "4x", "'4x'")])
def test_a_bad_vision_config_exits_2_and_names_the_key(tmp_path, capsys, key, value, shown):
    """The open_clip model config (--vision FILE) the same way: its vision_cfg key named, nothing written."""
    config = json.loads((FIXTURE / "vision.json").read_text())
    config["vision_cfg"][key] = value
    (tmp_path / "vision.json").write_text(json.dumps(config))
    argv = _argv(tmp_path / "of")
    argv[argv.index("--vision") + 1] = str(tmp_path / "vision.json")
    assert main(argv) == 2
    assert f"vision.json: vision_cfg.{key} is {shown}, expected a positive" in capsys.readouterr().err
    assert not (tmp_path / "of").exists()
