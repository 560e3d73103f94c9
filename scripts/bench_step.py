"""Memory and time of a few KTR training steps, split by phase, with random weights of the real architecture.

    python scripts/bench_step.py --config configs/qwen7b_qlora.yaml --steps 3 --json bench_step.json
    python scripts/bench_step.py --config configs/qwen7b_qlora.yaml --arch qwen2.5-vl-7b --dry-run  # size only
    python scripts/bench_step.py --config configs/qwen3vl_8b_qlora.yaml --arch qwen3-vl-8b --steps 2

The measurement is `ktr.experiments.bench_step` (its docstring: the phases, how memory is measured); this
script is its command line. The model is built from the architecture's config with random initialisation
(nothing is downloaded) and trains on synthetic videos with the config's frame settings; every completion
runs to `max_new_tokens` (the worst case). Without a GPU the built-in tiny model runs on CPU and memory is the
process's peak RSS. Every step timed is an RL step: a config's SFT warm start (`warm_start_steps`) is set to 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ktr.experiments.bench_step import ARCHS, dry_run, measure


def run(args) -> dict:
    overrides = {"sampling.max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    arch = None if args.arch == "tiny" else args.arch
    return measure(args.config, steps=args.steps, arch=arch, device=args.device, frames=args.frames,
                   overrides=overrides)


def table(result: dict) -> str:
    setup = result["setup"]
    lines = [f"{result['arch']} ({result['parameters'] / 1e9:.2f}B parameters) on {result['device']}, "
             f"G={result['group_size']}, max_new_tokens={result['max_new_tokens']}; memory: {result['memory']}",
             f"weights at rest {setup['allocated_gb']:.2f} GB (built in {setup['seconds']:.1f} s)",
             f"{'phase':<12}{'seconds':>10}{'peak GB':>10}{'reserved GB':>13}"]
    for phase, rec in result["summary"].items():
        peak = "" if rec["peak_gb"] is None else f"{rec['peak_gb']:.2f}"
        reserved = "" if rec["reserved_gb"] is None else f"{rec['reserved_gb']:.2f}"
        lines.append(f"{phase:<12}{rec['seconds']:>10.3f}{peak:>10}{reserved:>13}")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="ktr fit config(s), merged in order")
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first is reported apart)")
    parser.add_argument("--arch", default="auto", choices=["auto", "tiny", *ARCHS],
                        help="auto: the 7B architecture on CUDA, the config's tiny model on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--frames", type=int, default=None, help="override data video max_frames (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override sampling.max_new_tokens")
    parser.add_argument("--dry-run", action="store_true", help="only build --arch on the meta device and count")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.dry_run:
        arch = "qwen2.5-vl-7b" if args.arch in ("auto", "tiny") else args.arch
        print(f"{arch}: {dry_run(arch):,} parameters")
        return None
    result = run(args)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
