"""The README's demo figures, over seeds: `ktr fit --config configs/demo.yaml` (Video-KTR) and
`configs/demo_grpo.yaml` (vanilla GRPO) with `seed_everything=SEED`, then `ktr test --config configs/demo_eval.yaml`
on the warm-start checkpoint and on the final one.

    python scripts/demo_seeds.py --seeds 0 1 2 3 4 --jobs 2 --json docs/demo_seeds.json

Per run it records held-out greedy accuracy (`val/acc`, 64 questions) and `val/p_target` (the teacher-forced
probability of the right answer text at temperature 1: continuous where greedy accuracy moves in steps) right
after the warm start and after the RL steps, the benchmark score of both checkpoints, the wall time, and the
learning curves. Runs go in subprocesses, `--jobs` at a time, 1 torch thread each; each writes
`OUT/runs/VARIANT_sSEED.json` and is not run again when that file exists (rerun to resume; `--summary-only`
tabulates). Prints one table per variant (per seed, then mean and standard deviation) and writes JSON with the
machine. Extra arguments after `--` go to every `ktr fit` (e.g. `-- --trainer.max_steps=120`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ktr.experiments.machine import describe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ktr": "configs/demo.yaml", "grpo": "configs/demo_grpo.yaml"}
EVAL_CONFIG = "configs/demo_eval.yaml"
MEASURES = ("acc_warm", "acc_rl", "p_warm", "p_rl", "test_warm", "test_rl")


def fit(variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    """One demo run in this process: curves, the warm-start and final checkpoints' paths."""
    import lightning as L
    import torch

    from ktr.cli import main

    torch.set_num_threads(1)
    run_dir = out / "fits" / f"{variant}_s{seed}"
    curve: list[tuple[int, float, float | None]] = []
    warm_ckpt = run_dir / "warm.ckpt"

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == module.warm_start_steps:
                trainer.save_checkpoint(warm_ckpt)

        def on_validation_end(self, trainer, module):
            m = trainer.callback_metrics
            if "val/acc" in m:
                p = float(m["val/p_target"]) if "val/p_target" in m else None
                curve.append((trainer.global_step, float(m["val/acc"]), p))

    sys.argv = sys.argv[:1]
    t = time.time()
    argv = ["fit", "--config", CONFIGS[variant], f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.logger.init_args.name=tb", "--model.init_args.val_target_prob=true", *extra]
    cli = main(argv, callbacks=[Record()])
    final_ckpt = run_dir / "final.ckpt"
    cli.trainer.save_checkpoint(final_ckpt)
    warm_steps = cli.model.warm_start_steps
    warm = [c for c in curve if c[0] <= warm_steps][-1]
    return {"variant": variant, "seed": seed, "warm_start_steps": warm_steps, "steps": cli.trainer.global_step,
            "acc_warm": warm[1], "p_warm": warm[2], "acc_rl": curve[-1][1], "p_rl": curve[-1][2], "curve": curve,
            "fit_s": time.time() - t, "warm_ckpt": str(warm_ckpt), "final_ckpt": str(final_ckpt), "overrides": extra}


def benchmark(ckpt: str, out: Path) -> float:
    """`ktr test --config configs/demo_eval.yaml --ckpt_path CKPT`: the synthetic benchmark's accuracy."""
    from ktr.cli import main

    sys.argv = sys.argv[:1]
    cli = main(["test", "--config", EVAL_CONFIG, f"--ckpt_path={ckpt}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={out}",
                "--trainer.logger.init_args.name=eval"])
    return float(cli.trainer.callback_metrics["eval/synthetic/acc"])


def one(variant: str, seed: int, out: Path, extra: list[str]) -> None:
    """Child process: fit, then evaluate both checkpoints; writes OUT/runs/VARIANT_sSEED.json."""
    rec = fit(variant, seed, out, extra)
    t = time.time()
    rec["test_warm"] = benchmark(rec["warm_ckpt"], out / "fits" / f"{variant}_s{seed}")
    rec["test_rl"] = benchmark(rec["final_ckpt"], out / "fits" / f"{variant}_s{seed}")
    rec["test_s"] = time.time() - t
    for key in ("warm_ckpt", "final_ckpt"):  # checkpoints are large; the figures are what is kept
        Path(rec[key]).unlink(missing_ok=True)
    (out / "runs" / f"{variant}_s{seed}.json").write_text(json.dumps(rec, indent=1) + "\n")


def launch(variant: str, seed: int, out: Path, extra: list[str], summary_only: bool) -> dict | None:
    path = out / "runs" / f"{variant}_s{seed}.json"
    if not path.is_file() and not summary_only:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        log = out / "logs" / f"{variant}_s{seed}.log"
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, __file__, "--one", variant, str(seed), "--out", str(out), "--",
                                 *extra], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc != 0 or not path.is_file():
            raise RuntimeError(f"{variant} seed {seed} failed (exit {rc}); see {log}")
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    print(f"{variant:>5} seed {seed}: acc {rec['acc_warm']:.3f} -> {rec['acc_rl']:.3f}, p_target {rec['p_warm']:.3f} "
          f"-> {rec['p_rl']:.3f}, ktr test {rec['test_warm']:.3f} -> {rec['test_rl']:.3f} ({rec['fit_s']:.0f} s)",
          flush=True)
    return rec


def summarise(records: list[dict]) -> dict:
    """Per variant: mean, standard deviation, and on how many seeds RL raised each measure."""
    out = {}
    for variant in sorted({r["variant"] for r in records}):
        rs = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        s = {"seeds": [r["seed"] for r in rs]}
        for m in MEASURES:
            xs = [r[m] for r in rs]
            s[m] = {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        s["acc_raised"] = sum(r["acc_rl"] > r["acc_warm"] for r in rs)
        s["p_raised"] = sum(r["p_rl"] > r["p_warm"] for r in rs)
        s["test_raised"] = sum(r["test_rl"] > r["test_warm"] for r in rs)
        s["fit_s"] = statistics.median(r["fit_s"] for r in rs)
        out[variant] = s
    return out


def table(records: list[dict], summary: dict) -> str:
    head = ("| seed | acc after warm start | acc after RL | p_target after warm start | p_target after RL | "
            "`ktr test` warm start | `ktr test` final | fit (s) |")
    lines = []
    for variant, s in summary.items():
        lines += [f"\n{variant} ({CONFIGS[variant]})\n", head, "|" + "---|" * 8]
        for r in sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"]):
            lines.append(f"| {r['seed']} | {r['acc_warm']:.3f} | {r['acc_rl']:.3f} | {r['p_warm']:.3f} | "
                         f"{r['p_rl']:.3f} | {r['test_warm']:.3f} | {r['test_rl']:.3f} | {r['fit_s']:.0f} |")
        cells = " | ".join(f"{s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" for m in MEASURES)
        lines.append(f"| mean ± sd | {cells} | {s['fit_s']:.0f} |")
        lines.append(f"\nRL raised accuracy on {s['acc_raised']}/{len(s['seeds'])} seeds, p_target on "
                     f"{s['p_raised']}/{len(s['seeds'])}, the benchmark score on {s['test_raised']}/{len(s['seeds'])}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/demo_seeds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    out = Path(args.out).resolve()
    if args.one:
        return one(args.one[0], int(args.one[1]), out, extra)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    t = time.time()
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        records = [r for r in pool.map(lambda j: launch(*j, out, extra, args.summary_only), jobs) if r]
    summary = summarise(records)
    print(table(records, summary))
    if args.json:
        machine = describe() | {"jobs": args.jobs, "threads_per_run": 1}
        Path(args.json).write_text(json.dumps({"machine": machine, "wall_s": time.time() - t, "overrides": extra,
                                               "summary": summary, "runs": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
