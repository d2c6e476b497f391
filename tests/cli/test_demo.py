"""`flamingo-edge demo` end to end on a briefly trained demo checkpoint; the missing-checkpoint error.

The bundled checkpoint is not in the repository yet; `FLAMINGO_EDGE_DEMO_CHECKPOINT` names a folder trained here for
a few seconds by samples/train_demo_model.py (its accuracy is low; the mechanics are what is tested).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.cli.main import main

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("transformers", reason="the training script uses transformers")
    out = tmp_path_factory.mktemp("demo") / "checkpoint"
    subprocess.run([sys.executable, str(ROOT / "samples" / "train_demo_model.py"), str(out), "--minutes", "0.2"],
                   check=True, capture_output=True)
    return out


def test_missing_demo_checkpoint_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLAMINGO_EDGE_DEMO_CHECKPOINT", str(tmp_path / "none"))
    assert main(["demo"]) == 2
    assert "the demo checkpoint is missing" in capsys.readouterr().err


def test_demo_end_to_end_and_export_cache(trained, tmp_path):
    env = {**os.environ, "FLAMINGO_EDGE_DEMO_CHECKPOINT": str(trained), "FLAMINGO_EDGE_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "flamingo_edge.cli.main", "demo", "--n", "3"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    for section in ("1. captions", "2. a question", "3. few-shot", "4. held-out accuracy", "PyTorch",
                    "ONNX Runtime", "5. speed"):
        assert section in first
    assert "query 1:" in first and "reused" in first.split("query 1:")[1].split("\n")[0]
    exports = list(tmp_path.glob("demo-export-*"))
    assert len(exports) == 1
    stamp = (exports[0] / "export.json").stat().st_mtime_ns
    subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert (exports[0] / "export.json").stat().st_mtime_ns == stamp  # cached: not exported again


def test_transformers_loads_the_trained_folder_and_agrees(trained):
    transformers = pytest.importorskip("transformers")
    import torch
    from PIL import Image

    from flamingo_edge.demo import scenes
    from flamingo_edge.demo.evaluate import MAX_ANSWER_TOKENS, pytorch_answerer

    scene = scenes.make_scene(np.random.default_rng(4321))
    model = transformers.IdeficsForVisionText2Text.from_pretrained(trained).eval()
    processor = transformers.AutoProcessor.from_pretrained(trained)
    inputs = processor(text=[[Image.fromarray(scene.image), scenes.CAPTION_PROMPT]], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
    theirs = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    ours = pytorch_answerer(trained)([scenes.caption_prompt(scene)])[0]
    assert " ".join(ours.split()) == " ".join(theirs.split())
