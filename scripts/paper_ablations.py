"""The Video-KTR paper's ablation figures as config sets: write them for a real run, or run them at CPU scale.

Figures (KTR_SPEC sections 1-2 and 6 give the paper's numbers):

* ``baselines``     same-data comparison: GRPO, T-GRPO, TW-GRPO, Video-KTR
* ``ratio``         selection ratio 10-50% (all three signals)
* ``scores``        log-prob difference vs KL, JS, L1, L2, cosine, Hellinger (visual and temporal probes)
* ``perturbations`` visual: mask all / a random half of the vision tokens, zero their embeddings;
                    temporal: random shuffle, reverse, 4-frame segment shuffle
* ``weighting``     hard top-20% mask vs softmax, sigmoid, linear, exponential soft weights

Write YAML overlays (one per variant, ``<dir>/<figure>/<variant>.yaml``) for the released 7B run::

    python scripts/paper_ablations.py write runs/paper_ablations
    ktr fit --config configs/qwen7b.yaml --config runs/paper_ablations/scores/kl.yaml \\
        --config configs/data/video_r1_holmes_16k.yaml

Run them at CPU scale on the synthetic task with scripts/ablate.py's protocol (the demo config: the same SFT
warm start for every variant, the same RL steps, held-out greedy accuracy ``val/acc`` after RL), one table
per figure, plus JSON::

    python scripts/paper_ablations.py run --figures scores weighting --seeds 0 1 2 --json out.json --markdown out.md

At CPU scale every variant keeps the demo's learning rate (the real-run overlays of the baselines set their
own, 1e-6, as the released baseline scripts did). The paper's "replace with another video" perturbation has
no counterpart in ktr yet (``zero_embeddings`` is listed instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("visual", "temporal", "entropy")
Overlay = dict  # nested model.init_args values


def _ratio(r: float) -> Overlay:
    return {"key_tokens": {s: {"ratio": r} for s in SIGNALS}}


def _score(name: str) -> Overlay:
    return {"key_tokens": {"visual": {"score": name}, "temporal": {"score": name}}}


GRPO_LR = {"optim": {"lr": 1.0e-6}}  # released baseline scripts (vanilla GRPO, Video-R1's T-GRPO)
FIGURES: dict[str, dict[str, Overlay]] = {
    "baselines": {
        "grpo": {"algorithm": "grpo", "key_tokens": {"enabled": False}, **GRPO_LR},
        "t_grpo": {"algorithm": "t_grpo", "key_tokens": {"enabled": False}, **GRPO_LR},
        "tw_grpo": {"algorithm": "tw_grpo", "key_tokens": {"enabled": False}, "loss": {"aggregation": "token-mean"},
                    **GRPO_LR},
        "ktr": {},
    },
    "ratio": {f"ratio_{int(r * 100)}": _ratio(r) for r in (0.1, 0.2, 0.3, 0.4, 0.5)},
    "scores": {name: _score(name) for name in ("logp_diff", "kl", "js", "l1", "l2", "cosine", "hellinger")},
    "perturbations": {
        "visual_mask_all": {"key_tokens": {"visual_perturbation": "attention_mask"}},
        "visual_mask_half": {"key_tokens": {"visual_perturbation": "random_half"}},
        "visual_zero_embeddings": {"key_tokens": {"visual_perturbation": "zero_embeddings"}},
        "temporal_shuffle": {"key_tokens": {"temporal_perturbation": "shuffle"}},
        "temporal_reverse": {"key_tokens": {"temporal_perturbation": "reverse"}},
        "temporal_segment_shuffle": {"key_tokens": {"temporal_perturbation": "segment_shuffle"}},
    },
    "weighting": {w: {"key_tokens": {"weighting": w}} for w in ("hard", "softmax", "sigmoid", "linear", "exponential")},
}
# The paper's averages over Video-Holmes, Video-MMMU and MMVU (KTR_SPEC), for the tables.
PAPER: dict[str, float] = {
    "grpo": 51.1, "t_grpo": 52.2, "tw_grpo": 51.9, "ktr": 53.4,
    "ratio_10": 52.8, "ratio_20": 53.4, "ratio_30": 52.0, "ratio_40": 53.0, "ratio_50": 52.3,
    "logp_diff": 53.4, "l1": 53.1, "js": 53.0, "cosine": 52.9, "l2": 52.8, "kl": 52.6, "hellinger": 52.4,
    "visual_mask_all": 52.5, "visual_mask_half": 52.4, "temporal_shuffle": 52.6, "temporal_reverse": 52.4,
    "temporal_segment_shuffle": 52.0,
    "hard": 53.4, "softmax": 52.5, "sigmoid": 51.9, "linear": 51.8, "exponential": 51.1,
}


def overlay_yaml(values: Overlay, cpu: bool = False) -> dict:
    """The YAML overlay of one variant (`cpu`: without the learning-rate override)."""
    init = {k: v for k, v in values.items() if not (cpu and k == "optim")}
    return {"model": {"class_path": "ktr.module.KTRModule", "init_args": init}}


def write(out: Path, figures: list[str], cpu: bool = False) -> list[Path]:
    paths = []
    for fig in figures:
        for name, values in FIGURES[fig].items():
            p = out / fig / f"{name}.yaml"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"# Paper ablation '{fig}', variant '{name}' (scripts/paper_ablations.py)\n"
                         + yaml.safe_dump(overlay_yaml(values, cpu), sort_keys=False))
            paths.append(p)
    return paths


def run_one(fig: str, name: str, overlay: Path, seed: int, config: str, extra: list[str], out: Path) -> dict:
    """One `ktr fit` as scripts/ablate.py runs it: same config and seed, the variant's overlay on top."""
    from ktr.cli import main

    t = time.time()
    cli = main(["fit", "--config", config, "--config", str(overlay), f"--seed_everything={seed}",
                "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
                f"--trainer.logger.init_args.name={fig}_{name}_s{seed}", *extra])
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    return {"figure": fig, "variant": name, "seed": seed, "val_acc": m.get("val/acc"), "wall_s": time.time() - t,
            "frac_key": m.get("train/ktr/frac_key")}


def tables(records: list[dict], figures: list[str]) -> str:
    out = []
    for fig in figures:
        lines = [f"### {fig}", "", "| variant | held-out acc (mean ± sd) | per seed | wall s/run | paper avg |",
                 "|---|---|---|---|---|"]
        for name in FIGURES[fig]:
            rs = [r for r in records if r["figure"] == fig and r["variant"] == name]
            accs = [r["val_acc"] for r in rs if r["val_acc"] is not None]
            if not rs:
                continue
            mean = f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.3f}" \
                if accs else "n/a"
            paper = f"{PAPER[name]:.1f}" if name in PAPER else "-"
            lines.append(f"| {name} | {mean} | {', '.join(f'{a:.3f}' for a in accs)} | "
                         f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {paper} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the YAML overlays for a real run")
    w.add_argument("out", type=Path)
    w.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    r = sub.add_parser("run", help="run the variants at CPU scale on the synthetic task")
    r.add_argument("--figures", nargs="+", default=list(FIGURES), choices=list(FIGURES))
    r.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    r.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", default="runs/paper_ablations", help="TensorBoard directory")
    r.add_argument("--json", default=None)
    r.add_argument("--markdown", default=None)
    r.add_argument("extra", nargs="*", help="CLI overrides for every run, e.g. --trainer.max_steps=100")
    args = p.parse_args(argv)
    if args.cmd == "write":
        for path in write(args.out, args.figures):
            print(path)
        return
    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), args.figures, cpu=True)
        for fig in args.figures:
            for name in FIGURES[fig]:
                if args.variants and name not in args.variants:
                    continue
                for seed in args.seeds:
                    overlay = Path(tmp) / fig / f"{name}.yaml"
                    records.append(run_one(fig, name, overlay, seed, args.config, args.extra, Path(args.out)))
    md = tables(records, args.figures)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
