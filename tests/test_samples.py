"""The README's commands, run as a user would (its samples and console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_readme_main_command_is_install_plus_demo():
    """The first command is the install with what the demo needs (it exports the bundled checkpoint: `[export]`) plus
    `flamingo-edge demo`, which tests/cli/test_demo.py runs end to end."""
    readme = (ROOT / "README.md").read_text()
    command = readme.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command == ("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[export]' && "
                       "flamingo-edge demo")


@pytest.mark.slow
def test_readme_own_checkpoint_commands(tmp_path):
    """The README's commands for your own checkpoint, run as written from a copy of the samples (out/ is relative)."""
    pytest.importorskip("transformers", reason="the sample builds its checkpoint with transformers")
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```bash\n")[1:]]
    block = next(b for b in blocks if "random_idefics.py" in b)
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLAMINGO_EDGE_CACHE": str(tmp_path / "cache")}
    env.pop("FLAMINGO_EDGE_DEMO_CHECKPOINT", None)
    result = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "vocabulary" in result.stdout and "export.json" in result.stdout and "captions" in result.stdout


def test_readme_python_example(tmp_path):
    """The README's Python example, run as written, in a folder where the main command has made its checkpoint."""
    pytest.importorskip("transformers", reason="the checkpoint is built with transformers")
    from flamingo_edge.models.random_idefics import save_random_idefics

    readme = (ROOT / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    save_random_idefics(tmp_path / "out" / "idefics-tiny")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip().startswith("torch.Size([1, ")
