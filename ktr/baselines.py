"""Rules of the same-data baselines of the Video-KTR paper (layer L1): T-GRPO and TW-GRPO.

* **T-GRPO** (Video-R1, Feng et al. 2025, `src/r1-v/src/open_r1/trainer/grpo_trainer.py`, `temporal: true`):
  besides the G ordered completions, G/2 completions are sampled from the same prompt with the video's frames
  shuffled. If the ordered group's mean accuracy is at least 0.8 x the shuffled group's, every ordered
  completion with accuracy > 0.1 gets +0.3 on its accuracy reward (:func:`temporal_bonus`). Images get no
  shuffled rollouts and no bonus. Video-R1 compares the means over one device's batch, which is one prompt's
  group in its run (1 prompt per GPU); here the comparison is per prompt (group), the same thing there.
  The shuffled completions only feed the comparison; they get no gradient.
* **TW-GRPO** (Dang et al. 2025, "Reinforcing Video Reasoning with Focused Thinking", `longmalongma/TW-GRPO`,
  `compute_token_importance_kl_logs_uniform`): token weights in ``[1, alpha]`` per *position* of a group. At
  position t, each of the G completions has a full next-token log-distribution ``l_i`` (a row already past its
  end contributes the uniform ``-log V``); with ``m = mean_i l_i`` (mean of log-probs),
  ``d_t = mean_i sum_v (exp(c) - c - 1)``, ``c = clamp(m_v - l_iv, -11, 11)`` (:func:`group_divergence`). The
  weights min-max normalise ``d`` over the group's positions and map it to ``1 + (alpha - 1) * norm``, the same
  for the G completions at t (:func:`divergence_weights`); the loss is the token mean of ``w * l`` over valid
  tokens (normaliser: the number of valid tokens, i.e. ``weight_norm="mask"``). Deviation: the min and max run
  over positions where at least one completion of the group is valid (TW-GRPO's code takes all ``T`` padded
  positions of its one-prompt batch, where every position is valid for some completion, so the two agree there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.ops import project_logits

__all__ = ["divergence_weights", "group_divergence", "temporal_bonus", "tw_grpo_weights"]

_TW_CLAMP = 11.0  # TW-GRPO's clamp of the per-entry log difference


def temporal_bonus(accuracy: Tensor, shuffled_accuracy: Tensor, group_size: int, shuffled_group_size: int,
                   is_video: Tensor, bonus: float = 0.3, ratio: float = 0.8, correct: float = 0.1) -> Tensor:
    """T-GRPO's temporal bonus ``[B*G]`` (0 or ``bonus``) for the ordered completions.

    Args:
        accuracy: ``[B*G]`` accuracy rewards of the ordered completions (rows ``b*G .. b*G+G-1``: prompt b).
        shuffled_accuracy: ``[B*G']`` accuracy of the shuffled-frame completions (``G' = shuffled_group_size``).
        is_video: ``[B]`` bool; image prompts never get the bonus.
        bonus / ratio / correct: Video-R1's 0.3, 0.8 and the 0.1 accuracy threshold of a "correct" completion.
    Returns:
        ``bonus`` where the prompt is a video, ``mean(acc) >= ratio * mean(shuffled acc)`` over its group, and the
        completion's accuracy is ``> correct``; else 0.

    Example: G = 4, ordered accuracies [1, 0, 1, 0] (mean 0.5), shuffled [1, 1] (mean 1): 0.5 < 0.8, no bonus.
    """
    b = is_video.shape[0]
    if accuracy.shape != (b * group_size,) or shuffled_accuracy.shape != (b * shuffled_group_size,):
        raise ValueError(f"expected accuracy [{b * group_size}] and shuffled_accuracy [{b * shuffled_group_size}], "
                         f"got {tuple(accuracy.shape)} and {tuple(shuffled_accuracy.shape)}")
    acc = accuracy.float().view(b, group_size)  # [B, G]
    ordered = acc.mean(-1)  # [B]
    shuffled = shuffled_accuracy.float().view(b, shuffled_group_size).mean(-1)  # [B]
    applies = is_video.to(acc.device) & (ordered >= ratio * shuffled)  # [B]
    out = torch.where(applies.unsqueeze(-1) & (acc > correct), bonus, 0.0)  # [B, G]
    return out.reshape(-1)


def group_divergence(logps: Tensor, valid: Tensor) -> Tensor:
    """TW-GRPO's divergence from the group ``[B, T]`` from full log-distributions ``logps [B, G, T, V]``
    (float32) and ``valid [B, G, T]`` bool (rows past their end are replaced by the uniform distribution)."""
    v = logps.shape[-1]
    lp = torch.where(valid.unsqueeze(-1), logps, torch.full_like(logps, -math.log(v)))  # [B, G, T, V]
    c = (lp.mean(1, keepdim=True) - lp).clamp(-_TW_CLAMP, _TW_CLAMP)  # [B, G, T, V]
    return (c.exp() - c - 1.0).sum(-1).mean(1)  # [B, T]


def divergence_weights(divergence: Tensor, valid: Tensor, alpha: float = 1.7) -> Tensor:
    """Weights ``[B*G, T]`` in ``[1, alpha]`` (0 outside ``valid``) from ``divergence [B, T]`` and
    ``valid [B, G, T]``: min-max over the positions valid for some completion of the group."""
    b, g, t = valid.shape
    seen = valid.any(1)  # [B, T]
    lo = torch.where(seen, divergence, torch.full_like(divergence, float("inf"))).amin(-1, keepdim=True)  # [B, 1]
    hi = torch.where(seen, divergence, torch.full_like(divergence, float("-inf"))).amax(-1, keepdim=True)
    norm = ((divergence - lo) / (hi - lo + 1e-8)).clamp(0.0, 1.0).nan_to_num(0.0)  # [B, T]
    w = (1.0 + (alpha - 1.0) * norm).unsqueeze(1).expand(b, g, t)  # [B, G, T]
    return torch.where(valid, w, torch.zeros_like(w)).reshape(b * g, t)


@torch.no_grad()
def tw_grpo_weights(hidden: Tensor, weight: Tensor, valid: Tensor, group_size: int, alpha: float = 1.7, *,
                    bias: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    float32_logits: bool = False) -> Tensor:
    """TW-GRPO weights ``[N, T]`` from the policy pass's hidden states ``[N, T, H]`` (no grad), projecting one
    group's ``chunk_size // G`` positions at a time: ``[G, c, V]`` float32, never ``[N, T, V]``. ``float32_logits``:
    the logits' rounding, as in ``ktr.ops.project_logits`` (``policy.head_logits``)."""
    n, t, _ = hidden.shape
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide N={n}")
    b = n // group_size
    hid = hidden.view(b, group_size, t, -1)
    ok = valid.view(b, group_size, t)
    step = max(1, chunk_size // group_size)
    div = torch.zeros(b, t, dtype=torch.float32, device=hidden.device)  # [B, T]
    for p in range(b):
        for s in range(0, t, step):
            h = hid[p, :, s:s + step]  # [G, c, H]
            logps = project_logits(h.to(weight.dtype), weight, bias, float32_logits).log_softmax(-1)  # [G, c, V]
            div[p, s:s + step] = group_divergence(logps.unsqueeze(0), ok[p:p + 1, :, s:s + step])[0]
    return divergence_weights(div, ok, alpha)

