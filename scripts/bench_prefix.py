"""Shared prompt prefix vs naive: time, peak memory and tokens processed of the rollout, of each scoring pass
and of the whole step (issue 11).

    python scripts/bench_prefix.py --repeats 3 --new-tokens 32 128 --json bench_prefix.json
    python scripts/bench_prefix.py --parts passes step --new-tokens 128 --json bench_prefix_step.json

Rollout: `naive` is transformers' `generate` with `num_return_sequences` (`sampling.backend: hf`): the decoder
prefills each prompt G times. `shared` is `ktr.rollout.shared` (`sampling.backend: shared`): one prefill per
prompt, its key/value cache repeated to the G rows, ktr's own sampling loop (exact candidate-set top-p).

Scoring passes (`--parts passes`; `loss.shared_prefix: false` vs `true`, `ktr.model.prefix`): on G random completions
of `new_tokens` tokens, each measured in its own phase of one process: `policy` (vision features and the
decoder with gradient, log-probs and entropy through the chunked projection), `backward` (the fused masked
loss and its backward into the decoder and the vision tower), `reference` (a no-grad pass), `visual` (the
released `attention_mask` probe), `temporal` (the `shuffle` probe: re-encoded frames and a decoder pass).
Peak memory of a phase is the growth of the process's resident set over the phase (the kernel's high-water
mark is reset before each phase, `/proc/self/clear_refs`, and large buffers are returned to the system when
freed, `MALLOC_MMAP_THRESHOLD_`); gradients are allocated before the first phase, so `policy` + `backward`
hold the gradient pass's activations only. Tokens processed count decoder positions (the packed layout's
padding included).

Whole step (`--parts step`): `scripts/bench_step.py`'s instrumented KTRModule steps on the same model and a
~1,000-token synthetic video, three variants: naive KTR (`sampling.backend: hf`, `loss.shared_prefix: false`),
shared KTR (the defaults) and shared GRPO (`key_tokens.enabled: false`), with the released sampling (temperature
1, top-p 0.95) and KL (beta 0.04, so a reference pass). Memory there is the process's peak RSS over the run
(monotonic, so it includes the weights, the reference copy and the optimizer state), time the mean step after
the first (`ktr.experiments.bench_step.summarise`).

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
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

QUESTION = ("Watch the video carefully. Several coloured shapes appear one after another and move across the "
            "scene. Count how many distinct shapes appear, note the colour of each and the order in which they "
            "enter, then decide which of the four options describes the sequence best. Think step by step and "
            "explain your reasoning before you answer. Options: (A) red, green, blue (B) blue, red, green "
            "(C) green, blue, red (D) red, blue, green. Put the letter of the answer in the answer tags.")


def build(head_scale: float):
    """The bench model (random, seeded) and a one-prompt batch."""
    import torch

    from ktr.config import PolicyConfig, TinyModelConfig
    from ktr.model.policy import load_policy
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
    from ktr.rollout.hf import generate
    from ktr.rollout.shared import generate_shared

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
                head_scale=head_scale, generated_tokens_per_s=n * t / seconds,
                tokens_per_cpu_s=(prefill + n * (t - 1)) / cpu_seconds)


PASSES = ("policy", "backward", "reference", "visual", "temporal")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _phase(fn) -> tuple[object, float, float, float]:
    """Run `fn()`: its result, wall s, cpu s and peak resident growth in MB (high-water mark reset first)."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the system before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return out, wall, cpu, (_rss_kb("VmHWM") - before) / 1024


def passes_worker(impl: str, new_tokens: int, group_size: int, head_scale: float) -> list[dict]:
    """The scoring passes and the backward of one step on G random completions (run in its own process)."""
    import torch

    from ktr import fused
    from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media, output_projection
    from ktr.probes.temporal import temporal_scores
    from ktr.probes.visual import visual_scores
    from ktr.types import Rollout

    torch.set_num_threads(1)
    policy, batch = build(head_scale)
    model, proc = policy.model, policy.processor
    g, t = group_size, new_tokens
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 150000, (g, t), generator=gen)
    valid = torch.ones(g, t, dtype=torch.bool)
    rollout = Rollout(g, torch.cat([batch.input_ids.repeat(g, 1), comp], 1),
                      torch.cat([batch.attention_mask.repeat(g, 1), valid.long()], 1),
                      torch.cat([batch.mm_token_type_ids.repeat(g, 1), torch.zeros_like(comp, dtype=torch.int)], 1),
                      comp, valid)
    view = SequenceView.of(model, rollout, batch, shared_prefix=impl == "shared")
    adv = torch.linspace(-1, 1, g)
    key = torch.rand(g, t, generator=gen) < 0.3

    def policy_pass():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        hidden = completion_hidden(model, view, feats, t)
        with torch.no_grad():
            logps, ent = completion_logps(model, hidden.detach(), comp, valid, with_entropy=True)
        return feats, hidden, logps

    def backward(hidden, logps):
        fn = partial(fused.fused_policy_loss, tokens=comp, advantages=adv, mask=key, ref_logps=logps, beta=0.04,
                     num_sequences=g, num_tokens=key.sum(), max_len=t)
        loss, _, _ = fused.call_with_head(output_projection(model), hidden, fn)
        loss.backward()

    feats, hidden, logps = policy_pass()  # warm-up, and the gradients' buffers allocated once
    backward(hidden, logps)
    model.zero_grad(set_to_none=False)
    del feats, hidden
    records = []

    def record(phase, wall, cpu, mem):
        p = int(batch.attention_mask.sum())
        tokens = (p + g * t) if impl == "shared" else g * (p + t)
        records.append(dict(impl=impl, phase=phase, group_size=g, prompt_tokens=p, new_tokens=t,
                            tokens_processed=tokens, time_s=wall, cpu_s=cpu, peak_mem_mb=mem, head_scale=head_scale,
                            tokens_per_cpu_s=tokens / cpu))

    out, *m = _phase(policy_pass)
    feats, hidden, logps = out
    record("policy", *m)
    _, *m = _phase(lambda: backward(hidden, logps))
    record("backward", *m)
    hidden = None  # the activations go before the no-grad passes
    detached = feats.detached(leaves=False)
    with torch.no_grad():
        _, *m = _phase(lambda: completion_logps(model, completion_hidden(model, view, detached, t), comp, valid))
        record("reference", *m)
        _, *m = _phase(lambda: visual_scores(model, batch, view, detached, comp, valid, logps))
        record("visual", *m)
        _, *m = _phase(lambda: temporal_scores(model, proc, batch, view, detached, comp, valid, logps,
                                               generator=torch.Generator().manual_seed(1)))
        record("temporal", *m)
    return records


STEP_VARIANTS = {  # bench_step overrides of each whole-step variant
    "naive": {"sampling.backend": "hf", "loss.shared_prefix": False},
    "shared": {},
    "shared-grpo": {"key_tokens.enabled": False},
}


def step_worker(variant: str, new_tokens: int, group_size: int, steps: int) -> list[dict]:
    """Whole KTRModule steps (`scripts/bench_step.py`) on the bench model and a ~1,000-token synthetic video."""
    from ktr.experiments import bench_step

    tiny = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                tie_word_embeddings=False)
    overrides = {"sampling.group_size": group_size, "sampling.max_new_tokens": new_tokens, "sampling.top_p": 0.95,
                 "loss.beta": 0.04, "policy.tiny": tiny, **STEP_VARIANTS[variant]}
    side = 308  # 16 frames of 308 x 308: grid 8 x 22 x 22, 968 video tokens
    video = dict(fps=2.0, min_frames=16, max_frames=16, min_pixels=side * side, max_pixels=side * side)
    result = bench_step.measure([Path(__file__).parent.parent / "configs" / "demo.yaml"], steps=steps, arch=None,
                                device="cpu", overrides=overrides, video=video)
    out = []
    for phase, rec in result["summary"].items():  # mean seconds after the warm-up step, max peaks (bench_step)
        out.append(dict(impl=variant, phase=phase if phase == "step" else f"step/{phase}", group_size=group_size,
                        new_tokens=new_tokens, time_s=rec["seconds"], peak_mem_mb=rec["peak_gb"] * 1024))
    return out


def measure(impl: str, new_tokens: int, group_size: int, head_scale: float, part: str = "rollout",
            steps: int = 3):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--worker", impl, "--worker-part", part, "--new-tokens", str(new_tokens),
           "--group-size", str(group_size), "--head-scale", str(head_scale), "--steps", str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    rec = dict(runs[0])
    for key in ("time_s", "cpu_s", "peak_mem_mb", "generated_tokens_per_s", "tokens_per_cpu_s"):
        if key in rec:
            rec[key] = statistics.median(r[key] for r in runs)
    rec["repeats"] = len(runs)
    rec["time_s_all"] = [round(r["time_s"], 3) for r in runs]
    if "cpu_s" in rec:
        rec["cpu_s_all"] = [round(r["cpu_s"], 3) for r in runs]
    return rec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["rollout", "passes", "step"], default=["rollout", "passes"])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="whole steps per step run (the first is warm-up)")
    parser.add_argument("--head-scale", type=float, nargs="+", default=[1.0],
                        help="multiply the output projection (1: flat random logits; 40: a peaked, trained-like "
                             "distribution whose nucleus is small)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-part", default="rollout", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        t, g, h = args.new_tokens[0], args.group_size, args.head_scale[0]
        out = {"rollout": lambda: worker(args.worker, t, g, h), "passes": lambda: passes_worker(args.worker, t, g, h),
               "step": lambda: step_worker(args.worker, t, g, args.steps)}[args.worker_part]()
        print(json.dumps(out))
        return
    records = []
    for part in args.parts:
        impls = tuple(STEP_VARIANTS) if part == "step" else ("naive", "shared")
        for scale in args.head_scale if part != "step" else [1.0]:
            for t in args.new_tokens:
                runs: dict[str, list] = {i: [] for i in impls}
                for r in range(args.repeats if part != "step" else 1):
                    for impl in (impls if r % 2 == 0 else impls[::-1]):
                        got = measure(impl, t, args.group_size, scale, part, args.steps)
                        runs[impl].append(got if isinstance(got, list) else [got])
                        print(f"  {part} {impl:11s} head x{scale:g} {t:4d} new tokens: "
                              + ", ".join(f"{x['phase']} {x['time_s']:.2f} s" for x in runs[impl][-1]),
                              file=sys.stderr, flush=True)
                for impl in impls:  # one record per (impl, phase): medians over the repeats
                    for k in range(len(runs[impl][0])):
                        records.append(medians([rep[k] for rep in runs[impl]]))
    print(table(records, args))
    if args.json:
        import torch

        meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(), "threads": 1,
                "model": "tiny Qwen2.5-VL, hidden 512, 4 layers, 8 heads (2 kv), MLP 1408, vocab 151936, untied",
                "sampling": {"temperature": 1.0, "top_p": 0.95}}
        args.json.write_text(json.dumps({"settings": meta, "results": records}, indent=2) + "\n")


def table(records: list[dict], args) -> str:
    """Each record beside its naive counterpart (same phase, lengths, head scale): times and memory as ratios."""
    lines = [f"G={args.group_size}, 1 thread, {os.cpu_count()} cpus ({platform.machine()}), medians of interleaved "
             f"runs (shared machine: noisy; cpu s is the steadier measure)",
             f"{'phase':>16} {'impl':>11} {'new':>4} {'tokens':>7} {'wall s':>7} {'cpu s':>7} {'x naive':>7} "
             f"{'peak MB':>8} {'x naive':>7}"]
    def key(r):
        return (r["phase"], r["new_tokens"], r.get("head_scale", 1.0))
    naive = {key(r): r for r in records if r["impl"] == "naive"}
    for r in records:
        n = naive.get(key(r))
        base_t = "cpu_s" if "cpu_s" in r else "time_s"
        ratio = f"{r[base_t] / n[base_t]:.2f}" if n and n[base_t] else "-"
        mem = f"{r['peak_mem_mb'] / n['peak_mem_mb']:.2f}" if n and n.get("peak_mem_mb") else "-"
        lines.append(f"{r['phase']:>16} {r['impl']:>11} {r['new_tokens']:>4} {r.get('tokens_processed', 0):>7} "
                     f"{r['time_s']:>7.2f} {r.get('cpu_s', float('nan')):>7.2f} {ratio:>7} "
                     f"{r['peak_mem_mb']:>8.0f} {mem:>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
