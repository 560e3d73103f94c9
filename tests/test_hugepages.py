"""The `ktr` command puts torch's large CPU tensors on huge pages and keeps freed memory for reuse (ktr/__main__.py).

Each check runs in a fresh Python process, since torch reads its switch once per process and the suite's own process
has both on (conftest.py). Page faults are counted with `getrusage`: a 64 MB tensor touched on 4 KB pages takes 16,384
of them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_ENTRY_PROBE = """
import resource, sys, types

def measure():  # stands in for ktr.cli: Lightning's import allocates, then a 64 MB tensor is touched
    import lightning  # noqa: F401
    import torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if sys.argv[2] == "once":
        torch.empty(16 * 2**20).fill_(1.0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    else:  # a 37 MB tensor (the demo's [V, 64] gradients) made and freed 10 times after a first one; this thread's
        torch.empty(151936, 64).fill_(1.0)  # faults only (Lightning's import leaves threads behind)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(10):
            torch.empty(151936, 64).fill_(1.0)
        print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

sys.modules["ktr.cli"] = types.SimpleNamespace(console=measure)
if sys.argv[1] == "entry":
    from ktr.__main__ import console
    console()
else:
    measure()
"""


def _faults(how: str, what: str = "once", **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "KTR_MALLOPT")} | env
    out = subprocess.run([sys.executable, "-c", _ENTRY_PROBE, how, what], capture_output=True, text=True, cwd=ROOT,
                         env=clean, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="this kernel has no transparent huge pages (or they are off)")
def test_the_ktr_command_puts_large_tensors_on_huge_pages() -> None:
    """`ktr` (ktr/__main__.py) turns torch's huge pages on before Lightning's import has allocated: a 64 MB tensor
    then costs a page fault per 2 MB, against one per 4 KB in a plain process. A user's explicit 0 is kept."""
    assert _faults("plain") > 15000
    assert _faults("entry") < 2000
    assert _faults("entry", THP_MEM_ALLOC_ENABLE="0") > 15000


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="the thresholds are glibc's (Linux)")
def test_the_ktr_command_reuses_freed_memory() -> None:
    """`ktr` raises glibc's thresholds: a 37 MB tensor made and freed again and again comes back from the heap without
    a page fault, where glibc maps (and the kernel zeroes) it afresh each time. `KTR_MALLOPT=0` keeps glibc's own."""
    got = {"entry": _faults("entry", "again"), "KTR_MALLOPT=0": _faults("entry", "again", KTR_MALLOPT="0"),
           "plain": _faults("plain", "again")}
    # reused: about none; mapped afresh: >= 10 x 37 MB / 2 MB on huge pages, 4 KB pages 512x that
    assert got["entry"] < 100 and got["KTR_MALLOPT=0"] > 150 and got["plain"] > 150, got
