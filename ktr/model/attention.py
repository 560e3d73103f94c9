"""Split attention over the packed shared-prefix row, registered with transformers' `AttentionInterface` (layer L2).

`ktr.model.prefix.pack_split` lays every group of a pass out in one row, its prompt's visible tokens then its
completions, and describes it with a `SplitLayout`. Each decoder layer then computes, per group,

- the prompt's causal self-attention, once;
- each completion against `[prompt K/V; its own K/V]`, causal and aligned at the lower right (query j of the
  completion sees the whole prompt and the completion's keys 0..j), all completions of the group in one call.

These are exactly the keys and values each token sees in the naive layout (one row per completion), so the result
equals it by construction, with no `[W, W]` mask and no pair computed twice. Autograd sums the prompt K/V gradients
over the completions (the `expand` in `_completions`), so gradient checkpointing (the layout travels in the layer's
keyword arguments and is there again at recomputation), FSDP2, LoRA/QLoRA and the chunked output projection need
nothing special.

Micro-batches (`ktr.model.forward.MicroBatches`): a layout may carry a `PromptCache`. A prompts-only pass records
each group's prompt keys and values at every layer; the micro-batches' passes hold completions only
(`SplitGroup.cached`) and read them from the cache as leaves, whose gradients go back through the prompts' pass once.

How every layer of every family gets it: `install()` wraps the `sdpa` (and flash-attention) entries of
transformers' global `AttentionInterface`; the wrapper computes split attention when the layer's keyword arguments
carry a layout (`SPLIT_KWARG`, passed to the decoder trunk by `ktr.model.forward.decoder_hidden`) and otherwise
calls the wrapped function unchanged (rollouts, the vision tower, other models in the process). Qwen2-VL,
Qwen2.5-VL and Qwen3-VL (whose deepstack merge is outside attention) all look their attention up there at every
call. The mask handed to the trunk with a layout is an empty `[1, 1, 0, 0]` tensor (`split_marker`): the models
pass a 4D mask through unchanged, and any attention that does not know the layout (eager) fails on it loudly
instead of attending everywhere.

Kernels: `split_sdpa` (PyTorch SDPA: `is_causal` for the prompt, `causal_lower_right` for the completions: on a GPU
the flash kernel's own lower-right causal mode; on a CPU a `[T, L + T]` mask, so the T x T block is computed whole
there, the one excess over the needed pairs) and `split_varlen` (two `flash_attn_varlen_func` calls, `causal=True`,
which flash-attention >= 2.1 aligns at the lower right when queries are fewer than keys; its index bookkeeping is
tested on CPU through `varlen_reference`, the kernel by the GPU check's `prefix` part).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ktr.model.prefix import SplitLayout

SPLIT_KWARG = "ktr_split_layout"
SPLIT_SDPA = ("sdpa",)  # implementations whose wrapper computes split attention with SDPA
SPLIT_FLASH = ("flash_attention_2",)  # ... with flash_attn_varlen_func (flash-attention 2)


def split_marker(device: torch.device | str) -> Tensor:
    """The attention mask handed to the decoder trunk with a layout: 4D (returned as-is by transformers' mask
    builders) and empty (an attention that ignores the layout fails on it)."""
    return torch.ones(1, 1, 0, 0, dtype=torch.bool, device=device)


def _check(query: Tensor, key: Tensor, layout: SplitLayout, sliding_window) -> None:
    if query.shape[0] != 1 or query.shape[2] != layout.width or key.shape[2] != layout.width:
        raise ValueError(f"split attention expects one packed row of {layout.width} tokens, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if sliding_window is not None:
        raise NotImplementedError("split attention has no sliding window; use loss.shared_prefix: false")


def _completions(q: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor, dropout: float,
                 scale: float | None) -> Tensor:
    """`[n, H, T, D]`: completion queries `q` against `[prompt K/V (kp, vp: [1, H_kv, L, D]); own K/V (kc, vc:
    [n, H_kv, T, D])]`, lower-right causal."""
    from torch.nn.attention.bias import causal_lower_right

    n, h, t, _ = q.shape
    k = torch.cat([kp.expand(n, -1, -1, -1), kc], 2)  # [n, H_kv, L + T, D]
    v = torch.cat([vp.expand(n, -1, -1, -1), vc], 2)
    gqa = h != k.shape[1]
    if gqa and q.device.type != "cpu":  # a GPU's lower-right flash kernel is reached without `enable_gqa`
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, k.shape[2]), dropout_p=dropout,
                                          scale=scale, enable_gqa=gqa)


class PromptCache:
    """Each group's prompt keys and values at every layer, recorded by one prompts-only pass (`record`), served to
    the micro-batch passes of its completions as leaves (`freeze`, `get`), whose gradients then go back through the
    prompts' pass once (`gradients`). Exact: each completion sees the same keys and values as in one pass."""

    def __init__(self) -> None:
        self.recorded: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.leaves: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.frozen = False

    def record(self, layer: int, group: int, key: Tensor, value: Tensor) -> None:
        if not self.frozen:  # (gradient checkpointing recomputes the prompts' pass in its backward: nothing to keep)
            self.recorded[(layer, group)] = (key, value)

    def freeze(self) -> None:
        self.frozen = True
        self.leaves = {i: tuple(x.detach().requires_grad_(x.requires_grad) for x in kv)
                       for i, kv in self.recorded.items()}

    def get(self, layer: int, group: int) -> tuple[Tensor, Tensor]:
        return self.leaves[(layer, group)]

    def gradients(self) -> tuple[list[Tensor], list[Tensor]]:
        """The recorded tensors whose leaves received a gradient, and those gradients."""
        pairs = [(x, leaf.grad) for i, kv in self.recorded.items() for x, leaf in zip(kv, self.leaves[i])
                 if leaf.grad is not None]
        return [x for x, _ in pairs], [g for _, g in pairs]


def _segments(layout: SplitLayout) -> list[int]:
    """Lengths of the row's consecutive segments: per group its prompt, then its completions."""
    out = []
    for g in layout.groups:
        out += [g.prompt, g.completions * g.length]
    return out


def split_sdpa(module: nn.Module | None, query: Tensor, key: Tensor, value: Tensor, layout: SplitLayout,
               dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
               **_) -> tuple[Tensor, None]:
    """Split attention with SDPA. `query` `[1, H, W, D]`, `key`/`value` `[1, H_kv, W, D]` (grouped-query heads
    native) -> `([1, W, H, D], None)`, transformers' attention-function contract. With a `layout.cache`, a group's
    prompt keys and values are recorded there (a prompts pass) or read from it (`SplitGroup.cached`)."""
    _check(query, key, layout, sliding_window)
    gqa = query.shape[1] != key.shape[1]
    cache = layout.cache
    sizes = _segments(layout)
    qs, ks, vs = (x.split(sizes, 2) for x in (query, key, value))  # one backward (a cat) for all segments
    out = []
    for i, g in enumerate(layout.groups):
        if g.cached >= 0:
            kp, vp = cache.get(module.layer_idx, g.cached)
        else:
            qp, kp, vp = qs[2 * i], ks[2 * i], vs[2 * i]  # [1, H(_kv), L, D]
            out.append(F.scaled_dot_product_attention(qp, kp, vp, dropout_p=dropout, is_causal=True, scale=scaling,
                                                      enable_gqa=gqa).squeeze(0))  # [H, L, D]
            if cache is not None:
                cache.record(module.layer_idx, i, kp, vp)
        if g.completions == 0:
            continue
        shape = (g.completions, g.length)  # [1, H, n*T, D] -> [n, H, T, D]
        qc, kc, vc = (x[2 * i + 1].squeeze(0).unflatten(1, shape).transpose(0, 1) for x in (qs, ks, vs))
        oc = _completions(qc, kp, vp, kc, vc, dropout, scaling)  # [n, H, T, D]
        out.append(oc.transpose(0, 1).flatten(1, 2))  # [H, n*T, D]
    return torch.cat(out, 1).transpose(0, 1).unsqueeze(0), None


@lru_cache(maxsize=8)
def varlen_indices(layout: SplitLayout, device: torch.device) -> dict[str, Tensor | int]:
    """Index tensors of `split_varlen`: the prompts' positions (`prompt_pos`, `cu_prompt`), the completions'
    (`comp_pos`, `cu_q`: T each) and their keys `[prompt; own]` (`kv_pos`, `cu_k`), the maximal lengths, and
    `inverse`, which puts `[prompt outputs; completion outputs]` back in row order."""
    prompt_pos, comp_pos, kv_pos, cu_p, cu_q, cu_k = [], [], [], [0], [0], [0]
    for g in layout.groups:
        c = g.start + g.prompt
        prompt = torch.arange(g.start, c)
        prompt_pos.append(prompt)
        cu_p.append(cu_p[-1] + g.prompt)
        for m in range(g.completions):
            own = torch.arange(c + m * g.length, c + (m + 1) * g.length)
            comp_pos.append(own)
            kv_pos.append(torch.cat([prompt, own]))
            cu_q.append(cu_q[-1] + g.length)
            cu_k.append(cu_k[-1] + g.prompt + g.length)
    prompt_pos, comp_pos = torch.cat(prompt_pos), torch.cat(comp_pos or [torch.zeros(0, dtype=torch.long)])
    order = torch.cat([prompt_pos, comp_pos])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    def dev(x: list[int] | Tensor, dtype=torch.long) -> Tensor:
        return torch.as_tensor(x, dtype=dtype).to(device)

    return dict(prompt_pos=dev(prompt_pos), comp_pos=dev(comp_pos),
                kv_pos=dev(torch.cat(kv_pos) if kv_pos else torch.zeros(0, dtype=torch.long)),
                cu_prompt=dev(cu_p, torch.int32), cu_q=dev(cu_q, torch.int32), cu_k=dev(cu_k, torch.int32),
                max_prompt=max(g.prompt for g in layout.groups),
                max_q=max([g.length for g in layout.groups if g.completions] or [0]),
                max_k=max([g.prompt + g.length for g in layout.groups if g.completions] or [0]),
                inverse=dev(inverse))


VarlenFn = Callable[..., Tensor]  # flash_attn_varlen_func's signature (q, k, v, cu_q, cu_k, max_q, max_k, ...)


def split_varlen(module: nn.Module | None, query: Tensor, key: Tensor, value: Tensor, layout: SplitLayout,
                 dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                 varlen_fn: VarlenFn | None = None, **_) -> tuple[Tensor, None]:
    """Split attention with two variable-length calls (`varlen_fn`, default `flash_attn_varlen_func`): the prompts
    causal, and the completions (T queries each) against their `[prompt; own]` keys, `causal=True` aligned at the
    lower right. Grouped-query heads are native. Same contract as `split_sdpa`."""
    _check(query, key, layout, sliding_window)
    if layout.cache is not None:
        raise NotImplementedError("cached prompts take split_sdpa (`ktr.model.forward.MicroBatches`)")
    if varlen_fn is None:
        from flash_attn import flash_attn_varlen_func as varlen_fn
    ix = varlen_indices(layout, query.device)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [W, H, D]
    kw = dict(dropout_p=dropout, softmax_scale=scaling, causal=True)
    qp, kp, vp = (x.index_select(0, ix["prompt_pos"]) for x in (q, k, v))
    out = [varlen_fn(qp, kp, vp, ix["cu_prompt"], ix["cu_prompt"], ix["max_prompt"], ix["max_prompt"], **kw)]
    if ix["comp_pos"].numel():
        kc, vc = (x.index_select(0, ix["kv_pos"]) for x in (k, v))
        out.append(varlen_fn(q.index_select(0, ix["comp_pos"]), kc, vc, ix["cu_q"], ix["cu_k"], ix["max_q"],
                             ix["max_k"], **kw))
    return torch.cat(out).index_select(0, ix["inverse"]).unsqueeze(0), None  # [1, W, H, D]


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                     dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = True) -> Tensor:
    """`flash_attn_varlen_func`'s semantics with SDPA, one sequence at a time (lower-right causal): `split_varlen`'s
    index bookkeeping is tested on machines without flash-attention."""
    from torch.nn.attention.bias import causal_lower_right

    out = []
    for i in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qi, ki, vi = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
        if ki.shape[0] != qi.shape[0]:
            rep = qi.shape[0] // ki.shape[0]
            ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
        mask = causal_lower_right(b - a, d - c) if causal else None
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout_p,
                                                  scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


@lru_cache(maxsize=1)
def flash_available() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA (undefined symbols)
        return False
    return True


SPLITTERS: dict[str, Callable] = {"sdpa": split_sdpa, "varlen": split_varlen}
"""The split kernels the wrappers call, looked up at each call (a test swaps in a leaking one)."""


def _wrap(inner: Callable, kernel: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        layout = kwargs.pop(SPLIT_KWARG, None)
        if layout is None:
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.numel():
            raise ValueError("split attention takes its layout instead of a mask")
        return SPLITTERS[kernel](module, query, key, value, layout, *args, **kwargs)

    attention.ktr_wrapped = inner
    attention.__name__ = f"ktr_split_{getattr(inner, '__name__', 'attention')}"
    return attention


def install() -> None:
    """Wrap transformers' SDPA and flash-attention entries once (idempotent; calls without a layout unchanged)."""
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    for names, kernel in ((SPLIT_SDPA, "sdpa"), (SPLIT_FLASH, "varlen")):
        for name in names:
            current = mapping.get(name)
            if current is not None and not hasattr(current, "ktr_wrapped"):
                AttentionInterface.register(name, _wrap(current, kernel))


def splits(implementation: str) -> bool:
    """Whether the model's attention implementation computes split attention (flash only when importable)."""
    return implementation in SPLIT_SDPA or (implementation in SPLIT_FLASH and flash_available())
