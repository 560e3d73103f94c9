"""The `ktr` command puts torch's large CPU tensors on huge pages and keeps freed memory for reuse (ktr/__main__.py).

Each check runs in a fresh Python process, since torch reads its switch once per process and the suite's own process
has both on (conftest.py). Page faults are counted with `getrusage`: a 64 MB tensor touched on 4 KB pages takes 16,384
of them."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_ENTRY_PROBE = """
import resource, sys, types

def measure():  # stands in for ktr.cli: Lightning's import allocates, then the tensors are made
    import lightning  # noqa: F401
    import torch
    if sys.argv[2] == "once":  # page faults of a 64 MB tensor touched once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    else:  # bytes glibc maps afresh for a 37 MB tensor (the demo's [V, 64] gradients), the most of 3 in turn
        import ctypes
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        mapped = []
        for _ in range(3):
            before = libc.mallinfo2().hblkhd  # bytes in mapped chunks
            x = torch.empty(151936, 64).fill_(1.0)
            mapped.append(libc.mallinfo2().hblkhd - before)
            del x
        print(max(mapped))

sys.modules["ktr.cli"] = types.SimpleNamespace(console=measure)
if sys.argv[1] == "entry":
    from ktr.__main__ import console
    console()
else:
    measure()
"""


def _probe(how: str, what: str = "once", **env: str) -> int:
    """What the probe prints: page faults for a 64 MB tensor (`once`), or bytes mapped for a 37 MB one (`again`)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "KTR_MALLOPT")} | env
    out = subprocess.run([sys.executable, "-c", _ENTRY_PROBE, how, what], capture_output=True, text=True, cwd=ROOT,
                         env=clean, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="this kernel has no transparent huge pages (or they are off)")
def test_the_ktr_command_puts_large_tensors_on_huge_pages() -> None:
    """`ktr` (ktr/__main__.py) turns torch's huge pages on before Lightning's import has allocated: a 64 MB tensor
    then costs a page fault per 2 MB, against one per 4 KB in a plain process. A user's explicit 0 is kept."""
    assert _probe("plain") > 15000
    assert _probe("entry") < 2000
    assert _probe("entry", THP_MEM_ALLOC_ENABLE="0") > 15000


def _has_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="the thresholds are glibc's (2.33 or later to read them back)")
def test_the_ktr_command_keeps_mid_size_tensors_on_the_heap() -> None:
    """`ktr` raises glibc's thresholds, so a 37 MB tensor comes from the heap, where its memory is reused when freed,
    instead of a fresh mapping the kernel zeroes each time (glibc's dynamic threshold never reaches torch's 2 MB-aligned
    requests, and stops at 32 MB). `KTR_MALLOPT=0` keeps glibc's own. Read back with `mallinfo2`, not page faults:
    a reused heap chunk and a mapping on huge pages both fault little, and other threads' faults add noise."""
    size = 151936 * 64 * 4
    got = {"entry": _probe("entry", "again"), "KTR_MALLOPT=0": _probe("entry", "again", KTR_MALLOPT="0"),
           "plain": _probe("plain", "again")}  # bytes mapped for the tensor
    assert got["entry"] == 0 and got["KTR_MALLOPT=0"] >= size and got["plain"] >= size, got
