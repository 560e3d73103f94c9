"""Masked tensor helpers (layer L0): reductions that never produce NaN on empty masks.

Masked-out entries are removed with ``torch.where`` rather than multiplied by zero, so a NaN or inf
sitting at a masked position (padding, a non-finite score) cannot leak into the result (``nan * 0``
is ``nan``). An empty mask gives 0 for a sum and 0 for a mean, never ``0 / 0``.

``exp_shifted_`` and ``mul_rows_`` are the exponential of shifted logits and its scaling into ``dL/dlogits`` that the
chunked head (``ktr.fused``) computes over each ``[chunk, V]`` block: on CPU they keep the exp kernel and the
matmuls after them off their slow paths for subnormal numbers, which a peaked (trained) distribution fills.
``mm_float32`` and ``project_logits`` keep a bf16 / fp16 head's product in float32 (``policy.head_logits``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def exp_shifted_(z: Tensor) -> Tensor:
    """``z.exp_()`` for shifted logits (``z <= 0``, float32/64), except that on CPU an entry whose exponential is
    within ~1% of the dtype's smallest normal number or below it (float32: ``z < -87.32``, values under ~1.19e-38)
    reads 0, where the plain kernel gives subnormals or tiny normals.

    Why: torch's CPU ``exp`` takes a slow path for every such entry (8-19x the normal per-entry cost on an
    AVX-512 Xeon, with or without ``torch.set_flush_denormal``), and a trained model's next-token distribution
    puts most of a 151,936-entry row there. Entries above the cut are the same kernel's values, bit for bit; the
    dropped ones are each below 1.2e-38 next to a row sum of at least 1 (the row's maximum contributes
    ``exp(0)``), so row sums and log-probs keep their bits, and an entropy moves by less than 1e-30 (only one that
    small changes; tests/test_prefix.py shows the key-token masks unchanged on a head that puts many there).
    On other devices this is exactly ``z.exp_()``. ``scripts/bench_exp.py`` measures it.
    """
    if z.device.type != "cpu":
        return z.exp_()
    floor = math.log(torch.finfo(z.dtype).tiny) + 0.01  # exp(floor) is a normal number: the fast path
    z.clamp_(min=floor).exp_()
    # Clamped entries hold exp(floor) (to the kernel's rounding); the cut sits just above it: they read 0.
    return F.threshold_(z, math.exp(floor + 1e-3), 0.0)


def mul_rows_(e: Tensor, scale: Tensor) -> Tensor:
    """``e.mul_(scale[:, None])`` for ``e >= 0`` ``[c, V]`` and ``scale`` ``[c]``, except that on CPU a product below
    the dtype's smallest normal number (float32: ~1.18e-38) reads 0 instead of a subnormal.

    Why: the chunked head multiplies these ``dL/dlogits`` into the hidden states' and the head's gradients, and a
    matmul with subnormal operands runs an order of magnitude slower on x86 CPUs (a 1,024-token fused loss on a
    peaked head: 30 s instead of 2.4 s). ``e`` (``exp_shifted_``'s output) holds no subnormals, but a normal
    ``e_v`` times a small per-token coefficient can be one. Kept products are bit for bit ``e.mul_``'s; each dropped
    one is below 1.2e-38, so a gradient moves by at most ~1e-38 times the head's largest weight times V.
    On other devices this is exactly ``e.mul_(scale[:, None])``.
    """
    if e.device.type == "cpu":
        cuts = (torch.finfo(e.dtype).tiny / scale.abs()).tolist()  # [c]; inf where scale is 0: the row is 0 anyway
        for row, cut in zip(e, cuts):
            F.threshold_(row, cut, 0.0)  # e_v <= cut -> 0, i.e. |e_v * scale| below the smallest normal
    return e.mul_(scale[:, None])


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


def low_precision(dtype: torch.dtype) -> bool:
    """A matmul in ``dtype`` rounds its output coarser than float32 (bf16, fp16)."""
    return dtype in _LOW_PRECISION


CUDA_FLOAT32_OUT: list[bool] = []  # [] untried; [True] cuBLAS's float32-output GEMM works here; [False] it failed


def mm_float32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` in float32 for low-precision ``a [m, k]``, ``b [k, n]``, rounded once, to float32.

    A bf16 / fp16 GEMM multiplies and accumulates in float32, then rounds its output to the input dtype (a logit
    of 20 to a multiple of 1/8 in bf16). Here that last rounding is to float32 instead. On CUDA this is one
    cuBLAS GEMM with float32 output (``torch.mm(a, b, torch.float32)``, PyTorch >= 2.8): the same bf16 matmul with
    a wider output (its speed on a GPU is not measured yet). Elsewhere, or if that call fails (warned once), the
    inputs are upcast, which is exact (a product of two bf16 or fp16 numbers fits a float32), and multiplied in
    float32. The two differ only in the order of the float32 sums. Not differentiable through the CUDA call: the
    chunked paths form their own gradients."""
    if a.is_cuda and CUDA_FLOAT32_OUT != [False]:
        try:
            res = torch.mm(a, b, torch.float32) if out is None else torch.mm(a, b, torch.float32, out=out)
            CUDA_FLOAT32_OUT[:] = [True]
            return res
        except torch.cuda.OutOfMemoryError:
            raise  # a RuntimeError too, but not a missing kernel: the fallback would need more memory
        except (RuntimeError, TypeError, NotImplementedError) as e:  # an older torch, or no such kernel here
            import warnings

            CUDA_FLOAT32_OUT[:] = [False]
            warnings.warn(f"float32-output GEMM unavailable ({type(e).__name__}: {str(e)[:200]}); head logits are "
                          "computed from float32 copies of the inputs instead (same values, slower)", stacklevel=2)
    return torch.mm(a.float(), b.float(), out=out)


def project_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, float32_logits: bool = False) -> Tensor:
    """Float32 logits ``[..., V]`` of ``hidden [..., H]`` through ``weight [V, H]`` (and ``bias``), differentiable.

    ``float32_logits=False``: ``F.linear(...).float()``, the logits rounded to the projection's compute dtype first
    (autocast's, else the weight's), as transformers' ``lm_head`` computes them. ``True``: with a low-precision
    compute dtype the inputs are cast to it and then upcast (exact) so that the product is rounded to float32 only
    (the values of :func:`mm_float32`); a float32 or float64 projection is the same either way."""
    dev = hidden.device.type
    cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    if not (float32_logits and low_precision(cdtype)):
        return F.linear(hidden, weight, bias).float()
    with torch.autocast(dev, enabled=False):
        up = [None if t is None else t.to(cdtype).float() for t in (hidden, weight, bias)]
        return F.linear(*up)
