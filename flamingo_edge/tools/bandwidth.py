"""The machine's memory copy bandwidth, measured in a child process as often as a benchmark asks.

`bench` divides the bytes a decode step reads by this bandwidth to get the step's floor. On a shared machine the
bandwidth drifts by tens of percent within minutes (measured here: 24.5 to 36.9 GB/s between two `bench` runs of
the same exports, the fp32 baseline's fraction of its floor going from 93 % to 58 % with it), so it is measured
right before each timed run and each run's decode is judged against its own measurement. The buffers live in a
child process, allocated once: they stay out of the benchmark's peak RSS, and no measurement pays for page faults.
"""

from __future__ import annotations

import os
import time

import numpy as np


def copy_bandwidth(source: np.ndarray, target: np.ndarray, repeats: int, pool, threads: int) -> float:
    """Bytes per second moved by copying `source` into `target` (read + write), split over `threads` threads (one
    per CPU, as the backends' thread pools read weights; `pool` a ThreadPoolExecutor of them); best of `repeats`."""
    bounds = np.linspace(0, source.size, threads + 1).astype(int)

    def copy():  # numpy releases the GIL while it copies
        list(pool.map(lambda i: np.copyto(target[bounds[i]:bounds[i + 1]], source[bounds[i]:bounds[i + 1]]),
                      range(threads)))

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def _serve(connection, megabytes: int, repeats: int) -> None:
    """The child: answer each request with a measurement, until None."""
    from concurrent.futures import ThreadPoolExecutor

    source = np.ones(megabytes << 18, np.float32)
    target = np.ones_like(source)  # written now, so that no measurement pays for its page faults
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        while connection.recv() is not None:
            connection.send(copy_bandwidth(source, target, repeats, pool, threads))


class BandwidthProbe:
    """A child process holding two `megabytes` buffers (larger than any CPU cache); `measure()` returns the copy
    bandwidth in bytes/s, best of `repeats` copies. A context manager: the child ends on exit."""

    def __init__(self, megabytes: int = 256, repeats: int = 3):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process that holds ONNX Runtime's threads
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, megabytes, repeats), daemon=True,
                                        name="flamingo-edge bandwidth probe")
        self._process.start()
        child.close()

    def measure(self) -> float:
        self._connection.send(True)
        return self._connection.recv()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
        self._connection.close()

    def __enter__(self) -> BandwidthProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
