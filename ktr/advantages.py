"""Group-relative advantage estimators (layer L1), picked by name from ``ADVANTAGES``.

Rows are laid out as consecutive groups: ``rewards[g*G:(g+1)*G]`` are the ``G`` completions of
prompt ``g`` (``N = B * G``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ktr.ops import upcast

__all__ = ["ADVANTAGES", "drgrpo_advantages", "get_advantage_fn", "grpo_advantages", "group_advantages"]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """View ``rewards [N]`` as ``[B, G]`` after validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"`rewards` must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards N={n} is not a multiple of group_size={group_size}; "
            "rows must come in consecutive groups of G completions per prompt"
        )
    return rewards.view(n // group_size, group_size)  # [B, G]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale_by_std: bool = True) -> Tensor:
    """Group-normalised advantages ``A_i = (r_i - mean_g) / (std_g + eps)`` (GRPO, docs/method.md section 3.1).

    Args:
        rewards: ``[N]`` scalar reward per completion, ``N = B * G``, one prompt per block of ``G`` rows.
        group_size: ``G``.
        eps: added to the std (the released code uses 1e-4); must be > 0 when ``scale_by_std``.
        scale_by_std: ``False`` gives ``r_i - mean_g`` (Dr. GRPO, no std scaling).
    Returns:
        ``[N]`` advantages, float32 at least (float64 kept).

    The std is unbiased (Bessel, divide by ``G - 1``) like ``torch.std``. For ``G = 1`` the unbiased std
    is undefined (``torch.std`` gives NaN); it is taken as 0 here, and ``r - mean = 0``, so ``A = 0``.

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), group_size=2, scale_by_std=False).tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    if scale_by_std and not eps > 0:
        # eps = 0 turns a constant-reward group (std 0) into 0 / 0 = NaN.
        raise ValueError(f"`eps` must be > 0 when scale_by_std=True, got {eps!r}")
    r = _grouped(upcast(rewards), group_size)  # [B, G]
    centred = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale_by_std:
        # max(G - 1, 1): for G = 1 the only centred value is 0, so var = 0 instead of 0 / 0.
        var = centred.square().sum(dim=1, keepdim=True) / max(group_size - 1, 1)  # [B, 1]
        centred = centred / (var.sqrt() + eps)
    return centred.reshape(-1)  # [N]


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO / Video-KTR: ``(r - mean_g) / (std_g + eps)``; see :func:`group_advantages`."""
    return group_advantages(rewards, group_size, eps=eps, scale_by_std=True)


def drgrpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Dr. GRPO: ``r - mean_g`` (``eps`` unused, kept so every estimator has one signature)."""
    return group_advantages(rewards, group_size, eps=eps, scale_by_std=False)


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
}


def get_advantage_fn(name: str) -> Callable[..., Tensor]:
    """Look up an estimator ``fn(rewards [N], group_size, eps=1e-4) -> [N]`` by name."""
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGES)}") from None
