"""What SFT and RL share: `PolicyModule`, the Lightning base of both stages (layer L3).

The policy and its processor, manual optimisation with clipping and the schedule (`ktr.training.optim`), the SFT loss
used by the SFT module and the RL warm start, undecodable-sample accounting, FSDP2 sharding hooks, RNG state in
checkpoints (exact resume) and greedy validation accuracy. The RL step itself is in `ktr.module`.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from functools import partial

import lightning as L
import torch
from torch import Tensor

from ktr.config import DEFAULT_CHUNK_SIZE, OptimConfig, PolicyConfig, SamplingConfig, check_number
from ktr.data.base import StepBatch
from ktr.data.skips import SkipCounter, SkipLimitExceeded, Skipped, row_source
from ktr.model.checkpoint import CheckpointError, flat_settings, shape_mismatch
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.fsdp import tied_gradients
from ktr.model.policy import load_policy
from ktr.rewards import compute_rewards
from ktr.rollout.base import teacher_rollout
from ktr.rollout.hf import generate
from ktr.training.lightning_compat import attached_trainer, forget_step_metrics
from ktr.training.optim import decay_groups, lr_lambda, make_optimizer
from ktr.training.resume import rng_state, set_rng_state
from ktr.types import PromptBatch

log = logging.getLogger(__name__)

_QUANT_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")
"""bitsandbytes' 4-bit quantisation state in a state dict: `Linear4bit` writes it and cannot load it back."""


class PolicyModule(L.LightningModule):
    """What SFT and RL share: the policy, manual optimisation with clipping, greedy validation accuracy."""

    needs_targets = False
    warm_start_steps: int = 0  # SFT steps before RL (`KTRModule`); the schedule and reports read them
    warm_start_lr: float | None = None

    def __init__(self, policy: PolicyConfig = PolicyConfig(), optim: OptimConfig = OptimConfig(),  # noqa: B008
                 val_max_new_tokens: int = 64, val_target_prob: bool = False) -> None:
        check_number("val_max_new_tokens", val_max_new_tokens, integer=True, low=1)
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg = policy
        self.optim_cfg = optim
        self.val_max_new_tokens = val_max_new_tokens
        self.val_target_prob = val_target_prob
        built = load_policy(self.policy_cfg)
        self.model = built.model
        self.processor = built.processor
        self._sharded = False  # set by `configure_model` under ModelParallelStrategy (FSDP2)
        self._skips: SkipCounter | None = None  # the data module's counter of unusable samples, at train start
        self._skips_restored: dict | None = None  # its state from the checkpoint of a resumed run
        self._load_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        """Checkpoints are written through a temporary file in their own folder (`ktr.training.checkpoint_io`)."""
        from ktr.training.checkpoint_io import use_run_folder_io

        use_run_folder_io(self.trainer)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """A metric is logged only in the steps that compute it (`lightning_compat.forget_step_metrics`)."""
        forget_step_metrics(self.trainer)

    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        self._skips = dm.make_skip_counter() if hasattr(dm, "make_skip_counter") else None
        if self._skips is not None and self._skips_restored is not None:
            self._skips.load_state_dict(self._skips_restored)
        self._load_metrics = dm.load_metrics() if hasattr(dm, "load_metrics") else {}

    def count_skips(self, batch: StepBatch) -> StepBatch:
        """Log unusable samples of this batch and the run's totals by reason (this rank's, cumulative over
        resumes), plus the data module's load-time counts; stop the run (clear error) past `max_skip_fraction`.

        Returns the batch to train on: under several processes, when any rank has no usable prompt left, every
        rank skips the step together (one all-reduce), since a rank that returned early would leave the others
        waiting in their collectives; the prompts dropped that way are counted as skipped (`PeerRankEmpty`).
        """
        batch = _agree_on_step(batch, self.device)
        self.log("data/skipped", float(len(batch.skipped)), reduce_fx="sum", batch_size=1)
        if self._skips is not None:
            self._stop_saved(self._skips.update_batch, batch)
            # rank-local, no sync: reason keys differ between ranks, a collective per key could hang
            self.log_dict({**self._skips.metrics(), **self._load_metrics}, batch_size=1)
        return batch

    def on_train_epoch_end(self) -> None:
        if self._skips is not None:
            self._stop_saved(self._skips.check, final=True)

    def _stop_saved(self, check, *args, **kwargs) -> None:
        """Run a skip-limit `check`; when it raises `SkipLimitExceeded`, save `last.ckpt` first.

        The epoch-end check runs before `ModelCheckpoint`'s own epoch-end save, so without this a limit that
        trips there lost every step of the run.
        """
        try:
            check(*args, **kwargs)
        except SkipLimitExceeded:
            self._save_last_checkpoint()
            raise

    def _save_last_checkpoint(self) -> None:
        """`last.ckpt` (the name `ModelCheckpoint` gives it) in the run's checkpoint folder, single process only:
        saving is collective and the other ranks did not trip their own, rank-local, skip limit."""
        cb = self.trainer.checkpoint_callback
        if cb is None or getattr(cb, "dirpath", None) is None or self.trainer.world_size > 1:
            log.warning("stopping on the skip limit without saving a checkpoint (%s)",
                        "no ModelCheckpoint" if cb is None else "several processes" if self.trainer.world_size > 1
                        else "no checkpoint folder")
            return
        step = {"epoch": torch.tensor(self.current_epoch), "step": torch.tensor(self.global_step)}
        path = cb.format_checkpoint_name(step, cb.CHECKPOINT_NAME_LAST)
        cb.last_model_path = path
        self.trainer.save_checkpoint(path)
        log.warning("skip limit reached at step %d: saved %s before stopping (resume with --ckpt_path %s once "
                    "the data is fixed)", self.global_step, path, path)

    # --- scale: FSDP2 sharding and exact resume (ktr.model.fsdp, ktr.training.resume) -------------------------
    def configure_model(self) -> None:
        """Under `ModelParallelStrategy`, shard the policy (and frozen models) with FSDP2; else nothing."""
        if self._sharded or not self._model_parallel():
            return
        from ktr.model.fsdp import data_parallel_mesh, shard_policy

        mesh = data_parallel_mesh(self.device_mesh)
        for frozen in self._frozen_models():
            shard_policy(frozen, mesh, self.policy_cfg.sharding)
        shard_policy(self.model, mesh, self.policy_cfg.sharding, self.policy_cfg.gradient_checkpointing)
        self._sharded = True

    def _model_parallel(self) -> bool:
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = attached_trainer(self)
        return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)

    def _frozen_models(self) -> list:
        """Models that are sharded alongside the policy (KTR's reference copy)."""
        return []

    def on_fit_start(self) -> None:
        """The policy trains in training mode, frozen models stay in eval mode. `from_pretrained` returns a model in
        eval mode and Lightning no longer switches modules to training mode at fit start (it warns), so without
        this a loaded checkpoint never ran gradient checkpointing (transformers checkpoints a layer only while
        `training`): every layer's activations were kept. A model built from a config starts in training mode."""
        self.model.train()
        for m in self._frozen_models():
            m.eval()
        if self._sharded:
            from ktr.model.fsdp import ensure_root_initialized

            for m in [self.model, *self._frozen_models()]:
                ensure_root_initialized(m)

    def rollout_context(self):
        """Weights stay gathered across `generate` under FSDP2 (one all-gather per unit, not per token)."""
        if not self._sharded:
            return nullcontext()
        from ktr.model.fsdp import gathered_for_rollout

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
        checkpoint["ktr_policy"] = flat_settings(self.policy_cfg, "policy")  # named when a resume does not fit
        if self._trainable_only():
            trainable = self._trainable_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            checkpoint["ktr_trainable_only"] = True
        if self._skips is not None:
            checkpoint["ktr_skips"] = _per_rank(self._skips.state_dict())

    def _trainable_only(self) -> bool:
        """A LoRA policy on one device saves its trainable tensors only (the adapters): the frozen base is rebuilt
        from `policy.name_or_path` as it was, and a 4-bit base's quantisation state cannot be loaded back into
        bitsandbytes' layers (a QLoRA checkpoint did not resume before 2026-12-06). Under FSDP2 the strategy
        saves the whole sharded state."""
        return self.policy_cfg.lora is not None and not self._sharded

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def _fit_trainable_only(self, checkpoint: dict) -> None:
        """Before Lightning loads the weights: a checkpoint of the trainable tensors must hold exactly those of
        this policy, then loads non-strictly; an older whole QLoRA checkpoint loses its quantisation state (the
        4-bit weights are recomputed from the same base)."""
        state = checkpoint.get("state_dict", {})
        if checkpoint.get("ktr_trainable_only"):
            want = self._trainable_names()
            missing, extra = sorted(want - state.keys()), sorted(state.keys() - want)
            if missing or extra:
                raise CheckpointError(f"the checkpoint holds the trainable tensors of another policy: {len(missing)} "
                                      f"of this one's missing (e.g. {missing[:2]}), {len(extra)} not trainable here "
                                      f"(e.g. {extra[:2]}); use the policy settings it was trained with")
            self.strict_loading = False
        elif self.policy_cfg.quantization != "none":
            for key in [k for k in state if _QUANT_STATE.search(k)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one line naming the differing settings, a checkpoint whose tensors do not fit the policy
        (Lightning loads the weights after this hook); then restore skip counts and RNG states."""
        if not self._sharded:
            self._fit_trainable_only(checkpoint)
            problem = shape_mismatch(checkpoint.get("state_dict", {}), self.state_dict(),
                                     checkpoint.get("ktr_policy"), flat_settings(self.policy_cfg, "policy"))
            if problem is not None:
                raise CheckpointError(problem)
        skips = checkpoint.get("ktr_skips")
        world = _world_size(self)
        if skips is not None:  # applied at train start, when the counter exists
            if len(skips) == world:
                self._skips_restored = skips[self.global_rank]
            elif self.global_rank == 0:  # resumed on another number of processes: rank 0 carries the totals
                self._skips_restored = _merged_skips(skips)
        states = checkpoint.get("ktr_rng")
        world = _world_size(self)
        if states is not None and len(states) == world:
            set_rng_state(states[self.global_rank])
        elif states is not None:
            log.warning("checkpoint holds RNG states of %d processes, this run has %d: RNG not restored, the "
                        "resumed run will not replay the interrupted one exactly", len(states), world)

    def configure_optimizers(self):
        groups = decay_groups(self.model, self.optim_cfg)
        if not groups:
            raise ValueError("the policy has no trainable parameters (a 4-bit `policy.quantization: nf4` base is "
                             "frozen: set `policy.lora` to train adapters)")
        opt = make_optimizer(groups, self.optim_cfg)
        trainer = attached_trainer(self)
        total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1
        warm = self.warm_start_steps
        factor = (self.warm_start_lr or self.optim_cfg.lr) / self.optim_cfg.lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_lambda, total=total, cfg=self.optim_cfg,
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

    def target_token_logps(self, prompts: PromptBatch, missing: str) -> tuple[Tensor, Tensor]:
        """Teacher-forced `[B, T]` log-probs of the SFT targets and their `[B, T]` mask; `missing` is the error
        raised when the batch has no targets."""
        if prompts.target_ids is None:
            raise ValueError(missing)
        rollout = teacher_rollout(prompts, self.processor)
        feats = encode_media(self.model, prompts.pixel_values, prompts.grid_thw)
        view = SequenceView.of(self.model, rollout, prompts)
        hidden = completion_hidden(self.model, view, feats, rollout.completion_ids.shape[1])
        logps, _ = completion_logps(self.model, hidden, rollout.completion_ids, rollout.completion_mask,
                                    self.chunk_size)
        return logps, rollout.completion_mask

    def sft_loss(self, prompts: PromptBatch) -> Tensor:
        """Teacher-forced negative log-likelihood of the targets (mean over target tokens)."""
        logps, mask = self.target_token_logps(
            prompts, "SFT needs targets: the datamodule must provide sft_target for its rows")
        return -(logps * mask).sum() / mask.sum().clamp(min=1)

    @property
    def chunk_size(self) -> int | None:
        return DEFAULT_CHUNK_SIZE

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
        _, per, _ = compute_rewards(rollout.assistant_texts, [r["solution"] for r in rows],
                                    [r["problem_type"] for r in rows], names=["accuracy", "format"],
                                    weights=[1.0, 1.0], device=self.device)
        n = len(rows)
        self.log("val/acc", per["accuracy"].mean(), batch_size=n, sync_dist=True, prog_bar=True)
        self.log("val/format", per["format"].mean(), batch_size=n, sync_dist=True)
        if self.val_target_prob:
            logp = self.target_logp(batch.prompts)  # [B]
            self.log("val/p_target", logp.exp().mean(), batch_size=n, sync_dist=True)
            self.log("val/logp_target", logp.mean(), batch_size=n, sync_dist=True)  # no underflow far from it

    @torch.no_grad()
    def target_logp(self, prompts: PromptBatch) -> Tensor:
        """`[B]` log-probability that the policy, sampling at temperature 1, writes exactly each row's SFT
        target (then `<|im_end|>`): the teacher-forced sum of its token log-probs. `val/p_target` is the mean of
        its exp, `val/logp_target` its mean.

        Greedy accuracy moves in steps (a question flips when its argmax does), which hides small changes in
        small-scale comparisons. Where the target is a right answer (the synthetic task's warm-start target),
        this is continuous and is the expected accuracy reward of that one text: a lower bound on the sampled
        accuracy, since other texts may be right too."""
        logps, mask = self.target_token_logps(
            prompts, "val_target_prob needs SFT targets for the held-out rows: the datamodule's sft_target must "
                     "give one for every validation row")
        return (logps * mask).sum(-1)

    def test_step(self, batch: StepBatch, batch_idx: int) -> None:
        """Nothing per batch: `ktr test` is done by the benchmark evaluator callbacks (`ktr.callbacks`)."""


def _world_size(module: L.LightningModule) -> int:
    trainer = attached_trainer(module)
    return trainer.world_size if trainer is not None else 1


def _per_rank(state: dict) -> list[dict]:
    """`state` of every rank (a collective: every rank reaches `on_save_checkpoint`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def _merged_skips(states: list[dict]) -> dict:
    """Skip counts of a run resumed on another number of processes, summed over the old ranks."""
    from collections import Counter

    by_reason: Counter = Counter()
    for s in states:
        by_reason.update(s["by_reason"])
    return {"seen": sum(s["seen"] for s in states), "skipped": sum(s["skipped"] for s in states),
            "by_reason": dict(by_reason)}


PEER_RANK_EMPTY = "PeerRankEmpty"


def _agree_on_step(batch: StepBatch, device: torch.device) -> StepBatch:
    """`batch`, or its prompts moved to `skipped` when some rank of the process group has no prompt this step."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return batch
    backend_device = device if dist.get_backend() != "gloo" else torch.device("cpu")
    flag = torch.tensor([0 if batch.prompts is None else 1], device=backend_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if int(flag.item()) == 1 or batch.prompts is None:
        return batch
    dropped = [Skipped(-1, str(row.get("path", "")), f"{PEER_RANK_EMPTY}: another rank had no usable prompt in "
                       "this step, so every rank skipped it", where=row_source(row)) for row in batch.prompts.rows]
    return StepBatch(None, batch.skipped + dropped)
