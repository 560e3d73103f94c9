"""The Video-KTR paper's ablation figures as config sets: write them for a real run, or run them at CPU scale.

Figures (docs/method.md sections 1-2 and 6 give the paper's numbers):

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
import sys
from pathlib import Path

from ktr.experiments.paper_ablations import FIGURES, PAPER, run_figures, write
from ktr.report.ablation import figure_tables

ROOT = Path(__file__).resolve().parents[1]


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
    records = run_figures(args.figures, args.variants, args.seeds, args.config, args.extra, Path(args.out))
    md = figure_tables(records, {fig: FIGURES[fig] for fig in args.figures}, PAPER)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
