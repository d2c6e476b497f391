"""The base install (`pip install flamingo-edge`, no extras) in a fresh venv: no torch, onnx or safetensors; it runs
an export made here (generate, eval, bench, calibrate, the camera app); the commands that need `[export]` say so.
And what pip resolves for the TensorRT extras: cuda-python of the CUDA major each one names.

pip fetches the base dependencies (numpy, onnxruntime, OpenCV, tokenizers, tqdm) from the package registry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from flamingo_edge.artifacts import DEMO_OVERRIDE
from flamingo_edge.demo import scenes

pytestmark = pytest.mark.slow  # a venv and a pip install: about a minute

ROOT = Path(__file__).parents[1]
EXTRA_HINT = "pip install 'flamingo-edge[export]'"
PROMPT = f"<image>{scenes.CAPTION_PROMPT}"


def _copy_source(root: Path) -> Path:
    """A copy of the package's source, so that pip's build leaves the repository alone."""
    source = root / "source"
    shutil.copytree(ROOT / "flamingo_edge", source / "flamingo_edge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A fresh venv holding `pip install .` of a copy of the package (no extras, not editable)."""
    root = tmp_path_factory.mktemp("base-install")
    source = _copy_source(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                            capture_output=True, text=True, env=_clean_env(root))
    assert result.returncode == 0, result.stderr
    return venv


def _clean_env(tmp: Path) -> dict[str, str]:
    """This process's environment without its venv (nothing of the test install may leak in)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", DEMO_OVERRIDE)}
    return {**env, "FLAMINGO_EDGE_CACHE": str(tmp / "cache")}


def _run(command: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=_clean_env(tmp), timeout=600)


@pytest.fixture(scope="module")
def scene_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    cv2.imwrite(str(path), cv2.cvtColor(scenes.make_scene(np.random.default_rng(3)).image, cv2.COLOR_RGB2BGR))
    return path


def test_the_base_install_holds_the_runtime_and_no_torch_onnx_or_safetensors(base_venv, tmp_path):
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "('torch', 'onnx', 'safetensors', 'onnxruntime', 'cv2', 'tokenizers', 'numpy', 'tqdm')}))")
    found = json.loads(_run([str(base_venv / "bin" / "python"), "-c", code], tmp_path).stdout)
    assert found == {"torch": False, "onnx": False, "safetensors": False, "onnxruntime": True, "cv2": True,
                     "tokenizers": True, "numpy": True, "tqdm": True}


def test_generate_on_the_base_install_equals_the_full_install(base_venv, demo_export, scene_image, tmp_path):
    args = ["generate", str(demo_export), "--prompt", PROMPT, "--image", str(scene_image), "--max-new-tokens", "8"]
    base = _run([str(base_venv / "bin" / "flamingo-edge"), *args], tmp_path)
    assert base.returncode == 0, base.stderr
    full = _run([sys.executable, "-m", "flamingo_edge.cli.main", *args], tmp_path)
    assert full.returncode == 0, full.stderr
    assert base.stdout.strip() and base.stdout == full.stdout


@pytest.mark.parametrize("command", [
    ["eval", "{export}", "--n", "2", "--json"],
    ["bench", "{export}", "--runs", "1", "--new-tokens", "4"],
    ["calibrate", "{export}", "--images", "demo", "--n", "4", "-o", "{tmp}/calib"],
], ids=lambda command: command[0])
def test_the_base_install_runs_an_export(base_venv, demo_export, tmp_path, command):
    args = [part.format(export=demo_export, tmp=tmp_path) for part in command]
    result = _run([str(base_venv / "bin" / "flamingo-edge"), *args], tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_camera_app_runs_on_the_base_install(base_venv, demo_export, scene_image, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(3):
        shutil.copy2(scene_image, frames / f"{index}.png")
    result = _run([str(base_venv / "bin" / "python"), str(ROOT / "samples" / "camera_app.py"), str(frames),
                   "--export", str(demo_export), "--headless", "--max-new-tokens", "6"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["frame"] for line in result.stdout.splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("command", [
    ["export", "demo", "-o", "{out}"],
    ["demo", "--n", "1"],  # its first run exports the bundled checkpoint
    ["info", "demo"],
    ["compare", "demo", "{export}"],
    ["quantize", "{export}", "--precision", "fp16", "-o", "{out}"],
    ["eval", "demo", "--backend", "pytorch", "--n", "1"],
    ["bench", "{export}", "--reference", "demo"],
], ids=["export", "demo", "info", "compare", "quantize", "eval-pytorch", "bench-reference"])
def test_a_command_that_needs_the_export_extra_names_it(base_venv, demo_export, tmp_path, command):
    out = tmp_path / "out"
    args = [part.format(export=demo_export, out=out) for part in command]
    result = _run([str(base_venv / "bin" / "flamingo-edge"), *args], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and EXTRA_HINT in result.stderr.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("extra, major", [("tensorrt", 12), ("tensorrt-cu12", 12), ("tensorrt-cu13", 13)])
def test_the_tensorrt_extras_resolve_cuda_python_of_their_cuda_major(tmp_path, extra, major):
    """An unpinned cuda-python resolved 13, which needs driver >= 580: JetPack 6 got cudaErrorInsufficientDriver."""
    report = tmp_path / "report.json"
    result = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                   str(report), f"{_copy_source(tmp_path)}[{extra}]"], tmp_path)
    assert result.returncode == 0, result.stderr
    versions = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())[
        "install"]}
    assert versions["cuda-python"].split(".")[0] == str(major) and "onnx" in versions
