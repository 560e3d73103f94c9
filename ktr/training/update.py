"""The policy-gradient backward of one RL step: the masked (or weighted) loss of `ktr.losses.policy_loss`,
normalised over the whole batch, in micro-batches of rows (no Lightning: `backward` is the module's).

`LossInputs` holds what the loss reads per completion row and `LossTerms` what is the same for every
micro-batch (settings and the whole batch's denominators), so a micro-batch's loss sums to the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
from torch import Tensor, nn

from ktr import fused
from ktr.config import LossConfig
from ktr.model.forward import MicroBatches, PolicyPass, float32_logits, output_projection
from ktr.types import Rollout


@dataclass(frozen=True)
class LossInputs:
    """Per-row inputs of the loss; `rows` cuts a micro-batch."""

    tokens: Tensor  # [N, T] completion ids
    mask: Tensor  # [N, T] bool: the tokens carrying the loss (key tokens, or every valid token for GRPO)
    advantages: Tensor  # [N], or [N, T] with importance weights
    ref_logps: Tensor | None = None  # [N, T] (the KL term)
    weights: Tensor | None = None  # [N, T] float token weights on `mask` (soft key tokens, TW-GRPO)
    kl_mask: Tensor | None = None  # [N, T] bool: tokens carrying the KL term (None: `mask`, as released)

    def rows(self, rows: slice) -> LossInputs:
        return LossInputs(*(None if t is None else t[rows] for t in (getattr(self, f.name) for f in fields(self))))


@dataclass(frozen=True)
class LossTerms:
    """Settings and whole-batch denominators of `ktr.losses.policy_loss`, the same for every micro-batch."""

    beta: float
    clip_low: float
    clip_high: float
    aggregation: str
    num_sequences: int | Tensor  # the whole batch's rows ([] float under `across_ranks`)
    num_tokens: Tensor  # [] tokens (or summed weights) of the whole batch's `mask`
    max_len: int
    weight_norm: str | None = None  # with weights: "weights" (sums of weights) or "mask" (counts)
    num_kl_tokens: Tensor | None = None  # [] with a separate `kl_mask`

    @classmethod
    def of(cls, cfg: LossConfig, inputs: LossInputs, weight_norm: str = "weights") -> LossTerms:
        """The terms of `inputs`, this rank's batch; over the whole process group under `loss.normalize: global`."""
        weighted = inputs.weights is not None and weight_norm == "weights"
        n, t = inputs.tokens.shape
        terms = cls(beta=cfg.beta if inputs.ref_logps is not None else 0.0, clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, aggregation=cfg.aggregation, num_sequences=n,
                    num_tokens=inputs.weights.masked_fill(~inputs.mask, 0.0).sum() if weighted else inputs.mask.sum(),
                    max_len=t, weight_norm=weight_norm if inputs.weights is not None else None,
                    num_kl_tokens=inputs.kl_mask.sum() if inputs.kl_mask is not None else None)
        return terms.across_ranks() if cfg.normalize == "global" else terms

    def across_ranks(self) -> LossTerms:
        """These terms with the whole process group's denominators: every count summed over the ranks and divided
        by their number, the longest `max_len`. DDP and FSDP average the ranks' gradients, so each rank's loss then
        contributes its share of one loss over all ranks' completions, as if one process held them all (TRL
        normalises its DAPO loss the same way). Every rank must call it, as every rank reaches the update
        (`ktr.training.base`: a step runs on all ranks or on none). Unchanged without a process group of 2+."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        world = dist.get_world_size()
        device = torch.device("cpu") if dist.get_backend() == "gloo" else self.num_tokens.device
        kl = self.num_kl_tokens
        counts = torch.stack([torch.as_tensor(self.num_sequences, dtype=torch.float64, device=device),
                              self.num_tokens.to(device, torch.float64),
                              (kl if kl is not None else self.num_tokens).to(device, torch.float64)])  # [3]
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        longest = torch.tensor([self.max_len], dtype=torch.int64, device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        share = (counts / world).to(self.num_tokens.device)  # [3]
        return replace(self, num_sequences=share[0], num_tokens=share[1], max_len=int(longest.item()),
                       num_kl_tokens=share[2] if kl is not None else None)

    def kwargs(self) -> dict:
        """The keyword arguments of `ktr.losses.policy_loss` these terms set (unset ones left to its defaults)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def loss_inputs(rollout: Rollout, scored: PolicyPass, mask: Tensor, advantages: Tensor, cfg: LossConfig,
                weights: Tensor | None = None) -> LossInputs:
    """The loss's inputs for `rollout`'s completions under `mask` `[N, T]` and `advantages`."""
    kl_mask = rollout.completion_mask if cfg.kl_on == "valid" else None
    return LossInputs(rollout.completion_ids, mask, advantages, scored.ref_logps, weights, kl_mask)


def loss_backward(model: nn.Module, hidden: Tensor, inputs: LossInputs, terms: LossTerms, chunk_size: int | None,
                  backward: Callable[[Tensor], None]) -> Tensor:
    """Loss of one micro-batch from its hidden states `[n, T, H]`, backpropagated; returns it detached."""
    kw = terms.kwargs()
    kw.update(ref_logps=inputs.ref_logps)
    kw.update({k: v for k, v in (("weights", inputs.weights), ("kl_mask", inputs.kl_mask)) if v is not None})
    kw.update(float32_logits=float32_logits(model))  # as the scoring passes (`policy.head_logits`)
    if chunk_size is None:
        fn = partial(fused.naive_policy_loss, tokens=inputs.tokens, advantages=inputs.advantages, mask=inputs.mask,
                     **kw)
    else:
        fn = partial(fused.fused_policy_loss, tokens=inputs.tokens, advantages=inputs.advantages, mask=inputs.mask,
                     chunk_size=chunk_size, **kw)
    loss, _, _ = fused.call_with_head(output_projection(model), hidden, fn)
    backward(loss)
    return loss.detach()


def policy_update(model: nn.Module, scored: PolicyPass, inputs: LossInputs, terms: LossTerms,
                  chunk_size: int | None, micro_batch_size: int | None, backward: Callable[[Tensor], None]) -> Tensor:
    """Backward of the whole batch's loss: from `scored.hidden` when it was kept with grad (one micro-batch), else
    recomputing the hidden states per micro-batch of rows (`ktr.model.forward.MicroBatches`: each prompt once) with
    the vision features as a leaf, then one backward through the vision tower for all of them. Returns the summed
    loss, detached."""
    if scored.hidden is not None:
        return loss_backward(model, scored.hidden, inputs, terms, chunk_size, backward)
    n, t = inputs.tokens.shape
    leaf = scored.features.detached()
    total = torch.zeros((), device=inputs.tokens.device)
    micro = MicroBatches(model, scored.view, leaf, t, micro_batch_size)  # each prompt once (split attention)
    for rows, hidden in micro:
        total = total + loss_backward(model, hidden, inputs.rows(rows), terms, chunk_size, backward)
    micro.finish()  # the prompts' pass, before the vision tower's (its features are `leaf`)
    grads = [(f, lf.grad) for f, lf in zip(scored.features.tensors(), leaf.tensors()) if lf.grad is not None]
    if grads:  # the vision tower trains: one backward through it for all micro-batches
        torch.autograd.backward([f for f, _ in grads], [g for _, g in grads])
    return total
