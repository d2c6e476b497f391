"""What the base install leaves out, in the quick loop: `require`, and the CLI in a process where torch, onnx and
safetensors cannot be imported (a real base install in a fresh venv: tests/test_install.py, marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_edge.artifacts import DEMO_OVERRIDE
from flamingo_edge.errors import FeatureUnavailableError
from flamingo_edge.extras import require

# Run the CLI as on the base install: a None in sys.modules makes both `import` and `find_spec` fail for that name.
WITHOUT_EXPORT_EXTRA = ("import sys; sys.modules.update(torch=None, onnx=None, safetensors=None); "
                        "from flamingo_edge.cli.main import main; sys.exit(main(sys.argv[1:]))")
IMAGE = Path(__file__).parents[1] / "samples" / "data" / "shapes.png"


def run_without_the_extra(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != DEMO_OVERRIDE}
    return subprocess.run([sys.executable, "-c", WITHOUT_EXPORT_EXTRA, *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "FLAMINGO_EDGE_CACHE": str(tmp_path / "cache")})


def test_require_names_the_extra_to_install():
    require("numpy", "export", "anything")  # installed: nothing happens
    with pytest.raises(FeatureUnavailableError, match=r"^frobnicate needs no_such_module_here, which this install "
                                                      r"of flamingo-edge does not have; install it with: pip install "
                                                      r"'flamingo-edge\[export\]'$"):
        require("no_such_module_here", "export", "frobnicate")


def test_generate_runs_without_torch_onnx_or_safetensors(demo_export, tmp_path):
    result = run_without_the_extra("generate", str(demo_export), "--prompt", "<image>caption:", "--image", str(IMAGE),
                                   "--max-new-tokens", "4", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("command", [["export", "demo", "-o", "out"], ["compare", "demo", "EXPORT"],
                                     ["info", "demo"], ["convert", "openflamingo", "c.pt", "--lm", "lm", "--vision",
                                                        "v", "--cross-attn-every-n-layers", "1", "-o", "out"]],
                         ids=lambda command: command[0])
def test_a_command_that_needs_the_extra_says_which(command, demo_export, tmp_path):
    args = [str(demo_export) if part == "EXPORT" else part for part in command]
    result = run_without_the_extra(*args, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"flamingo-edge {command[0]}: error: ")
    assert result.stderr.rstrip().endswith("install it with: pip install 'flamingo-edge[export]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _declared_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]


def _pins(requirements: list[str], name: str):
    from packaging.requirements import Requirement

    found = [Requirement(r).specifier for r in requirements if Requirement(r).name == name]
    assert len(found) == 1, (name, requirements)
    return found[0]


@pytest.mark.parametrize("major", [11, 12, 13])
def test_each_tensorrt_extra_pins_cuda_python_to_one_cuda_major(major):
    """cuda-python 13 needs a CUDA 13 driver (>= 580): an unpinned one fails on JetPack 6 and older datacenter
    drivers with cudaErrorInsufficientDriver. Each extra keeps to its major; [tensorrt] is the JetPack 6 one."""
    extras = _declared_extras()
    pins = _pins(extras[f"tensorrt-cu{major}"], "cuda-python")
    assert pins.contains(f"{major}.9.0") and not pins.contains(f"{major + 1}.0.0")
    assert not pins.contains(f"{major - 1}.9.0")
    assert "onnx>=1.16" in extras[f"tensorrt-cu{major}"]  # build's operator check on a board without torch
    assert extras["tensorrt"] == ["flamingo-edge[tensorrt-cu12]"]


def test_the_rtx_extras_name_their_cuda_build():
    extras = _declared_extras()
    for major in (12, 13):
        assert _pins(extras[f"rtx-cu{major}"], f"tensorrt-rtx-cu{major}").contains("1.7.1.116")
    assert extras["rtx"] == ["tensorrt-rtx>=1.7"]
