"""scripts/ablate.py's statistics (`ktr.report.ablation`): t-intervals, the exact sign test, pairing on shared
seeds, both metrics."""

import math

import pytest

import ktr.report.ablation as ab
from ktr.experiments.ablation import VARIANTS


def test_mean_ci_is_the_student_t_interval() -> None:
    m, lo, hi = ab.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(m - lo) and hi - m == pytest.approx(4.303 / math.sqrt(3))
    assert all(math.isnan(x) for x in ab.mean_ci([0.5])[1:])


def test_sign_test_is_exact_and_drops_ties() -> None:
    assert ab.sign_test([0.1] * 5) == (5, 0, pytest.approx(2 / 32))
    assert ab.sign_test([0.1, -0.1, 0.0]) == (1, 1, 1.0)
    assert ab.sign_test([0.0, 0.0]) == (0, 0, 1.0)
    w, l, p = ab.sign_test([1, 1, 1, 1, 1, 1, -1, 1])  # 7 of 8: 2 * (1 + 8) / 256
    assert (w, l) == (7, 1) and p == pytest.approx(18 / 256)


def _rec(variant, seed, acc, p):
    return {"variant": variant, "seed": seed, "val_acc": acc, "val_p_target": p, "frac_key": 0.5, "wall_s": 1.0,
            "warm_start": {"val_acc": 0.4, "val_p_target": 0.3}}


def test_summarise_pairs_on_shared_seeds_per_metric() -> None:
    recs = [_rec("grpo", 0, 0.5, 0.30), _rec("grpo", 1, 0.6, 0.32), _rec("ktr", 0, 0.7, 0.35),
            _rec("ktr", 1, 0.6, 0.33), _rec("ktr", 2, 0.9, 0.50), _rec("random", 2, 0.1, None)]
    summaries, paired = ab.summarise(recs, "val_acc", VARIANTS)
    ktr = next(s for s in summaries if s["variant"] == "ktr")
    assert ktr["n_seeds"] == 3 and ktr["mean"] == pytest.approx(0.7333, abs=1e-4) and ktr["warm_start"] == 0.4
    vs = {(p["variant"], p["vs"]): p for p in paired}
    assert vs["ktr", "grpo"]["n_seeds"] == 2 and vs["ktr", "grpo"]["mean_diff"] == pytest.approx(0.1)  # seed 2 unpaired
    assert vs["ktr", "random"]["n_seeds"] == 1 and vs["ktr", "random"]["mean_diff"] == pytest.approx(0.8)
    summaries, paired = ab.summarise(recs, "val_p_target", VARIANTS)
    assert {s["variant"] for s in summaries} == {"grpo", "ktr"}  # the run without the metric is left out
    diff = next(p for p in paired if p["variant"] == "ktr")
    assert diff["metric"] == "val_p_target" and diff["mean_diff"] == pytest.approx(0.03)
    assert (diff["wins"], diff["losses"]) == (2, 0)
