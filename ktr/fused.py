"""Chunked log-probs, entropy and policy loss from final hidden states (layer L1), plain PyTorch.

With V = 151,936 (Qwen2.5-VL), 8 x 1,024 tokens give 5 GB of float32 logits and the naive path holds
several such ``[N, T, V]`` tensors at once. Here the projection runs over chunks of tokens: a chunk's
logits ``[c, V]`` are upcast to float32 in one reused buffer and reduced at once, so the extra memory is
``O(chunk_size * V)`` (plus a weight-sized gradient) whatever ``N * T`` is. Two gradient strategies:

* ``"grad-in-forward"`` (:func:`fused_policy_loss`'s default): the loss is known inside the chunk loop, so
  each chunk's ``dL/dlogits`` is formed while its softmax is in memory and multiplied into the hidden and
  weight gradients at once: three matmuls per chunk, as many as the naive forward+backward. It relies on
  :func:`ktr.losses.policy_loss` being a sum of per-token terms, each depending on its own log-prob only
  (true of every rule in ``AGGREGATIONS``); a chunk's gradient is taken from ``policy_loss`` itself.
* ``"recompute"`` (:func:`token_logps_entropy`): differentiable log-probs for any downstream loss; the
  backward re-projects each chunk from the saved hidden states and log-sum-exp (four matmuls).

Only tokens selected by ``mask`` are projected, so padding (and, for the loss, unselected tokens) cost
nothing. Under FSDP2 the lm_head weight is a sharded DTensor outside its module's forward: run the chunked
computation through :func:`call_with_head`.

Shapes: ``N`` sequences, ``T`` positions, ``H`` hidden size, ``V`` vocabulary, ``M`` selected tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from ktr.config import DEFAULT_CHUNK_SIZE
from ktr.losses import policy_loss
from ktr.ops import CUDA_FLOAT32_OUT, exp_shifted_, low_precision, mm_float32, mul_rows_, project_logits

__all__ = ["DEFAULT_CHUNK_SIZE", "GradStrategy", "call_with_head", "fused_policy_loss", "naive_policy_loss",
           "naive_token_logps_entropy", "token_logps_entropy"]

# DEFAULT_CHUNK_SIZE (ktr.config): 512 x 151,936 x 4 B = 0.3 GB of float32 scratch. Large enough for full-speed
# matmuls; 1024 is as fast but misses the 1/8-of-naive memory goal at 4,096 tokens (scripts/bench_loss.py).
GradStrategy = Literal["grad-in-forward", "recompute"]
R = TypeVar("R")
_ROW_BLOCK = 32  # rows per exp block when the entropy is wanted (a [32, V] temporary)


# ---------------------------------------------------------------------------------------------------------
# Chunk kernel shared by every path.


class _Buffers:
    """Reused ``[chunk, V]`` scratch: fresh multi-GB allocations per chunk cost page faults on CPU."""

    def __init__(self, rows: int, vocab: int, cdtype: torch.dtype, device: torch.device):
        fdtype = torch.promote_types(cdtype, torch.float32)  # softmax maths: float32 (float64 kept)
        self.z = torch.empty(rows, vocab, dtype=fdtype, device=device)  # logits, then exp, then dlogits
        self._low = self.z if cdtype == fdtype else None
        self._cdtype = cdtype

    @property
    def low(self) -> Tensor:
        """Matmul output / low-precision dlogits; aliases z when the compute dtype is already z's. Allocated on
        first use: with float32 logits a pass without gradients never needs it."""
        if self._low is None:
            self._low = torch.empty(self.z.shape, dtype=self._cdtype, device=self.z.device)
        return self._low


def _logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float, buf: _Buffers,
            w32: Tensor | None = None, float32_logits: bool = False) -> Tensor:
    """Float32 ``[c, V]`` logits of ``h [c, H]`` in ``buf.z`` (``w [V, H]``, ``b [V]`` in compute dtype).

    ``float32_logits`` with a low-precision compute dtype: the product is rounded to float32 only
    (:func:`ktr.ops.mm_float32`, given ``w32``, a float32 copy of ``w``, where it would upcast ``w``)."""
    if float32_logits and low_precision(h.dtype):
        z = buf.z[: h.shape[0]]
        mm_float32(h, (w if w32 is None else w32).t(), out=z)
        if b is not None:
            z.add_(b.float())
    else:
        out = buf.low[: h.shape[0]]
        # addmm rounds once, like F.linear, instead of once for the product and once for the bias
        low = torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)  # [c, V]
        z = low if low.data_ptr() == buf.z.data_ptr() else buf.z[: h.shape[0]].copy_(low)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _chunk_forward(
    h: Tensor, run: _Chunked, y: Tensor, with_entropy: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """For ``h [c, H]`` and sampled ids ``y [c]``: log-prob ``[c]``, entropy ``[c]`` (or None),
    ``e = exp(z - max) [c, V]`` (in place of the logits in ``run.buf.z``), its row sums ``s [c]`` and the
    log-sum-exp ``[c]``."""
    z = run.logits(h)  # [c, V]
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
            eb = exp_shifted_(zb.clone())
            dot[r : r + _ROW_BLOCK] = torch.bmm(eb.unsqueeze(1), zb.unsqueeze(2)).view(-1)
            zb.copy_(eb)
    else:
        exp_shifted_(z)
    s = z.sum(dim=-1)  # [c]
    log_s = s.log()
    entropy = None if dot is None else log_s - dot / s  # H = log s - sum_v p_v z_v
    return z_y - log_s, entropy, z, s, row_max.squeeze(1) + log_s


def _backprop_chunk(dlogits: Tensor, h: Tensor, w: Tensor, buf: _Buffers, grads: dict, sl: slice) -> None:
    """Push float32 ``dlogits [c, V]`` (d loss / d projection output) into ``grads`` (h, w, b)."""
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


# ---------------------------------------------------------------------------------------------------------
# Autograd functions. Both take the selected hidden states h [M, H] (already in the compute dtype), the
# projection w [V, H] and bias [V] as given (cast inside), and sampled ids y [M].


class _Cfg(NamedTuple):
    chunk_size: int
    temperature: float
    with_entropy: bool
    cdtype: torch.dtype  # dtype of the projection matmuls
    needs: tuple[bool, bool, bool]  # grads wanted for (hidden, weight, bias)
    float32_logits: bool = False  # low-precision projection: round its output to float32 only (`_logits`)


class _Chunked:
    """Casts and scratch for one pass over ``h [M, H]``; ``grads`` holds float accumulators as needed."""

    def __init__(self, h: Tensor, w: Tensor, b: Tensor | None, cfg: _Cfg, with_grads: bool):
        self.cfg, self.dtypes = cfg, (h.dtype, w.dtype, None if b is None else b.dtype)
        self.w, self.b = w.detach().to(cfg.cdtype), None if b is None else b.detach().to(cfg.cdtype)
        # float32 logits where mm_float32 upcasts (off CUDA, or after its CUDA call failed): the weight upcast once
        # (exact) rather than per chunk
        upcasts = not h.is_cuda or CUDA_FLOAT32_OUT == [False]
        self.w32 = self.w.float() if cfg.float32_logits and low_precision(cfg.cdtype) and upcasts else None
        self.buf = _Buffers(min(cfg.chunk_size, h.shape[0]), w.shape[0], cfg.cdtype, h.device)
        self.slices = [slice(i, min(i + cfg.chunk_size, h.shape[0])) for i in range(0, h.shape[0], cfg.chunk_size)]
        acc = torch.promote_types(w.dtype, torch.float32)
        wanted = cfg.needs if with_grads else (False, False, False)
        like = {"h": (h.shape, h.dtype), "w": (w.shape, acc), "b": (w.shape[:1], acc)}
        self.grads = {k: torch.zeros(like[k][0], dtype=like[k][1], device=h.device)
                      for k, on in zip("hwb", wanted) if on}

    def logits(self, h: Tensor) -> Tensor:
        """Float32 ``[c, V]`` logits of the chunk ``h [c, H]``, in the reused buffer."""
        return _logits(h, self.w, self.b, self.cfg.temperature, self.buf, self.w32, self.cfg.float32_logits)

    def forward(self, h: Tensor, y: Tensor, on_chunk: Callable | None = None):
        """Log-probs, entropy and log-sum-exp, each ``[M]``; ``on_chunk(sl, logp, e, s)`` sees each softmax."""
        cfg = self.cfg
        logps = h.new_empty(h.shape[0], dtype=self.buf.z.dtype)  # [M]
        entropy = torch.empty_like(logps) if cfg.with_entropy else logps.new_empty(0)  # [M]
        lse = torch.empty_like(logps)  # [M]
        for sl in self.slices:
            logps[sl], ent, e, s, lse[sl] = _chunk_forward(h[sl], self, y[sl], cfg.with_entropy)
            if ent is not None:
                entropy[sl] = ent
            if on_chunk is not None:
                on_chunk(sl, logps[sl], e, s)
        return logps, entropy, lse

    def result(self, scale: Tensor | None = None) -> tuple:
        """``(grad_h, grad_w, grad_b)`` (None where not wanted) in the input dtypes."""
        out = []
        for key, dtype in zip("hwb", self.dtypes):
            g = self.grads.get(key)
            out.append(None if g is None else (g if scale is None else g.mul_(scale)).to(dtype))
        self.grads = {}  # in-place scaling above: a second backward must not reuse them
        return tuple(out)


class _LogpsEntropy(torch.autograd.Function):
    """Recompute strategy: forward keeps only the log-sum-exp ``[M]``; backward re-projects each chunk."""

    @staticmethod
    def forward(ctx, h, w, b, y, cfg: _Cfg):
        with torch.autocast(h.device.type, enabled=False):
            logps, entropy, lse = _Chunked(h, w, b, cfg, with_grads=False).forward(h, y)
        ctx.save_for_backward(h, w, b, y, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_entropy):
        h, w, b, y, lse = ctx.saved_tensors
        run = _Chunked(h, w, b, ctx.cfg, with_grads=True)
        temperature = ctx.cfg.temperature
        with torch.autocast(h.device.type, enabled=False):
            for sl in run.slices:
                g = grad_logps[sl].to(lse.dtype) / temperature  # [c]
                p = run.logits(h[sl]).sub_(lse[sl, None])  # [c, V]
                dlogits = mul_rows_(exp_shifted_(p), -g).scatter_add_(1, y[sl, None], g[:, None])  # g * (onehot - p)
                _backprop_chunk(dlogits, h[sl], run.w, run.buf, run.grads, sl)
        return *run.result(), None, None


class _FusedLoss(torch.autograd.Function):
    """Grad-in-forward strategy: each chunk's loss gradient is formed while its softmax is in memory."""

    @staticmethod
    def forward(ctx, h, w, b, y, loss_fn: _ChunkedPolicyLoss, cfg: _Cfg):
        run = _Chunked(h, w, b, cfg, with_grads=True)

        def backprop(sl: slice, logp: Tensor, e: Tensor, s: Tensor) -> None:
            coef = loss_fn.grad(logp, sl) / cfg.temperature  # [c] dL/dlogp, chained through 1/temperature
            dlogits = mul_rows_(e, -coef / s).scatter_add_(1, y[sl, None], coef[:, None])  # in place of e
            _backprop_chunk(dlogits, h[sl], run.w, run.buf, run.grads, sl)

        with torch.autocast(h.device.type, enabled=False):
            logps, entropy, _ = run.forward(h, y, backprop if run.grads else None)
            loss = loss_fn.value(logps)
        run.buf = run.w = run.b = run.w32 = None  # free scratch and casts; only the finished grads wait for backward
        ctx.run = run
        ctx.mark_non_differentiable(logps, entropy)
        return loss, logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logps, _grad_entropy):
        if ctx.run is None:
            raise RuntimeError("the fused policy loss can be back-propagated only once (no retain_graph reuse)")
        run, ctx.run = ctx.run, None
        return *run.result(grad_loss), None, None, None


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


def _prepare(hidden, weight, bias, tokens, mask, chunk_size, temperature, with_entropy, float32_logits=False):
    """Checks; selected rows ``h [M, H]`` (compute dtype, differentiable), ids ``y [M]``, flat positions
    of the selected tokens (None: all), and the chunk config."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"expected hidden [N, T, H] and weight [V, H], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if tokens.shape != hidden.shape[:2] or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`tokens` must be int [N, T]={tuple(hidden.shape[:2])}, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
        raise ValueError(f"`mask` must be bool [N, T]={tuple(tokens.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    h = hidden.reshape(-1, hidden.shape[-1])  # [N*T, H]
    y = tokens.reshape(-1).long()  # [N*T]
    pos = None
    if mask is not None:
        pos = mask.reshape(-1).nonzero().squeeze(1)  # [M]
        h, y = h.index_select(0, pos), y.index_select(0, pos)
    dev = hidden.device.type  # project in the dtype F.linear would use: autocast's if on, else the weight's
    h = h.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (h, weight, bias))
    return h, y, pos, _Cfg(chunk_size, float(temperature), with_entropy, h.dtype, needs, float32_logits)


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
    float32_logits: bool = False,
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
        float32_logits: with a low-precision projection (bf16, fp16), round its output to float32 only, not to
            the compute dtype first (:func:`ktr.ops.mm_float32`; ``policy.head_logits``). False: as ``F.linear``.
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
    h, y, pos, cfg = _prepare(hidden, weight, bias, tokens, mask, chunk_size, temperature, with_entropy,
                              float32_logits)
    logps, entropy = _LogpsEntropy.apply(h, weight, bias, y, cfg)  # [M], [M]
    shape = tuple(tokens.shape)
    return _scatter(logps, pos, shape), _scatter(entropy, pos, shape) if with_entropy else None


def _used_mask(mask: Tensor, loss_kwargs: dict) -> Tensor:
    """``[N, T]`` tokens whose log-prob the loss reads: ``mask``, plus ``kl_mask`` when the KL term is on."""
    kl_on = loss_kwargs.get("ref_logps") is not None and loss_kwargs.get("beta", 0.0) != 0
    kl_mask = loss_kwargs.get("kl_mask")
    return mask | kl_mask if kl_on and kl_mask is not None else mask


def _loss_grad_in_forward(hidden, weight, tokens, advantages, mask, bias, opts, loss_kwargs):
    h, y, pos, cfg = _prepare(hidden, weight, bias, tokens, _used_mask(mask, loss_kwargs), *opts)
    loss_fn = _ChunkedPolicyLoss(pos, tuple(tokens.shape), advantages, mask, loss_kwargs)
    loss, logps, entropy = _FusedLoss.apply(h, weight, bias, y, loss_fn, cfg)  # [], [M], [M]
    shape = tuple(tokens.shape)
    return loss, _scatter(logps, pos, shape), _scatter(entropy, pos, shape) if cfg.with_entropy else None


def _loss_recompute(hidden, weight, tokens, advantages, mask, bias, opts, loss_kwargs):
    chunk_size, temperature, with_entropy, float32_logits = opts
    logps, entropy = token_logps_entropy(hidden, weight, tokens, mask=_used_mask(mask, loss_kwargs), bias=bias,
                                         chunk_size=chunk_size, with_entropy=with_entropy, temperature=temperature,
                                         float32_logits=float32_logits)
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
    float32_logits: bool = False,
    **loss_kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`ktr.losses.policy_loss` from hidden states, never materialising ``[N, T, V]`` logits.

    Equal in value and in gradients w.r.t. ``hidden``, ``weight``, ``bias`` to
    ``policy_loss(naive_logps, advantages, mask, **loss_kwargs)`` up to rounding.

    Args:
        hidden: ``[N, T, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; tokens: ``[N, T]`` sampled ids;
            advantages: ``[N]`` or ``[N, T]``; mask: ``[N, T]`` bool tokens of the loss.
        chunk_size: tokens projected at a time. Extra memory: one float32 ``[chunk_size, V]`` buffer (plus a
            compute-dtype one under bf16) and a float32 ``[V, H]`` weight-gradient accumulator.
        temperature: logits are divided by it before the softmax.
        with_entropy: also return the entropy (it comes from the same softmax).
        strategy: ``"grad-in-forward"`` (3 matmuls per chunk; the backward only rescales the gradients
            made in forward, and can run once) or ``"recompute"`` (4 matmuls; keeps ``[M]`` floats).
        float32_logits: as in :func:`token_logps_entropy`.
        **loss_kwargs: for :func:`ktr.losses.policy_loss` (``ref_logps``, ``beta``, ``old_logps``,
            ``clip_low``, ``clip_high``, ``aggregation``, ``kl_mask``, ``num_sequences``, ``num_tokens``,
            ``max_len``, ``num_kl_tokens``, ``weights``, ``weight_norm``: float token weights on ``mask``).
    Returns:
        ``(loss, logps, entropy)``: scalar float32 loss; detached float32 ``[N, T]`` log-probs and entropy
        (None unless ``with_entropy``), computed on ``mask`` (``| kl_mask`` with the KL term), 0 elsewhere.
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {sorted(_STRATEGIES)}")
    opts = (chunk_size, temperature, with_entropy, float32_logits)
    return _STRATEGIES[strategy](hidden, weight, tokens, advantages, mask, bias, opts, loss_kwargs)


def naive_token_logps_entropy(
    hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Tensor | None = None, with_entropy: bool = True,
    temperature: float = 1.0, float32_logits: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Reference for :func:`token_logps_entropy` that materialises ``[N, T, V]`` logits (tests, benchmarks)."""
    logits = project_logits(hidden, weight, bias, float32_logits)  # [N, T, V]
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
                      with_entropy=False, float32_logits=False, **loss_kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reference for :func:`fused_policy_loss` (same arguments, no chunking)."""
    logps, entropy = naive_token_logps_entropy(hidden, weight, tokens, bias=bias, with_entropy=with_entropy,
                                               temperature=temperature, float32_logits=float32_logits)
    return policy_loss(logps, advantages, mask, **loss_kwargs), logps.detach(), entropy


def call_with_head(head: nn.Module, hidden: Tensor, fn: Callable[..., R]) -> R:
    """Run ``fn(hidden, head.weight, bias=head.bias)`` *as* ``head``'s forward and return its result.

    Going through ``head(...)`` fires the module's hooks. With FSDP2 (``fully_shard``) the pre-forward hook
    all-gathers the sharded weight, so ``fn`` sees the full ``[V, H]`` tensor, and the hooks on the outputs
    re-gather it for backward (if resharded) and reduce-scatter its gradient. (``head.unshard()`` and a
    direct call is not enough: when the head is FSDP's root nothing reduce-scatters its gradient.)
    Tensors bound into ``fn`` (e.g. with ``functools.partial``) bypass FSDP's input casting; only
    ``hidden`` is cast, as in a plain ``head(hidden)``.

    Example: ``loss, logps, _ = call_with_head(model.lm_head, hidden, partial(fused_policy_loss,
    tokens=ids, advantages=adv, mask=m))``.
    """
    if not isinstance(getattr(head, "weight", None), Tensor) or hasattr(head, "lora_A"):
        raise TypeError(f"call_with_head needs a plain linear head with `.weight`, got {type(head).__name__}")
    own = head.__dict__.get("forward")  # a forward some wrapper already patched onto the instance

    def forward(h: Tensor) -> R:
        return fn(h, head.weight, bias=getattr(head, "bias", None))

    head.forward = forward  # the instance attribute shadows the class's forward for this one call
    try:
        return head(hidden)
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward
