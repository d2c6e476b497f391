"""A converted OpenFlamingo checkpoint through everything downstream of `models/`, with no family-specific code:
export, `flamingo-edge generate` (greedy tokens equal open_flamingo's `Flamingo.generate`, per LM family), the
ONNX Runtime pipeline in a left-padded batch with its image and prefix caches, `compare`, the camera app.
(calibrate/quantize/build: tests/cli/test_build.py; the model itself: tests/models/test_open_flamingo_parity.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.runtime.image import load_image
from flamingo_edge.runtime.pipeline import Pipeline

from conftest import OPENFLAMINGO_FIXTURES

# slow: the session converts and exports a checkpoint per family (~35 s on 2 cores) before any test here runs;
# the fast loop keeps the model-level parity (tests/models/test_open_flamingo_parity.py).
pytestmark = pytest.mark.slow

FAMILIES = ("llama", "mpt", "gpt_neox")
ROOT = Path(__file__).resolve().parents[1]


def cases(family: str) -> dict:
    return json.loads((OPENFLAMINGO_FIXTURES / family / "cases.json").read_text())


def expected_tokens(case: dict, row: int) -> list[int]:
    """open_flamingo's greedy tokens for one row, up to and including <|endofchunk|> when it stopped there."""
    return case["generated_new_tokens"][row][: case["generated_valid_length"][row]]


def items(prompt: str, images: list[str]) -> list:
    """A fixture prompt as processor items: the text split at each <image>, the image files in between."""
    pieces = prompt.split("<image>")
    out = [pieces[0]] if pieces[0] else []
    for name, text in zip(images, pieces[1:]):
        out.append(load_image(OPENFLAMINGO_FIXTURES / "images" / name))
        if text:
            out.append(text)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_cli_gives_open_flamingos_greedy_tokens(openflamingo_export, family, capsys):
    _, export = openflamingo_export(family)
    for case in cases(family)["cases"]:
        for row, (prompt, images) in enumerate(zip(case["prompts"], case["images"])):
            argv = ["generate", str(export), "--prompt", prompt, "--max-new-tokens",
                    str(len(case["generated_new_tokens"][row])), "--json"]
            for name in images:
                argv += ["--image", str(OPENFLAMINGO_FIXTURES / "images" / name)]
            assert main(argv) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["token_ids"] == expected_tokens(case, row), f"{family} {case['name']} row {row}"


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_batch_and_caches(openflamingo_export, family):
    """The left-padded batch of the fixture in one call; then the same prompts again: every image comes from the
    cross-attention cache and the prompt prefix from the prefix cache, with the same tokens."""
    _, export = openflamingo_export(family)
    case = next(c for c in cases(family)["cases"] if len(c["prompts"]) == 2)
    prompts = [items(p, i) for p, i in zip(case["prompts"], case["images"])]
    steps = len(case["generated_new_tokens"][0])
    with Pipeline.open(export) as pipeline:
        first = pipeline.complete(prompts, max_new_tokens=steps)
        assert [c.token_ids for c in first] == [expected_tokens(case, row) for row in range(2)]
        runs = dict(pipeline.stats)
        for row, prompt in enumerate(prompts):
            for _ in range(2):  # the second time the prompt's prefix comes from the prefix cache
                again = pipeline.complete([prompt], max_new_tokens=steps)
                assert again[0].token_ids == expected_tokens(case, row)
        assert pipeline.stats["vision_runs"] == runs["vision_runs"]  # no image encoded twice
        assert pipeline.stats["image_cache_hits"] > runs.get("image_cache_hits", 0)
        assert pipeline.stats["prefix_tokens_reused"] > runs.get("prefix_tokens_reused", 0)


def test_compare_passes_on_a_converted_checkpoint(openflamingo_export, tmp_path, capsys):
    checkpoint, export = openflamingo_export("mpt")
    images = sorted(str(p) for p in (OPENFLAMINGO_FIXTURES / "images").glob("*.png"))
    assert main(["compare", str(checkpoint), str(export), "--images", *images, "--task-n", "2",
                 "--json", str(tmp_path / "report.json")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_camera_app_captions_each_frame_like_the_pipeline(openflamingo_export):
    _, export = openflamingo_export("gpt_neox")
    folder = OPENFLAMINGO_FIXTURES / "images"
    result = subprocess.run([sys.executable, str(ROOT / "samples" / "camera_app.py"), str(folder), "--export",
                             str(export), "--prompt", "An image of", "--max-new-tokens", "6", "--headless"],
                            capture_output=True, text=True, check=True, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    frames = sorted(folder.glob("*.png"))
    assert len(lines) == len(frames)
    with Pipeline.open(export) as pipeline:
        for line in lines:
            image = load_image(frames[line["frame"]])
            assert line["text"] == pipeline.complete([[image, "An image of"]], max_new_tokens=6)[0].text
