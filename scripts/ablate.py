"""Ablation on the synthetic task: vanilla GRPO vs Video-KTR vs each single signal, several seeds.

Every variant starts from the same warm start (the demo's SFT steps) and runs the same number of RL steps; the
held-out greedy accuracy (`val/acc`) after RL is reported. Writes a markdown table and JSON.

    python scripts/ablate.py --seeds 0 1 2 --json ablation.json --markdown ablation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "grpo": ["--model.init_args.key_tokens.enabled=false"],
    "ktr": [],
    "visual only": ["--model.init_args.key_tokens.temporal.enabled=false",
                    "--model.init_args.key_tokens.entropy.enabled=false"],
    "temporal only": ["--model.init_args.key_tokens.visual.enabled=false",
                      "--model.init_args.key_tokens.entropy.enabled=false"],
    "entropy only": ["--model.init_args.key_tokens.visual.enabled=false",
                     "--model.init_args.key_tokens.temporal.enabled=false"],
}


def run(variant: str, seed: int, config: str, extra: list[str], out: Path) -> dict:
    from ktr.cli import main

    t = time.time()
    cli = main(["fit", "--config", config, f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={out}",
                f"--trainer.logger.init_args.name={variant.replace(' ', '_')}_s{seed}", *VARIANTS[variant], *extra])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    return {"variant": variant, "seed": seed, "val_acc": metrics.get("val/acc"), "wall_s": time.time() - t,
            "frac_key": metrics.get("train/ktr/frac_key")}


def table(records: list[dict]) -> str:
    lines = ["| variant | held-out acc (mean ± sd) | per seed | wall s/run |", "|---|---|---|---|"]
    for v in VARIANTS:
        accs = [r["val_acc"] for r in records if r["variant"] == v and r["val_acc"] is not None]
        if not accs:
            continue
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        wall = statistics.mean(r["wall_s"] for r in records if r["variant"] == v)
        lines.append(f"| {v} | {statistics.mean(accs):.3f} ± {sd:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in accs)} | {wall:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="runs/ablation", help="TensorBoard directory")
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("extra", nargs="*", help="extra CLI overrides for every run, e.g. --trainer.max_steps=100")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    records = [run(v, s, args.config, args.extra, Path(args.out)) for v in args.variants for s in args.seeds]
    md = table(records)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
