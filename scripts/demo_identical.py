"""Are two demo runs the same, bit for bit? Compares every held-out figure (`val/*` scalars at every validation)
and every trained tensor of the final checkpoints of two `ktr fit --config configs/demo.yaml` runs.

Used to show that a refactor changes no computation: run the demo on the old and the new commit with the same
seed and thread count, e.g.

    OMP_NUM_THREADS=1 ktr fit --config configs/demo.yaml --seed_everything=0 \
        --model.init_args.val_target_prob=true --trainer.logger.init_args.save_dir=/tmp/before
    python scripts/demo_identical.py /tmp/before/demo/version_0 /tmp/after/demo/version_0 --out docs/x.json

Prints a table (step, figure, before, after, equal) and writes JSON; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch


def val_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.rglob("events.out.tfevents*"))
    if not events:
        raise SystemExit(f"no TensorBoard events under {run}")
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith("val/")}


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    a, b = val_scalars(args.before), val_scalars(args.after)
    rows = []
    for tag in sorted(set(a) | set(b)):
        for (step, x), (step_b, y) in zip(a.get(tag, []), b.get(tag, []), strict=False):
            rows.append({"figure": tag, "step": step, "before": x, "after": y, "equal": step == step_b and x == y})
        if len(a.get(tag, [])) != len(b.get(tag, [])):
            rows.append({"figure": tag, "step": None, "before": len(a.get(tag, [])), "after": len(b.get(tag, [])),
                         "equal": False})
    wa, wb = weights(args.before), weights(args.after)
    differing = sorted(k for k in set(wa) | set(wb) if k not in wa or k not in wb or not torch.equal(wa[k], wb[k]))
    print(f"{'step':>5}  {'figure':<18} {'before':>12} {'after':>12}  equal")
    for r in rows:
        print(f"{r['step']!s:>5}  {r['figure']:<18} {r['before']:>12.6f} {r['after']:>12.6f}  {r['equal']}")
    print(f"final weights: {len(wa)} tensors, {len(differing)} differ")
    same = all(r["equal"] for r in rows) and not differing and bool(rows)
    print("IDENTICAL" if same else "DIFFERENT")
    if args.out:
        args.out.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "identical": same,
                                        "figures": rows, "weights_compared": len(wa), "weights_differing": differing,
                                        "machine": f"{platform.machine()} {platform.processor()}, torch "
                                                   f"{torch.__version__}"},
                                       indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
