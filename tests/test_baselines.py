"""Same-data baselines: T-GRPO's bonus rule and TW-GRPO's weights on hand-made groups, validation at
construction, and 3-step runs of each (and of soft weights with a distribution score) through `ktr fit`."""

import math
import sys
from pathlib import Path

import pytest
import torch

from ktr.baselines import divergence_weights, group_divergence, temporal_bonus, tw_grpo_weights
from ktr.cli import main
from ktr.config import BaselineConfig, KeyTokenConfig, SamplingConfig
from ktr.training.algorithms import get_algorithm

ROOT = Path(__file__).resolve().parents[1]


def test_temporal_bonus_rule_on_hand_made_groups() -> None:
    # prompt 0 (video): ordered acc mean 0.5 >= 0.8 x shuffled 0.5 -> correct ones (> 0.1) get +0.3
    # prompt 1 (video): ordered 0.25 < 0.8 x shuffled 1.0 -> nothing
    # prompt 2 (image): never
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    shuffled = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    bonus = temporal_bonus(acc, shuffled, 4, 2, torch.tensor([True, True, False]))
    assert bonus.tolist() == pytest.approx([0.3, 0.0, 0.3, 0.0] + [0.0] * 4 + [0.0] * 4)
    # the boundary (exact in floats with ratio 0.5): mean 0.5 == 0.5 x 1.0 qualifies; accuracy 0.1 is not "correct"
    edge = temporal_bonus(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 1.0]), 2, 2, torch.tensor([True]), ratio=0.5)
    assert edge.tolist() == pytest.approx([0.3, 0.0])
    with pytest.raises(ValueError, match="shuffled_accuracy"):
        temporal_bonus(acc, shuffled[:5], 4, 2, torch.tensor([True, True, False]))


def test_group_divergence_is_zero_for_identical_distributions_and_hand_value() -> None:
    same = torch.log(torch.tensor([0.25, 0.75])).expand(1, 3, 2, 2).clone()  # B=1, G=3, T=2, V=2
    valid = torch.ones(1, 3, 2, dtype=torch.bool)
    assert torch.equal(group_divergence(same, valid), torch.zeros(1, 2))
    # G=2 at one position: l1 = log(1/2, 1/2), l2 = log(1/4, 3/4); m = mean of the log-probs
    l = torch.log(torch.tensor([[[[0.5, 0.5]], [[0.25, 0.75]]]]))  # [1, 2, 1, 2]
    m = l.mean(1, keepdim=True)
    c = m - l
    want = float((c.exp() - c - 1).sum(-1).mean())
    got = float(group_divergence(l, torch.ones(1, 2, 1, dtype=torch.bool)))
    a0, a1 = math.log(0.5), math.log(0.5)
    b0, b1 = math.log(0.25), math.log(0.75)
    hand = 0.0
    for x0, x1 in ((a0, a1), (b0, b1)):
        for mv, xv in (((a0 + b0) / 2, x0), ((a1 + b1) / 2, x1)):
            hand += (math.exp(mv - xv) - (mv - xv) - 1) / 2
    assert got == pytest.approx(want, abs=1e-6) and got == pytest.approx(hand, abs=1e-6) and got > 0


def test_divergence_weights_span_one_to_alpha_per_group() -> None:
    div = torch.tensor([[0.0, 2.0, 1.0, 7.0]])  # last position: nobody valid, ignored by the min-max
    valid = torch.tensor([[[True, True, True, False], [True, True, False, False]]])  # B=1, G=2, T=4
    w = divergence_weights(div, valid, alpha=1.7)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.7, 1.35, 0.0], [1.0, 1.7, 0.0, 0.0]]))
    flat = divergence_weights(torch.zeros(1, 4), valid, alpha=1.7)  # no divergence anywhere: weight 1
    assert flat[valid.view(2, 4)].tolist() == [1.0] * 5


def test_tw_weights_chunked_equal_naive() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, w = torch.randn(4, 5, 8, generator=g), torch.randn(40, 8, generator=g)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    got = tw_grpo_weights(hidden, w, valid, group_size=2, alpha=1.7, chunk_size=2)
    logps = torch.log_softmax(hidden @ w.T, -1).view(2, 2, 5, 40)
    want = divergence_weights(group_divergence(logps, valid.view(2, 2, 5)), valid.view(2, 2, 5), 1.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got[valid] >= 1.0).all() and (got[valid] <= 1.7 + 1e-6).all() and (got[~valid] == 0).all()


def test_algorithm_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="algorithm must be"):
        get_algorithm("ppo", BaselineConfig(), KeyTokenConfig(), SamplingConfig())
    with pytest.raises(ValueError, match="key_tokens.enabled: false"):
        get_algorithm("tw_grpo", BaselineConfig(), KeyTokenConfig(), SamplingConfig())
    with pytest.raises(ValueError, match="group_size"):
        get_algorithm("t_grpo", BaselineConfig(), KeyTokenConfig(enabled=False), SamplingConfig(group_size=1))
    with pytest.raises(ValueError, match="tw_alpha"):
        BaselineConfig(tw_alpha=0.5)


def _fit(tmp_path: Path, monkeypatch, *overlay: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(sys, "argv", ["ktr"])
    torch.set_num_threads(1)
    main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *overlay, "--trainer.max_steps=3",
          "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--model.init_args.warm_start_steps=0", "--model.init_args.sampling.group_size=2",
          "--model.init_args.sampling.max_new_tokens=6", "--data.init_args.batch_size=1",
          "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"])
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*"))))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("name,tags", [
    ("t_grpo", ["train/reward/temporal", "train/t_grpo/shuffled_accuracy"]),
    ("tw_grpo", ["train/tw_grpo/mean_weight"]),
])
@pytest.mark.slow
def test_three_step_demo_run_of_each_baseline(tmp_path, monkeypatch, name, tags) -> None:
    got = _fit(tmp_path, monkeypatch, "--config", str(ROOT / f"configs/baselines/{name}.yaml"))
    for tag in ["train/loss", "train/reward/total", *tags]:
        assert tag in got, (tag, sorted(got))


@pytest.mark.slow
def test_three_step_run_with_soft_weights_and_a_distribution_score(tmp_path, monkeypatch) -> None:
    got = _fit(tmp_path, monkeypatch, "--model.init_args.key_tokens.weighting=sigmoid",
               "--model.init_args.key_tokens.visual.score=js", "--model.init_args.loss.beta=0.04")
    assert {"train/loss", "train/ktr/score_visual", "train/kl", "train/kl_released_key"} <= got
