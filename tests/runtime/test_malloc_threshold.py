"""The ONNX Runtime backend pins glibc's mmap threshold: what a process frees in large blocks goes back to the system.

Each case runs in a fresh process (the threshold is process-wide and moves only once blocks are freed). The probe
frees a 16 MiB block, which raises glibc's dynamic threshold, then allocates 32 blocks of 4 MiB and one of 1 MiB
after them, frees the 32 and reports how much of the resident memory went away.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned":
    from flamingo_edge.runtime.onnxruntime_backend import pin_malloc_mmap_threshold
    assert pin_malloc_mmap_threshold()

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

MIB = 2**20
big = libc.malloc(16 * MIB); ctypes.memset(big, 1, 16 * MIB); libc.free(big)
blocks = [libc.malloc(4 * MIB) for _ in range(32)]
for block in blocks:
    ctypes.memset(block, 1, 4 * MIB)
last = libc.malloc(MIB); ctypes.memset(last, 1, MIB)
before = rss()
for block in blocks:
    libc.free(block)
print((before - rss()) / MIB)
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


def released_mib(mode: str, env: dict | None = None) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          timeout=120, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_go_back_to_the_system_once_pinned():
    import os

    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    assert released_mib("default", env) < 16  # glibc's own behaviour: the 4 MiB blocks came from the heap and stay
    assert released_mib("pinned", env) >= 120  # each was mmapped and unmapped when freed


def test_a_threshold_the_user_set_is_left_alone():
    import os

    # 32 MiB, set by the user: the 4 MiB blocks stay on the heap although the backend was asked to pin.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
    assert released_mib("pinned", env) < 16
