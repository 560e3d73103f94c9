"""Chunked log-probs, entropy and policy loss from final hidden states (layer L1), plain PyTorch.

Qwen2.5-VL has V = 151,936: eight completions of 1,024 tokens give 5 GB of float32 logits, and the naive
path holds several such ``[N, T, V]`` tensors at once (logits, log-softmax, their gradients). Here the
output projection runs over token chunks: each chunk's logits ``[c, V]`` are upcast to float32 in reused
buffers and reduced at once, so the extra memory is ``O(chunk_size * V)`` whatever ``N * T`` is.

Two gradient strategies, both exact up to rounding:

* ``"grad-in-forward"`` (:func:`fused_policy_loss` default): the loss is known inside the chunk loop, so
  each chunk's ``dL/dlogits`` is formed while its softmax is still in memory and multiplied into
  ``dL/dhidden`` and ``dL/dweight`` right away. Three matmuls per chunk, like the naive forward+backward,
  and no logits are ever recomputed. It relies on the policy loss being a sum of per-token terms each
  depending only on its own log-prob (true of every rule in ``ktr.losses.AGGREGATIONS``): the gradient
  of a chunk's tokens is then taken from :func:`ktr.losses.policy_loss` itself, with the other tokens'
  log-probs held at a placeholder.
* ``"recompute"`` (:func:`token_logps_entropy`): differentiable log-probs for any downstream loss; the
  backward recomputes each chunk's logits from the saved hidden states and log-sum-exp (four matmuls).

Only tokens selected by ``mask`` are projected (padding and, for the loss, unselected tokens cost nothing).
Under FSDP2 the lm_head weight is a sharded DTensor outside its module's forward: use :func:`call_with_head`,
which runs the chunked computation *as* the head's forward so that FSDP all-gathers the weight before it
and reduce-scatters its gradient after backward.

Shapes: ``N`` sequences, ``T`` positions, ``H`` hidden size, ``V`` vocabulary, ``M`` selected tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ktr.losses import policy_loss

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GradStrategy",
    "call_with_head",
    "fused_policy_loss",
    "naive_policy_loss",
    "naive_token_logps_entropy",
    "token_logps_entropy",
]

# Tokens per chunk. 1024 x 151,936 x 4 B = 0.6 GB per float32 chunk buffer; large enough that the
# matmuls run at full speed on CPU and GPU (see scripts/bench_loss.py).
DEFAULT_CHUNK_SIZE = 1024
GradStrategy = Literal["grad-in-forward", "recompute"]
R = TypeVar("R")
_ROW_BLOCK = 32  # rows per exp block when the entropy is wanted (a [32, V] temporary)


# ---------------------------------------------------------------------------------------------------------
# Chunk kernel shared by every path.


def _compute_dtype(device_type: str, weight: Tensor) -> torch.dtype:
    # The dtype F.linear would run in: the autocast dtype when autocast is on, else the weight's.
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _Buffers:
    """Reused ``[chunk, V]`` scratch: fresh multi-GB allocations per chunk cost page faults on CPU."""

    def __init__(self, rows: int, vocab: int, cdtype: torch.dtype, device: torch.device):
        fdtype = torch.promote_types(cdtype, torch.float32)  # softmax maths: float32 (float64 kept)
        self.z = torch.empty(rows, vocab, dtype=fdtype, device=device)  # logits, then exp, then dlogits
        # Matmul output / low-precision dlogits; aliases z when the compute dtype is already fdtype.
        self.low = self.z if cdtype == fdtype else torch.empty(rows, vocab, dtype=cdtype, device=device)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, buf: _Buffers) -> Tensor:
    """Float32 ``[c, V]`` logits of ``h [c, H]`` in ``buf.z`` (``w [V, H]``, ``b [V]`` in compute dtype)."""
    c = h.shape[0]
    low = torch.mm(h, w.t(), out=buf.low[:c])  # [c, V] compute dtype
    if b is not None:
        low += b
    z = low if low.data_ptr() == buf.z.data_ptr() else buf.z[:c].copy_(low)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _chunk_forward(
    h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, temperature: float, buf: _Buffers, with_entropy: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """For ``h [c, H]`` and sampled ids ``y [c]``: log-prob ``[c]``, entropy ``[c]`` (or None),
    ``e = exp(z - max) [c, V]`` (in place of the logits in ``buf.z``), its row sums ``s [c]`` and the
    log-sum-exp ``[c]``."""
    z = _logits(h, w, b, temperature, buf)  # [c, V]
    row_max = z.amax(dim=-1, keepdim=True)  # [c, 1]
    z.sub_(row_max)  # shifted so that exp() cannot overflow
    z_y = z.gather(1, y[:, None]).squeeze(1)  # [c] shifted logit of the sampled token
    dot = None
    if with_entropy:
        # Entropy needs sum_v e_v z_v while exp overwrites z: go by row blocks, so that the only
        # temporary is [_ROW_BLOCK, V] rather than a second [c, V] buffer.
        dot = z.new_empty(z.shape[0])  # [c]
        for r in range(0, z.shape[0], _ROW_BLOCK):
            zb = z[r : r + _ROW_BLOCK]
            eb = torch.exp(zb)
            dot[r : r + _ROW_BLOCK] = torch.bmm(eb.unsqueeze(1), zb.unsqueeze(2)).view(-1)
            zb.copy_(eb)
    else:
        z.exp_()
    s = z.sum(dim=-1)  # [c]
    log_s = s.log()
    entropy = None if dot is None else log_s - dot / s  # H = log s - sum_v p_v z_v
    return z_y - log_s, entropy, z, s, row_max.squeeze(1) + log_s


def _backprop_chunk(dlogits: Tensor, h: Tensor, w: Tensor, buf: _Buffers, grads: dict, sl: slice) -> None:
    """Push float32 ``dlogits [c, V]`` (d loss / d projection output) into the hidden/weight/bias grads."""
    dl = dlogits if dlogits.dtype == w.dtype else buf.low[: h.shape[0]].copy_(dlogits)  # [c, V]
    if "h" in grads:
        torch.mm(dl, w, out=grads["h"][sl])  # [c, H]
    if "w" in grads:
        if dl.dtype == grads["w"].dtype:
            grads["w"].addmm_(dl.t(), h)  # [V, H], accumulated in place
        else:  # low-precision product, float32 accumulation across chunks
            grads["w"] += torch.mm(dl.t(), h)
    if "b" in grads:
        grads["b"] += dlogits.sum(dim=0)


def _alloc_grads(h: Tensor, w: Tensor, needs: tuple[bool, bool, bool]) -> dict[str, Tensor]:
    grads = {}
    if needs[0]:
        grads["h"] = torch.empty_like(h)  # [M, H]
    if needs[1]:
        grads["w"] = torch.zeros(w.shape, dtype=_acc_dtype(w), device=w.device)  # [V, H]
    if needs[2]:
        grads["b"] = torch.zeros(w.shape[0], dtype=_acc_dtype(w), device=w.device)  # [V]
    return grads


def _acc_dtype(w: Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, torch.float32)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


# ---------------------------------------------------------------------------------------------------------
# Autograd functions. Both take the selected hidden states h [M, H] (already in the compute dtype), the
# projection w [V, H] and bias [V] as given (cast inside), and sampled ids y [M].


class _Cfg:
    def __init__(self, chunk_size: int, temperature: float, with_entropy: bool, cdtype: torch.dtype, needs):
        self.chunk_size, self.temperature, self.with_entropy = chunk_size, temperature, with_entropy
        self.cdtype, self.needs = cdtype, needs  # needs: (hidden, weight, bias) grads wanted


def _cast(w: Tensor, b: Tensor | None, cdtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    return w.detach().to(cdtype), None if b is None else b.detach().to(cdtype)


def _outputs_grads(grads: dict, dtypes: tuple, scale: Tensor | None) -> tuple:
    """``(grad_h, grad_w, grad_b)`` (None where not wanted) in the dtypes of ``(h, w, b)``."""
    out = []
    for key, dtype in zip(("h", "w", "b"), dtypes):
        g = grads.get(key)
        if g is not None:
            g = g if scale is None else g.mul_(scale)  # in place: these buffers are used once
            g = g.to(dtype)
        out.append(g)
    return tuple(out)


def _dtypes(h: Tensor, w: Tensor, b: Tensor | None) -> tuple:
    return h.dtype, w.dtype, None if b is None else b.dtype


class _LogpsEntropy(torch.autograd.Function):
    """Recompute strategy: forward keeps only the log-sum-exp ``[M]``; backward re-projects each chunk."""

    @staticmethod
    def forward(ctx, h, w, b, y, cfg: _Cfg):
        wc, bc = _cast(w, b, cfg.cdtype)
        fdtype = torch.promote_types(cfg.cdtype, torch.float32)
        logps = h.new_empty(h.shape[0], dtype=fdtype)  # [M]
        entropy = torch.empty_like(logps) if cfg.with_entropy else logps.new_empty(0)  # [M]
        lse = torch.empty_like(logps)  # [M]
        buf = _Buffers(min(cfg.chunk_size, h.shape[0]), w.shape[0], cfg.cdtype, h.device)
        with torch.autocast(h.device.type, enabled=False):
            for sl in _chunks(h.shape[0], cfg.chunk_size):
                logp, ent, _, _, lse[sl] = _chunk_forward(h[sl], wc, bc, y[sl], cfg.temperature, buf, cfg.with_entropy)
                logps[sl] = logp
                if ent is not None:
                    entropy[sl] = ent
        ctx.save_for_backward(h, w, b, y, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_entropy):
        h, w, b, y, lse = ctx.saved_tensors
        cfg = ctx.cfg
        wc, bc = _cast(w, b, cfg.cdtype)
        grads = _alloc_grads(h, wc, cfg.needs)
        buf = _Buffers(min(cfg.chunk_size, h.shape[0]), w.shape[0], cfg.cdtype, h.device)
        with torch.autocast(h.device.type, enabled=False):
            for sl in _chunks(h.shape[0], cfg.chunk_size):
                g = grad_logps[sl].to(lse.dtype)  # [c]
                p = _logits(h[sl], wc, bc, cfg.temperature, buf).sub_(lse[sl, None]).exp_()  # [c, V] softmax
                dlogits = p.mul_(-g[:, None]).scatter_add_(1, y[sl, None], g[:, None])  # g * (onehot - p)
                if cfg.temperature != 1.0:
                    dlogits.div_(cfg.temperature)
                _backprop_chunk(dlogits, h[sl], wc, buf, grads, sl)
        return *_outputs_grads(grads, _dtypes(h, w, b), None), None, None


class _FusedLoss(torch.autograd.Function):
    """Grad-in-forward strategy: the loss gradient of each chunk is formed while its softmax is live."""

    @staticmethod
    def forward(ctx, h, w, b, y, loss_fn: "_ChunkedPolicyLoss", cfg: _Cfg):
        wc, bc = _cast(w, b, cfg.cdtype)
        fdtype = torch.promote_types(cfg.cdtype, torch.float32)
        logps = h.new_empty(h.shape[0], dtype=fdtype)  # [M]
        entropy = torch.empty_like(logps) if cfg.with_entropy else logps.new_empty(0)  # [M]
        grads = _alloc_grads(h, wc, cfg.needs)
        buf = _Buffers(min(cfg.chunk_size, h.shape[0]), w.shape[0], cfg.cdtype, h.device)
        with torch.autocast(h.device.type, enabled=False):
            for sl in _chunks(h.shape[0], cfg.chunk_size):
                logp, ent, e, s, _ = _chunk_forward(h[sl], wc, bc, y[sl], cfg.temperature, buf, cfg.with_entropy)
                logps[sl] = logp
                if ent is not None:
                    entropy[sl] = ent
                if grads:
                    coef = loss_fn.grad(logp, sl) / cfg.temperature  # [c] dL/dlogp, chain through 1/temp
                    # dL/dz = coef * (onehot - e / s), built in place in e
                    dlogits = e.mul_((-coef / s)[:, None]).scatter_add_(1, y[sl, None], coef[:, None])
                    _backprop_chunk(dlogits, h[sl], wc, buf, grads, sl)
        del buf
        loss = loss_fn.value(logps)
        ctx.grads, ctx.dtypes = grads, _dtypes(h, w, b)
        ctx.mark_non_differentiable(logps, entropy)
        return loss, logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logps, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("the fused policy loss can be back-propagated only once (no retain_graph reuse)")
        grads, ctx.grads = ctx.grads, None
        return *_outputs_grads(grads, ctx.dtypes, grad_loss), None, None, None


class _ChunkedPolicyLoss:
    """:func:`ktr.losses.policy_loss` seen from a chunk of the ``M`` selected tokens.

    ``pos [M]`` are the tokens' flat positions in ``[N, T]``. Because every aggregation is a weighted sum
    of per-token terms, the gradient at a chunk's positions does not depend on the other log-probs, which
    are held at 0 (finite under the loss's clamps). ``value`` evaluates the loss once all are known.
    """

    def __init__(self, pos: Tensor, shape: tuple[int, int], advantages: Tensor, mask: Tensor, kwargs: dict):
        self.pos, self.shape = pos, shape
        self.args, self.kwargs = (advantages, mask), kwargs

    def _full(self, values: Tensor, sl: slice = slice(None)) -> Tensor:
        return _scatter(values, self.pos[sl], self.shape)  # [N, T]

    def grad(self, logp: Tensor, sl: slice) -> Tensor:
        with torch.enable_grad():
            leaf = logp.detach().requires_grad_()  # [c]
            loss = policy_loss(self._full(leaf, sl), *self.args, **self.kwargs)
            return torch.autograd.grad(loss, leaf)[0]  # [c]

    def value(self, logps: Tensor) -> Tensor:
        return policy_loss(self._full(logps), *self.args, **self.kwargs)


# ---------------------------------------------------------------------------------------------------------
# Public API.


def _scatter(values: Tensor, pos: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """``[M]`` values at flat positions ``pos`` of a zero ``[N, T]`` tensor (differentiable)."""
    if pos is None:
        return values.view(shape)
    return values.new_zeros(shape[0] * shape[1]).index_put((pos,), values).view(shape)


def _select(hidden: Tensor, weight: Tensor, tokens: Tensor, mask: Tensor | None, cdtype: torch.dtype):
    """Selected rows ``h [M, H]`` (compute dtype, differentiable), ids ``y [M]``, flat positions or None."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"expected hidden [N, T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if tokens.shape != hidden.shape[:2] or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`tokens` must be integer [N, T]={tuple(hidden.shape[:2])}, got {tokens.dtype} {tuple(tokens.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
        raise ValueError(f"`mask` must be bool [N, T]={tuple(tokens.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N*T, H]
    y = tokens.reshape(-1).long()  # [N*T]
    pos = None
    if mask is not None:
        pos = mask.reshape(-1).nonzero().squeeze(1)  # [M]
        flat, y = flat.index_select(0, pos), y.index_select(0, pos)
    return flat.to(cdtype), y, pos


def _cfg(hidden, weight, bias, h, chunk_size, temperature, with_entropy) -> _Cfg:
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (h, weight, bias))
    return _Cfg(chunk_size, float(temperature), with_entropy, h.dtype, needs)


def token_logps_entropy(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the sampled tokens and full-vocabulary entropy, projecting ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[N, T, H]`` final hidden states (any float dtype; under autocast the projection runs in
            the autocast dtype, logits are upcast to float32 per chunk).
        weight: ``[V, H]`` output projection (lm_head); frozen (``requires_grad=False``) gets no grad.
        tokens: ``[N, T]`` int sampled token ids (position ``t`` is predicted by ``hidden[:, t]``).
        mask: ``[N, T]`` bool, tokens to compute (e.g. ``valid``); others are skipped and read 0.
        bias: ``[V]`` optional projection bias.
        temperature: logits are divided by it (the rollout samples at 1.0).
    Returns:
        ``logps [N, T]`` float32, differentiable w.r.t. ``hidden``/``weight``/``bias`` (recompute strategy:
        the backward re-projects each chunk), and ``entropy [N, T]`` float32 without grad (None when
        ``with_entropy=False``).

    Example:
        >>> h, w, y = torch.randn(2, 3, 4), torch.randn(10, 4), torch.randint(0, 10, (2, 3))
        >>> logps, ent = token_logps_entropy(h, w, y, chunk_size=4)
        >>> torch.allclose(logps, torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])[..., 0])
        True
    """
    h, y, pos = _select(hidden, weight, tokens, mask, _compute_dtype(hidden.device.type, weight))
    cfg = _cfg(hidden, weight, bias, h, chunk_size, temperature, with_entropy)
    logps, entropy = _LogpsEntropy.apply(h, weight, bias, y, cfg)  # [M], [M]
    shape = tuple(tokens.shape)
    return _scatter(logps, pos, shape), _scatter(entropy, pos, shape) if with_entropy else None


def _used_mask(mask: Tensor, loss_kwargs: dict) -> Tensor:
    """``[N, T]`` tokens whose log-prob the loss reads: ``mask``, plus ``kl_mask`` when the KL term is on."""
    kl_on = loss_kwargs.get("ref_logps") is not None and loss_kwargs.get("beta", 0.0) != 0
    kl_mask = loss_kwargs.get("kl_mask")
    return mask | kl_mask if kl_on and kl_mask is not None else mask


def _loss_grad_in_forward(hidden, weight, tokens, advantages, mask, *, bias, chunk_size, temperature,
                          with_entropy, loss_kwargs):
    h, y, pos = _select(hidden, weight, tokens, _used_mask(mask, loss_kwargs), _compute_dtype(hidden.device.type, weight))
    cfg = _cfg(hidden, weight, bias, h, chunk_size, temperature, with_entropy)
    loss_fn = _ChunkedPolicyLoss(pos, tuple(tokens.shape), advantages, mask, loss_kwargs)
    loss, logps, entropy = _FusedLoss.apply(h, weight, bias, y, loss_fn, cfg)
    shape = tuple(tokens.shape)
    return loss, _scatter(logps, pos, shape), _scatter(entropy, pos, shape) if with_entropy else None


def _loss_recompute(hidden, weight, tokens, advantages, mask, *, bias, chunk_size, temperature, with_entropy,
                    loss_kwargs):
    logps, entropy = token_logps_entropy(
        hidden, weight, tokens, mask=_used_mask(mask, loss_kwargs), bias=bias, chunk_size=chunk_size,
        with_entropy=with_entropy, temperature=temperature,
    )
    return policy_loss(logps, advantages, mask, **loss_kwargs), logps.detach(), entropy


_STRATEGIES: dict[str, Callable[..., tuple]] = {
    "grad-in-forward": _loss_grad_in_forward,
    "recompute": _loss_recompute,
}


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    with_entropy: bool = False,
    strategy: GradStrategy = "grad-in-forward",
    **loss_kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`ktr.losses.policy_loss` computed from hidden states without materialising ``[N, T, V]`` logits.

    Equal, in value and in gradients w.r.t. ``hidden``, ``weight`` and ``bias``, to
    ``policy_loss(naive_logps, advantages, mask, **loss_kwargs)`` up to rounding.

    Args:
        hidden: ``[N, T, H]`` final hidden states; ``weight`` ``[V, H]``; ``bias`` ``[V]`` or None.
        tokens: ``[N, T]`` sampled ids. ``advantages``: ``[N]`` or ``[N, T]``. ``mask``: ``[N, T]`` bool.
        chunk_size: tokens projected at a time; peak extra memory is about ``3 * chunk_size * V`` floats.
        temperature: logits are divided by it before the softmax.
        with_entropy: also return the entropy (free: it comes from the same softmax).
        strategy: ``"grad-in-forward"`` (3 matmuls per chunk; the backward only rescales stored grads and
            can run once) or ``"recompute"`` (4 matmuls; saves only ``[M]`` floats in forward).
        **loss_kwargs: forwarded to :func:`ktr.losses.policy_loss` (``ref_logps``, ``beta``, ``old_logps``,
            ``clip_low``, ``clip_high``, ``aggregation``, ``kl_mask``, ``num_sequences``, ``num_tokens``,
            ``max_len``, ``num_kl_tokens``).
    Returns:
        ``(loss, logps, entropy)``: scalar float32 loss; detached ``[N, T]`` log-probs and entropy
        (entropy None unless ``with_entropy``), computed on ``mask`` (plus ``kl_mask`` when the KL term is
        on) and 0 elsewhere.
    """
    try:
        impl = _STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {sorted(_STRATEGIES)}") from None
    return impl(hidden, weight, tokens, advantages, mask, bias=bias, chunk_size=chunk_size,
                temperature=temperature, with_entropy=with_entropy, loss_kwargs=loss_kwargs)


def naive_token_logps_entropy(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    with_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Reference for :func:`token_logps_entropy` that materialises the ``[N, T, V]`` logits (tests, benchmarks)."""
    logits = F.linear(hidden, weight, bias).float()  # [N, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    logps = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [N, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, T]
    return logps, entropy


def naive_policy_loss(hidden, weight, tokens, advantages, mask, *, bias=None, temperature=1.0,
                      with_entropy=False, **loss_kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reference for :func:`fused_policy_loss` via :func:`naive_token_logps_entropy` (same arguments)."""
    logps, entropy = naive_token_logps_entropy(hidden, weight, tokens, bias=bias, with_entropy=with_entropy,
                                               temperature=temperature)
    return policy_loss(logps, advantages, mask, **loss_kwargs), logps.detach(), entropy


def call_with_head(head: nn.Module, hidden: Tensor, fn: Callable[..., R]) -> R:
    """Run ``fn(hidden, head.weight, bias=head.bias)`` *as* ``head``'s forward and return its result.

    Calling through ``head(...)`` fires the module's hooks: with FSDP2 (``fully_shard``) the pre-forward
    hook all-gathers the sharded weight so ``fn`` sees the full ``[V, H]`` tensor, and the hooks on the
    outputs re-gather it for backward (if resharded) and reduce-scatter its gradient afterwards. Without
    FSDP it is just ``fn(hidden, head.weight, bias=head.bias)``.

    Example: ``loss, logps, _ = call_with_head(model.lm_head, hidden, partial(fused_policy_loss,
    tokens=ids, advantages=adv, mask=m))``.
    Only non-tensor state should reach ``fn`` through ``partial``: FSDP's mixed precision casts the
    floating tensors passed to a forward (here only ``hidden``, as a plain ``head(hidden)`` would).
    """
    if not isinstance(getattr(head, "weight", None), Tensor) or hasattr(head, "lora_A"):
        raise TypeError(f"call_with_head needs a plain linear head with `.weight`, got {type(head).__name__}")
    had_own = "forward" in head.__dict__  # e.g. a forward already patched on the instance by a wrapper
    own = head.__dict__.get("forward")

    def forward(h: Tensor) -> R:
        return fn(h, head.weight, bias=getattr(head, "bias", None))

    head.forward = forward  # instance attribute shadows the class method for this one call
    try:
        return head(hidden)
    finally:
        if had_own:
            head.forward = own
        else:
            del head.forward
