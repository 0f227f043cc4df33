"""hostmem: with glibc told to keep freed memory, a large block freed and allocated again (as XLA's
CPU backend does with each step's temporaries, from a worker thread) costs no page faults."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r"""
import ctypes, resource, sys, threading
from jaxsft.hostmem import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 256 << 20
faults = []

def steps():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)  # first touch of every page
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(" ".join(map(str, faults)))
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default, keep = _faults("default"), _faults("keep")
    pages = (256 << 20) // 4096
    # glibc by default maps each 256 MiB block fresh and unmaps it on free: every step faults it in.
    assert min(default[1:]) > pages // 2
    # Kept: only the first step faults; the later ones reuse the same pages.
    assert keep[0] > pages // 2
    assert max(keep[1:]) < pages // 100
