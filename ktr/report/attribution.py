"""Attribute the tokens of answers outside training: generate (or take given answers), run the probes
(layer L2). Used by `ktr explain` and by the report callback's end-of-training report.

The passes are the training step's (vision features once, the policy pass with entropy, the visual and
temporal probes, selection per pool), under `no_grad`, on the model as it is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ktr.advantages import group_advantages
from ktr.data.processor import VisionLanguageProcessor
from ktr.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.probes.keytokens import KeyTokenConfig, attribute
from ktr.report.record import StepRecord
from ktr.rewards import compute_rewards
from ktr.rollout import SamplingConfig, generate
from ktr.types import PromptBatch, Rollout


def given_rollout(prompts: PromptBatch, processor: VisionLanguageProcessor, answers: list[str]) -> Rollout:
    """A rollout (G = 1) whose completions are `answers` (one per prompt), each closed by the end-of-turn token."""
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [tok(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), processor.pad_token_id, dtype=torch.long)  # [B, T]
    valid = torch.zeros((len(seqs), t), dtype=torch.bool)  # [B, T]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        valid[i, : len(s)] = True
    ids, valid = ids.to(prompts.input_ids.device), valid.to(prompts.input_ids.device)
    return Rollout(group_size=1, input_ids=torch.cat([prompts.input_ids, ids], 1),
                   attention_mask=torch.cat([prompts.attention_mask, valid.long()], 1),
                   mm_token_type_ids=torch.cat([prompts.mm_token_type_ids,
                                                torch.zeros_like(ids, dtype=prompts.mm_token_type_ids.dtype)], 1),
                   completion_ids=ids, completion_mask=valid, texts=list(answers))


@torch.no_grad()
def explain_batch(model: nn.Module, processor: VisionLanguageProcessor, prompts: PromptBatch,
                  key_cfg: KeyTokenConfig, sampling: SamplingConfig | None = None, answers: list[str] | None = None,
                  chunk_size: int | None = 512, step: int = 0, greedy: bool = False) -> StepRecord:
    """Key tokens of sampled (or given) answers to `prompts`, with rewards when the rows carry a solution.

    The probes run whatever `key_cfg.enabled` says (a GRPO config still names the signals to compute). With
    one completion per prompt the selection pool is that completion alone.
    """
    if answers is not None:
        rollout = given_rollout(prompts, processor, answers)
    else:
        rollout = generate(model, processor, prompts, sampling or SamplingConfig(group_size=1), greedy=greedy)
    ids, valid = rollout.completion_ids, rollout.completion_mask  # [N, T] each
    feats = encode_media(model, prompts.pixel_values, prompts.grid_thw)
    view = SequenceView.of(model, rollout, prompts)
    hidden = completion_hidden(model, view, feats, ids.shape[1])  # [N, T, H]
    logps, entropy = completion_logps(model, hidden, ids, valid, chunk_size, with_entropy=True)
    cfg = replace(key_cfg, enabled=True)
    key = attribute(model, processor, prompts, view, feats, ids, valid, logps, entropy, cfg, rollout.group_size,
                    chunk_size)
    g = rollout.group_size
    rows = [r for r in prompts.rows for _ in range(g)]
    rewards, per, advantages = None, {}, None
    if all(r.get("solution") for r in rows):
        rewards, per, _ = compute_rewards(rollout.texts, [r["solution"] for r in rows],
                                          [r["problem_type"] for r in rows], ["accuracy", "format"], [1.0, 1.0])
        advantages = group_advantages(rewards, g) if g > 1 else None
    return StepRecord(step=step, prompts=prompts, rollout=rollout, key=key, rewards=rewards, per_reward=per,
                      advantages=advantages)
