"""The Video-KTR paper's ablation figures as config sets (layer L4): one YAML overlay per variant of each
figure, written for a real run or run at CPU scale as `ktr fit` (`scripts/paper_ablations.py`).

`FIGURES` holds the overlays (nested `model.init_args` values), `PAPER` the paper's averages over
Video-Holmes, Video-MMMU and MMVU (docs/method.md sections 1-2 and 6); `ktr.report.ablation.figure_tables` puts
the two side by side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

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
# The paper's averages over Video-Holmes, Video-MMMU and MMVU (docs/method.md section 6.2), for the tables.
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
    """`out/<figure>/<variant>.yaml` for every variant of `figures`; the paths written."""
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


def run_figures(figures: list[str], variants: list[str] | None, seeds: list[int], config: str, extra: list[str],
                out: Path) -> list[dict]:
    """Every variant of `figures` (only `variants` if given) and seed at CPU scale (overlays without their
    learning rate), one after another in this process: their records."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), figures, cpu=True)
        for fig in figures:
            for name in FIGURES[fig]:
                if variants and name not in variants:
                    continue
                for seed in seeds:
                    overlay = Path(tmp) / fig / f"{name}.yaml"
                    records.append(run_one(fig, name, overlay, seed, config, extra, out))
    return records
