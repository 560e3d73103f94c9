"""Length bonus of the released Video-R1 / Video-KTR run (layer L1, docs/method.md section 4.6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

LengthReading = Literal["generated", "key"]
"""Which token count is fed to :func:`length_bonus` as ``lengths``.

- ``"generated"``: valid completion tokens, ``valid.sum(1)`` (what the bonus was meant to count);
- ``"key"``: key tokens, ``key_mask.sum(1)``. The released KTR code counted the length after the
  completion mask had been replaced by the key-token mask, so with ~35% of tokens selected the bonus
  almost never fires. Use this reading to reproduce the released run.
"""


def length_bonus(
    accuracies: Sequence[float] | Tensor,
    lengths: Sequence[int] | Tensor,
    group_size: int,
    *,
    bonus: float = 0.2,
    min_len: int = 320,
    max_len: int = 512,
    acc_threshold: float = 0.1,
) -> Tensor:
    """Per-completion bonus: ``bonus`` where it applies, else 0. Returns ``[N]``.

    A completion gets ``bonus`` when (1) its accuracy is ``> acc_threshold``, (2) more than one
    completion of its group has accuracy ``> acc_threshold``, and (3) ``min_len <= length <= max_len``.

    Args:
        accuracies: ``[N]`` accuracy reward (unweighted) per completion, ``N = B * group_size``, groups
            contiguous (completions ``g*G .. g*G+G-1`` belong to prompt ``g``).
        lengths: ``[N]`` token counts per completion; which count is the :data:`LengthReading`.
        group_size: ``G``, completions per prompt.

    >>> length_bonus([1.0, 1.0, 0.0, 1.0], [400, 100, 400, 400], group_size=2)
    tensor([0.2000, 0.0000, 0.0000, 0.0000])
    """
    acc = torch.as_tensor(accuracies)
    acc = acc if acc.is_floating_point() else acc.float()  # [N]
    lens = torch.as_tensor(lengths, device=acc.device)  # [N]
    if acc.dim() != 1 or lens.shape != acc.shape:
        raise ValueError(f"accuracies and lengths must both be [N]; got {tuple(acc.shape)} and {tuple(lens.shape)}")
    if group_size < 1 or acc.numel() % group_size != 0:
        raise ValueError(f"N={acc.numel()} completions do not split into groups of group_size={group_size}")
    good = (acc > acc_threshold).view(-1, group_size)  # [B, G]
    group_ok = good.sum(dim=1, keepdim=True) > 1  # [B, 1]
    in_range = ((lens >= min_len) & (lens <= max_len)).view(-1, group_size)  # [B, G]
    fires = (good & group_ok & in_range).reshape(-1)  # [N]
    return fires.to(acc.dtype) * bonus
