"""How the `ktr` command takes CPU memory (ktr/__main__.py): 4 KB pages, transparent huge pages
(`THP_MEM_ALLOC_ENABLE`), and huge pages with freed memory kept for reuse (glibc's thresholds, `KTR_MALLOPT`), on the
head passes and over the whole laptop demo.

    python scripts/bench_hugepages.py --parts head demo --json docs/bench_hugepages.json

Each measurement runs in a fresh Python process per setting (torch reads its switch once, at its first CPU
allocation), the settings interleaved (order reversed every other round):

- `head`: `ktr.fused.token_logps_entropy` at the demo's size (32 completions x 20 tokens, hidden 64, the
  151,936-wide head, so one `[512, 151936]` float32 scratch of 311 MB per pass), one torch thread, with and without
  the entropy; a warm-up pass, then `--passes` passes; median over `--rounds` processes of the wall milliseconds and
  page faults per pass.
- `demo`: `ktr fit --config configs/demo.yaml` (seed 0, `val_target_prob` on; `--demo-threads` torch threads,
  torch's default unless given), `--demo-rounds` rounds; wall, user and system seconds, minor page faults and peak
  RSS of the process; then whether each run is the same bit for bit as the round's 4 KB run
  (`scripts/demo_identical.py`: every held-out figure and every final weight).

Nothing else should run meanwhile. Linux only (elsewhere torch only aligns, `ru_minflt` may read 0, and the
thresholds are glibc's).
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
SETTINGS = {  # name -> (THP_MEM_ALLOC_ENABLE, KTR_MALLOPT)
    "4 KB": ("0", "0"),
    "huge": ("1", "0"),
    "huge + heap": ("1", "1"),  # what `ktr` does
}

_HEAD = """
import json, resource, sys, time
from ktr.__main__ import allocator_defaults
allocator_defaults()  # as `ktr` does, within the environment's settings
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


def _env(setting: str, threads: int = 1) -> dict:
    """The child's environment: the memory `setting`, and `threads` torch threads (0: torch's default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    thp, mallopt = SETTINGS[setting]
    env.update(THP_MEM_ALLOC_ENABLE=thp, KTR_MALLOPT=mallopt, HF_HUB_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _order(i: int) -> list[str]:
    return list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]


def bench_head(rounds: int, passes: int) -> list[dict]:
    out = []
    for entropy in ("0", "1"):
        got: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for i in range(rounds):
            for setting in _order(i):
                proc = subprocess.run([sys.executable, "-c", _HEAD, str(passes), entropy], cwd=ROOT,
                                      env=_env(setting), capture_output=True, text=True, check=True)
                got[setting].append(json.loads(proc.stdout.splitlines()[-1]))
        for setting in SETTINGS:
            row = dict(entropy=entropy == "1", setting=setting, ms=statistics.median(r["ms"] for r in got[setting]),
                       faults=statistics.median(r["faults"] for r in got[setting]))
            out.append(row)
        base = out[-len(SETTINGS)]["ms"]
        for row in out[-len(SETTINGS):]:
            row["x_4kb"] = row["ms"] / base
            print(f"head entropy={row['entropy']!s:5}  {row['setting']:12} {row['ms']:7.1f} ms "
                  f"{row['faults']:8.0f} faults  x 4 KB {row['x_4kb']:.3f}", flush=True)
    return out


def bench_demo(rounds: int, threads: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            runs = {}
            for setting in _order(i):
                tag = f"{SETTINGS[setting][0]}{SETTINGS[setting][1]}_{i}"
                save = Path(tmp) / tag
                cmd = [sys.executable, "-m", "ktr", "fit", "--config", "configs/demo.yaml", "--seed_everything=0",
                       "--trainer.enable_progress_bar=false", "--model.init_args.val_target_prob=true",
                       f"--trainer.logger.init_args.save_dir={save}"]
                log = Path(tmp) / f"{tag}.log"
                with log.open("w") as f:  # wait4: this child's own rusage (peak RSS included)
                    t0 = time.perf_counter()
                    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(setting, threads), stdout=f,
                                            stderr=subprocess.STDOUT)
                    _, status, ru = os.wait4(proc.pid, 0)
                    wall = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"demo with {setting!r} failed:\n{log.read_text()[-3000:]}")
                row = dict(round=i, setting=setting, wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime,
                           minor_faults=ru.ru_minflt, max_rss_mb=ru.ru_maxrss / 1024)  # Linux: ru_maxrss in KB
                out.append(row)
                runs[setting] = save / "demo" / "version_0"
                print(f"demo round {i} {setting:12} wall {wall:6.1f} s  user {row['user_s']:6.1f}  "
                      f"sys {row['sys_s']:5.1f}  faults {row['minor_faults']:>10,}", flush=True)
            first = list(SETTINGS)[0]
            for row in out[-len(SETTINGS):]:
                row["identical_to_4kb"] = row["setting"] == first or identical(
                    [str(runs[first]), str(runs[row["setting"]])]) == 0  # prints its table
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
        print("\n| head pass (demo size) | setting | ms | x 4 KB | faults per pass |")
        print("|---|---|---:|---:|---:|")
        for r in result["head"]:
            print(f"| log-probs{' + entropy' if r['entropy'] else ''} | {r['setting']} | {r['ms']:.1f} | "
                  f"{r['x_4kb']:.3f} | {r['faults']:,.0f} |")
    if "demo" in args.parts:
        result["demo"] = bench_demo(args.demo_rounds, args.demo_threads)
        print("\n| demo, round | setting | wall s | user s | sys s | minor faults | peak RSS MB | identical |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in result["demo"]:
            print(f"| {r['round']} | {r['setting']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | "
                  f"{r['minor_faults']:,} | {r['max_rss_mb']:,.0f} | {r['identical_to_4kb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _thp_sysfs() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    main()
