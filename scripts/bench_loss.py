"""Naive vs chunked policy loss from hidden states: peak extra memory, forward+backward time, grad error.

CPU (default): V=151,936, H=512, N*T=4,096 tokens (8 x 512), float32. Every case runs in a fresh
subprocess and its peak is the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the op) minus the resident set just before the op.
``--gpu`` (needs CUDA): H=3,584, N*T from 2,048 up to 8 x 2,048, bfloat16 hidden states and weight,
peak from ``torch.cuda.max_memory_allocated`` minus the allocation before the op; inputs are drawn on the GPU.
``inprocess_records(...)`` is that GPU path as a function (``scripts/gpu_check.py`` calls it; on CPU it runs
the same code with no memory figure, for tests); the measurement is ``ktr.experiments.bench_loss``.

The op is the KTR training loss (``beta=0.04`` with reference log-probs, ``seq-mean-token-mean``) followed
by ``backward()``; gradients w.r.t. hidden states and weight are compared with the naive ones:
``max_rel_grad_err = max over {hidden, weight} of max|g - g_naive| / max|g_naive|``.

    python scripts/bench_loss.py --json /tmp/bench_loss.json
    python scripts/bench_loss.py --gpu --json /tmp/bench_loss_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ktr.experiments.bench_loss import cpu_worker, inprocess_records


def run_cpu_case(case: dict, timeout: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(records: list[dict]) -> None:
    naive = {r["tokens"]: r for r in records if r["impl"] == "naive"}
    cols = ["impl", "strategy", "tokens", "chunk", "peak_mem_mb", "time_s", "cpu_s", "max_rel_grad_err",
            "mem_vs_naive", "time_vs_naive", "cpu_vs_naive"]
    print(f"vocab={records[0]['vocab']} hidden={records[0]['hidden']} device={records[0]['device']}")
    print(" | ".join(f"{c:>13}" for c in cols))
    for r in records:
        base = naive.get(r["tokens"])
        row = dict(r)
        row["mem_vs_naive"] = f"{r['peak_mem_mb'] / base['peak_mem_mb']:.3f}" if base and r["peak_mem_mb"] else "-"
        row["time_vs_naive"] = f"{r['time_s'] / base['time_s']:.3f}" if base else "-"
        row["cpu_vs_naive"] = f"{r['cpu_s'] / base['cpu_s']:.3f}" if base and r["cpu_s"] else "-"
        row["max_rel_grad_err"] = f"{r['max_rel_grad_err']:.2e}"
        print(" | ".join(f"{str(row[c]):>13}" for c in cols))


def cpu_records(args: argparse.Namespace, tokens: list[int], hidden: int, log) -> list[dict]:
    """CPU mode: every case in a fresh subprocess (the naive one first: it stores the reference gradients)."""
    common = dict(vocab=args.vocab, hidden=hidden, entropy=args.entropy, repeats=args.repeats,
                  threads=args.threads, strategy=None, chunk=None)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tok in tokens:
            cases = [dict(common, impl="naive", tokens=n_tok)] + [
                dict(common, impl="chunked", tokens=n_tok, chunk=c, strategy=s)
                for s in args.strategies for c in args.chunks
            ]
            for case in cases:
                case["ref_path"] = os.path.join(tmp, f"ref_{n_tok}.pt")
                records.append(run_cpu_case(case, args.timeout))
                log(records[-1])
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    p.add_argument("--gpu", action="store_true", help="GPU case: H=3584, N*T up to 8 x 2048 (needs CUDA)")
    p.add_argument("--tokens", type=int, nargs="+", help="N*T values (default 4096; GPU 2048..16384)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, help="H (default 512; GPU 3584)")
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048], help="chunk sizes to try")
    p.add_argument("--strategies", nargs="+", default=["grad-in-forward", "recompute"])
    p.add_argument("--entropy", action="store_true", help="also compute the entropy (both impls)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (the minimum is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per CPU case (0: torch default)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per CPU case")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(cpu_worker(json.loads(args.worker))))
        return []
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    tokens = args.tokens or ([2048, 4096, 8192, 16384] if args.gpu else [4096])
    hidden = args.hidden or (3584 if args.gpu else 512)
    log = lambda rec: print(json.dumps(rec), file=sys.stderr, flush=True)  # noqa: E731
    if args.gpu:
        records = inprocess_records(tokens, hidden, args.vocab, args.chunks, args.strategies, args.entropy,
                                    args.repeats, log=log)
    else:
        records = cpu_records(args, tokens, hidden, log)
    print_table(records)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
