"""Attribute the tokens of answers outside training: generate (or take given answers), run the probes
(layer L2). Used by `ktr explain` and by the report callback's end-of-training report.

The passes are the training step's (vision features once, the policy pass with entropy, the visual and
temporal probes, selection per pool), under `no_grad`, on the model as it is. `ktr explain` then applies
its noise floor (:func:`apply_noise_floor`, `ktr.report.floor`) to what its page marks.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ktr.advantages import group_advantages
from ktr.config import DEFAULT_CHUNK_SIZE, KeyTokenConfig, SamplingConfig
from ktr.data.processor import VisionLanguageProcessor
from ktr.model.forward import PolicyPass, SequenceView, completion_hidden, completion_logps, encode_media
from ktr.probes.keytokens import attribute
from ktr.report.floor import MIN_SCORE, NOISE_MADS, noise_floor
from ktr.report.record import StepRecord
from ktr.rewards import compute_rewards
from ktr.rollout.base import teacher_rollout
from ktr.rollout.hf import generate
from ktr.types import PromptBatch


@torch.no_grad()
def explain_batch(model: nn.Module, processor: VisionLanguageProcessor, prompts: PromptBatch,
                  key_cfg: KeyTokenConfig, sampling: SamplingConfig | None = None, given: bool = False,
                  chunk_size: int | None = DEFAULT_CHUNK_SIZE, step: int = 0, greedy: bool = False) -> StepRecord:
    """Key tokens of sampled answers to `prompts` (or, with `given`, of their targets: answers to score, as
    `processor.encode(..., target=answer)` puts them), with rewards when the rows carry a solution.

    The probes run whatever `key_cfg.enabled` says (a GRPO config still names the signals to compute). With
    one completion per prompt the selection pool is that completion alone.
    """
    if given:
        if prompts.target_ids is None:
            raise ValueError("given answers are read from the prompts' targets: encode them with target=answer")
        rollout = teacher_rollout(prompts, processor)
        shown = rollout.completion_ids.masked_fill(~rollout.completion_mask, processor.pad_token_id)
        rollout.texts = processor.tokenizer.batch_decode(shown, skip_special_tokens=True)
    else:
        rollout = generate(model, processor, prompts, sampling or SamplingConfig(group_size=1), greedy=greedy)
    ids, valid = rollout.completion_ids, rollout.completion_mask  # [N, T] each
    feats = encode_media(model, prompts.pixel_values, prompts.grid_thw)
    view = SequenceView.of(model, rollout, prompts)
    hidden = completion_hidden(model, view, feats, ids.shape[1])  # [N, T, H]
    logps, entropy = completion_logps(model, hidden, ids, valid, chunk_size, with_entropy=True)
    cfg = replace(key_cfg, enabled=True)
    scored = PolicyPass(view, feats, logps, entropy, base_hidden=hidden)  # distribution scores compare against it
    key = attribute(model, processor, prompts, rollout, scored, cfg, chunk_size)
    g = rollout.group_size
    rows = [r for r in prompts.rows for _ in range(g)]
    rewards, per, advantages = None, {}, None
    if all(r.get("solution") for r in rows):
        rewards, per, _ = compute_rewards(rollout.assistant_texts, [r["solution"] for r in rows],
                                          [r["problem_type"] for r in rows], ["accuracy", "format"], [1.0, 1.0])
        advantages = group_advantages(rewards, g) if g > 1 else None
    return StepRecord(step=step, prompts=prompts, rollout=rollout, key=key, rewards=rewards, per_reward=per,
                      advantages=advantages)


def apply_noise_floor(record: StepRecord, key_cfg: KeyTokenConfig, mads: float = NOISE_MADS,
                      min_score: float = MIN_SCORE) -> StepRecord:
    """`record` with the noise floor of `ktr.report.floor` (what an explain page marks); its key tokens, scores
    and thresholds (the training rule's) are kept as they are."""
    ro = record.rollout
    video_rows = record.prompts.is_video.to(ro.completion_mask.device).repeat_interleave(ro.group_size)  # [N]
    floor = noise_floor(record.key.masks, record.key.scores, ro.completion_mask, video_rows, key_cfg,
                        ro.group_size, mads, min_score)
    return replace(record, floor=floor)
