"""Masked tensor helpers (layer L0): reductions that never produce NaN on empty masks.

Masked-out entries are removed with ``torch.where`` rather than multiplied by zero, so a NaN or inf
sitting at a masked position (padding, a non-finite score) cannot leak into the result (``nan * 0``
is ``nan``). An empty mask gives 0 for a sum and 0 for a mean, never ``0 / 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in at least float32 (half/bfloat16/integer -> float32, float64 kept).

    RL losses take ``exp`` of log-probability differences; bf16 has 8 mantissa bits, so the maths runs
    in float32 while gradients still flow back to the low-precision input.
    """
    if x.dtype in _LOW_PRECISION or not x.dtype.is_floating_point:
        return x.float()
    return x


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool tensor with the shape of ``like``."""
    if mask.dtype != torch.bool:
        raise ValueError(f"`{name}` must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` else 0 (same shape as the broadcast of both). Gradient is 0 outside ``mask``."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Sum of ``x`` over the entries where ``mask`` is true.

    Args:
        x: values, any shape, e.g. ``[N, T]``.
        mask: bool, broadcastable to ``x``.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.
    Returns:
        ``x`` reduced over ``dim`` (e.g. ``[N]`` for ``dim=-1`` on ``[N, T]``); 0 where the mask is empty.
    """
    kept = masked_fill_zero(x, mask)
    if dim is None:
        return kept.sum()
    return kept.sum(dim=dim, keepdim=keepdim)


def masked_count(mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Number of true entries of ``mask`` over ``dim`` (int64; scalar when ``dim`` is None)."""
    if dim is None:
        return mask.sum()
    return mask.sum(dim=dim, keepdim=keepdim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true; 0 (not NaN) where the mask is empty.

    Args:
        x: values, any shape, e.g. ``[N, T]``.
        mask: bool with the shape of ``x`` (broadcasting is allowed for ``x``'s sake, but the count is
            taken over ``mask`` expanded to ``x``'s shape).
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.
    Returns:
        the masked mean, shape of ``x`` reduced over ``dim``.
    """
    mask = mask.expand_as(x) if mask.shape != x.shape else mask
    total = masked_sum(x, mask, dim=dim, keepdim=keepdim)
    # clamp_min(1): an empty mask has a zero numerator, so 0 / 1 = 0 instead of 0 / 0 = NaN.
    count = masked_count(mask, dim=dim, keepdim=keepdim).clamp_min(1)
    return total / count.to(total.dtype)


def safe_denominator(n: int | float | Tensor, like: Tensor) -> Tensor:
    """``max(n, 1)`` as a tensor of ``like``'s dtype/device (``n`` may be a global, all-reduced count)."""
    return torch.as_tensor(n, dtype=like.dtype, device=like.device).clamp_min(1)
