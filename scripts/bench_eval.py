"""Evaluation throughput (questions/s) of the tiny model through the full evaluator path.

Each run evaluates the synthetic benchmark (Video-R1 eval JSON + mp4 files) into a fresh folder: load the
annotation, decode and resize the videos, encode the prompts, generate, score, write predictions and results.
The first run per device is a warm-up and is not reported.

Decoding "released" is temperature 0.1 / top-p 0.001 (Hugging Face sorts the whole 151,936-token vocabulary
at every step for top-p, which dominates the tiny model's CPU time); "greedy" is temperature 0, the
near-equivalent that skips the sort.

    python scripts/bench_eval.py                       # CPU (and CUDA when available)
    python scripts/bench_eval.py --json bench_eval.json --questions 64 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ktr.callbacks import DecodingConfig, EvalVideoSettings, SyntheticBenchmark
from ktr.config import PolicyConfig
from ktr.model.policy import load_policy

PROFILES = {
    # the demo's settings: 56x56 clips as they are, up to 8 frames -> 4 vision tokens per 2 frames
    "demo": dict(fps=4.0, min_frames=4, max_frames=8, min_pixels=56 * 56, max_pixels=56 * 56),
    # the released evaluation's frame/pixel settings (the 56x56 clips are upscaled to >= 128*28*28 pixels)
    "released": dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28),
}
DECODING = {"released": dict(temperature=0.1, top_p=0.001), "greedy": dict(temperature=0.0)}


def run_once(policy, data: Path, questions: int, batch_size: int, max_new_tokens: int, profile: str,
             decoding: str) -> dict:
    dec = DecodingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, **DECODING[decoding])
    evaluator = SyntheticBenchmark(num_questions=questions, data_dir=str(data), decoding=dec,
                                   video=EvalVideoSettings(**PROFILES[profile]))
    with tempfile.TemporaryDirectory() as out:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluator.evaluate(policy.model, policy.processor, out)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "questions_per_s": questions / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--profiles", nargs="+", default=["demo", "released"], choices=sorted(PROFILES))
    parser.add_argument("--decodings", nargs="+", default=["released", "greedy"], choices=sorted(DECODING))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    with tempfile.TemporaryDirectory() as data:
        for device in devices:
            policy = load_policy(PolicyConfig())
            policy.model.to(device)
            run_once(policy, Path(data), min(args.questions, 8), 8, args.max_new_tokens, "demo", "greedy")  # warm-up
            for profile in args.profiles:
                for decoding in args.decodings:
                    for bs in args.batch_sizes:
                        r = run_once(policy, Path(data), args.questions, bs, args.max_new_tokens, profile, decoding)
                        rows.append({"device": device, "frames": profile, "decoding": decoding, "batch_size": bs,
                                     "questions": args.questions, "max_new_tokens": args.max_new_tokens,
                                     "threads": torch.get_num_threads(), **r})
    print(f"{'device':6} {'frames':9} {'decoding':9} {'batch':>5} {'questions':>9} {'seconds':>8} {'q/s':>7}")
    for r in rows:
        print(f"{r['device']:6} {r['frames']:9} {r['decoding']:9} {r['batch_size']:5d} {r['questions']:9d} "
              f"{r['seconds']:8.2f} {r['questions_per_s']:7.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
