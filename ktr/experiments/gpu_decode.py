"""The GPU check's `decode` part (layer L4): the shared backend's decode loop against transformers' `generate`.

At 7B widths (Qwen2.5-VL-7B's decoder with 4 layers, 2 vision blocks, random, bf16, SDPA), one video prompt at the
training pixels, G = 8, released sampling (temperature 1, top-p 0.95), 128 and 768 new tokens: tokens/s and peak
allocated memory of `hf` (`generate`, every prompt prefilled G times), `concat` (the shared loop over transformers'
concatenating `DynamicCache`, before issue 27), `shared` (the preallocated cache, eager) and `compiled`
(`sampling.compile_decode`: the step under `torch.compile` over a static cache; its compilation is timed apart, on
a warm-up of two steps at the same shapes). In `--tiny` mode (CPU, toy model) the compiled column uses dynamo's
`eager` backend, so that the path runs in CI without a C++ toolchain; its speed there means nothing.
"""

from __future__ import annotations

import time

import torch

from ktr.experiments.gpu_parts import _bench_rollout_model, _timed

LOOPS = ("hf", "concat", "shared", "compiled")


def _warm_compiled(model, batch, cfg, backend: str) -> float:
    """Compile the static step at the rollout's shapes (two decode steps); seconds taken."""
    from ktr.rollout import shared

    start = time.perf_counter()
    with torch.no_grad():
        state = shared.prefill(model, batch, cfg.group_size, cfg.max_new_tokens, static=True)
        for _ in range(2):
            shared.decode_step(model, state, state.logits.argmax(-1), shared.compiled_step(backend))
    if batch.input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - start, 2)


def decode(device: torch.device, tiny: bool, lengths: tuple[int, ...], out: dict) -> dict:
    """Fill `out` with per-length, per-loop seconds / tokens / tokens per second / peak GiB; return the headline
    ratios (tokens/s over `hf`'s)."""
    from dataclasses import replace

    from ktr.config import SamplingConfig
    from ktr.rollout.hf import generate
    from ktr.rollout.shared import generate_shared

    model, processor, batch, g, what = _bench_rollout_model(device, tiny)
    model.eval()
    backend = "eager" if device.type != "cuda" else "inductor"
    out.update(model=what, group_size=g, prompt_tokens=int(batch.attention_mask.sum()), compile_backend=backend,
               lengths={})
    runs = {
        "hf": lambda cfg: generate(model, processor, batch, cfg),
        "concat": lambda cfg: generate_shared(model, processor, batch, cfg, _grow_by_concat=True),
        "shared": lambda cfg: generate_shared(model, processor, batch, cfg),
        "compiled": lambda cfg: generate_shared(model, processor, batch, replace(cfg, compile_decode=True),
                                                _compile_backend=None if device.type == "cuda" else backend),
    }
    ratios = {}
    for length in lengths:
        cfg = SamplingConfig(group_size=g, max_new_tokens=length, temperature=1.0, top_p=0.95)
        model.generation_config.min_new_tokens = length  # hf: every completion full length, as the shared loops
        rec = out["lengths"][str(length)] = {"compile_s": _warm_compiled(model, batch, cfg, backend)}
        for name in LOOPS:
            torch.manual_seed(1)
            rollout, secs, peak = _timed(device, lambda: runs[name](cfg))  # noqa: B023
            tokens = int(rollout.completion_mask.sum())
            rec[name] = {"seconds": secs, "tokens": tokens, "tokens_per_s": round(tokens / secs, 1),
                         "peak_gib": peak}
        ratios[str(length)] = {k: round(rec[k]["tokens_per_s"] / rec["hf"]["tokens_per_s"], 2) for k in LOOPS[1:]}
    return {"x_hf_tokens_per_s": ratios}
