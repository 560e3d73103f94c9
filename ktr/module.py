"""The RL LightningModule: GRPO with Video-KTR key-token masking, and the SFT stage (layer L3).

`training_step` reads as the method: rollout -> score passes (policy, probes, reference) -> rewards ->
advantages -> masked policy loss -> optimizer step. The maths lives in L1/L2 functions; this file wires them.
Vanilla GRPO is `key_tokens.enabled: false` on the same module.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from ktr import fused
from ktr.advantages import group_advantages
from ktr.data.base import StepBatch
from ktr.distributed import tied_gradients
from ktr.forward import (SequenceView, VisionFeatures, completion_hidden, completion_logps, encode_media,
                         output_projection)
from ktr.losses import masked_kl_mean
from ktr.policy import PolicyConfig, load_policy, vision_tower
from ktr.probes.keytokens import KeyTokenConfig, attribute, key_token_stats
from ktr.resume import rng_state, set_rng_state
from ktr.rewards import compute_rewards, length_bonus
from ktr.rollout import SamplingConfig, generate
from ktr.types import PromptBatch, Rollout

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    """The policy objective (KTR_SPEC section 3)."""

    beta: float = 0.04
    """KL coefficient (k3 estimator against the frozen reference); 0 drops the reference entirely."""
    kl_on: Literal["key", "valid"] = "key"
    """Tokens carrying the KL term: key tokens only (released) or every valid token."""
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """Loss aggregation: released GRPO, DAPO token mean, or Dr. GRPO."""
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    """Group advantage: (r - mean) / (std + eps), or r - mean (Dr. GRPO)."""
    clip_low: float = 0.2
    """PPO clip range below 1 (only active with several updates per rollout)."""
    clip_high: float = 0.2
    """PPO clip range above 1."""
    chunk_size: int | None = 512
    """Tokens per chunk of the output projection; null materialises full logits (naive; for comparison)."""
    micro_batch_size: int | None = None
    """Completions per gradient pass; null = all N at once. The loss is normalised over the whole group."""


@dataclass
class RewardConfig:
    """Rewards summed into the scalar that advantages are computed from (KTR_SPEC section 4)."""

    names: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Registered reward names or dotted paths `pkg.module:function` of your own rewards."""
    weights: list[float] | None = None
    """One weight per reward (default 1 each)."""
    length_bonus: bool = False
    """Add the released length bonus (+0.2 for correct completions of 320-512 tokens in a group with >1 correct)."""
    length_reading: Literal["generated", "key"] = "key"
    """Length counted over generated tokens, or over key tokens as the released code did."""


@dataclass
class OptimConfig:
    """Optimiser and schedule (defaults: the released run)."""

    lr: float = 2e-6
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """8-bit and paged variants need bitsandbytes (`pip install 'ktr[quant]'`)."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule over the run's optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float | None = 5.0
    """Clip the global gradient norm to this value (null: no clipping)."""


def _make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    from ktr._imports import BITSANDBYTES_AVAILABLE, require

    require(BITSANDBYTES_AVAILABLE, "bitsandbytes", "quant")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)


def _lr_lambda(step: int, total: int, cfg: OptimConfig, warm_start_steps: int = 0,
               warm_start_factor: float = 1.0) -> float:
    if step < warm_start_steps:  # SFT warm start at its own rate; the RL schedule starts after it
        return warm_start_factor
    step, total = step - warm_start_steps, total - warm_start_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class PolicyModule(L.LightningModule):
    """What SFT and RL share: the policy, manual optimisation with clipping, greedy validation accuracy."""

    needs_targets = False

    def __init__(self, policy: PolicyConfig = PolicyConfig(), optim: OptimConfig = OptimConfig(),  # noqa: B008
                 val_max_new_tokens: int = 64) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg = policy
        self.optim_cfg = optim
        self.val_max_new_tokens = val_max_new_tokens
        built = load_policy(self.policy_cfg)
        self.model = built.model
        self.processor = built.processor

    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        self._skips = dm.make_skip_counter() if hasattr(dm, "make_skip_counter") else None

    def count_skips(self, batch: StepBatch) -> None:
        """Log undecodable samples of this batch; stop the run (clear error) past `max_skip_fraction`."""
        self.log("data/skipped", float(len(batch.skipped)), reduce_fx="sum", batch_size=1)
        if getattr(self, "_skips", None) is not None:
            self._skips.update_batch(batch)

    def on_train_epoch_end(self) -> None:
        if getattr(self, "_skips", None) is not None:
            self._skips.check(final=True)

    # --- scale: FSDP2 sharding and exact resume (ktr.distributed, ktr.resume) -------------------------
    def configure_model(self) -> None:
        """Under `ModelParallelStrategy`, shard the policy (and frozen models) with FSDP2; else nothing."""
        if getattr(self, "_sharded", False) or not self._model_parallel():
            return
        from ktr.distributed import data_parallel_mesh, shard_policy

        mesh = data_parallel_mesh(self.device_mesh)
        for frozen in self._frozen_models():
            shard_policy(frozen, mesh, self.policy_cfg.sharding)
        shard_policy(self.model, mesh, self.policy_cfg.sharding, self.policy_cfg.gradient_checkpointing)
        self._sharded = True

    def _model_parallel(self) -> bool:
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    def _frozen_models(self) -> list:
        """Models that are sharded alongside the policy (KTR's reference copy)."""
        return []

    def on_fit_start(self) -> None:
        if getattr(self, "_sharded", False):
            from ktr.distributed import ensure_root_initialized

            for m in [self.model, *self._frozen_models()]:
                ensure_root_initialized(m)

    def _rollout_context(self):
        """Weights stay gathered across `generate` under FSDP2 (one all-gather per unit, not per token)."""
        if not getattr(self, "_sharded", False):
            return nullcontext()
        from ktr.distributed import gathered_for_rollout

        return gathered_for_rollout(self.model, self.policy_cfg.sharding)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Every rank's RNG states (generation and the temporal probe sample from them): exact resume."""
        state = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)  # every rank reaches here: Lightning dumps on all
        else:
            states = [state]
        checkpoint["ktr_rng"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("ktr_rng")
        world = self.trainer.world_size if self._trainer is not None else 1
        if states is not None and len(states) == world:
            set_rng_state(states[self.global_rank])
        elif states is not None:
            log.warning("checkpoint holds RNG states of %d processes, this run has %d: RNG not restored, the "
                        "resumed run will not replay the interrupted one exactly", len(states), world)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (a 4-bit `policy.quantization: nf4` base is "
                             "frozen: set `policy.lora` to train adapters)")
        opt = _make_optimizer(params, self.optim_cfg)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm = getattr(self, "warm_start_steps", 0)
        factor = (getattr(self, "warm_start_lr", None) or self.optim_cfg.lr) / self.optim_cfg.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_lr_lambda, total=total, cfg=self.optim_cfg,
                                                               warm_start_steps=warm, warm_start_factor=factor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _optimizer_step(self) -> Tensor:
        """Clip, step, zero, schedule. Returns the pre-clip global gradient norm."""
        opt = self.optimizers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else float("inf")
        with tied_gradients(self.model):  # FSDP2 unties shared embeddings; their gradients are one here
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def sft_loss(self, prompts: PromptBatch) -> Tensor:
        """Teacher-forced negative log-likelihood of the targets (mean over target tokens)."""
        if prompts.target_ids is None:
            raise ValueError("SFT needs targets: the datamodule must provide sft_target for its rows")
        rollout = teacher_rollout(prompts, self.processor)
        feats = encode_media(self.model, prompts.pixel_values, prompts.grid_thw)
        view = SequenceView.of(self.model, rollout, prompts)
        hidden = completion_hidden(self.model, view, feats, rollout.completion_ids.shape[1])
        logps, _ = completion_logps(self.model, hidden, rollout.completion_ids, rollout.completion_mask,
                                    self.chunk_size)
        mask = rollout.completion_mask
        return -(logps * mask).sum() / mask.sum().clamp(min=1)

    @property
    def chunk_size(self) -> int | None:
        return 512

    def sft_step(self, prompts: PromptBatch) -> Tensor:
        loss = self.sft_loss(prompts)
        self.manual_backward(loss)
        norm = self._optimizer_step()
        self.log_dict({"train/sft_loss": loss.detach(), "train/grad_norm": norm}, batch_size=len(prompts))
        return loss.detach()

    def validation_step(self, batch: StepBatch, batch_idx: int) -> None:
        if batch.prompts is None:
            return
        cfg = SamplingConfig(group_size=1, max_new_tokens=self.val_max_new_tokens, temperature=0.0)
        rollout = generate(self.model, self.processor, batch.prompts, cfg, greedy=True)
        rows = batch.prompts.rows
        _, per, _ = compute_rewards(rollout.texts, [r["solution"] for r in rows], [r["problem_type"] for r in rows],
                                    names=["accuracy", "format"], weights=[1.0, 1.0], device=self.device)
        n = len(rows)
        self.log("val/acc", per["accuracy"].mean(), batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/format", per["format"].mean(), batch_size=n, sync_dist=True)

    def test_step(self, batch: StepBatch, batch_idx: int) -> None:
        """Nothing per batch: `ktr test` is done by the benchmark evaluator callbacks (`ktr.callbacks`)."""


def teacher_rollout(prompts: PromptBatch, processor) -> Rollout:
    """The prompts followed by their SFT targets, shaped like a rollout with G = 1."""
    target, valid = prompts.target_ids, prompts.target_mask
    return Rollout(group_size=1, input_ids=torch.cat([prompts.input_ids, target], 1),
                   attention_mask=torch.cat([prompts.attention_mask, valid.long()], 1),
                   mm_token_type_ids=torch.cat([prompts.mm_token_type_ids, torch.zeros_like(target, dtype=torch.int)], 1),
                   completion_ids=target, completion_mask=valid)


class SFTModule(PolicyModule):
    """Supervised fine-tuning on the datamodule's targets (e.g. Video-R1-COT-165k: `process + "\\n" + solution`)."""

    needs_targets = True

    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor | None:
        self.count_skips(batch)
        return None if batch.prompts is None else self.sft_step(batch.prompts)


@dataclass
class StepScores:
    """What the scoring passes of one step produce."""

    hidden: Tensor | None  # [N, T, H] with grad (single micro-batch) or None (recomputed per micro-batch)
    features: VisionFeatures  # with grad when the vision tower trains
    view: SequenceView
    logps: Tensor  # [N, T] policy log-probs, no grad
    ref_logps: Tensor | None  # [N, T]
    entropy: Tensor | None  # [N, T] full-vocabulary entropy of the policy, no grad


class KTRModule(PolicyModule):
    """GRPO / Video-KTR on a Qwen2.5-VL policy, with an optional SFT warm start."""

    # Config defaults are dataclass instances (never mutated) so that `--help` lists every nested option.
    def __init__(self, policy: PolicyConfig = PolicyConfig(), sampling: SamplingConfig = SamplingConfig(),  # noqa: B008
                 key_tokens: KeyTokenConfig = KeyTokenConfig(), loss: LossConfig = LossConfig(),  # noqa: B008
                 rewards: RewardConfig = RewardConfig(), optim: OptimConfig = OptimConfig(),  # noqa: B008
                 warm_start_steps: int = 0, warm_start_lr: float | None = None,
                 val_max_new_tokens: int = 64) -> None:
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
        """
        super().__init__(policy, optim, val_max_new_tokens)
        self.sampling = sampling
        self.key_cfg = key_tokens
        self.loss_cfg = loss
        self.reward_cfg = rewards
        self.warm_start_steps = warm_start_steps
        self.warm_start_lr = warm_start_lr
        weights = self.reward_cfg.weights or [1.0] * len(self.reward_cfg.names)
        if len(weights) != len(self.reward_cfg.names):
            raise ValueError(f"rewards.weights has {len(weights)} entries for {len(self.reward_cfg.names)} names")
        from ktr.rewards import get_reward

        for name in self.reward_cfg.names:  # fail at construction on an unknown reward
            get_reward(name)
        self._weights = weights
        self._ref: list = []  # frozen reference, kept out of state_dict and checkpoints

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
        elif not getattr(self, "_sharded", False):
            self._ref[0].to(self.device)  # taken at resume time, before Lightning moved the policy to its device

    def _frozen_models(self) -> list:
        return self._ref

    def configure_model(self) -> None:
        if self._model_parallel() and not getattr(self, "_sharded", False):
            if self.loss_cfg.beta != 0 and self.policy_cfg.lora is None and self.warm_start_steps > 0:
                raise ValueError("under ModelParallelStrategy the reference copy is taken before sharding, so a "
                                 "warm start with beta > 0 and full fine-tuning is not supported; use "
                                 "warm_start_steps: 0, loss.beta: 0 or policy.lora")
            self._reference_ready()  # the start point, copied before sharding; sharded alongside the policy
        super().configure_model()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # After a warm start the reference is not the starting checkpoint: save it (single device only).
        if self._ref and self.warm_start_steps > 0 and not getattr(self, "_sharded", False):
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
        self.count_skips(batch)
        if batch.prompts is None:
            return None
        if self.global_step < self.warm_start_steps:
            return self.sft_step(batch.prompts)
        self._reference_ready()
        prompts = batch.prompts
        with self._rollout_context():
            rollout = generate(self.model, self.processor, prompts, self.sampling)
        scores = self.score(prompts, rollout)
        key = attribute(self.model, self.processor, prompts, scores.view, _detached(scores.features),
                        rollout.completion_ids, rollout.completion_mask, scores.logps, scores.entropy, self.key_cfg,
                        rollout.group_size, self.chunk_size)
        rewards, per_reward, failed = self.rewards(prompts, rollout, key.mask)
        scale = self.loss_cfg.advantage == "grpo"
        advantages = group_advantages(rewards, rollout.group_size, scale_by_std=scale)
        loss = self.update(rollout, scores, key.mask, advantages)
        norm = self._optimizer_step()
        self._log_step(rollout, rewards, per_reward, failed, loss, norm, scores, key)
        return loss

    def score(self, prompts: PromptBatch, rollout: Rollout) -> StepScores:
        """Vision features (once), the policy pass (kept with grad when one micro-batch), reference log-probs."""
        ids, valid = rollout.completion_ids, rollout.completion_mask
        single = self.loss_cfg.micro_batch_size is None or self.loss_cfg.micro_batch_size >= ids.shape[0]
        vision_trains = any(p.requires_grad for p in vision_tower(self.model).parameters())
        with torch.set_grad_enabled(vision_trains):
            features = encode_media(self.model, prompts.pixel_values, prompts.grid_thw)
        view = SequenceView.of(self.model, rollout, prompts)
        need_entropy = self.key_cfg.enabled and self.key_cfg.entropy.enabled
        with torch.set_grad_enabled(single):
            hidden = completion_hidden(self.model, view, features if single else _detached(features), ids.shape[1])
        with torch.no_grad():
            logps, entropy = completion_logps(self.model, hidden.detach(), ids, valid, self.chunk_size,
                                              with_entropy=need_entropy)
        ref = self.reference_logps(prompts, rollout, view, _detached(features))
        return StepScores(hidden if single else None, features, view, logps, ref, entropy)

    def rewards(self, prompts: PromptBatch, rollout: Rollout, key_mask: Tensor):
        g = rollout.group_size
        rows = [r for r in prompts.rows for _ in range(g)]
        total, per, failed = compute_rewards(rollout.texts, [r["solution"] for r in rows],
                                             [r["problem_type"] for r in rows], self.reward_cfg.names,
                                             self._weights, device=self.device)
        if self.reward_cfg.length_bonus:
            lengths = key_mask.sum(-1) if self.reward_cfg.length_reading == "key" else rollout.completion_mask.sum(-1)
            acc = per.get("accuracy", torch.zeros_like(total))
            per["length"] = length_bonus(acc.cpu(), lengths.cpu(), g).to(total)
            total = total + per["length"]
        return total, per, failed

    def update(self, rollout: Rollout, scores: StepScores, mask: Tensor, advantages: Tensor) -> Tensor:
        """Backward of the masked objective, in micro-batches of rows normalised over the whole batch."""
        cfg = self.loss_cfg
        ids, valid = rollout.completion_ids, rollout.completion_mask
        n = ids.shape[0]
        kl_mask = valid if cfg.kl_on == "valid" else None
        common = dict(beta=cfg.beta if scores.ref_logps is not None else 0.0, clip_low=cfg.clip_low,
                      clip_high=cfg.clip_high, aggregation=cfg.aggregation, num_sequences=n,
                      num_tokens=mask.sum(), max_len=ids.shape[1])
        if kl_mask is not None:
            common["num_kl_tokens"] = kl_mask.sum()
        if scores.hidden is not None:
            return self._loss_backward(scores.hidden, slice(None), rollout, scores, mask, kl_mask, advantages, common)
        leaf = VisionFeatures([f.detach().requires_grad_(f.requires_grad) for f in scores.features.per_prompt])
        total = torch.zeros((), device=self.device)
        for start in range(0, n, cfg.micro_batch_size):
            rows = slice(start, start + cfg.micro_batch_size)
            hidden = completion_hidden(self.model, _rows(scores.view, rows), leaf, ids.shape[1])
            total = total + self._loss_backward(hidden, rows, rollout, scores, mask, kl_mask, advantages, common)
        grads = [(f, lf.grad) for f, lf in zip(scores.features.per_prompt, leaf.per_prompt) if lf.grad is not None]
        if grads:  # the vision tower trains: one backward through it for all micro-batches
            torch.autograd.backward([f for f, _ in grads], [g for _, g in grads])
        return total

    def _loss_backward(self, hidden, rows, rollout, scores, mask, kl_mask, advantages, common) -> Tensor:
        ids = rollout.completion_ids[rows]
        kw = dict(common, ref_logps=None if scores.ref_logps is None else scores.ref_logps[rows])
        if kl_mask is not None:
            kw["kl_mask"] = kl_mask[rows]
        head = output_projection(self.model)
        if self.chunk_size is None:
            fn = partial(fused.naive_policy_loss, tokens=ids, advantages=advantages[rows], mask=mask[rows], **kw)
        else:
            fn = partial(fused.fused_policy_loss, tokens=ids, advantages=advantages[rows], mask=mask[rows],
                         chunk_size=self.chunk_size, **kw)
        loss, _, _ = fused.call_with_head(head, hidden, fn)
        self.manual_backward(loss)
        return loss.detach()

    def _log_step(self, rollout, rewards, per_reward, failed, loss, norm, scores, key) -> None:
        n = rollout.completion_ids.shape[0]
        valid = rollout.completion_mask
        metrics = {"train/loss": loss, "train/grad_norm": norm, "train/reward/total": rewards.mean(),
                   "train/completion_length": valid.sum(-1).float().mean()}
        metrics.update({f"train/reward/{k}": v.mean() for k, v in per_reward.items()})
        metrics.update({f"train/reward/failed/{k}": float(v) for k, v in failed.items()})
        if scores.ref_logps is not None:
            metrics["train/kl"] = masked_kl_mean(scores.logps, scores.ref_logps, valid)
        else:
            metrics["train/kl"] = torch.zeros((), device=self.device)
        if self.key_cfg.enabled:
            metrics.update({f"train/ktr/{k}": v for k, v in key_token_stats(key, valid).items()})
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        self.log_dict(metrics, batch_size=n)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=n, logger=False)


def _detached(features: VisionFeatures) -> VisionFeatures:
    return VisionFeatures([f.detach() for f in features.per_prompt])


def _rows(view: SequenceView, rows: slice) -> SequenceView:
    return SequenceView(view.input_ids[rows], view.attention_mask[rows], view.mm_token_type_ids[rows],
                        view.position_ids[:, rows], view.prompt_index[rows])
