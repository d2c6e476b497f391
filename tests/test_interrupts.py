"""Ctrl-C during the long commands, sent to a real process: exit 130, one line, no traceback, and no output folder
or temporary sibling left behind.

The signal goes to the process group, as a terminal sends it, once the command's progress bar shows that the work
has begun. So that the work cannot finish in between (the race that makes such tests fragile), the process is
stopped (SIGSTOP) the moment the bar is seen, sent SIGINT, and continued: it meets the interrupt at that very point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flamingo_edge.cli.main import main

INTERRUPTED = 130
ROOT = Path(__file__).resolve().parents[1]


def interrupt_when(argv: list[str], ready: str, env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run `flamingo-edge ARGV`; once `ready` appears on its stderr, interrupt it as Ctrl-C does. Returns the exit
    status and the whole stderr."""
    process = subprocess.Popen([sys.executable, "-m", "flamingo_edge.cli.main", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    seen, chunks = threading.Event(), []

    def read() -> None:
        while chunk := process.stderr.read1(4096):
            chunks.append(chunk)
            if ready.encode() in b"".join(chunks):
                seen.set()
        seen.set()  # the process ended without it

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout), f"no {ready!r} on stderr within {timeout} s"
        try:
            os.killpg(process.pid, signal.SIGSTOP)  # freeze it where it is: the work cannot end before the signal
            finished = process.poll() is not None
            os.killpg(process.pid, signal.SIGINT)
            os.killpg(process.pid, signal.SIGCONT)
        except ProcessLookupError:  # it has ended already (an error, or work shorter than expected)
            finished = True
        code = process.wait(timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(10)
    err = b"".join(chunks).decode(errors="replace")
    assert not finished, f"{argv[0]} finished before it could be interrupted:\n{err}"
    return code, err


def assert_interrupted(command: str, code: int, err: str, out: Path) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == INTERRUPTED, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert lines[-1] == f"flamingo-edge {command}: interrupted (nothing was left half-written)", err
    assert not out.exists(), sorted(out.parent.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], sorted(out.parent.iterdir())


@pytest.fixture
def env(tmp_path) -> dict:
    environment = {**os.environ, "FLAMINGO_EDGE_CACHE": str(tmp_path / "cache")}
    environment.pop("FLAMINGO_EDGE_DEMO_CHECKPOINT", None)
    return environment


@pytest.fixture(scope="module")
def calibration(demo_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibration") / "calib"
    assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "32", "-o", str(out)]) == 0
    return out


@pytest.mark.slow
def test_export(tmp_path, env):
    out = tmp_path / "out"
    code, err = interrupt_when(["export", "demo", "-o", str(out)], "export:", env)
    assert_interrupted("export", code, err, out)


@pytest.mark.slow
def test_export_overwrite_keeps_the_old_export(tmp_path, env, demo_export):
    """Interrupted while replacing an export (--overwrite): the old one stays, whole."""
    import shutil

    from flamingo_edge.artifacts import read_export_record

    out = tmp_path / "out"
    shutil.copytree(demo_export, out)
    code, err = interrupt_when(["export", "demo", "-o", str(out), "--overwrite"], "export:", env)
    assert code == INTERRUPTED and "Traceback" not in err, err
    read_export_record(out)  # the earlier export, unchanged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.slow
def test_calibrate(tmp_path, env, demo_export):
    out = tmp_path / "calib"
    code, err = interrupt_when(["calibrate", str(demo_export), "--images", "demo", "--n", "200", "-o", str(out)],
                               "calibrate:", env)
    assert_interrupted("calibrate", code, err, out)


@pytest.mark.slow
def test_quantize(tmp_path, env, demo_export, calibration):
    out = tmp_path / "int8"
    code, err = interrupt_when(["quantize", str(demo_export), "--precision", "int8", "--calibration",
                                str(calibration), "--method", "entropy", "-o", str(out)], "quantize (int8)", env)
    assert_interrupted("quantize", code, err, out)


@pytest.mark.slow
def test_build(tmp_path, env, demo_export):
    pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
    out = tmp_path / "engines"
    code, err = interrupt_when(["build", str(demo_export), "-o", str(out), "--target", "rtx-sm86"],
                               "build (rtx-sm86)", env)
    assert_interrupted("build", code, err, out)


@pytest.mark.slow
def test_demo_first_export(tmp_path, env):
    """`flamingo-edge demo` with an empty cache exports first; interrupted then, the cache holds no export and no
    temporary folder, and `info demo` says it is not exported yet."""
    cache = Path(env["FLAMINGO_EDGE_CACHE"])
    code, err = interrupt_when(["demo", "--n", "1"], "export (cached)", env)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == INTERRUPTED and "Traceback" not in err, err
    assert lines[-1] == "flamingo-edge demo: interrupted (nothing was left half-written)", err
    assert not cache.exists() or list(cache.iterdir()) == [], sorted(cache.iterdir())
    info = subprocess.run([sys.executable, "-m", "flamingo_edge.cli.main", "info", "demo"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert info.returncode == 0 and "not exported yet" in info.stdout, info.stderr
