"""Shared prompt prefix vs naive: time, peak memory and tokens processed of the rollout (issue 11).

    python scripts/bench_prefix.py --repeats 3 --new-tokens 32 128 --json bench_prefix.json

`naive` is transformers' `generate` with `num_return_sequences` (`sampling.backend: hf`): the decoder prefills
each prompt G times. `shared` is `ktr.rollout_shared` (`sampling.backend: shared`): one prefill per prompt,
its key/value cache repeated to the G rows, ktr's own sampling loop (exact candidate-set top-p).

Model: a decoder-dominated CPU model (the built-in random Qwen2.5-VL at hidden 512, 4 layers, the full
151,936 vocabulary, untied output projection), one prompt of a 16-frame 224x448 video (1,024 video tokens)
plus ~100 text tokens, G = 8, the released sampling (temperature 1, top-p 0.95). A random model almost never
emits an end token, so every completion runs to `new_tokens`. Its next-token distribution is nearly flat,
so the nucleus holds ~95% of the vocabulary and the candidate-set filter falls back to the full sort; with
`--head-scale 40` the output projection is scaled so the nucleus holds a few tokens, as for a trained model.

Each measurement runs in a fresh subprocess with 1 thread (peak memory = growth of the process's peak RSS
during the rollout, `getrusage`), naive and shared interleaved (order alternating per repeat); the table shows
medians. "tokens processed" counts decoder tokens (prefill + decode steps). Wall time and the process's CPU
time are both reported: on a machine shared with other jobs the wall time mostly measures waiting, and the
CPU time (1 thread) is the steadier measure of the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = ("Watch the video carefully. Several coloured shapes appear one after another and move across the "
            "scene. Count how many distinct shapes appear, note the colour of each and the order in which they "
            "enter, then decide which of the four options describes the sequence best. Think step by step and "
            "explain your reasoning before you answer. Options: (A) red, green, blue (B) blue, red, green "
            "(C) green, blue, red (D) red, blue, green. Put the letter of the answer in the answer tags.")


def build(head_scale: float):
    """The bench model (random, seeded) and a one-prompt batch."""
    import torch

    from ktr.policy import PolicyConfig, TinyModelConfig, load_policy
    from ktr.types import Media

    tiny = TinyModelConfig(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                           tie_word_embeddings=False)
    policy = load_policy(PolicyConfig(attn_implementation="sdpa", tiny=tiny))
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(head_scale)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (16, 3, 224, 448), dtype=torch.uint8, generator=gen)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    sample = policy.processor.encode(messages, Media("video", frames, 2.0))
    return policy, policy.processor.collate([sample])


def worker(impl: str, new_tokens: int, group_size: int, head_scale: float) -> dict:
    """One measurement (run in its own process): the rollout's time, RSS growth and token counts."""
    import torch

    from ktr.config import SamplingConfig
    from ktr.rollout import generate
    from ktr.rollout_shared import generate_shared

    torch.set_num_threads(1)
    policy, batch = build(head_scale)
    fn = generate if impl == "naive" else generate_shared
    fn(policy.model, policy.processor, batch, SamplingConfig(group_size=1, max_new_tokens=1))  # warm-up
    cfg = SamplingConfig(group_size=group_size, max_new_tokens=new_tokens, temperature=1.0, top_p=0.95)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    rollout = fn(policy.model, policy.processor, batch, cfg)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    prompt = int(batch.attention_mask.sum())
    b, n, t = len(batch), rollout.completion_ids.shape[0], rollout.completion_ids.shape[1]
    prefill = (b if impl == "shared" else n) * prompt
    return dict(impl=impl, phase="rollout", group_size=group_size, prompt_tokens=prompt, new_tokens=t,
                tokens_processed=prefill + n * (t - 1), time_s=seconds, cpu_s=cpu_seconds, peak_mem_mb=peak_kb / 1024,
                head_scale=head_scale, generated_tokens_per_s=n * t / seconds, tokens_per_cpu_s=(prefill + n * (t - 1)) / cpu_seconds)


def measure(impl: str, new_tokens: int, group_size: int, head_scale: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", impl, "--new-tokens", str(new_tokens), "--group-size",
           str(group_size), "--head-scale", str(head_scale)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    rec = dict(runs[0])
    for key in ("time_s", "cpu_s", "peak_mem_mb", "generated_tokens_per_s", "tokens_per_cpu_s"):
        rec[key] = statistics.median(r[key] for r in runs)
    rec["repeats"] = len(runs)
    rec["time_s_all"] = [round(r["time_s"], 3) for r in runs]
    rec["cpu_s_all"] = [round(r["cpu_s"], 3) for r in runs]
    return rec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--head-scale", type=float, nargs="+", default=[1.0],
                        help="multiply the output projection (1: flat random logits; 40: a peaked, trained-like "
                             "distribution whose nucleus is small)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=["naive", "shared"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens[0], args.group_size, args.head_scale[0])))
        return
    records = []
    for scale in args.head_scale:
        for t in args.new_tokens:
            runs: dict[str, list[dict]] = {"naive": [], "shared": []}
            for r in range(args.repeats):
                for impl in (("naive", "shared") if r % 2 == 0 else ("shared", "naive")):
                    runs[impl].append(measure(impl, t, args.group_size, scale))
                    last = runs[impl][-1]
                    print(f"  {impl:6s} head x{scale:g} {t:4d} new tokens: {last['time_s']:.2f} s wall, "
                          f"{last['cpu_s']:.2f} s cpu",
                          file=sys.stderr, flush=True)
            records += [medians(runs["naive"]), medians(runs["shared"])]
    print(f"rollout, G={args.group_size}, 1 thread, {os.cpu_count()} cpus ({platform.machine()}), medians of "
          f"{args.repeats} interleaved runs (shared machine: noisy)")
    print(f"{'head':>5} {'impl':>6} {'prompt':>6} {'new':>4} {'tokens':>7} {'wall s':>7} {'speed-up':>8} "
          f"{'cpu s':>7} {'speed-up':>8} {'peak MB':>8} {'tok/cpu s':>9}")
    for i in range(0, len(records), 2):
        naive = records[i]
        for r in records[i:i + 2]:
            print(f"{r['head_scale']:>5g} {r['impl']:>6} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
                  f"{r['tokens_processed']:>7} {r['time_s']:>7.2f} {naive['time_s'] / r['time_s']:>7.2f}x "
                  f"{r['cpu_s']:>7.2f} {naive['cpu_s'] / r['cpu_s']:>7.2f}x {r['peak_mem_mb']:>8.0f} "
                  f"{r['tokens_per_cpu_s']:>9.0f}")
    if args.json:
        import torch

        meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(), "threads": 1,
                "model": "tiny Qwen2.5-VL, hidden 512, 4 layers, 8 heads (2 kv), MLP 1408, vocab 151936, untied",
                "sampling": {"temperature": 1.0, "top_p": 0.95}}
        args.json.write_text(json.dumps({"settings": meta, "results": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
