"""The `ktr` command puts torch's large CPU tensors on huge pages (ktr/__main__.py).

Each check runs in a fresh Python process, since torch reads its switch once per process and the suite's own process
has it on (conftest.py). Page faults are counted with `getrusage`: a 64 MB tensor touched on 4 KB pages takes 16,384
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
    torch.empty(16 * 2**20).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

sys.modules["ktr.cli"] = types.SimpleNamespace(console=measure)
if sys.argv[1] == "entry":
    from ktr.__main__ import console
    console()
else:
    measure()
"""


def _faults(how: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", _ENTRY_PROBE, how], capture_output=True, text=True, cwd=ROOT, env=clean,
                         check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not _THP.exists() or "[never]" in _THP.read_text(),
                    reason="this kernel has no transparent huge pages (or they are off)")
def test_the_ktr_command_puts_large_tensors_on_huge_pages() -> None:
    """`ktr` (ktr/__main__.py) turns torch's huge pages on before Lightning's import has allocated: a 64 MB tensor
    then costs a page fault per 2 MB, against one per 4 KB in a plain process. A user's explicit 0 is kept."""
    assert _faults("plain") > 15000
    assert _faults("entry") < 2000
    assert _faults("entry", THP_MEM_ALLOC_ENABLE="0") > 15000
