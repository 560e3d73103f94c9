"""The only place ktr reads Lightning's private attributes, each behind a function with its reason.

`tests/test_lightning_compat.py` checks that nothing else in `ktr/` touches them and that each function still
does its job on the installed Lightning (the pinned set in constraints.txt).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None before one is attached (`module.trainer` raises then)."""
    return module._trainer


def forget_step_metrics(trainer: L.Trainer) -> None:
    """Forget the previous step's per-step metrics, so a metric is logged only in the steps that compute it.

    Lightning keeps an `on_step` metric's last value until the epoch ends and logs it again at every later step:
    the warm start's `train/sft_loss` would otherwise be drawn as a flat line over all RL steps. Only per-step
    metrics (`on_epoch` false) are touched, so nothing accumulated over the epoch is lost. Lightning has no
    public API for this; its result collection is `trainer._results`.
    """
    for item in trainer._results.values():
        if item.meta.on_step and not item.meta.on_epoch:
            item.has_reset = True


class StepsProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled `Epoch 0` instead of `Epoch 0/-2` when the run is bounded by
    `max_steps` (Lightning then sets `max_epochs` to -1, and the stock label prints `max_epochs - 1`). Only the
    label changes; it overrides the one method that builds it (`_get_train_description`, Lightning's own)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        return f"{text:{len(self.validation_description)}}"  # padded as Lightning does, against flicker
