"""trt_compat.py: where TensorRT's log messages go, and the CUDA major of the installed TensorRT wheels."""

from __future__ import annotations

import logging

import pytest

from flamingo_edge.trt_compat import collecting_logger, cuda_major


def test_tensorrt_messages_reach_logging_at_their_own_level(caplog):
    """An error TensorRT reports without failing the call (a calibration cache it ignores, a tactic it drops) must
    be seen: ERROR and INTERNAL_ERROR at logging.ERROR, WARNING at logging.WARNING; INFO and VERBOSE stay DEBUG."""
    trt = pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
    severity = trt.ILogger.Severity
    log = collecting_logger(trt)
    with caplog.at_level(logging.DEBUG, logger="flamingo_edge.trt_compat"):
        for level in (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING, severity.INFO, severity.VERBOSE):
            log.log(level, f"message {level.name}")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "TensorRT: message INTERNAL_ERROR"), (logging.ERROR, "TensorRT: message ERROR"),
        (logging.WARNING, "TensorRT: message WARNING"), (logging.DEBUG, "TensorRT: message INFO"),
        (logging.DEBUG, "TensorRT: message VERBOSE")]
    assert log.errors == ["message INTERNAL_ERROR", "message ERROR"]  # for the exception when a call fails


def test_cuda_major_comes_from_the_wheel_that_installs_the_module():
    assert cuda_major("tensorrt_rtx", {"tensorrt_rtx": ["tensorrt_rtx_cu13"]}) == 13
    assert cuda_major("tensorrt_rtx", {"tensorrt_rtx": ["tensorrt-rtx-cu12"]}) == 12
    assert cuda_major("tensorrt", {"tensorrt": ["tensorrt_cu12_bindings"]}) == 12
    assert cuda_major("tensorrt", {}) is None  # JetPack's python3-libnvinfer: no distribution
    assert cuda_major("tensorrt", {"tensorrt": ["tensorrt"]}) is None  # a build that does not say
    assert cuda_major("tensorrt", {"tensorrt": ["tensorrt_cu12", "tensorrt_cu13"]}) is None  # two disagree


def test_cuda_major_of_the_installed_tensorrt_rtx():
    from importlib.metadata import packages_distributions

    pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
    names = packages_distributions()["tensorrt_rtx"]
    assert cuda_major("tensorrt_rtx") in (12, 13) and any(f"cu{cuda_major('tensorrt_rtx')}" in n for n in names)



def test_ctrl_c_during_tensorrt_is_held_then_raised():
    """TensorRT catches what its Python callbacks raise and goes on, so a KeyboardInterrupt that lands in our logger
    or progress monitor was lost and the build ran to its end (seen in CI: `build` exited 0 after Ctrl-C). While
    HeldInterrupt is entered, SIGINT only marks it pending: the progress monitor cancels the build at its next step,
    and KeyboardInterrupt is raised once TensorRT has returned; the previous handler is back afterwards."""
    import os
    import signal

    from flamingo_edge.trt_compat import HeldInterrupt, progress_monitor

    trt = pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras")
    before = signal.getsignal(signal.SIGINT)
    reports = []
    with pytest.raises(KeyboardInterrupt):
        with HeldInterrupt() as held:
            monitor = progress_monitor(trt, reports.append, held.pending_now)
            monitor.phase_start("Building engine", None, 3)
            assert monitor.step_complete("Building engine", 0) is True
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; handled between bytecodes, not raised here
            log = collecting_logger(trt)
            log.log(trt.ILogger.Severity.WARNING, "a callback runs after the Ctrl-C")
            assert held.pending and monitor.step_complete("Building engine", 1) is False  # cancels the build
    assert reports == ["Building engine 0/3", "Building engine 1/3", "Building engine 2/3"]
    assert signal.getsignal(signal.SIGINT) is before
    with HeldInterrupt():  # no Ctrl-C: nothing raised
        pass
