"""What differs between GRPO / Video-KTR and the paper's same-data baselines, by name (`model.algorithm`).

`ALGORITHMS` maps each name to an `Algorithm`: its settings check, the extra rewards it adds (T-GRPO's temporal
bonus from completions sampled on shuffled frames) and the float token weights it gives the loss (TW-GRPO).
`KTRModule` never asks which algorithm it runs. The rules themselves are pure functions in `ktr.baselines`; this
file holds the model-touching parts. docs/baselines.md describes both baselines.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ktr import fused
from ktr.baselines import temporal_bonus, tw_grpo_weights
from ktr.config import DEFAULT_CHUNK_SIZE, BaselineConfig, KeyTokenConfig, SamplingConfig
from ktr.model.forward import float32_logits, output_projection
from ktr.rollout.shuffled import shuffled_accuracy
from ktr.types import PromptBatch, Rollout

AlgorithmName = Literal["grpo", "t_grpo", "tw_grpo"]


class Algorithm:
    """GRPO, with Video-KTR key tokens when `key_tokens.enabled`. Subclasses change one step of it.

    `metrics` arguments are the step's metric dict (`train/...` keys), filled in place.
    """

    needs_base_hidden = False  # the loss pass's detached hidden states are kept for `token_weights`

    def check(self, baseline: BaselineConfig, key_tokens: KeyTokenConfig, sampling: SamplingConfig) -> None:
        """ValueError at construction for settings this algorithm cannot run with."""

    def extra_rewards(self, module, prompts: PromptBatch, rollout: Rollout, rewards: Tensor,
                      per_reward: dict[str, Tensor], metrics: dict[str, Tensor]) -> Tensor:
        """`[N]` total rewards after this algorithm's additions (named in `per_reward`)."""
        return rewards

    def token_weights(self, model: nn.Module, base_hidden: Tensor | None, rollout: Rollout, baseline: BaselineConfig,
                      chunk_size: int | None, metrics: dict[str, Tensor]) -> Tensor | None:
        """`[N, T]` float token weights of the loss (normalised by the mask's counts), or None."""
        return None


class TGRPO(Algorithm):
    """Video-R1's T-GRPO: a temporal bonus from G' completions sampled on shuffled frames (no gradient)."""

    def check(self, baseline, key_tokens, sampling) -> None:
        if (baseline.shuffled_group_size or sampling.group_size // 2) < 1:
            raise ValueError(f"algorithm t_grpo samples G // 2 completions on shuffled frames: sampling.group_size "
                             f"{sampling.group_size} gives none; use G >= 2 or set baseline.shuffled_group_size")

    def extra_rewards(self, module, prompts, rollout, rewards, per_reward, metrics) -> Tensor:
        cfg, g = module.baseline_cfg, rollout.group_size
        acc = per_reward.get("accuracy")
        if acc is None:
            raise ValueError("algorithm t_grpo needs the `accuracy` reward in rewards.names")
        g_shuffled = cfg.shuffled_group_size or g // 2
        with module.rollout_context():
            shuffled = shuffled_accuracy(module.model, module.processor, module.rollout_backend, prompts,
                                         module.sampling, g_shuffled)
        bonus = temporal_bonus(acc, shuffled.to(acc), g, g_shuffled, prompts.is_video, cfg.temporal_bonus,
                               cfg.temporal_ratio, cfg.correct_threshold)
        per_reward["temporal"] = bonus
        metrics["train/t_grpo/shuffled_accuracy"] = shuffled.mean()
        return rewards + bonus


class TWGRPO(Algorithm):
    """TW-GRPO: every valid token weighted in [1, alpha] by its group's divergence at that position."""

    needs_base_hidden = True

    def check(self, baseline, key_tokens, sampling) -> None:
        if key_tokens.enabled:
            raise ValueError("algorithm tw_grpo weights every valid token by its divergence from the group; set "
                             "key_tokens.enabled: false")

    def token_weights(self, model, base_hidden, rollout, baseline, chunk_size, metrics) -> Tensor:
        w = tw_weights(model, base_hidden, rollout.completion_mask, rollout.group_size, baseline.tw_alpha,
                       chunk_size)
        metrics["train/tw_grpo/mean_weight"] = w[rollout.completion_mask].mean()
        return w


ALGORITHMS: dict[str, Algorithm] = {"grpo": Algorithm(), "t_grpo": TGRPO(), "tw_grpo": TWGRPO()}
assert set(ALGORITHMS) == set(get_args(AlgorithmName)), "AlgorithmName and ALGORITHMS must name the same algorithms"


def get_algorithm(name: str, baseline: BaselineConfig, key_tokens: KeyTokenConfig,
                  sampling: SamplingConfig) -> Algorithm:
    """The registered algorithm `name`, its settings checked; ValueError listing the names otherwise."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {name!r}")
    algorithm = ALGORITHMS[name]
    algorithm.check(baseline, key_tokens, sampling)
    return algorithm


@torch.no_grad()
def tw_weights(model: nn.Module, hidden: Tensor, valid: Tensor, group_size: int, alpha: float,
               chunk_size: int | None) -> Tensor:
    """TW-GRPO weights `[N, T]` from the policy pass's detached hidden states `[N, T, H]`."""
    fn = partial(_tw, valid=valid, group_size=group_size, alpha=alpha, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                 float32_logits=float32_logits(model))
    return fused.call_with_head(output_projection(model), hidden, fn)


def _tw(h, weight, bias=None, *, valid, group_size, alpha, chunk_size, float32_logits):
    return tw_grpo_weights(h, weight, valid, group_size, alpha, bias=bias, chunk_size=chunk_size,
                           float32_logits=float32_logits)
