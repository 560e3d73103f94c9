"""Drawing the next token on CPU: `torch.multinomial` (what `generate` draws) against ktr's `inverse_cdf` draw
(`ktr.rollout.sampling.draw_inverse_cdf`, `sampling.draw: inverse_cdf`), per call and over the whole laptop demo.

    python scripts/bench_draw.py --parts draw demo --json docs/bench_draw.json

For one sample per row `torch.multinomial` runs the exponential race (`argmax(p / E)`, an exponential variate for
every vocabulary entry); `inverse_cdf` draws one uniform number per row and places it on the row's cumulative
weights `exp(scores - max)` (block sums, then one block scanned in float64). Both draw from `softmax(scores)`
(tests/test_sampling.py checks `inverse_cdf`'s frequencies); they use the random stream differently, so one seed
gives different tokens.

- `draw`: one call on `[R, 151936]` scores (R = 8: one prompt's G completions; R = 32: the demo's 4 prompts x 8),
  flat (a random head) and peaked (the same head x40, as `bench_prefix.py --head-scale 40`), interleaved (order
  alternating per round, a warm-up round first), median wall milliseconds; `--threads` torch threads.
- `demo`: `ktr fit --config configs/demo.yaml` with `--model.init_args.sampling.draw=` each value, `--demo-rounds`
  rounds, order alternating, torch's default threads, wall seconds and the final held-out greedy accuracy
  (`val/acc`). Nothing else should run meanwhile.
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

import torch

from demo_identical import val_scalars  # scripts/, on the path when this script runs

from ktr.experiments.machine import describe
from ktr.rollout import sampling
from ktr.rollout.sampling import choose_tokens

ROOT = Path(__file__).resolve().parents[1]
DRAWS = tuple(sampling.DRAWS)  # multinomial, inverse_cdf
V = 151936


def bench_draw(rows: list[int], repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, 64, generator=g) * 0.02
    out = []
    for scale in (1.0, 40.0):
        for r in rows:
            scores = torch.randn(r, 64, generator=g) @ (head * scale).T  # [R, V]
            times: dict[str, list[float]] = {d: [] for d in DRAWS}
            for i in range(repeats + 1):
                for draw in (DRAWS if i % 2 else DRAWS[::-1]):
                    start = time.perf_counter()
                    choose_tokens(scores, sample=True, draw=draw)
                    if i:  # round 0 warms up
                        times[draw].append(time.perf_counter() - start)
            med = {d: statistics.median(t) * 1000 for d, t in times.items()}
            row = dict(logits="peaked (x40)" if scale > 1 else "flat", rows=r, multinomial_ms=med["multinomial"],
                       inverse_cdf_ms=med["inverse_cdf"], ratio=med["inverse_cdf"] / med["multinomial"])
            out.append(row)
            print(f"draw {row['logits']:13s} R={r:3d}  multinomial {row['multinomial_ms']:8.2f} ms  "
                  f"inverse_cdf {row['inverse_cdf_ms']:7.2f} ms  ratio {row['ratio']:.3f}", flush=True)
    return out


def bench_demo(rounds: int) -> list[dict]:
    out = []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for draw in (DRAWS if i % 2 == 0 else DRAWS[::-1]):
                save = Path(tmp) / f"{draw}_{i}"
                cmd = [sys.executable, "-m", "ktr", "fit", "--config", "configs/demo.yaml",
                       f"--model.init_args.sampling.draw={draw}", "--trainer.enable_progress_bar=false",
                       f"--trainer.logger.init_args.save_dir={save}"]
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode:
                    raise SystemExit(f"demo with draw={draw} failed:\n{proc.stderr[-3000:]}")
                row = dict(round=i, draw=draw, wall_s=wall, final_val_acc=val_scalars(save)["val/acc"][-1][1])
                out.append(row)
                print(f"demo round {i} {draw:12s} {wall:7.1f} s  final val/acc {row['final_val_acc']:.3f}",
                      flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("draw", "demo"), default=["draw"])
    p.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--demo-rounds", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result: dict = dict(machine=describe(), threads=args.threads, repeats=args.repeats)
    if "draw" in args.parts:
        torch.set_num_threads(args.threads)
        result["draw"] = bench_draw(args.rows, args.repeats)
        print("\n| logits | rows x 151,936 | multinomial ms | inverse_cdf ms | inverse_cdf / multinomial |")
        print("|---|---:|---:|---:|---:|")
        for r in result["draw"]:
            print(f"| {r['logits']} | {r['rows']} | {r['multinomial_ms']:.2f} | {r['inverse_cdf_ms']:.2f} | "
                  f"{r['ratio']:.3f} |")
    if "demo" in args.parts:
        result["demo"] = bench_demo(args.demo_rounds)
        print("\n| draw | demo wall s (per round) | median | final val/acc |")
        print("|---|---|---:|---|")
        for draw in DRAWS:
            rs = [r for r in result["demo"] if r["draw"] == draw]
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
            accs = ", ".join(f"{r['final_val_acc']:.3f}" for r in rs)
            print(f"| {draw} | {walls} | {statistics.median(r['wall_s'] for r in rs):.1f} | {accs} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
