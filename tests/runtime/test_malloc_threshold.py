"""The ONNX Runtime backend returns freed large blocks to the system while a session loads, and lets glibc reuse them
afterwards.

Each case runs in a fresh process (the threshold is process-wide). The probe frees a 16 MiB block, which raises
glibc's dynamic threshold, then allocates 32 blocks of 4 MiB and one of 1 MiB after them, frees the 32 and reports how
much of the resident memory went away: freed blocks that were mapped on their own go back to the system, blocks on
the heap stay for reuse.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import contextlib, ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
from flamingo_edge.runtime.onnxruntime_backend import loading_memory_returned

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

def probe():
    MIB = 2**20
    big = libc.malloc(16 * MIB); ctypes.memset(big, 1, 16 * MIB); libc.free(big)
    blocks = [libc.malloc(4 * MIB) for _ in range(32)]
    for block in blocks:
        ctypes.memset(block, 1, 4 * MIB)
    last = libc.malloc(MIB); ctypes.memset(last, 1, MIB)
    before = rss()
    for block in blocks:
        libc.free(block)
    return (before - rss()) / MIB

mode = sys.argv[1]
if mode == "loading":
    with loading_memory_returned():
        print(probe())
elif mode == "after":
    with loading_memory_returned():
        pass
    print(probe())
else:
    print(probe())
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


def released_mib(mode: str, env: dict) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          timeout=120, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_go_back_to_the_system_while_a_session_loads_and_are_reused_after():
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    assert released_mib("default", env) < 16  # glibc's own behaviour: the 4 MiB blocks came from the heap and stay
    assert released_mib("loading", env) >= 120  # while loading: each was mapped on its own and unmapped when freed
    # after loading: up to 32 MiB from the heap again (a frame-sized allocation is not a fresh mapping each time)
    assert released_mib("after", env) < 16


def test_a_threshold_the_user_set_is_left_alone():
    # 32 MiB, set by the user: the 4 MiB blocks stay on the heap even while a session loads.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
    assert released_mib("loading", env) < 16
