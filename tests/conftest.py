"""Shared fixtures: small IDEFICS checkpoints with random weights, built offline and saved with save_pretrained.

Every run draws a fresh seed (printed in the header); set FLAMINGO_EDGE_TEST_SEED to replay one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.models.random_idefics import PRESETS

SEED = int(os.environ.get("FLAMINGO_EDGE_TEST_SEED", secrets.randbelow(2**31)))


def pytest_report_header(config):
    return f"flamingo-edge test seed: {SEED} (replay with FLAMINGO_EDGE_TEST_SEED={SEED})"


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


@pytest.fixture
def rng(seed, request):
    """A generator per test, derived from the session seed and the test's name (so tests do not share draws)."""
    return np.random.default_rng([seed, *request.node.name.encode()])


def random_image(rng, height, width, channels=3):
    """A uint8 image of random pixels: [H, W, channels], or [H, W] with channels None."""
    shape = (height, width) if channels is None else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="session", params=sorted(PRESETS))
def idefics_checkpoint(request, tmp_path_factory):
    """A folder written by IdeficsForVisionText2Text/IdeficsProcessor.save_pretrained, one per preset."""
    from flamingo_edge.models.random_idefics import save_random_idefics

    return save_random_idefics(tmp_path_factory.mktemp(f"idefics-{request.param}"), preset=request.param, seed=SEED)


@pytest.fixture(scope="session")
def idefics_export(idefics_checkpoint, tmp_path_factory):
    """`flamingo-edge export` of `idefics_checkpoint` (checked against PyTorch while exporting)."""
    from flamingo_edge.export.export import export_all

    out = tmp_path_factory.mktemp("export") / "export"  # export_all writes a new folder
    export_all(idefics_checkpoint, out, seed=SEED)
    return out


WORDS = "a red circle blue square what colour is the shape how many two three dog cat photo of on grass".split()
# Each case is a batch of prompts; "I" marks an image, "T" a text.
PROMPT_CASES = {
    "text_before_first_image": [["T", "I", "T"]],
    "two_images": [["T", "I", "T", "I", "T"]],
    "three_images_two_adjacent": [["T", "I", "I", "T", "I", "T"]],
    "batch_of_two_with_padding": [["T", "I", "T", "I", "T", "T"], ["T", "I", "T"]],
}


def make_prompts(case: str, rng) -> list[list]:
    """A batch of prompts for `case`: random words and random uint8 RGB images (numpy) of random sizes."""
    import numpy as np

    def item(kind):
        if kind == "T":
            return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        height, width = rng.integers(8, 80, size=2)
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)

    return [[item(kind) for kind in prompt] for prompt in PROMPT_CASES[case]]


def as_pil(prompts: list[list]) -> list[list]:
    """The same prompts with PIL images, for transformers' processor."""
    from PIL import Image

    return [[item if isinstance(item, str) else Image.fromarray(item) for item in prompt] for prompt in prompts]


def upstream_inputs(processor, prompts: list[list]) -> dict:
    """transformers' IdeficsProcessor on our prompts (numpy images): the four model inputs as torch tensors."""
    batch = processor(text=as_pil(prompts), return_tensors="pt")
    return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_attention_mask")}


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """The bundled demo checkpoint exported once for the session (whatever FLAMINGO_EDGE_DEMO_CHECKPOINT says)."""
    from flamingo_edge.export.export import export_all
    from flamingo_edge.models.checkpoint import DEMO_CHECKPOINT

    out = tmp_path_factory.mktemp("demo-export") / "export"
    export_all(DEMO_CHECKPOINT, out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_calibration(demo_export, tmp_path_factory):
    """`flamingo-edge calibrate` of `demo_export` on 24 demo images (int8 Q/DQ and GPTQ read it)."""
    from flamingo_edge.cli.main import main

    out = tmp_path_factory.mktemp("calib") / "calib"
    assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "24", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def mllama_export(tmp_path_factory):
    """A tiny random Llama 3.2 Vision checkpoint (`random_mllama`, saved by transformers) and its export:
    (checkpoint, export)."""
    from flamingo_edge.export.export import export_all
    from flamingo_edge.models.random_mllama import save_random_mllama

    root = tmp_path_factory.mktemp("mllama")
    checkpoint = save_random_mllama(root / "checkpoint", preset="tiny", seed=SEED)
    export_all(checkpoint, root / "export", seed=SEED)
    return checkpoint, root / "export"


OPENFLAMINGO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "openflamingo"  # tests/reference/openflamingo


def convert_openflamingo_fixture(family: str, out: Path) -> Path:
    """`flamingo-edge convert openflamingo` of the open_flamingo fixture of one LM family (llama, mpt, gpt_neox):
    its released-form checkpoint.pt on top of its LM folder and open_clip weights."""
    import json

    from flamingo_edge.models.convert import convert_openflamingo

    folder = OPENFLAMINGO_FIXTURES / family
    every = json.loads((folder / "cases.json").read_text())["cross_attn_every_n_layers"]
    return convert_openflamingo(folder / "checkpoint.pt", lm_dir=folder / "lm", vision=str(folder / "vision.json"),
                                vision_weights=folder / "open_clip.safetensors", cross_attn_every_n_layers=every,
                                out_dir=out).folder


@pytest.fixture(scope="session")
def openflamingo_export(tmp_path_factory):
    """family -> (converted checkpoint, its export), each made once per session on first use."""
    from flamingo_edge.export.export import export_all

    made = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            root = tmp_path_factory.mktemp(f"openflamingo-{family}")
            checkpoint = convert_openflamingo_fixture(family, root / "checkpoint")
            export_all(checkpoint, root / "export", seed=SEED)
            made[family] = checkpoint, root / "export"
        return made[family]

    return get


def assert_imports_without(module: str, banned: tuple[str, ...] = ("torch", "transformers", "PIL")) -> None:
    """Importing `module` in a fresh interpreter loads none of `banned` (what an edge device does not install)."""
    import subprocess
    import sys

    code = (f"import sys, {module}; bad = [m for m in {banned!r} if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
