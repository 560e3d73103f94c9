"""Key-token attribution: run the enabled probes, select per signal, combine (layer L2, docs/method.md sections 1-2)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ktr.config import DEFAULT_CHUNK_SIZE, KeyTokenConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.forward import PolicyPass
from ktr.probes.select import (above_thresholds, combine_masks, context_representatives, random_same_count,
                               scope_thresholds)
from ktr.probes.temporal import temporal_scores
from ktr.probes.visual import PER_ROW_PERTURBATIONS, visual_scores
from ktr.types import PromptBatch, Rollout


@dataclass
class KeyTokens:
    """The key-token mask `M` and what produced it."""

    mask: Tensor  # [N, T] bool
    masks: dict[str, Tensor]  # signal -> [N, T] bool
    scores: dict[str, Tensor]  # signal -> [N, T] float (0 outside valid)
    weights: Tensor | None = None  # [N, T] float soft weights (key_tokens.weighting != hard; `mask` is then valid)
    thresholds: dict[str, Tensor] = field(default_factory=dict)  # signal -> [N] its pool's threshold (NaN: empty)


def select_key_tokens(scores: dict[str, Tensor], valid: Tensor, video_rows: Tensor, cfg: KeyTokenConfig,
                      group_size: int) -> KeyTokens:
    """Threshold each signal at its quantile within the pool and combine.

    `valid` `[N, T]` bool, `video_rows` `[N]` bool. The temporal signal pools only video rows' tokens; image rows
    combine visual and entropy only.
    """
    masks: dict[str, Tensor] = {}
    thresholds: dict[str, Tensor] = {}
    for name, s in scores.items():
        eligible = valid & video_rows.unsqueeze(-1) if name == "temporal" else valid
        thresholds[name] = scope_thresholds(s, eligible, getattr(cfg, name).ratio, cfg.scope, group_size)  # [N]
        masks[name] = above_thresholds(s, eligible, thresholds[name])  # one quantile per pool, shown by reports
    if cfg.combine == "union" or "temporal" not in masks or len(masks) == 1:
        mask = combine_masks(list(masks.values()), cfg.combine)
    else:  # intersection: image rows have no temporal signal, intersect the others there
        others = combine_masks([m for k, m in masks.items() if k != "temporal"], "intersection")
        mask = torch.where(video_rows.unsqueeze(-1), others & masks["temporal"], others)
    if cfg.weighting != "hard":
        return replace(soft_key_tokens(scores, masks, valid, video_rows, cfg, group_size), thresholds=thresholds)
    return KeyTokens(mask=mask & valid, masks=masks, scores=scores, thresholds=thresholds)


def soft_key_tokens(scores: dict[str, Tensor], masks: dict[str, Tensor], valid: Tensor, video_rows: Tensor,
                    cfg: KeyTokenConfig, group_size: int) -> KeyTokens:
    """Soft weights per signal (`ktr.probes.weighting`), combined; `mask` is `valid` (every token is weighted)."""
    from ktr.probes.weighting import combine_weights, rank_weights

    ws, elig = [], []
    for name, s in scores.items():
        eligible = valid & video_rows.unsqueeze(-1) if name == "temporal" else valid
        ws.append(rank_weights(s, eligible, cfg.weighting, cfg.scope, group_size, cfg.soft_k, cfg.soft_gamma))
        elig.append(eligible & torch.isfinite(s))
    weights = combine_weights(ws, elig, cfg.weight_combine)
    return KeyTokens(mask=valid.clone(), masks=masks, scores=scores, weights=weights.masked_fill(~valid, 0.0))


@torch.no_grad()
def attribute(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch, rollout: Rollout,
              scored: PolicyPass, cfg: KeyTokenConfig, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> KeyTokens:
    """Run the enabled probes on the current policy and return the key tokens of `rollout`'s completions.

    `scored` is the policy pass already made: its `logps` and `entropy` `[N, T]`, the vision features (reused
    detached: the probes never backpropagate) and, for distribution scores (`cfg.needs_base_hidden`), its
    detached hidden states `base_hidden` `[N, T, H]`. The visual probe adds one decoder pass (no vision call),
    the temporal probe one vision call and one decoder pass, each per draw (`draws`).
    """
    completion_ids, valid, group_size = rollout.completion_ids, rollout.completion_mask, rollout.group_size
    view, features, base_logps = scored.view, scored.features.detached(leaves=False), scored.logps
    entropy, base_hidden = scored.entropy, scored.base_hidden
    if not cfg.enabled:
        return KeyTokens(mask=valid.clone(), masks={}, scores={})
    scores: dict[str, Tensor] = {}
    if cfg.visual.enabled:
        scores["visual"] = visual_scores(model, batch, view, features, completion_ids, valid, base_logps,
                                         cfg.visual_perturbation, chunk_size, score=cfg.visual.score,
                                         base_hidden=base_hidden, draws=cfg.visual.draws, hidden=cfg.visual_hidden)
    if cfg.temporal.enabled:
        scores["temporal"] = temporal_scores(model, processor, batch, view, features, completion_ids, valid,
                                             base_logps, cfg.temporal_perturbation, chunk_size,
                                             score=cfg.temporal.score, base_hidden=base_hidden,
                                             draws=cfg.temporal.draws)
    if cfg.entropy.enabled:
        if entropy is None:
            raise ValueError("the entropy signal needs the policy pass's entropy")
        scores["entropy"] = entropy.masked_fill(~valid, 0.0)
    if cfg.tie_contexts:
        scores = tie_contexts(scores, completion_ids, valid, view.prompt_index, cfg)
    key = select_key_tokens(scores, valid, batch.is_video[view.prompt_index], cfg, group_size)
    if cfg.random:  # the control: same count per group, random tokens
        key = replace(key, mask=random_same_count(key.mask, valid, group_size))
    return key


def tie_contexts(scores: dict[str, Tensor], completion_ids: Tensor, valid: Tensor, prompt_index: Tensor,
                 cfg: KeyTokenConfig) -> dict[str, Tensor]:
    """Each signal's `[N, T]` scores with the tokens of one context tied (`ktr.probes.select.tie_equal_contexts`).
    `logp_diff` scores depend on the token itself; entropy and distribution distances only on what precedes it.
    The representatives are computed once per kind of context and shared by the signals."""
    representatives: dict[bool, Tensor] = {}
    out = {}
    for name, s in scores.items():
        if name == "visual" and cfg.visual_perturbation in PER_ROW_PERTURBATIONS:
            out[name] = s
            continue
        own_token = name != "entropy" and getattr(cfg, name).score == "logp_diff"
        if own_token not in representatives:
            representatives[own_token] = context_representatives(completion_ids, valid, prompt_index, own_token)
        out[name] = s.gather(0, representatives[own_token])
    return out


@torch.no_grad()
def key_token_stats(kt: KeyTokens, valid: Tensor) -> dict[str, Tensor]:
    """Fractions of valid tokens selected per signal and in `M`, pairwise overlaps (|a & b| / valid), mean scores.

    With soft weights every valid token is in `M` (`frac_key` is 1); `weight_mean` is then the mean token weight,
    the soft counterpart of the key fraction."""
    n = valid.sum().clamp(min=1).float()
    out = {"frac_key": (kt.mask & valid).sum() / n}
    if kt.weights is not None:
        out["weight_mean"] = kt.weights[valid].float().mean() if valid.any() else torch.zeros(())
    for name, m in kt.masks.items():
        out[f"frac_{name}"] = (m & valid).sum() / n
        out[f"score_{name}"] = kt.scores[name][valid].float().mean() if valid.any() else torch.zeros(())
    names = sorted(kt.masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"overlap_{a}_{b}"] = (kt.masks[a] & kt.masks[b] & valid).sum() / n
    return out
