"""The controlled ablation of `scripts/ablate.py` (layer L4): its variants, one run, the shared SFT warm start,
and the driver that runs every (variant, seed) from that warm start in subprocesses.

The protocol is in the script's docstring (and docs/ablation.md); the statistics and tables of the records
are `ktr.report.ablation`. A run is `ktr fit` (`ktr.cli.main`) in its own process: the driver starts the
script again (`entry`, e.g. `[sys.executable, "scripts/ablate.py"]`) with `--warm` or `--one VARIANT SEED`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
PRIORITY = ("ktr", "grpo", "random", "grpo-matched", "visual", "temporal", "entropy", "ktr-averaged")


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

    sys.argv = sys.argv[:1]  # LightningCLI must not see the script's arguments
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
# `args` is scripts/ablate.py's parsed command line; `entry` the command that starts that script again.
def launch(variant: str, seed: int, args, extra: list[str], out: Path, entry: list[str]) -> dict | None:
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
    rc = child(entry, ["--one", variant, str(seed)], args, extra, out / "logs" / f"{variant}_s{seed}.log")
    if rc != 0 or not path.is_file():
        raise RuntimeError(f"run {variant} seed {seed} failed (exit {rc}); see {out}/logs/{variant}_s{seed}.log")
    rec = json.loads(path.read_text())
    print(f"{variant:>12} seed {seed}: val_acc {rec['val_acc']:.3f} frac_key {rec['frac_key']:.2f} "
          f"({rec['wall_s']:.0f} s)", flush=True)
    return rec


def child(entry: list[str], flags: list[str], args, extra: list[str], log: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [*entry, *flags, "--config", args.config, "--out", args.out, "--", *extra]
    with log.open("w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def rl_overrides(args, out: Path, entry: list[str]) -> tuple[list[str], dict]:
    """Overrides that start every run from the shared warm start, and that warm start's record."""
    path = out / "warm.json"
    if not path.is_file():
        # the config's warm start as it is: the extra overrides are for the RL runs only
        if args.summary_only or child(entry, ["--warm"], args, [], out / "logs" / "warm.log") != 0:
            raise RuntimeError(f"no warm start at {path}; see {out}/logs/warm.log")
    warm = json.loads(path.read_text())
    print(f"warm start: {warm['steps']} SFT steps, held-out acc {warm['val_acc']:.3f} ({warm['wall_s']:.0f} s)")
    return [f"--model.init_args.policy.name_or_path={(out / 'warm').resolve()}", "--model.init_args.warm_start_steps=0",
            f"--trainer.max_steps={args.rl_steps}", f"--trainer.val_check_interval={args.val_every}",
            f"{TARGET_PROB}=true"], warm


def run_all(args, entry: list[str]) -> tuple[list[dict], dict, float | None, float]:
    """Every (variant, seed) of `args` from the shared warm start (run first if `OUT/warm.json` is missing),
    `args.jobs` at a time. Returns the records (curves starting at the warm start), the warm start's record,
    the learning-rate factor of `grpo-matched` and the config's learning rate."""
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start, warm = rl_overrides(args, out, entry)
    base_lr = float(config_value(args.config, args.extra, "optim.lr"))
    order = [v for v in PRIORITY if v in args.variants]  # KTR first: matched-step GRPO needs its fraction
    with ThreadPoolExecutor(args.jobs) as pool:
        run = lambda v, s, more=(): launch(v, s, args, [*start, *VARIANTS[v], *args.extra, *more], out, entry)  # noqa: E731
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
    return records, warm, scale, base_lr
