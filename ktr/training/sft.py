"""Supervised fine-tuning as a stage of its own (layer L3), e.g. the cold start on Video-R1-COT-165k."""

from __future__ import annotations

from torch import Tensor

from ktr.data.base import StepBatch
from ktr.training.base import PolicyModule


class SFTModule(PolicyModule):
    """Supervised fine-tuning on the datamodule's targets (e.g. Video-R1-COT-165k: `process + "\\n" + solution`)."""

    needs_targets = True

    def training_step(self, batch: StepBatch, batch_idx: int) -> Tensor | None:
        batch = self.count_skips(batch)
        return None if batch.prompts is None else self.sft_step(batch.prompts)
