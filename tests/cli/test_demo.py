"""`flamingo-edge demo` end to end on the bundled checkpoint; transformers agrees with us on it; the training script
writes a folder both load; the missing-checkpoint error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.models.checkpoint import DEMO_CHECKPOINT, DEMO_OVERRIDE

ROOT = Path(__file__).parents[2]


@pytest.fixture
def bundled(monkeypatch):
    """The word `demo` names the checkpoint shipped in the package, whatever the caller's environment says."""
    monkeypatch.delenv(DEMO_OVERRIDE, raising=False)
    return DEMO_CHECKPOINT


def test_missing_demo_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(DEMO_OVERRIDE, str(tmp_path / "none"))
    assert main(["demo"]) == 2
    assert "the demo checkpoint is missing" in capsys.readouterr().err


def test_the_bundled_checkpoint_is_small_safetensors_with_a_model_card(bundled):
    files = {p.name for p in bundled.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert sum(p.stat().st_size for p in bundled.iterdir()) < 25 * 2**20


@pytest.mark.slow
def test_demo_end_to_end_and_export_cache(bundled, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DEMO_OVERRIDE}
    env["FLAMINGO_EDGE_CACHE"] = str(tmp_path)
    command = [sys.executable, "-m", "flamingo_edge.cli.main", "demo", "--n", "5", "--seed", "7"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    for section in ("1. captions", "2. a question", "3. few-shot", "4. held-out accuracy", "PyTorch",
                    "ONNX Runtime", "5. speed"):
        assert section in first
    captions = [line for line in first.splitlines() if re.match(r"\s+scene \d:", line)]
    assert len(captions) == 3 and all(line.endswith("[ok]") for line in captions), first  # the model is trained
    assert "query 1:" in first and "reused" in first.split("query 1:")[1].split("\n")[0]
    exports = list(tmp_path.glob("demo-export-*"))
    assert len(exports) == 1
    stamp = (exports[0] / "export.json").stat().st_mtime_ns
    subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert (exports[0] / "export.json").stat().st_mtime_ns == stamp  # cached: not exported again


def test_transformers_loads_the_bundled_folder_and_agrees(bundled, seed):
    transformers = pytest.importorskip("transformers")
    import torch
    from PIL import Image

    from flamingo_edge.demo import scenes
    from flamingo_edge.demo.evaluate import MAX_ANSWER_TOKENS, pytorch_answerer

    rng = np.random.default_rng(seed + 1)  # held out: training used seed 0
    scene = scenes.make_scene(rng)
    question = scene.questions()[rng.integers(len(scene.questions()))][0]
    prompts = [scenes.caption_prompt(scene), scenes.question_prompt(scene, question)]
    model = transformers.IdeficsForVisionText2Text.from_pretrained(bundled).eval()
    processor = transformers.AutoProcessor.from_pretrained(bundled)
    inputs = processor(text=[[Image.fromarray(p[0]), p[1]] for p in prompts], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
    theirs = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    ours = pytorch_answerer("demo")(prompts)
    assert [" ".join(t.split()) for t in ours] == [" ".join(t.split()) for t in theirs]


@pytest.mark.slow
def test_training_script_is_reproducible_and_writes_a_folder_both_load(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the training script uses transformers")
    from flamingo_edge.artifacts import sha256_of
    from flamingo_edge.models import load_checkpoint

    digests = []
    for run in ("first", "second"):
        out = tmp_path / run
        result = subprocess.run([sys.executable, str(ROOT / "samples" / "train_demo_model.py"), str(out),
                                 "--steps", "9", "--batch-size", "4"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "saved" in result.stdout and "after 9 steps" in result.stdout
        digests.append(sha256_of(out / "model.safetensors"))
    assert digests[0] == digests[1]  # same seed and steps: the same weights, bit for bit
    transformers.IdeficsForVisionText2Text.from_pretrained(out)
    model = load_checkpoint(out)
    assert model.config.vision.patch_size == 32  # one scene cell per patch
