"""Statistics, tables and learning curves of seed-repeated comparisons (layer L2, stdlib + Pillow).

What `scripts/ablate.py` and `scripts/paper_ablations.py` report from their run records (one dict per
variant and seed): the mean with a 95% Student-t interval over seeds, paired differences on shared seeds with
the exact sign test, the markdown tables, and the held-out curves as a PNG. The variants and their order come
from the caller (`ktr.experiments.ablation.VARIANTS`, `ktr.experiments.paper_ablations.FIGURES`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
CURVE_COLOURS = ["#000000", "#888888", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (NaN bounds with fewer than 2 values)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = T975[min(len(xs) - 1, len(T975)) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def sign_test(diffs: list[float]) -> tuple[int, int, float]:
    """Wins, losses and the two-sided exact binomial p-value (ties dropped)."""
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return wins, losses, min(1.0, 2 * tail)


def summarise(records: list[dict], key: str = "val_acc", variants: Iterable[str] | None = None,
              bases: tuple[str, ...] = ("grpo", "random")) -> tuple[list[dict], list[dict]]:
    """Per variant: mean and 95% interval of `key` over seeds; paired differences against each of `bases`.

    `variants`: which variants, in this order (default: every variant of `records`, in order of appearance)."""
    variants = list(dict.fromkeys(r["variant"] for r in records)) if variants is None else list(variants)
    by = {v: {r["seed"]: r for r in records if r["variant"] == v and r.get(key) is not None} for v in variants}
    summaries, paired = [], []
    for v, runs in by.items():
        if not runs:
            continue
        m, lo, hi = mean_ci([r[key] for r in runs.values()])
        summaries.append({"variant": v, "metric": key, "mean": m, "ci95_low": lo, "ci95_high": hi,
                          "n_seeds": len(runs),
                          "warm_start": statistics.mean(r.get("warm_start", {}).get(key) or 0.0 for r in runs.values()),
                          "frac_key": statistics.mean(r["frac_key"] for r in runs.values()),
                          "wall_s": statistics.mean(r["wall_s"] for r in runs.values())})
        for base in bases:
            seeds = sorted(set(runs) & set(by.get(base, {})))
            if v == base or not seeds:
                continue
            d = [runs[s][key] - by[base][s][key] for s in seeds]
            dm, dlo, dhi = mean_ci(d)
            w, l, p = sign_test(d)
            paired.append({"variant": v, "vs": base, "metric": key, "n_seeds": len(seeds), "mean_diff": dm,
                           "ci95_low": dlo, "ci95_high": dhi, "wins": w, "losses": l, "sign_test_p": p})
    return summaries, paired


def tables(summaries: list[dict], paired: list[dict], what: str = "held-out acc after RL") -> str:
    """The markdown tables of `summarise`: per variant, then the paired differences."""
    lines = [f"| variant | {what} (mean) | 95% CI | seeds | warm start | key fraction | wall s/run |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['variant']} | {s['mean']:.3f} | [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}] | "
                     f"{s['n_seeds']} | {s['warm_start']:.3f} | {s['frac_key']:.2f} | {s['wall_s']:.0f} |")
    lines += ["", "| variant | vs | mean paired diff | 95% CI | wins / losses | sign test p |",
              "|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['variant']} | {p['vs']} | {p['mean_diff']:+.3f} | [{p['ci95_low']:+.3f}, "
                     f"{p['ci95_high']:+.3f}] | {p['wins']} / {p['losses']} | {p['sign_test_p']:.3f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, variants: Iterable[str], curve: str = "curve",
         what: str = "held-out greedy accuracy") -> None:
    """Held-out `what` vs step, mean over seeds per variant (PIL only: no matplotlib needed).

    `variants` in order; they take the colours of `CURVE_COLOURS` in that order."""
    from PIL import Image, ImageDraw

    variants = list(variants)
    colours = dict(zip(variants, CURVE_COLOURS))
    w, h, pad = 760, 460, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    curves = {}
    for v in variants:
        runs = [dict(r[curve]) for r in records if r["variant"] == v and r.get(curve)]
        steps = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
        if steps:
            curves[v] = [(s, statistics.mean(c[s] for c in runs), len(runs)) for s in steps]
    if not curves:
        return
    smax = max(s for c in curves.values() for s, _, _ in c)
    accs = [a for c in curves.values() for _, a, _ in c]
    lo, hi = math.floor(min(accs) * 20 - 1) / 20, math.ceil(max(accs) * 20 + 1) / 20  # 0.05 grid around the data
    x = lambda s: pad + (w - 2 * pad - 120) * s / max(1, smax)  # noqa: E731
    y = lambda a: h - pad - (h - 2 * pad) * (a - lo) / (hi - lo)  # noqa: E731
    d.line([(pad, pad), (pad, h - pad), (w - pad - 120, h - pad)], fill="black")
    for a in [lo + 0.05 * i for i in range(round((hi - lo) / 0.05) + 1)]:
        d.text((10, y(a) - 6), f"{a:.2f}", fill="black")
        d.line([(pad, y(a)), (w - pad - 120, y(a))], fill="#eeeeee")
    for s in sorted({s for c in curves.values() for s, _, _ in c}):
        d.text((x(s) - 8, h - pad + 6), str(s), fill="black")
    d.text((w // 2 - 140, h - 25), "RL step (0 = the shared SFT warm start)", fill="black")
    d.text((pad, 20), f"{what}, mean over seeds", fill="black")
    for i, (v, c) in enumerate(curves.items()):
        col = colours[v]
        d.line([(x(s), y(a)) for s, a, _ in c], fill=col, width=2)
        d.text((w - pad - 100, pad + 18 * i), f"{v} (n={c[0][2]})", fill=col)
    img.save(path)


def figure_tables(records: list[dict], figures: Mapping[str, Iterable[str]], paper: Mapping[str, float]) -> str:
    """One markdown table per figure: held-out accuracy (mean ± sd over seeds) of each of its variants, per
    seed, wall time, and the paper's average where `paper` has the variant."""
    out = []
    for fig, names in figures.items():
        lines = [f"### {fig}", "", "| variant | held-out acc (mean ± sd) | per seed | wall s/run | paper avg |",
                 "|---|---|---|---|---|"]
        for name in names:
            rs = [r for r in records if r["figure"] == fig and r["variant"] == name]
            accs = [r["val_acc"] for r in rs if r["val_acc"] is not None]
            if not rs:
                continue
            mean = f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.3f}" \
                if accs else "n/a"
            ref = f"{paper[name]:.1f}" if name in paper else "-"
            lines.append(f"| {name} | {mean} | {', '.join(f'{a:.3f}' for a in accs)} | "
                         f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {ref} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)
