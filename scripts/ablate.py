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
import sys
from pathlib import Path

from ktr.experiments.ablation import VARIANTS, run_all, run_one, warm_start
from ktr.report.ablation import plot, summarise, tables

ROOT = Path(__file__).resolve().parents[1]


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
    records, warm, scale, base_lr = run_all(args, entry=[sys.executable, __file__])
    summaries, paired = summarise(records, "val_acc", VARIANTS)
    p_summaries, p_paired = summarise(records, "val_p_target", VARIANTS)
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
            "config": (str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT)
                       else args.config),
            "rl_steps": args.rl_steps, "val_every": args.val_every, "extra": args.extra}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if args.png:
        plot(records, args.png, VARIANTS)
        stem = Path(args.png)
        plot(records, str(stem.with_name(stem.stem + "_p_target" + stem.suffix)), VARIANTS, "p_curve",
             "held-out p(target): probability of the right answer text at temperature 1")


if __name__ == "__main__":
    main()
