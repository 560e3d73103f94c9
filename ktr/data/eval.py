"""The data module of `ktr test` / `ktr validate` runs: the benchmark evaluator callbacks (`ktr.callbacks`) do
the work, so this one only gives Lightning a loop to run."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from ktr.data.base import BaseDataModule, StepBatch


def _first(batch: list) -> Any:
    return batch[0]


class EvalDataModule(BaseDataModule):
    """Data of `ktr test` / `ktr validate` runs whose work the evaluator callbacks do.

    Lightning runs an evaluation loop (and so the evaluators' epoch-end hooks) only over a non-empty
    dataloader; this one yields a single empty :class:`~ktr.data.base.StepBatch` per rank.
    """

    def __init__(self) -> None:
        super().__init__()

    def test_dataloader(self) -> DataLoader:
        return DataLoader([StepBatch(None)], batch_size=1, collate_fn=_first)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()
