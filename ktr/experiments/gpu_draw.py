"""The GPU check's `draw` part (layer L4): the next-token draw, `torch.multinomial` against ktr's `inverse_cdf`.

`sampling.draw: inverse_cdf` (`ktr.rollout.sampling.draw_inverse_cdf`) is a tenth of `torch.multinomial`'s cost on
a CPU (docs/bench_draw.md), where multinomial draws an exponential variate for every vocabulary entry. On a GPU
neither cost is known: this part measures both, per call, on what the shared decode loop hands them (float32
scores after `process_logits` with the released temperature 1 and top-p 0.95), at G = 8 and 64 rows, for
Qwen2.5-VL's 151,936-entry and Qwen3.5's 248,320-entry vocabularies, flat (a random head) and peaked (the same
head x40, as `scripts/bench_prefix.py --head-scale 40`). Order alternates per round after a warm-up round; the
median of `repeats` CUDA-synchronised calls is kept. The top-p filter's own time is recorded beside them: the
draw is only worth changing if it is a visible part of a decode step's sampling.

It also checks each draw's frequencies on the device (its kernels, its float64): 2^20 rows of one 16-token
distribution, the largest deviation from `softmax` in standard errors (a correct draw stays within about 5).
"""

from __future__ import annotations

import statistics
import time

import torch

from ktr.rollout import sampling
from ktr.rollout.sampling import choose_tokens, process_logits

DRAWS = tuple(sampling.DRAWS)  # multinomial, inverse_cdf


def _time_ms(device: torch.device, fn) -> float:
    """Milliseconds of `fn()`, unrounded (`gpu_parts._timed` rounds to 0.1 ms, coarser than a GPU draw)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def frequencies(device: torch.device, n: int, seed: int = 0) -> dict:
    """Largest |frequency - p| / standard error over a 16-token distribution, each draw, `n` rows."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(16, generator=g) * 2).to(device)
    p = scores.softmax(-1).double()
    rows = scores.expand(n, 16)
    out = {}
    for draw in DRAWS:
        torch.manual_seed(seed)
        counts = torch.bincount(choose_tokens(rows, sample=True, draw=draw), minlength=16).double()
        z = (counts / n - p).abs() / (p * (1 - p) / n).sqrt()
        out[draw] = round(float(z.max()), 2)
    return out


def draw(device: torch.device, tiny: bool, out: dict, repeats: int = 20) -> dict:
    """Fill `out` with per-setting median milliseconds (top-p filter, each draw) and the frequency check; return
    the headline ratios (inverse_cdf / multinomial per setting) and the largest z of each draw."""
    vocabs, rows_list, n_freq = ((2048,), (4,), 1 << 14) if tiny else ((151936, 248320), (8, 64), 1 << 20)
    repeats = 3 if tiny else repeats
    suppress = torch.zeros(0, dtype=torch.long, device=device)
    out.update(device=str(device), repeats=repeats, settings=[])
    ratios = {}
    for vocab in vocabs:
        g = torch.Generator().manual_seed(vocab)
        head = (torch.randn(vocab, 64, generator=g) * 0.02).to(device)
        for scale, logits in ((1.0, "flat"), (40.0, "peaked")):
            for rows in rows_list:
                hidden = torch.randn(rows, 64, generator=g).to(device)
                raw = hidden @ (head * scale).T  # [R, V] float32, as the loop's head output
                scores = process_logits(raw, suppress, True, 1.0, 0, 0.95)
                times: dict[str, list[float]] = {k: [] for k in ("top_p", *DRAWS)}
                for i in range(repeats + 1):
                    t = _time_ms(device, lambda: process_logits(raw, suppress, True, 1.0, 0, 0.95))  # noqa: B023
                    order = DRAWS if i % 2 else DRAWS[::-1]
                    drawn = {d: _time_ms(device, lambda d=d: choose_tokens(scores, True, d)) for d in order}  # noqa: B023
                    if i:  # round 0 warms up
                        times["top_p"].append(t)
                        for d in DRAWS:
                            times[d].append(drawn[d])
                med = {k: round(statistics.median(v), 4) for k, v in times.items()}
                key = f"v{vocab}/{logits}/R{rows}"
                out["settings"].append(dict(vocab=vocab, logits=logits, rows=rows,
                                            **{f"{k}_ms": v for k, v in med.items()}))
                ratios[key] = round(med["inverse_cdf"] / med["multinomial"], 3)
    out["frequency_rows"] = n_freq
    out["max_z"] = frequencies(device, n_freq)
    return {"inverse_cdf_x_multinomial": ratios, "max_z": out["max_z"]}
