"""Shared prompt prefix for the scoring passes: each prompt is run once per group, not G times (layer L1).

The naive layout runs the decoder on N = B*G rows of L + T tokens, so every pass computes each prompt G
times. Here the rows of one group are packed into one row, the prompt once followed by the G completions:

    [ prompt (L, left-padded) | completion 1 (T) | completion 2 (T) | ... | completion G (T) ]

with a 4D attention mask: prompt tokens attend causally to the prompt's visible tokens (as in the naive
layout); a token of completion g attends to the prompt's visible tokens and to the earlier visible tokens of
completion g only. Every token keeps its naive 3D rotary position (the prompt's from the group's first row,
completion g's from row g), so each completion sees exactly the keys and values it sees in the naive layout
and log-probs and gradients are equal up to floating-point rounding. The decoder processes
B*L + N*T tokens instead of N*(L + T).

This is one ordinary forward over B packed rows (no key/value cache is threaded through the model), so
gradient checkpointing, FSDP2 sharding, LoRA/QLoRA and the chunked output projection see a plain forward
and need nothing special, and the gradient of the prompt flows back through its own forward once per
micro-batch. The attention itself is computed densely over the packed row (masked pairs are computed and
discarded), so its cost grows as (L + G*T)^2 per group rather than G*(L + T)^2; the projections and MLPs,
which dominate at the released lengths, run once per prompt token. Attention implementations that cannot
take a 4D mask (flash-attention) use the naive layout.

A pass shares only when the rows of each group have identical prompt parts (ids, mask, positions, zeroed
vision): true for the policy, reference, temporal and the `attention_mask`/`zero_embeddings` visual probes;
`random_half` hides a different half per row and so runs naive. Micro-batches that split a group pack each
part with its own copy of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHARED_ATTENTION = ("sdpa", "eager")  # implementations that accept a custom 4D attention mask


@dataclass
class PackedRows:
    """B' packed rows of width W = L + K*T (K = largest group in the view) and how to read the N rows back."""

    input_ids: Tensor  # [B', W]
    mm_token_type_ids: Tensor  # [B', W]
    position_ids: Tensor  # [3, B', W]
    attention_mask: Tensor  # [B', 1, W, W] bool, True = attend
    prompt_index: Tensor  # [B'] the prompt of each packed row
    zero_vision: Tensor | None  # [B', W] bool or None
    gather: Tensor  # [N, T] long: flat index into [B' * W] of the hidden state predicting each completion token

    @property
    def tokens(self) -> int:
        """Positions the decoder runs on (padding of the packed layout included)."""
        return self.input_ids.numel()


def group_runs(prompt_index: Tensor) -> tuple[Tensor, Tensor]:
    """Start row `[B']` and size `[B']` of each run of consecutive rows with the same prompt."""
    n = prompt_index.shape[0]
    change = torch.ones(n, dtype=torch.bool, device=prompt_index.device)
    change[1:] = prompt_index[1:] != prompt_index[:-1]
    starts = change.nonzero().flatten()  # [B']
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    return starts, ends - starts


Runs = tuple[Tensor, Tensor]  # (start row [B'], size [B']) of each run, from `group_runs`


def prompts_shared(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
                   zero_vision: Tensor | None, runs: Runs, prompt_length: int) -> bool:
    """Whether every row's prompt part (first `prompt_length` tokens) equals its run's first row's."""
    starts, sizes = runs
    first = torch.repeat_interleave(starts, sizes)  # [N] first row of each row's run
    p = prompt_length
    same = [(t[:, :p] == t[first, :p]).all() for t in (input_ids, attention_mask, mm_token_type_ids)]
    same.append((position_ids[:, :, :p] == position_ids[:, first, :p]).all())
    if zero_vision is not None:
        same.append((zero_vision[:, :p] == zero_vision[first, :p]).all())
    return bool(torch.stack(same).all())


def pack_groups(input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor, position_ids: Tensor,
                zero_vision: Tensor | None, prompt_index: Tensor, runs: Runs, completion_length: int) -> PackedRows:
    """Pack N rows `[N, S]` (S = L + T; prompt parts equal within each of the `runs`, see `prompts_shared`) into
    B' rows."""
    n, s = input_ids.shape
    t = completion_length
    p = s - t
    starts, sizes = runs
    b, k = starts.shape[0], int(sizes.max())
    w = p + k * t
    dev = input_ids.device
    member = torch.arange(n, device=dev) - torch.repeat_interleave(starts, sizes)  # [N] place in its run
    run = torch.repeat_interleave(torch.arange(b, device=dev), sizes)  # [N] packed row of each row

    def pack(x: Tensor, fill) -> Tensor:  # x [N, S, ...] -> [B', W, ...]
        out = x.new_full((b, w) + x.shape[2:], fill)
        out[:, :p] = x[starts, :p]
        seg = out[:, p:].view((b, k, t) + x.shape[2:])
        seg[run, member] = x[:, p:]
        return out

    visible = pack(attention_mask.bool(), False)  # [B', W] keys that may be attended to
    segment = torch.full((w,), -1, dtype=torch.long, device=dev)  # -1: prompt; g: completion g
    segment[p:] = torch.arange(k, device=dev).repeat_interleave(t)
    pos = torch.arange(w, device=dev)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [W(q), W(k)]
    same_seg = (segment.unsqueeze(0) == -1) | (segment.unsqueeze(0) == segment.unsqueeze(1))
    allowed = (causal & same_seg).unsqueeze(0) & visible.unsqueeze(1)  # [B', W, W]
    allowed |= torch.eye(w, dtype=torch.bool, device=dev)  # every query sees itself: no empty rows, no NaN
    packed_pos = position_ids.new_zeros((3, b, w))
    packed_pos[:, :, :p] = position_ids[:, starts, :p]
    packed_pos[:, :, p:].view(3, b, k, t)[:, run, member] = position_ids[:, :, p:]
    # completion token j is predicted at the prompt's last position (j = 0) or at completion position j - 1
    j = torch.arange(t, device=dev)
    col = torch.where(j == 0, p - 1, p + member.unsqueeze(1) * t + j - 1)  # [N, T]
    return PackedRows(input_ids=pack(input_ids, 0), mm_token_type_ids=pack(mm_token_type_ids, 0),
                      position_ids=packed_pos, attention_mask=allowed.unsqueeze(1),
                      prompt_index=prompt_index[starts],
                      zero_vision=None if zero_vision is None else pack(zero_vision, False),
                      gather=run.unsqueeze(1) * w + col)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as the additive float mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
