"""The RL LightningModule: GRPO with Video-KTR key-token masking (layer L3).

`training_step` reads as the method: rollout -> score passes (policy, probes, reference) -> rewards ->
advantages -> masked policy loss -> optimizer step. The maths lives in L1/L2 functions; this file wires them.
Vanilla GRPO is `key_tokens.enabled: false` on the same module; the paper's baselines are algorithms by name
(`ktr.training.algorithms`). What SFT and RL share (policy loading, optimisation, checkpoints, validation) is
`ktr.training.base.PolicyModule`; the SFT stage is `ktr.training.sft`; the backward is `ktr.training.update`.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor

from ktr.advantages import group_advantages
from ktr.config import (BaselineConfig, ConfigError, KeyTokenConfig, LossConfig, OptimConfig, PolicyConfig,
                        RewardConfig, SamplingConfig, check_number, check_rollout_settings)
from ktr.data.base import StepBatch
from ktr.losses import masked_kl_mean, released_kl_mean, truncated_is_weights
from ktr.model.families import vision_tower
from ktr.model.forward import PolicyPass, SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.policy import active_dropout
from ktr.probes.keytokens import KeyTokens, attribute, key_token_stats
from ktr.report.record import StepRecord
from ktr.rewards import compute_rewards, length_bonus, resolve_rewards
from ktr.rollout.base import rollout_backend
from ktr.training.algorithms import AlgorithmName, get_algorithm
from ktr.training.base import PolicyModule
from ktr.training.update import LossTerms, loss_inputs, policy_update
from ktr.types import PromptBatch, Rollout, VisionFeatures

log = logging.getLogger(__name__)


class KTRModule(PolicyModule):
    """GRPO / Video-KTR on a Qwen2.5-VL policy, with an optional SFT warm start."""

    # Config defaults are dataclass instances (never mutated) so that `--help` lists every nested option.
    def __init__(self, policy: PolicyConfig = PolicyConfig(), sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
                 key_tokens: KeyTokenConfig = KeyTokenConfig(), loss: LossConfig = LossConfig(),  # noqa: B008
                 rewards: RewardConfig = RewardConfig(), optim: OptimConfig = OptimConfig(),  # noqa: B008
                 warm_start_steps: int = 0, warm_start_lr: float | None = None,
                 val_max_new_tokens: int = 64, algorithm: AlgorithmName = "grpo",
                 baseline: BaselineConfig = BaselineConfig(), val_target_prob: bool = False) -> None:  # noqa: B008
        """
        Args:
            policy: model to train.
            sampling: rollout settings (G, temperature, top-p, lengths).
            key_tokens: Video-KTR attribution and selection; `enabled: false` is vanilla GRPO.
            loss: objective, KL, aggregation, chunking, micro-batching.
            rewards: reward functions and weights.
            optim: optimiser and schedule.
            warm_start_steps: first steps are SFT on the datamodule's targets (the demo's cold start); the
                reference model is taken after them.
            warm_start_lr: learning rate of the warm-start steps (default: optim.lr).
            val_max_new_tokens: greedy completion length at validation.
            algorithm: `grpo` (GRPO, with Video-KTR key tokens when `key_tokens.enabled`), or a same-data
                baseline of the paper (`ktr.training.algorithms`, docs/baselines.md): `t_grpo` (Video-R1's
                temporal bonus from G/2 extra rollouts on shuffled frames) or `tw_grpo` (TW-GRPO's token weights in
                [1, baseline.tw_alpha]; needs `key_tokens.enabled: false`).
            baseline: settings of the baselines.
            val_target_prob: also log `val/p_target`, the mean probability of the held-out rows' SFT targets
                (`PolicyModule.target_logp`; the validation rows then carry targets).
        """
        check_number("warm_start_steps", warm_start_steps, integer=True, low=0)
        check_number("warm_start_lr", warm_start_lr, low=0, low_open=True, optional=True)
        check_rollout_settings(policy, sampling, loss)
        super().__init__(policy, optim, val_max_new_tokens, val_target_prob)
        if key_tokens.enabled:
            _check_no_dropout(self.model)
        self.sampling = sampling
        self.key_cfg = key_tokens
        self.loss_cfg = loss
        self.reward_cfg = rewards
        self.warm_start_steps = warm_start_steps
        self.warm_start_lr = warm_start_lr
        weights = self.reward_cfg.weights or [1.0] * len(self.reward_cfg.names)
        if len(weights) != len(self.reward_cfg.names):
            raise ValueError(f"rewards.weights has {len(weights)} entries for {len(self.reward_cfg.names)} names")
        resolve_rewards(self.reward_cfg.names)  # fail at construction on an unknown reward, naming its key
        self._weights = weights
        self._reward_warned: set[str] = set()
        self._ref: list = []  # frozen reference, kept out of state_dict and checkpoints
        self.rollout_backend = rollout_backend(sampling.backend)
        self.algorithm = get_algorithm(algorithm, baseline, key_tokens, sampling)
        self.baseline_cfg = baseline
        self._extra_metrics: dict[str, Tensor] = {}

    @property
    def needs_targets(self) -> bool:  # the datamodule provides SFT targets only when a warm start is asked for
        return self.warm_start_steps > 0

    @property
    def chunk_size(self) -> int | None:
        return self.loss_cfg.chunk_size

    # --- reference -----------------------------------------------------------------------------------
    def _reference_ready(self) -> None:
        if self.loss_cfg.beta == 0 or self.policy_cfg.lora is not None:
            return
        if not self._ref:
            self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))
        elif not self._sharded:
            self._ref[0].to(self.device)  # taken at resume time, before Lightning moved the policy to its device

    def _frozen_models(self) -> list:
        return self._ref

    def configure_model(self) -> None:
        if self._model_parallel() and not self._sharded:
            if self.loss_cfg.beta != 0 and self.policy_cfg.lora is None and self.warm_start_steps > 0:
                raise ValueError("under ModelParallelStrategy the reference copy is taken before sharding, so a "
                                 "warm start with beta > 0 and full fine-tuning is not supported; use "
                                 "warm_start_steps: 0, loss.beta: 0 or policy.lora")
            self._reference_ready()  # the start point, copied before sharding; sharded alongside the policy
        super().configure_model()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # After a warm start the reference is not the starting checkpoint: save it (single device only).
        if self._ref and self.warm_start_steps > 0 and not self._sharded:
            checkpoint["ktr_reference"] = self._ref[0].state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ktr_reference" in checkpoint:
            if not self._ref:
                self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))
            self._ref[0].load_state_dict(checkpoint["ktr_reference"])
        elif self.warm_start_steps == 0:
            self._reference_ready()  # the weights are still the start point here: Lightning loads them next

    @torch.no_grad()
    def reference_logps(self, prompts: PromptBatch, rollout: Rollout, view: SequenceView,
                        features: VisionFeatures) -> Tensor | None:
        """Log-probs under the frozen start point: the base with adapters off (LoRA), or the reference copy."""
        if self.loss_cfg.beta == 0:
            return None
        ids, valid = rollout.completion_ids, rollout.completion_mask
        if self.policy_cfg.lora is not None:  # adapters live in the language model only: vision features shared
            with self.model.disable_adapter():
                hidden = completion_hidden(self.model, view, features, ids.shape[1])
                return completion_logps(self.model, hidden, ids, valid, self.chunk_size)[0]
        ref = self._ref[0]
        feats = encode_media(ref, prompts.pixel_values, prompts.grid_thw)
        hidden = completion_hidden(ref, view, feats, ids.shape[1])
        return completion_logps(ref, hidden, ids, valid, self.chunk_size)[0]

    # --- the step ------------------------------------------------------------------------------------
    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor | None:
        batch = self.count_skips(batch)  # may drop the step on every rank (see count_skips)
        if batch.prompts is None:
            return None
        if self.global_step < self.warm_start_steps:
            loss = self.sft_step(batch.prompts)
            self.rollout_backend.on_weights_updated(self.model)  # an engine built already (evaluation) follows
            return loss
        self._reference_ready()
        prompts = batch.prompts
        with self.rollout_context():
            rollout = self.rollout_backend.generate(self.model, self.processor, prompts, self.sampling)
        self.rollout_backend.release()  # vLLM: the engine sleeps through scoring, backward and the step
        scores = self.score(prompts, rollout)
        key = attribute(self.model, self.processor, prompts, rollout, scores, self.key_cfg, self.chunk_size)
        weights, weight_norm = self.token_weights(rollout, scores, key)
        rewards, per_reward, failed = self.rewards(prompts, rollout, key.mask)
        rewards = self.algorithm.extra_rewards(self, prompts, rollout, rewards, per_reward, self._extra_metrics)
        scale = self.loss_cfg.advantage == "grpo"
        advantages = group_advantages(rewards, rollout.group_size, scale_by_std=scale)
        self.last_step = StepRecord(self.global_step, prompts, rollout, key, rewards, per_reward, advantages)  # reports
        self.rollout_backend.release()  # again if an algorithm sampled more (t_grpo's shuffled rollouts)
        loss = self.update(rollout, scores, key.mask, self.rollout_corrected(rollout, scores, advantages), weights,
                           weight_norm)
        norm = self._optimizer_step()
        self.rollout_backend.on_weights_updated(self.model)
        self._extra_metrics.update(self.rollout_backend.metrics())  # vLLM: the engine's memory per phase
        self._log_step(rollout, rewards, per_reward, failed, loss, norm, scores, key)
        return loss

    def score(self, prompts: PromptBatch, rollout: Rollout) -> PolicyPass:
        """Vision features (once), the policy pass (kept with grad when one micro-batch), reference log-probs."""
        ids, valid = rollout.completion_ids, rollout.completion_mask
        single = self.loss_cfg.micro_batch_size is None or self.loss_cfg.micro_batch_size >= ids.shape[0]
        vision_trains = any(p.requires_grad for p in vision_tower(self.model).parameters())
        with torch.set_grad_enabled(vision_trains):
            features = encode_media(self.model, prompts.pixel_values, prompts.grid_thw)
        view = SequenceView.of(self.model, rollout, prompts, shared_prefix=self.loss_cfg.shared_prefix)
        need_entropy = self.key_cfg.enabled and self.key_cfg.entropy.enabled
        with torch.set_grad_enabled(single):
            hidden = completion_hidden(self.model, view, features if single else _detached(features), ids.shape[1])
        with torch.no_grad():
            logps, entropy = completion_logps(self.model, hidden.detach(), ids, valid, self.chunk_size,
                                              with_entropy=need_entropy)
        ref = self.reference_logps(prompts, rollout, view, _detached(features))
        keep = self.key_cfg.needs_base_hidden or self.algorithm.needs_base_hidden
        return PolicyPass(view, features, logps, entropy, hidden if single else None, ref,
                          hidden.detach() if keep else None)

    def token_weights(self, rollout: Rollout, scores: PolicyPass, key: KeyTokens) -> tuple[Tensor | None, str]:
        """Float token weights `[N, T]` for the loss (the algorithm's, or soft key tokens) and their normaliser."""
        w = self.algorithm.token_weights(self.model, scores.base_hidden, rollout, self.baseline_cfg, self.chunk_size,
                                         self._extra_metrics)
        if w is not None:
            return w, "mask"
        if key.weights is not None:
            return key.weights, "weights" if self.key_cfg.soft_norm == "weights" else "mask"
        return None, "weights"

    def rollout_corrected(self, rollout: Rollout, scores: PolicyPass, advantages: Tensor) -> Tensor:
        """Advantages for the loss: `[N]` as they are, or `[N, T]` times the truncated importance weights of the
        rollout engine's samples (`loss.rollout_correction: tis`). Logs the engine/policy log-prob gap."""
        if rollout.logps is None:
            return advantages
        valid = rollout.completion_mask
        gap = (scores.logps - rollout.logps).abs()[valid]  # [n_valid]
        self._extra_metrics["train/rollout/logp_diff"] = gap.mean() if gap.numel() else gap.new_zeros(())
        self._extra_metrics["train/rollout/logp_diff_max"] = gap.max() if gap.numel() else gap.new_zeros(())
        if self.loss_cfg.rollout_correction != "tis":
            return advantages
        w = truncated_is_weights(scores.logps, rollout.logps, valid, self.loss_cfg.tis_cap)  # [N, T]
        self._extra_metrics["train/rollout/tis_weight"] = w[valid].mean() if valid.any() else w.new_zeros(())
        return advantages.unsqueeze(-1) * w

    def rewards(self, prompts: PromptBatch, rollout: Rollout, key_mask: Tensor):
        g = rollout.group_size
        rows = [r for r in prompts.rows for _ in range(g)]
        errors: dict[str, str] = {}
        total, per, failed = compute_rewards(rollout.assistant_texts, [r["solution"] for r in rows],
                                             [r["problem_type"] for r in rows], self.reward_cfg.names,
                                             self._weights, device=self.device, errors=errors)
        for name in errors.keys() - self._reward_warned:  # once per reward; every failure is counted
            self._reward_warned.add(name)
            log.warning("reward %r raised (%s); such completions score 0 for it, counted in "
                        "train/reward/failed/%s (warned once)", name, errors[name], name)
        if self.reward_cfg.length_bonus:
            lengths = key_mask.sum(-1) if self.reward_cfg.length_reading == "key" else rollout.completion_mask.sum(-1)
            acc = per.get("accuracy", torch.zeros_like(total))
            per["length"] = length_bonus(acc.cpu(), lengths.cpu(), g).to(total)
            total = total + per["length"]
        return total, per, failed

    def update(self, rollout: Rollout, scores: PolicyPass, mask: Tensor, advantages: Tensor,
               weights: Tensor | None = None, weight_norm: str = "weights") -> Tensor:
        """Backward of the masked (or weighted, `weights` `[N, T]`) objective over the whole batch
        (`ktr.training.update.policy_update`); returns the loss, detached."""
        inputs = loss_inputs(rollout, scores, mask, advantages, self.loss_cfg, weights)
        return policy_update(self.model, scores, inputs, LossTerms.of(self.loss_cfg, inputs, weight_norm),
                             self.chunk_size, self.loss_cfg.micro_batch_size, self.manual_backward)

    def _log_step(self, rollout, rewards, per_reward, failed, loss, norm, scores, key) -> None:
        n = rollout.completion_ids.shape[0]
        valid = rollout.completion_mask
        metrics = {"train/loss": loss, "train/grad_norm": norm, "train/reward/total": rewards.mean(),
                   "train/completion_length": valid.sum(-1).float().mean()}
        metrics.update({f"train/reward/{k}": v.mean() for k, v in per_reward.items()})
        metrics.update({f"train/reward/failed/{k}": float(v) for k, v in failed.items()})
        if scores.ref_logps is not None:
            metrics["train/kl"] = masked_kl_mean(scores.logps, scores.ref_logps, valid)
            # The released trainer's `kl` metric: per-sequence mean over the loss tokens (key tokens), then the mean.
            metrics["train/kl_released_key"] = released_kl_mean(scores.logps, scores.ref_logps, key.mask)
        else:
            metrics["train/kl"] = torch.zeros((), device=self.device)
        if self.key_cfg.enabled:
            metrics.update({f"train/ktr/{k}": v for k, v in key_token_stats(key, valid).items()})
        metrics.update(self._extra_metrics)
        self._extra_metrics = {}
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        self.log_dict(metrics, batch_size=n)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=n, logger=False)


def _check_no_dropout(model) -> None:
    """Video-KTR's probes compare the policy's log-probs with the video, without it and with shuffled frames, each
    in its own pass; under dropout every pass draws its own mask, and the key tokens would follow the draws
    (tests/test_module.py: the identity perturbation, whose scores must be 0, scores non-zero under a LoRA dropout
    of 0.05 on trained adapters). So Video-KTR trains without dropout, as the released full fine-tuning of
    Qwen2.5-VL does (its checkpoints have none)."""
    found = active_dropout(model)
    if found:
        key = "policy.lora.dropout" if any("lora_dropout" in f for f in found) else "policy.name_or_path"
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"{key}: key_tokens.enabled needs a policy without dropout, but {len(found)} module(s) "
                          f"drop out in training mode ({shown}). The probes compare the policy's log-probs with and "
                          "without the video (and with shuffled frames) in separate passes, and dropout would draw a "
                          "different mask in each, so the key tokens would follow the draws. Set "
                          "policy.lora.dropout: 0, or use a checkpoint whose attention_dropout is 0")


def _detached(features: VisionFeatures) -> VisionFeatures:
    return features.detached(leaves=False)


def __getattr__(name: str):  # `ktr.module.SFTModule` of older configs (ktr._moved)
    from ktr._moved import moved_attribute

    return moved_attribute(__name__, name)
