"""One probe score from the policy pass and a perturbed pass (layer L2): `logp_diff` or a distribution distance.

`logp_diff` needs only the two passes' log-probs of the sampled tokens. The distribution scores of
`ktr.probes.scores` need the policy pass's final hidden states as well (`base_hidden`), which `attribute`
passes only when such a score is configured, so the released setting costs nothing extra.
"""

from __future__ import annotations

from torch import Tensor, nn

from ktr.model.forward import completion_logps, float32_logits, output_projection
from ktr.probes.scores import SCORE_FUNCTIONS, distribution_scores, naive_distribution_scores


def compare_passes(model: nn.Module, score: str, base_logps: Tensor, base_hidden: Tensor | None, hidden: Tensor,
                   completion_ids: Tensor, valid: Tensor, chunk_size: int | None) -> Tensor:
    """`[N, T]` score of the perturbed pass `hidden` `[N, T, H]` against the policy pass (0 outside `valid`).

    `base_logps` `[N, T]` are the policy pass's log-probs; `base_hidden` `[N, T, H]` its hidden states (needed
    for every score but `logp_diff`). Under FSDP2 the projection runs through `ktr.fused.call_with_head`.
    """
    from ktr import fused

    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown score {score!r}; valid: {list(SCORE_FUNCTIONS)}")
    if score == "logp_diff":
        logps, _ = completion_logps(model, hidden, completion_ids, valid, chunk_size)
        return (base_logps - logps).masked_fill(~valid, 0.0)
    if base_hidden is None:
        raise ValueError(f"score {score!r} compares full distributions and needs the policy pass's hidden states "
                         "(`base_hidden`)")
    head, f32 = output_projection(model), float32_logits(model)
    if chunk_size is None:
        return naive_distribution_scores(base_hidden, hidden, head.weight, valid, score, bias=head.bias,
                                         float32_logits=f32)

    def fn(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return distribution_scores(h, hidden, weight, valid, score, bias=bias, chunk_size=chunk_size,
                                   float32_logits=f32)

    return fused.call_with_head(head, base_hidden, fn)
