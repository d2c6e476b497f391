"""Where the tests of `flamingo-edge serve` and `triton-repo` find the serving venv (not a test module).

The server runs in the serving venv (numpy<2 for PyTriton: tests/serving/build.sh makes ROOT/.venv-serve;
FLAMINGO_EDGE_SERVE_VENV names another); the tests and their Triton clients run in the main venv.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_serving_venv() -> Path | None:
    """FLAMINGO_EDGE_SERVE_VENV, else ROOT/.venv-serve, if it has flamingo-edge and PyTriton's tritonserver."""
    for venv in (os.environ.get("FLAMINGO_EDGE_SERVE_VENV"), ROOT / ".venv-serve"):
        if venv and (Path(venv) / "bin" / "flamingo-edge").is_file() and any(
                Path(venv).glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver")):
            return Path(venv)
    return None


def require_serving_venv() -> Path:
    """The serving venv; the test is skipped without one, except in CI (which builds it: a skip there would hide the
    tests)."""
    venv = find_serving_venv()
    if venv is None:
        message = ("no serving venv (flamingo-edge[serve]: PyTriton, numpy<2): run bash tests/serving/build.sh, or "
                   "set FLAMINGO_EDGE_SERVE_VENV")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return venv
