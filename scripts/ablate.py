"""Controlled ablation: GRPO, matched-step GRPO, Video-KTR, a random mask at KTR's fraction, each single signal,
and Video-KTR with averaged counterfactual probes (`ktr-averaged`: `draws`, see docs/ablation.md section 1).

Every run is `ktr fit` on one config (default `configs/ablation.yaml`: the `third` task, 256 held-out questions)
with the variant's overrides and `seed_everything=SEED`; the tiny model's initialisation and the data are the
same for every run, so within a seed the variants share the SFT warm start (same seed, same batches) and differ
only in the RL steps. Runs go in subprocesses, `--jobs` at a time (1 torch thread each); each writes
`OUT/runs/VARIANT_sSEED.json`, and a finished run is not run again (rerun the command to resume). A run is
claimed by `OUT/runs/VARIANT_sSEED.lock` first, so two invocations on the same OUT split the work; a lock left
by a killed run must be deleted by hand. `--summary-only` tabulates the finished runs.

Reported, for two held-out measures: greedy accuracy, and `val/p_target` (the policy's probability of writing
the right answer text at temperature 1, teacher-forced: continuous where greedy accuracy moves in steps). For
each: the mean after RL with a 95% t-interval over seeds, paired differences against GRPO and against the random
mask on the same seeds (mean, t-interval, exact sign test), and learning curves (`--png`, and `*_p_target.png`).

The matched-step GRPO variant is vanilla GRPO with the learning rate multiplied by 1 / (KTR's mean key
fraction over its RL steps, averaged over this invocation's KTR runs; or `--matched-scale`): under the
released `seq-mean-token-mean` aggregation a kept token's gradient is that factor larger in KTR than in GRPO,
so this gives GRPO the same per-token step (exactly under SGD; AdamW normalises a constant loss scale away, so
there a larger learning rate is the only way to give GRPO a larger step).

    python scripts/ablate.py --seeds 0 1 2 3 4 --json docs/ablation.json --png docs/ablation_curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = "--model.init_args.key_tokens"
TARGET_PROB = "--model.init_args.val_target_prob"
VARIANTS: dict[str, list[str]] = {
    "grpo": [f"{K}.enabled=false"],
    "grpo-matched": [f"{K}.enabled=false"],  # + the scaled learning rate, filled in at run time
    "ktr": [],
    "random": [f"{K}.random=true"],
    "visual": [f"{K}.temporal.enabled=false", f"{K}.entropy.enabled=false"],
    "temporal": [f"{K}.visual.enabled=false", f"{K}.entropy.enabled=false"],
    "entropy": [f"{K}.visual.enabled=false", f"{K}.temporal.enabled=false"],
    # Video-KTR with averaged counterfactuals (ktr's `draws`, docs/ablation.md section 1): the visual probe swaps
    # in each of the 3 other prompts' clips of the step, the temporal probe averages 8 frame shuffles
    "ktr-averaged": [f"{K}.visual_perturbation=swap_media", f"{K}.visual.draws=3", f"{K}.temporal.draws=8"],
}
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# --- one run (in its own process) ---------------------------------------------------------------------
def run_one(variant: str, seed: int, config: str, extra: list[str], out: Path) -> dict:
    import lightning as L
    import torch

    from ktr.cli import main

    torch.set_num_threads(1)
    curve: list[tuple[int, float]] = []
    p_curve: list[tuple[int, float]] = []
    frac: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            v = trainer.callback_metrics.get("train/ktr/frac_key")
            if v is not None and trainer.global_step > getattr(module, "warm_start_steps", 0):
                frac.append(float(v))

        def on_validation_end(self, trainer, module):
            if "val/acc" in trainer.callback_metrics:
                curve.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))
            if "val/p_target" in trainer.callback_metrics:
                p_curve.append((trainer.global_step, float(trainer.callback_metrics["val/p_target"])))

    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    t = time.time()
    argv = ["fit", "--config", config, f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={out / 'tb'}",
            f"--trainer.logger.init_args.name={variant}_s{seed}", *extra]
    main(argv, callbacks=[Record()])
    return {"variant": variant, "seed": seed, "val_acc": curve[-1][1] if curve else None,
            "val_p_target": p_curve[-1][1] if p_curve else None, "p_curve": p_curve,
            "frac_key": statistics.mean(frac) if frac else 1.0, "frac_key_last": frac[-1] if frac else 1.0,
            "wall_s": time.time() - t, "curve": curve, "overrides": extra}


def warm_start(config: str, extra: list[str], out: Path) -> dict:
    """The shared SFT warm start: the config's `warm_start_steps` as a run of their own, saved as a model dir."""
    import torch

    from ktr.cli import main

    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]
    steps = config_value(config, extra, "warm_start_steps")
    t = time.time()
    cli = main(["fit", "--config", config, "--seed_everything=0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={steps}", f"--trainer.logger.init_args.save_dir={out / 'tb'}",
                "--trainer.logger.init_args.name=warm", f"{TARGET_PROB}=true", *extra])
    cli.model.model.save_pretrained(out / "warm", safe_serialization=True)
    cli.model.processor.tokenizer.save_pretrained(out / "warm")
    m = cli.trainer.callback_metrics
    return {"steps": steps, "val_acc": float(m["val/acc"]), "val_p_target": float(m["val/p_target"]),
            "wall_s": time.time() - t}


# --- statistics ---------------------------------------------------------------------------------------
def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (NaN bounds with fewer than 2 values)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = T975[min(len(xs) - 1, len(T975)) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def sign_test(diffs: list[float]) -> tuple[int, int, float]:
    """Wins, losses and the two-sided exact binomial p-value (ties dropped)."""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return wins, losses, min(1.0, 2 * tail)


def summarise(records: list[dict], key: str = "val_acc") -> tuple[list[dict], list[dict]]:
    """Per variant: mean and 95% interval of `key` over seeds; paired differences against GRPO and random."""
    by = {v: {r["seed"]: r for r in records if r["variant"] == v and r.get(key) is not None} for v in VARIANTS}
    summaries, paired = [], []
    for v, runs in by.items():
        if not runs:
            continue
        m, lo, hi = mean_ci([r[key] for r in runs.values()])
        summaries.append({"variant": v, "metric": key, "mean": m, "ci95_low": lo, "ci95_high": hi,
                          "n_seeds": len(runs),
                          "warm_start": statistics.mean(r.get("warm_start", {}).get(key) or 0.0 for r in runs.values()),
                          "frac_key": statistics.mean(r["frac_key"] for r in runs.values()),
                          "wall_s": statistics.mean(r["wall_s"] for r in runs.values())})
        for base in ("grpo", "random"):
            seeds = sorted(set(runs) & set(by.get(base, {})))
            if v == base or not seeds:
                continue
            d = [runs[s][key] - by[base][s][key] for s in seeds]
            dm, dlo, dhi = mean_ci(d)
            w, l, p = sign_test(d)
            paired.append({"variant": v, "vs": base, "metric": key, "n_seeds": len(seeds), "mean_diff": dm,
                           "ci95_low": dlo, "ci95_high": dhi, "wins": w, "losses": l, "sign_test_p": p})
    return summaries, paired


def tables(summaries: list[dict], paired: list[dict], what: str = "held-out acc after RL") -> str:
    lines = [f"| variant | {what} (mean) | 95% CI | seeds | warm start | key fraction | wall s/run |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['variant']} | {s['mean']:.3f} | [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}] | "
                     f"{s['n_seeds']} | {s['warm_start']:.3f} | {s['frac_key']:.2f} | {s['wall_s']:.0f} |")
    lines += ["", "| variant | vs | mean paired diff | 95% CI | wins / losses | sign test p |", "|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['variant']} | {p['vs']} | {p['mean_diff']:+.3f} | [{p['ci95_low']:+.3f}, "
                     f"{p['ci95_high']:+.3f}] | {p['wins']} / {p['losses']} | {p['sign_test_p']:.3f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, curve: str = "curve", what: str = "held-out greedy accuracy") -> None:
    """Held-out `what` vs step, mean over seeds per variant (PIL only: no matplotlib needed)."""
    from PIL import Image, ImageDraw

    colours = dict(zip(VARIANTS, ["#000000", "#888888", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
                                 "#8c564b"]))
    w, h, pad = 760, 460, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    curves = {}
    for v in VARIANTS:
        runs = [dict(r[curve]) for r in records if r["variant"] == v and r.get(curve)]
        steps = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
        if steps:
            curves[v] = [(s, statistics.mean(c[s] for c in runs), len(runs)) for s in steps]
    if not curves:
        return
    smax = max(s for c in curves.values() for s, _, _ in c)
    accs = [a for c in curves.values() for _, a, _ in c]
    lo, hi = math.floor(min(accs) * 20 - 1) / 20, math.ceil(max(accs) * 20 + 1) / 20  # 0.05 grid around the data
    x = lambda s: pad + (w - 2 * pad - 120) * s / max(1, smax)
    y = lambda a: h - pad - (h - 2 * pad) * (a - lo) / (hi - lo)
    d.line([(pad, pad), (pad, h - pad), (w - pad - 120, h - pad)], fill="black")
    for a in [lo + 0.05 * i for i in range(round((hi - lo) / 0.05) + 1)]:
        d.text((10, y(a) - 6), f"{a:.2f}", fill="black")
        d.line([(pad, y(a)), (w - pad - 120, y(a))], fill="#eeeeee")
    for s in sorted({s for c in curves.values() for s, _, _ in c}):
        d.text((x(s) - 8, h - pad + 6), str(s), fill="black")
    d.text((w // 2 - 140, h - 25), "RL step (0 = the shared SFT warm start)", fill="black")
    d.text((pad, 20), f"{what}, mean over seeds", fill="black")
    for i, (v, c) in enumerate(curves.items()):
        col = colours[v]
        d.line([(x(s), y(a)) for s, a, _ in c], fill=col, width=2)
        d.text((w - pad - 100, pad + 18 * i), f"{v} (n={c[0][2]})", fill=col)
    img.save(path)


def config_value(config: str, extra: list[str], key: str) -> float:
    """`model.init_args.KEY` (dotted) of the config, or of an override in `extra`."""
    import yaml

    for e in extra:
        if e.startswith(f"--model.init_args.{key}="):
            return yaml.safe_load(e.split("=", 1)[1])
    value = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    for part in key.split("."):
        value = value[part]
    return value


# --- driver -------------------------------------------------------------------------------------------
def launch(variant: str, seed: int, args, extra: list[str], out: Path) -> dict | None:
    path = out / "runs" / f"{variant}_s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if args.summary_only:
        return None
    try:  # claim the run: several invocations on one OUT share the work without running a run twice
        os.close(os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"{variant:>12} seed {seed}: claimed by another invocation (delete {path.with_suffix('.lock')} "
              "if none is running)", flush=True)
        return None
    rc = child(["--one", variant, str(seed)], args, extra, out / "logs" / f"{variant}_s{seed}.log")
    if rc != 0 or not path.is_file():
        raise RuntimeError(f"run {variant} seed {seed} failed (exit {rc}); see {out}/logs/{variant}_s{seed}.log")
    rec = json.loads(path.read_text())
    print(f"{variant:>12} seed {seed}: val_acc {rec['val_acc']:.3f} frac_key {rec['frac_key']:.2f} "
          f"({rec['wall_s']:.0f} s)", flush=True)
    return rec


def child(flags: list[str], args, extra: list[str], log: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, *flags, "--config", args.config, "--out", args.out, "--", *extra]
    with log.open("w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def rl_overrides(args, out: Path) -> tuple[list[str], dict]:
    """Overrides that start every run from the shared warm start, and that warm start's record."""
    path = out / "warm.json"
    if not path.is_file():
        # the config's warm start as it is: the extra overrides are for the RL runs only
        if args.summary_only or child(["--warm"], args, [], out / "logs" / "warm.log") != 0:
            raise RuntimeError(f"no warm start at {path}; see {out}/logs/warm.log")
    warm = json.loads(path.read_text())
    print(f"warm start: {warm['steps']} SFT steps, held-out acc {warm['val_acc']:.3f} ({warm['wall_s']:.0f} s)")
    return [f"--model.init_args.policy.name_or_path={(out / 'warm').resolve()}", "--model.init_args.warm_start_steps=0",
            f"--trainer.max_steps={args.rl_steps}", f"--trainer.val_check_interval={args.val_every}",
            f"{TARGET_PROB}=true"], warm


PRIORITY = ("ktr", "grpo", "random", "grpo-matched", "visual", "temporal", "entropy", "ktr-averaged")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/ablation.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rl-steps", type=int, default=20, help="RL steps after the shared warm start")
    p.add_argument("--val-every", type=int, default=10, help="held-out evaluation every this many RL steps")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (1 torch thread each)")
    p.add_argument("--matched-scale", type=float, default=None,
                   help="lr factor of grpo-matched; default 1 / mean KTR key fraction of this invocation (its KTR "
                        "runs then go first); given, every run is scheduled seed-major")
    p.add_argument("--out", default="runs/ablation", help="per-run JSON, logs, TensorBoard, the warm start")
    p.add_argument("--summary-only", action="store_true", help="summarise the finished runs, start none")
    p.add_argument("--json", default=None, help="write records and summaries here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--png", default=None, help="write the learning curves here")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra CLI overrides for every run (after --)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.warm:  # child process: the shared warm start
        (out / "warm.json").write_text(json.dumps(warm_start(args.config, args.extra, out), indent=2))
        return
    if args.one:  # child process: one run
        rec = run_one(args.one[0], int(args.one[1]), args.config, args.extra, out)
        (out / "runs" / f"{args.one[0]}_s{args.one[1]}.json").write_text(json.dumps(rec, indent=2))
        return
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start, warm = rl_overrides(args, out)
    base_lr = float(config_value(args.config, args.extra, "optim.lr"))
    order = [v for v in PRIORITY if v in args.variants]  # KTR first: matched-step GRPO needs its fraction
    with ThreadPoolExecutor(args.jobs) as pool:
        run = lambda v, s, more=(): launch(v, s, args, [*start, *VARIANTS[v], *args.extra, *more], out)
        first = [] if args.matched_scale or "ktr" not in order else args.seeds  # KTR's fraction sets the scale
        records = [r for r in pool.map(lambda s: run("ktr", s), first) if r]
        scale = args.matched_scale or (1.0 / statistics.mean(r["frac_key"] for r in records) if records else None)
        if "grpo-matched" in order and scale is None:
            raise ValueError("grpo-matched needs KTR runs in this invocation or --matched-scale")
        more = {"grpo-matched": [f"--model.init_args.optim.lr={base_lr * (scale or 1.0)}"]}
        # seed-major: a run cut short leaves whole seeds, so the comparisons stay paired
        jobs = [(v, s) for s in args.seeds for v in order if not (v == "ktr" and first)]
        records += [r for r in pool.map(lambda vs: run(*vs, more.get(vs[0], ())), jobs) if r]
    for r in records:  # every curve starts at the shared warm start
        r["curve"] = [(0, warm["val_acc"])] + [tuple(c) for c in r["curve"] if c[0] > 0]
        r["p_curve"] = [(0, warm.get("val_p_target"))] + [tuple(c) for c in r.get("p_curve", []) if c[0] > 0]
        r["warm_start"] = {"val_acc": warm["val_acc"], "val_p_target": warm.get("val_p_target")}
    summaries, paired = summarise(records, "val_acc")
    p_summaries, p_paired = summarise(records, "val_p_target")
    md = (tables(summaries, paired) + "\n\n"
          + tables(p_summaries, p_paired, "held-out p(target) after RL"))
    print(md)
    if args.json:
        keep = ("variant", "seed", "val_acc", "val_p_target", "frac_key", "frac_key_last", "wall_s", "curve",
                "p_curve")
        Path(args.json).write_text(json.dumps({
            "records": [{k: r.get(k) for k in keep} for r in records], "summaries": summaries, "paired": paired,
            "summaries_p_target": p_summaries, "paired_p_target": p_paired,
            "warm_start": warm, "matched_scale": scale, "matched_lr": base_lr * (scale or 1.0),
            "ktr_frac_key_mean": next((s["frac_key"] for s in summaries if s["variant"] == "ktr"), None),
            "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
            "rl_steps": args.rl_steps, "val_every": args.val_every, "extra": args.extra}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.png:
        plot(records, args.png)
        stem = Path(args.png)
        plot(records, str(stem.with_name(stem.stem + "_p_target" + stem.suffix)), "p_curve",
             "held-out p(target): probability of the right answer text at temperature 1")

if __name__ == "__main__":
    main()
