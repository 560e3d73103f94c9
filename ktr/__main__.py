"""`ktr` (the console script) and `python -m ktr`.

Before anything allocates, :func:`allocator_defaults` sets how CPU memory is taken (docs/hugepages.md):

- **Huge pages.** `THP_MEM_ALLOC_ENABLE=1`, torch's own switch, aligns its allocations of 2 MB and more to 2 MB and
  `madvise`s them as transparent huge pages (Linux; elsewhere only the alignment changes). On CPU each head pass
  fills a fresh `[chunk, V]` float32 scratch (311 MB at 512 x 151,936); on huge pages that pass ran 0.69x the time
  with 1/90 of the faults (`scripts/bench_hugepages.py`). Torch reads the switch once, at its first CPU allocation,
  and importing Lightning allocates: so it is set here, before `ktr.cli` is imported. An explicit
  `THP_MEM_ALLOC_ENABLE=0` in the environment is kept.
- **Freed memory kept for reuse** (glibc only). glibc maps a fresh region for an allocation above its mmap threshold
  and unmaps it on free; it raises that threshold to the size of each mapping freed, so a size that recurs moves to
  the heap. A 2 MB-aligned request is larger than the mapping it frees, so the threshold never catches up: with the
  alignment above, every `[32, 151,936]` float32 tensor of the rollout (18.5 MB) was mapped afresh and zeroed by the
  kernel, where without it only the first was. `M_MMAP_THRESHOLD` 64 MB and `M_TRIM_THRESHOLD` 128 MB keep
  allocations below 64 MB on the heap and up to 128 MB of freed heap in the process (glibc's own limits, reached by
  its dynamic threshold, are 32 and 64 MB); larger tensors are still mapped and returned on free. The demo took
  0.81x the time of huge pages alone with 2 threads (147.7 -> 119.9 s, peak RSS 1.14 -> 1.23 GB) and 0.90x with one.
  `KTR_MALLOPT=0`, or glibc's own `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` / `GLIBC_TUNABLES` malloc
  settings, leave glibc as it is.

Code that imports ktr as a library is left as it is; it can call :func:`allocator_defaults` first thing.
"""

import os
import sys

MMAP_THRESHOLD = 64 << 20
"""Allocations below this many bytes come from glibc's heap (set by :func:`allocator_defaults`)."""
TRIM_THRESHOLD = 128 << 20
"""Free bytes at the top of glibc's heap kept in the process (set by :func:`allocator_defaults`)."""
_GLIBC_OWN = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def allocator_defaults() -> bool:
    """Huge pages for torch's large CPU tensors, and glibc's thresholds (module docstring); whether the thresholds
    were set. Call it before torch first allocates (before importing Lightning, say)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ.get("KTR_MALLOPT") == "0" or any(os.environ.get(k) for k in _GLIBC_OWN):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables:
        return False
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; musl has no libc.so.6 and no mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    # either call turns glibc's dynamic threshold off; a refused one changes nothing, so the mmap threshold first
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def console() -> None:
    allocator_defaults()
    from ktr.cli import console as run  # imports Lightning: after the switch

    run()


if __name__ == "__main__":
    console()
