"""The chunked head's exponential and gradient scaling on CPU: torch's `exp` and `mul_` against
`ktr.ops.exp_shifted_` and `ktr.ops.mul_rows_`, on flat and peaked next-token distributions (issue 26: why the
peaked step's scoring took twice the flat one's).

    python scripts/bench_exp.py --repeats 5 --json docs/bench_exp.json

torch's CPU `exp` takes a slow path for every entry whose result is below the smallest normal float (~1.18e-38,
an argument below -87.34), with or without `torch.set_flush_denormal`. A trained model's next-token distribution
puts most of its 151,936 entries there; a random head (flat logits) puts none. `exp_shifted_` clamps, takes the
fast exp and zeroes what was clamped. The loss's `dL/dlogits` (those exponentials times a small per-token
coefficient) then hold subnormal products, and the matmuls that take them into the gradients slow down by an
order of magnitude: `mul_rows_` zeroes the products below the smallest normal number. Cases, each plain (`exp`,
`mul_`: ktr before) vs fast (`exp_shifted_`, `mul_rows_`), interleaved (order alternating per round, a warm-up
round first), 1 thread, median process CPU seconds:

- `exp`: one `[512, V]` block of shifted logits (`z - max`), the chunked head's inner step;
- `logps_entropy`: `ktr.fused.token_logps_entropy` over 1,024 tokens (hidden 512, the full head): the
  reference, probe and policy passes' head;
- `loss_backward`: `ktr.fused.fused_policy_loss` forward + backward over the same tokens: the gradient pass's head;
- `nucleus`: `ktr.rollout.sampling.nucleus_filter` on `[8, V]` (one decode step of G = 8, top-p 0.95).

Logits: `h @ (s * W).T` with `h`, `W` Gaussian (`W` std 0.02), `s` = 1 (flat) or 40 (peaked, as
`bench_prefix.py --head-scale 40`). "bit-identical" says whether every output (the exponentials; log-probs,
entropy, loss, gradients; the filtered scores) has the same bits in both; "max diff" is the largest difference
relative to the output's largest value; "share below" is the fraction of the block's entries under the cut.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ktr.fused as fused
import ktr.rollout.sampling as sampling
from ktr.ops import exp_shifted_, mul_rows_

PLAIN = (lambda z: z.exp_(), lambda e, scale: e.mul_(scale[:, None]))  # what ktr did before
FAST = (exp_shifted_, mul_rows_)


def _cases(scale: float) -> dict:
    """name -> (run() -> outputs tuple), on seeded inputs."""
    g = torch.Generator().manual_seed(0)
    V, H, M = 151936, 512, 1024
    w = torch.randn(V, H, generator=g) * 0.02 * scale
    h = torch.randn(M, H, generator=g)
    y = torch.randint(0, V, (M,), generator=g)
    z = h[:512] @ w.T
    z = z - z.amax(-1, keepdim=True)
    step = h[:8] @ w.T
    adv = torch.randn(1, M, generator=g)

    def loss_backward():
        hh, ww = h[None].clone().requires_grad_(), w.clone().requires_grad_()
        loss, logps, _ = fused.fused_policy_loss(hh, ww, y[None], adv, torch.ones(1, M, dtype=torch.bool),
                                                 chunk_size=512)
        loss.backward()
        return loss.detach(), logps, hh.grad, ww.grad

    return {
        "exp": lambda: (fused.exp_shifted_(z.clone()),),
        "logps_entropy": lambda: fused.token_logps_entropy(h[None], w, y[None], chunk_size=512),
        "loss_backward": loss_backward,
        "nucleus": lambda: (sampling.nucleus_filter(step, 0.95),),
    }, float((z < -87.34).float().mean())


def _use(impl: tuple) -> None:
    fused.exp_shifted_, fused.mul_rows_ = impl
    sampling.exp_shifted_ = impl[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 40.0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for scale in args.scales:
        cases, below = _cases(scale)
        for name, run in cases.items():
            times, outs = {"plain": [], "fast": []}, {}
            for r in range(args.repeats + 1):
                for impl in (("plain", "fast") if r % 2 else ("fast", "plain")):
                    _use(PLAIN if impl == "plain" else FAST)
                    start = time.process_time()
                    outs[impl] = run()
                    if r:  # round 0 warms up
                        times[impl].append(time.process_time() - start)
            _use(FAST)
            pairs = [(a, b) for a, b in zip(outs["plain"], outs["fast"]) if a is not None]
            same = all(torch.equal(a, b) for a, b in pairs)
            diff = max(float((a - b).nan_to_num().abs().max() / b.nan_to_num().abs().max().clamp(min=1e-30))
                       for a, b in pairs)
            plain, fast = statistics.median(times["plain"]), statistics.median(times["fast"])
            rows.append(dict(case=name, head_scale=scale, share_below=round(below, 3), plain_cpu_s=plain,
                             fast_cpu_s=fast, ratio=fast / plain, same=same, max_rel_diff=diff))
            print(f"{name:14s} x{scale:<4g} below {below:5.3f}  plain {plain:7.3f} s  fast {fast:7.3f} s  "
                  f"fast/plain {fast / plain:5.2f}  same {same} ({diff:.1e})", flush=True)
    print("\n| case | logits | share below the cut | plain CPU s | fast CPU s | ratio | bit-identical "
          "| max diff |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['case']} | {'peaked' if r['head_scale'] > 1 else 'flat'} (x{r['head_scale']:g}) | "
              f"{r['share_below']:.3f} | {r['plain_cpu_s']:.3f} | {r['fast_cpu_s']:.3f} | {r['ratio']:.2f} | "
              f"{'yes' if r['same'] else 'no'} | {r['max_rel_diff']:.1e} |")
    if args.json:
        meta = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__, threads=1,
                    repeats=args.repeats, measure="median process CPU seconds, interleaved")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
