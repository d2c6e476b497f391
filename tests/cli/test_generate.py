"""`flamingo-edge generate`: markers place the images, --json reports the generated ids, errors exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from flamingo_edge.runtime.processor import prompt_items
from flamingo_edge.cli.main import main
from flamingo_edge.errors import PromptError
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import load_image


@pytest.fixture(scope="module")
def exported(idefics_export):
    return idefics_export


def test_markers_split_the_prompt_like_the_processor_items():
    image = np.zeros((2, 2, 3), np.uint8)
    assert prompt_items("A<image>B", [image]) == ["A", image, "B"]
    assert prompt_items("<image><image> what", [image, image]) == [image, image, " what"]
    with pytest.raises(PromptError, match=r"the prompt has 1 '<image>' markers but 2 --image were given"):
        prompt_items("A<image>B", [image, image])


def test_generate_json_equals_the_pipeline(exported, tmp_path, capsys, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    argv = ["generate", str(exported), "--prompt", "User: a<image>what colour is the square?", "--image", str(path),
            "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    with Pipeline.open(exported) as pipeline:
        expected = pipeline.complete([["User: a", load_image(path), "what colour is the square?"]], max_new_tokens=8)
    assert report["token_ids"] == expected[0].token_ids and report["text"] == expected[0].text
    assert report["time_to_first_token_s"] > 0


def test_generate_of_an_mllama_export_uses_its_image_token(mllama_export, tmp_path, capsys, seed):
    """`<image>` on the command line is the marker for every family: for Llama 3.2 Vision the processor writes
    `<|image|>` there (and its BOS after the leading images), as transformers' MllamaProcessor does."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), rng.integers(0, 256, (30, 60, 3), dtype=np.uint8))
    export = mllama_export[1]
    assert main(["generate", str(export), "--prompt", "<image>Describe it.", "--image", str(path),
                 "--max-new-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with Pipeline.open(export) as pipeline:
        batch = pipeline.processor.tokenize([[load_image(path), "Describe it."]])
        token_id = pipeline.processor.tokenizer.token_to_id
        expected = pipeline.complete([[load_image(path), "Describe it."]], max_new_tokens=6)
    bos, image = token_id("<|begin_of_text|>"), token_id("<|image|>")
    assert batch.input_ids[0, :3].tolist() == [bos, image, bos]
    assert report["token_ids"] == expected[0].token_ids


def test_generate_streams_text_through_the_console_script(exported):
    result = subprocess.run([sys.executable, "-m", "flamingo_edge.cli.main", "generate", str(exported),
                             "--prompt", "the dog", "--max-new-tokens", "4"], capture_output=True, text=True, check=True)
    assert result.stdout.endswith("\n")


@pytest.mark.parametrize("problem, match", [
    ("missing_image", r"cannot read image file .*nope\.png"),
    ("not_an_image", r"broken\.png is not an image"),
    ("marker_count", r"1 '<image>' markers but 0 --image"),
])
def test_generate_errors_exit_2(exported, tmp_path, capsys, problem, match):
    argv = ["generate", str(exported), "--prompt", "a <image> b"]
    if problem == "missing_image":
        argv += ["--image", str(tmp_path / "nope.png")]
    elif problem == "not_an_image":
        (tmp_path / "broken.png").write_bytes(b"not a png at all")
        argv += ["--image", str(tmp_path / "broken.png")]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_the_word_demo_names_the_cached_demo_export(tmp_path, monkeypatch, capsys):
    """`generate demo` exports the bundled checkpoint into the cache on first use, then reuses it; so does
    `compare demo demo` (the checkpoint, and its export)."""
    monkeypatch.setenv("FLAMINGO_EDGE_CACHE", str(tmp_path))
    monkeypatch.delenv("FLAMINGO_EDGE_DEMO_CHECKPOINT", raising=False)
    assert main(["generate", "demo", "--prompt", "caption:", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]
    [cached] = [p for p in tmp_path.iterdir()]
    assert cached.name.startswith("demo-export-")
    assert main(["compare", "demo", "demo", "--task-n", "0", "--new-tokens", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert [p for p in tmp_path.iterdir()] == [cached]
