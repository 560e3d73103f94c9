"""`ktr` (the console script) and `python -m ktr`.

Torch's large CPU tensors on transparent huge pages: `THP_MEM_ALLOC_ENABLE=1`, torch's own switch, aligns its
allocations of 2 MB and more to 2 MB and `madvise`s them as huge pages (Linux; elsewhere only the alignment changes).
On CPU each head pass fills a fresh `[chunk, V]` float32 scratch (311 MB at 512 x 151,936) and frees it, and every
fresh 4 KB page is a page fault; on huge pages that pass ran 0.69x the time with 1/90 of the faults, the same results
bit for bit (`scripts/bench_hugepages.py`, docs/hugepages.md). Torch reads the switch once, at its first CPU
allocation, and importing Lightning allocates: so it is set here, before `ktr.cli` is imported. An explicit
`THP_MEM_ALLOC_ENABLE=0` in the environment is kept; code that imports ktr as a library is left as it is.
"""

import os


def console() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from ktr.cli import console as run  # imports Lightning: after the switch

    run()


if __name__ == "__main__":
    console()
