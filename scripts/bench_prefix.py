"""Shared prompt prefix vs naive: time, peak memory and tokens processed of the rollout, of one attention layer,
of each scoring pass and of the whole step (issues 11 and 26).

    python scripts/bench_prefix.py --repeats 3 --new-tokens 32 128 --json bench_prefix.json
    python scripts/bench_prefix.py --parts attention --new-tokens 128 768 --json docs/bench_prefix.json --merge
    python scripts/bench_prefix.py --parts passes --model decoder --new-tokens 128 768 --repeats 2 \
        --json docs/bench_prefix.json --merge
    python scripts/bench_prefix.py --parts passes step --new-tokens 128 --json bench_prefix_step.json
    python scripts/bench_prefix.py --parts passes --model 7b-layer --vocab 5376 --new-tokens 768 --head-scale 40 \
        --repeats 1 --passes-impls naive released split --no-decoder-phases --json bench_prefix_7b_layer.json

Attention (`--parts attention`): one decoder layer's attention, forward + backward, fp32, 1 thread, at
Qwen2.5-VL-7B's head shapes (28 query and 4 key/value heads of 128), a 1,200-token prompt and G = 8
(`ktr.experiments.gpu_parts.attention_layouts`, also the GPU check's): `naive` (G rows, transformers' SDPA call
without a mask), `naive_mask` (the explicit causal mask transformers passes once a row is padded), `dense` (one
packed row, `[W, W]` mask) and `split` (`ktr.model.attention`), interleaved in one process, median process CPU
time, with the largest output and gradient difference to naive.

Rollout: `naive` is transformers' `generate` with `num_return_sequences` (`sampling.backend: hf`): the decoder
prefills each prompt G times. `shared` is `ktr.rollout.shared` (`sampling.backend: shared`): one prefill per
prompt, its key/value cache repeated to the G rows, ktr's own sampling loop (exact candidate-set top-p).

Scoring passes (`--parts passes`; `naive`: `loss.shared_prefix: false`; `split`: the default, `ktr.model.prefix` with
split attention; `dense`: the packed row with a dense mask, `SequenceView.prefix_attention = "dense"`;
`released`: naive rows with the visual probe's media masked rather than dropped, the layout as released; it times its
visual pass only, its other passes being naive's rows exactly): on G random
completions of `new_tokens` tokens, each measured in its own phase of one process: `policy` (vision features and the
decoder with gradient, log-probs and entropy through the chunked projection), `backward` (the fused masked
loss and its backward into the decoder and the vision tower), `reference` (a no-grad pass), `visual` (the
released `attention_mask` probe), `temporal` (the `shuffle` probe: re-encoded frames and a decoder pass).
Peak memory of a phase is the growth of the process's resident set over the phase (the kernel's high-water
mark is reset before each phase, `/proc/self/clear_refs`, and large buffers are returned to the system when
freed, `MALLOC_MMAP_THRESHOLD_`); gradients are allocated before the first phase, so `policy` + `backward`
hold the gradient pass's activations only. Tokens processed count decoder positions (the packed layout's
padding included). `policy/decoder`, `reference/decoder` and `visual/decoder` time the decoder part of those passes
alone (no output projection: on a 7B model the 151,936-wide head is ~1/12 of a token's cost, on the bench
models it is more than the decoder's per completion token).

Whole step (`--parts step`): `scripts/bench_step.py`'s instrumented KTRModule steps on the same model and a
~1,000-token synthetic video, three variants: naive KTR (`sampling.backend: hf`, `loss.shared_prefix: false`),
shared KTR (the defaults) and shared GRPO (`key_tokens.enabled: false`), with the released sampling (temperature
1, top-p 0.95) and KL (beta 0.04, so a reference pass). Memory there is the process's peak RSS over the run
(monotonic, so it includes the weights, the reference copy and the optimizer state), time the mean step after
the first (`ktr.experiments.bench_step.summarise`).

Model (`--model small`, the default): the built-in random Qwen2.5-VL at hidden 512, 4 layers, 8 heads (2 key/value),
MLP 1408, the full 151,936 vocabulary, untied output projection; `--model decoder`: hidden 1024, 8 layers,
16 heads (2 key/value), MLP 2816 (the decoder's share of the passes larger: 180 MFLOP per token through the decoder
against 311 MFLOP through the head, and each naive row 1,900 decoder tokens for 768 head tokens); `--model 7b-layer`:
one decoder layer at Qwen2.5-VL-7B's widths (hidden 3,584, 28 heads, 4 key/value, MLP 18,944; with `--vocab 5376`
the head is 1/12 of a token's work, as on the 28-layer 7B); one prompt of a
16-frame 224x448 video (1,024 video tokens)
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

from ktr.experiments.machine import cpu_name

QUESTION = ("Watch the video carefully. Several coloured shapes appear one after another and move across the "
            "scene. Count how many distinct shapes appear, note the colour of each and the order in which they "
            "enter, then decide which of the four options describes the sequence best. Think step by step and "
            "explain your reasoning before you answer. Options: (A) red, green, blue (B) blue, red, green "
            "(C) green, blue, red (D) red, blue, green. Put the letter of the answer in the answer tags.")


MODELS = {  # TinyModelConfig fields of the bench models
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1408),
    "decoder": dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=2, intermediate_size=2816),
    # one decoder layer of Qwen2.5-VL-7B's widths (its attention heads, MLP and hidden size; with `--vocab 5376` the
    # head is 1/12 of the layer's work per token, as the 151,936-wide head is of the 7B's 28 layers)
    "7b-layer": dict(hidden_size=3584, num_layers=1, num_heads=28, num_kv_heads=4, intermediate_size=18944),
}


def model_key(model: str, vocab: int = 0) -> str:
    """The records' model name: `--model`, and `/v<vocab>` when the head is narrowed."""
    return f"{model}/v{vocab}" if vocab else model


def build(head_scale: float, model: str = "small", vocab: int = 0):
    """The bench model (random, seeded; head narrowed to `vocab` rows if given) and a one-prompt batch."""
    import torch

    from ktr.config import PolicyConfig, TinyModelConfig
    from ktr.experiments.bench_step import narrow_head
    from ktr.model.policy import load_policy
    from ktr.types import Media

    tiny = TinyModelConfig(**MODELS[model], tie_word_embeddings=False)
    policy = load_policy(PolicyConfig(attn_implementation="sdpa", tiny=tiny))
    if vocab:
        narrow_head(policy.model, vocab)  # for the rest of this (worker) process
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


def passes_worker(impl: str, new_tokens: int, group_size: int, head_scale: float, model_name: str = "small",
                  vocab: int = 0, decoder_phases: bool = True) -> list[dict]:
    """The scoring passes and the backward of one step on G random completions (run in its own process); `impl`:
    naive, released (naive with the visual probe's media masked, not dropped: only its visual pass is run, the
    other passes being naive's rows exactly), dense or split (`shared`: split, the records of earlier runs).
    `decoder_phases`: also time the decoder alone (`<pass>/decoder`)."""
    import torch

    from ktr import fused
    from ktr.experiments.gpu_parts import layout_view, random_rollout
    from ktr.model.forward import completion_hidden, completion_logps, encode_media, output_projection
    from ktr.model.tokenizer import FIRST_SPECIAL_ID
    from ktr.probes.temporal import temporal_scores
    from ktr.probes.visual import get_visual_perturbation, visual_scores

    torch.set_num_threads(1)
    policy, batch = build(head_scale, model_name, vocab)
    model, proc = policy.model, policy.processor
    g, t = group_size, new_tokens
    rollout = random_rollout(batch, g, t, vocab or FIRST_SPECIAL_ID)
    comp, valid = rollout.completion_ids, rollout.completion_mask
    naive = impl in ("naive", "released")
    view = layout_view(model, rollout, batch, "split" if impl == "shared" else impl)
    adv = torch.linspace(-1, 1, g)
    key = torch.rand(g, t, generator=torch.Generator().manual_seed(1)) < 0.3
    records = []

    def record(phase, wall, cpu, mem):
        p = int(batch.attention_mask.sum())
        tokens = g * (p + t) if naive else (p + g * t)
        records.append(dict(impl=impl, phase=phase, group_size=g, prompt_tokens=p, new_tokens=t,
                            tokens_processed=tokens, time_s=wall, cpu_s=cpu, peak_mem_mb=mem, head_scale=head_scale,
                            tokens_per_cpu_s=tokens / cpu, model=model_key(model_name, vocab)))

    @torch.no_grad()
    def visual_phases(detached, logps):
        if decoder_phases:
            perturbed, _ = get_visual_perturbation("attention_mask")(view, model, batch, None, 0)
            _, *m = _phase(lambda: completion_hidden(model, perturbed, detached, t))
            record("visual/decoder", *m)
        _, *m = _phase(lambda: visual_scores(model, batch, view, detached, comp, valid, logps))
        record("visual", *m)

    if impl == "released":  # only the pass that differs from naive's
        with torch.no_grad():
            detached = encode_media(model, batch.pixel_values, batch.grid_thw).detached(leaves=False)
            logps, _ = completion_logps(model, completion_hidden(model, view, detached, t), comp, valid)
        visual_phases(detached, logps)
        return records

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

    out, *m = _phase(policy_pass)
    feats, hidden, logps = out
    record("policy", *m)
    _, *m = _phase(lambda: backward(hidden, logps))
    record("backward", *m)
    hidden = None  # the activations go before the no-grad passes
    detached = feats.detached(leaves=False)
    if decoder_phases:
        _, *m = _phase(lambda: completion_hidden(model, view, encode_media(model, batch.pixel_values, batch.grid_thw),
                                                 t))
        record("policy/decoder", *m)  # the policy pass's forward without the head (its graph dropped at once)
    with torch.no_grad():
        if decoder_phases:
            _, *m = _phase(lambda: completion_hidden(model, view, detached, t))
            record("reference/decoder", *m)
        _, *m = _phase(lambda: completion_logps(model, completion_hidden(model, view, detached, t), comp, valid))
        record("reference", *m)
        visual_phases(detached, logps)
        _, *m = _phase(lambda: temporal_scores(model, proc, batch, view, detached, comp, valid, logps,
                                               generator=torch.Generator().manual_seed(1)))
        record("temporal", *m)
    return records


def attention_records(new_tokens: int, repeats: int) -> list[dict]:
    """One attention layer at 7B head shapes, fp32, this process on 1 thread (`gpu_parts.attention_layouts`)."""
    import torch

    from ktr.experiments.gpu_parts import attention_layouts

    torch.set_num_threads(1)
    rec = attention_layouts(torch.device("cpu"), torch.float32, new_tokens, repeats=repeats)
    shape = {k: rec[k] for k in ("prompt", "group", "heads", "kv_heads", "head_dim", "dtype")}
    return [dict(impl=impl, phase="attention", part="attention", new_tokens=new_tokens, cpu_s=v["seconds"],
                 cpu_s_all=v["seconds_all"], x_naive=v["x_naive"], pairs=rec["pairs"].get(impl, rec["pairs"]["naive"]
                                                                                            if impl.startswith("naive")
                                                                                            else None),
                 max_rel_out_diff=v["max_rel_out_diff"], max_rel_grad_diff=v["max_rel_grad_diff"],
                 repeats=repeats, **shape) for impl, v in rec["impls"].items()]


STEP_VARIANTS = {  # bench_step overrides of each whole-step variant
    "naive": {"sampling.backend": "hf", "loss.shared_prefix": False},
    "shared": {},
    "shared-grpo": {"key_tokens.enabled": False},
}


def step_worker(variant: str, new_tokens: int, group_size: int, steps: int, head_scale: float = 1.0,
                model: str = "small", vocab: int = 0) -> list[dict]:
    """Whole KTRModule steps (`scripts/bench_step.py`) on the bench model and a ~1,000-token synthetic video;
    `head_scale` scales the output projection (peaked logits), `vocab` narrows it."""
    from ktr.experiments import bench_step

    tiny = dict(MODELS[model], tie_word_embeddings=False)
    overrides = {"sampling.group_size": group_size, "sampling.max_new_tokens": new_tokens, "sampling.top_p": 0.95,
                 "loss.beta": 0.04, "policy.tiny": tiny, **STEP_VARIANTS[variant]}
    side = 308  # 16 frames of 308 x 308: grid 8 x 22 x 22, 968 video tokens
    video = dict(fps=2.0, min_frames=16, max_frames=16, min_pixels=side * side, max_pixels=side * side)
    result = bench_step.measure([Path(__file__).parent.parent / "configs" / "demo.yaml"], steps=steps, arch=None,
                                device="cpu", overrides=overrides, video=video,
                                head_scale=head_scale, head_vocab=vocab or None)
    out = []

    def each_step(phase: str) -> list[float]:
        return [round(s["step_seconds"] if phase == "step" else s.get(phase, {}).get("seconds", 0.0), 3)
                for s in result["steps"]]

    for phase, rec in result["summary"].items():  # mean seconds after the warm-up step, max peaks (bench_step)
        out.append(dict(impl=variant, phase=phase if phase == "step" else f"step/{phase}", group_size=group_size,
                        new_tokens=new_tokens, time_s=rec["seconds"], peak_mem_mb=rec["peak_gb"] * 1024,
                        head_scale=head_scale, model=model_key(model, vocab),
                        time_s_steps=each_step(phase)))
    return out


def measure(impl: str, new_tokens: int, group_size: int, head_scale: float, part: str = "rollout",
            steps: int = 3, model: str = "small", vocab: int = 0, decoder_phases: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--worker", impl, "--worker-part", part, "--new-tokens", str(new_tokens),
           "--group-size", str(group_size), "--head-scale", str(head_scale), "--steps", str(steps),
           "--model", model, "--vocab", str(vocab), "--decoder-phases" if decoder_phases else "--no-decoder-phases"]
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


PART_OF_PHASE = {"rollout": "rollout", "attention": "attention"}  # else: step/... -> step, the rest -> passes


def part_of(rec: dict) -> str:
    """The `--parts` value a record comes from (records of earlier runs carry no `part`)."""
    phase = rec["phase"]
    return rec.get("part") or PART_OF_PHASE.get(phase) or ("step" if phase.startswith("step") else "passes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["rollout", "attention", "passes", "step"],
                        default=["rollout", "passes"])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="whole steps per step run (the first is warm-up)")
    parser.add_argument("--head-scale", type=float, nargs="+", default=[1.0],
                        help="multiply the output projection (1: flat random logits; 40: a peaked, trained-like "
                             "distribution whose nucleus is small)")
    parser.add_argument("--model", choices=sorted(MODELS), default="small",
                        help="the passes' and the step's model")
    parser.add_argument("--vocab", type=int, default=0,
                        help="narrow the output projection to its first VOCAB rows (0: the full 151,936): a "
                             "decoder-dominated model (passes and step)")
    parser.add_argument("--passes-impls", nargs="+", default=["naive", "dense", "split"],
                        choices=["naive", "released", "dense", "split"])
    parser.add_argument("--decoder-phases", action=argparse.BooleanOptionalAction, default=True,
                        help="passes: also time each pass's decoder alone (`<pass>/decoder`; off saves a naive "
                             "and two no-grad passes per run on a large model)")
    parser.add_argument("--step-variants", nargs="+", default=list(STEP_VARIANTS), choices=list(STEP_VARIANTS),
                        help="the whole-step variants to run (e.g. shared shared-grpo at 768 new tokens, where "
                             "the naive step takes the longest)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the records of --json's other parts (and of other models) and replace this run's")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-part", default="rollout", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        t, g, h = args.new_tokens[0], args.group_size, args.head_scale[0]
        out = {"rollout": lambda: worker(args.worker, t, g, h),
               "passes": lambda: passes_worker(args.worker, t, g, h, args.model, args.vocab, args.decoder_phases),
               "step": lambda: step_worker(args.worker, t, g, args.steps, h, args.model, args.vocab)}[
            args.worker_part]()
        print(json.dumps(out))
        return
    records = []
    for part in args.parts:
        if part == "attention":
            for t in args.new_tokens:
                records += attention_records(t, args.repeats)
                print(f"  attention {t:4d} new tokens: " + ", ".join(
                    f"{r['impl']} {r['cpu_s']:.2f} s" for r in records[-4:]), file=sys.stderr, flush=True)
            continue
        impls = (tuple(args.step_variants) if part == "step" else tuple(args.passes_impls) if part == "passes"
                 else ("naive", "shared"))
        for scale in args.head_scale:
            for t in args.new_tokens:
                runs: dict[str, list] = {i: [] for i in impls}
                for r in range(args.repeats):
                    for impl in (impls if r % 2 == 0 else impls[::-1]):
                        got = measure(impl, t, args.group_size, scale, part, args.steps, args.model, args.vocab,
                                      args.decoder_phases)
                        runs[impl].append(got if isinstance(got, list) else [got])
                        print(f"  {part} {impl:11s} head x{scale:g} {t:4d} new tokens: "
                              + ", ".join(f"{x['phase']} {x['time_s']:.2f} s" for x in runs[impl][-1]),
                              file=sys.stderr, flush=True)
                for impl in impls:  # one record per (impl, phase): medians over the repeats
                    for k in range(len(runs[impl][0])):
                        records.append(dict(medians([rep[k] for rep in runs[impl]]), part=part))
    print(table(records, args))
    if args.json:
        import torch

        meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
                "cpu": cpu_name(), "threads": 1,
                "models": {k: f"random Qwen2.5-VL, {v['num_layers']} layers, hidden {v['hidden_size']}, "
                              f"{v['num_heads']} heads ({v['num_kv_heads']} kv), MLP {v['intermediate_size']}, "
                              "vocab 151936, untied" for k, v in MODELS.items()},
                "sampling": {"temperature": 1.0, "top_p": 0.95}}
        if args.merge and args.json.exists():
            old = json.loads(args.json.read_text())
            ran = {(part_of(r), r.get("model", "small")) for r in records}
            kept = [r for r in old["results"] if (part_of(r), r.get("model", "small")) not in ran]
            meta = {**old["settings"], **meta}
            records = kept + records
        args.json.write_text(json.dumps({"settings": meta, "results": records}, indent=2) + "\n")


def table(records: list[dict], args) -> str:
    """Each record beside its naive counterpart (same part, model, phase, lengths, head scale): times and memory as
    ratios. Attention records: CPU seconds, ratio, pairs computed and the difference to naive."""
    lines = [f"G={args.group_size}, 1 thread, {os.cpu_count()} cpus ({platform.machine()}, {cpu_name()}), medians "
             f"of interleaved runs (shared machine: noisy; cpu s is the steadier measure)"]
    attn = [r for r in records if r["phase"] == "attention"]
    if attn:
        lines.append(f"{'attention':>16} {'impl':>11} {'new':>4} {'pairs M':>8} {'cpu s':>7} {'x naive':>7} "
                     f"{'out diff':>9} {'grad diff':>9}")
        for r in attn:
            pairs = f"{r['pairs'] / 1e6:.2f}" if r.get("pairs") else "-"
            lines.append(f"{'':>16} {r['impl']:>11} {r['new_tokens']:>4} {pairs:>8} {r['cpu_s']:>7.2f} "
                         f"{r['x_naive']:>7.2f} {r['max_rel_out_diff']:>9.1e} {r['max_rel_grad_diff']:>9.1e}")
    rest = [r for r in records if r["phase"] != "attention"]
    if not rest:
        return "\n".join(lines)
    lines.append(f"{'phase':>17} {'impl':>11} {'new':>4} {'tokens':>7} {'wall s':>7} {'cpu s':>7} {'x naive':>7} "
                 f"{'peak MB':>8} {'x naive':>7}")

    def key(r):
        return (part_of(r), r.get("model", "small"), r["phase"], r["new_tokens"], r.get("head_scale", 1.0))

    naive = {key(r): r for r in rest if r["impl"] == "naive"}
    for r in rest:
        n = naive.get(key(r))
        base_t = "cpu_s" if "cpu_s" in r else "time_s"
        ratio = f"{r[base_t] / n[base_t]:.2f}" if n and n[base_t] else "-"
        mem = f"{r['peak_mem_mb'] / n['peak_mem_mb']:.2f}" if n and n.get("peak_mem_mb") else "-"
        lines.append(f"{r['phase']:>17} {r['impl']:>11} {r['new_tokens']:>4} {r.get('tokens_processed', 0):>7} "
                     f"{r['time_s']:>7.2f} {r.get('cpu_s', float('nan')):>7.2f} {ratio:>7} "
                     f"{r['peak_mem_mb']:>8.0f} {mem:>7}")
    lines += passes_totals(rest)
    return "\n".join(lines)


SCORING = ("policy", "reference", "visual", "temporal")


def passes_totals(records: list[dict]) -> list[str]:
    """Lines "four scoring passes" (the policy forward and the reference, visual and temporal passes; CPU s), alone
    and with the backward, per model, length and head scale, against naive's. `released` runs only its visual pass,
    so its totals are naive's other phases plus that one."""
    cells: dict[tuple, dict[str, dict[str, float]]] = {}
    for r in records:
        if part_of(r) == "passes" and r["phase"] in (*SCORING, "backward"):
            k = (r.get("model", "small"), r["new_tokens"], r.get("head_scale", 1.0))
            cells.setdefault(k, {}).setdefault(r["impl"], {})[r["phase"]] = r.get("cpu_s", r["time_s"])
    out = []
    for (model, new, scale), impls in cells.items():
        full = {i: {**impls.get("naive", {}), **ph} if i == "released" else ph for i, ph in impls.items()}
        for with_backward in (False, True):
            names = (*SCORING, "backward") if with_backward else SCORING
            totals = {i: sum(ph[n] for n in names) for i, ph in full.items() if all(n in ph for n in names)}
            for impl, total in totals.items():
                ratio = f"{total / totals['naive']:.2f}" if "naive" in totals else "-"
                out.append(f"four scoring passes{' + backward' if with_backward else ''}, {model}, head x{scale:g}, "
                           f"{new} new: {impl} {total:.2f} cpu s, x naive {ratio}")
    return out


if __name__ == "__main__":
    main()
