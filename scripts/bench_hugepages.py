"""Transparent huge pages for torch's large CPU tensors (`THP_MEM_ALLOC_ENABLE`, what the `ktr` command sets) against
4 KB pages, on the head passes and over the whole laptop demo.

    python scripts/bench_hugepages.py --parts head demo --json docs/bench_hugepages.json

Each measurement runs in a fresh Python process with `THP_MEM_ALLOC_ENABLE=0` or `1` (torch reads it once, at its
first CPU allocation), the two settings interleaved (order alternating per round):

- `head`: `ktr.fused.token_logps_entropy` at the demo's size (32 completions x 20 tokens, hidden 64, the
  151,936-wide head, so one `[512, 151936]` float32 scratch of 311 MB per pass), one torch thread, with and without
  the entropy; a warm-up pass, then `--passes` passes; median over `--rounds` processes of the wall milliseconds and
  page faults per pass.
- `demo`: `ktr fit --config configs/demo.yaml` (seed 0, `val_target_prob` on; `--demo-threads` torch threads,
  torch's default unless given), `--demo-rounds` rounds; wall, user and system seconds, minor page faults and peak
  RSS of the process; then whether the two runs of a round are the same bit for bit (`scripts/demo_identical.py`:
  every held-out figure and every final weight).

Nothing else should run meanwhile. Linux only (elsewhere torch only aligns, and `ru_minflt` may read 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demo_identical import main as identical  # scripts/, on the path when this script runs

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("0", "1")  # THP_MEM_ALLOC_ENABLE: 4 KB pages, huge pages

_HEAD = """
import json, resource, sys, time
import torch
from ktr.fused import token_logps_entropy
torch.set_num_threads(1)
passes, with_entropy = int(sys.argv[1]), sys.argv[2] == "1"
g = torch.Generator().manual_seed(0)
h = torch.randn(32, 20, 64, generator=g)  # [N, T, H]
w = torch.randn(151936, 64, generator=g) * 0.1  # [V, H]
y = torch.randint(0, 151936, (32, 20), generator=g)  # [N, T]
token_logps_entropy(h, w, y, with_entropy=with_entropy)  # warm-up
f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(passes):
    token_logps_entropy(h, w, y, with_entropy=with_entropy)
print(json.dumps({"ms": 1000 * (time.perf_counter() - t0) / passes,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / passes}))
"""


def _env(thp: str, threads: int = 1) -> dict:
    """The child's environment: the page setting, and `threads` torch threads (0: torch's default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(THP_MEM_ALLOC_ENABLE=thp, HF_HUB_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def bench_head(rounds: int, passes: int) -> list[dict]:
    out = []
    for entropy in ("0", "1"):
        got: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for i in range(rounds):
            for thp in (SETTINGS if i % 2 == 0 else SETTINGS[::-1]):
                proc = subprocess.run([sys.executable, "-c", _HEAD, str(passes), entropy], cwd=ROOT, env=_env(thp),
                                      capture_output=True, text=True, check=True)
                got[thp].append(json.loads(proc.stdout.splitlines()[-1]))
        row = {"entropy": entropy == "1"}
        for thp, name in zip(SETTINGS, ("small", "huge")):
            row[f"{name}_ms"] = statistics.median(r["ms"] for r in got[thp])
            row[f"{name}_faults"] = statistics.median(r["faults"] for r in got[thp])
        row["ratio"] = row["huge_ms"] / row["small_ms"]
        out.append(row)
        print(f"head entropy={row['entropy']!s:5}  4 KB {row['small_ms']:7.1f} ms {row['small_faults']:8.0f} faults  "
              f"huge {row['huge_ms']:7.1f} ms {row['huge_faults']:6.0f} faults  ratio {row['ratio']:.3f}", flush=True)
    return out


def bench_demo(rounds: int, threads: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            runs = {}
            for thp in (SETTINGS if i % 2 == 0 else SETTINGS[::-1]):
                save = Path(tmp) / f"{thp}_{i}"
                cmd = [sys.executable, "-m", "ktr", "fit", "--config", "configs/demo.yaml", "--seed_everything=0",
                       "--trainer.enable_progress_bar=false", "--model.init_args.val_target_prob=true",
                       f"--trainer.logger.init_args.save_dir={save}"]
                log = Path(tmp) / f"{thp}_{i}.log"
                with log.open("w") as f:  # wait4: this child's own rusage (peak RSS included)
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(thp, threads), stdout=f, stderr=subprocess.STDOUT)
                    _, status, ru = os.wait4(proc.pid, 0)
                    wall = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"demo with THP_MEM_ALLOC_ENABLE={thp} failed:\n{log.read_text()[-3000:]}")
                row = dict(round=i, huge_pages=thp == "1", wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime,
                           minor_faults=ru.ru_minflt, max_rss_mb=ru.ru_maxrss / 1024)  # Linux: ru_maxrss in KB
                out.append(row)
                runs[thp] = save / "demo" / "version_0"
                print(f"demo round {i} huge pages {row['huge_pages']!s:5}  wall {wall:6.1f} s  "
                      f"user {row['user_s']:6.1f}  sys {row['sys_s']:5.1f}  faults {row['minor_faults']:>10,}",
                      flush=True)
            same = identical([str(runs["0"]), str(runs["1"])]) == 0  # prints its table
            for row in out[-2:]:
                row["identical_to_other_setting"] = same
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("head", "demo"), default=["head"])
    p.add_argument("--rounds", type=int, default=5, help="processes per setting for `head`")
    p.add_argument("--passes", type=int, default=10, help="passes per process for `head`")
    p.add_argument("--demo-rounds", type=int, default=1)
    p.add_argument("--demo-threads", type=int, default=0, help="torch threads of the demo runs (0: torch's default, "
                   "as a user runs it; tests/test_demo_learns.py runs 1)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from ktr.experiments.machine import describe

    result: dict = dict(machine=describe(), thp_sysfs=_thp_sysfs(), demo_threads=args.demo_threads)
    if "head" in args.parts:
        result["head"] = bench_head(args.rounds, args.passes)
        print("\n| head pass (demo size) | 4 KB pages ms | huge pages ms | huge / 4 KB | "
              "faults per pass, 4 KB -> huge |")
        print("|---|---:|---:|---:|---|")
        for r in result["head"]:
            print(f"| log-probs{' + entropy' if r['entropy'] else ''} | {r['small_ms']:.1f} | {r['huge_ms']:.1f} | "
                  f"{r['ratio']:.3f} | {r['small_faults']:,.0f} -> {r['huge_faults']:,.0f} |")
    if "demo" in args.parts:
        result["demo"] = bench_demo(args.demo_rounds, args.demo_threads)
        print("\n| demo, round | pages | wall s | user s | sys s | minor faults | peak RSS MB | identical |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in result["demo"]:
            print(f"| {r['round']} | {'huge' if r['huge_pages'] else '4 KB'} | {r['wall_s']:.1f} | {r['user_s']:.1f} | "
                  f"{r['sys_s']:.1f} | {r['minor_faults']:,} | {r['max_rss_mb']:,.0f} | "
                  f"{r['identical_to_other_setting']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _thp_sysfs() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    main()
