"""Lightning's private attributes are read in one place (`ktr.training.lightning_compat`), and what it does with
them still works on the installed Lightning."""

import re
from pathlib import Path

import lightning as L
import torch

from ktr.training.lightning_compat import attached_trainer, forget_step_metrics
from tests.helpers import metric_recorder

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"\._(results|trainer)\b|trainer\._\w+|_get_train_description")


def test_no_private_lightning_attribute_outside_the_compat_module() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "ktr").rglob("*.py"))
            if p.name != "lightning_compat.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "private Lightning attributes outside ktr/training/lightning_compat.py:\n" + "\n".join(hits)


class _Tiny(L.LightningModule):
    def __init__(self, forget: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.forget = forget
        self.trainers_seen: list = [attached_trainer(self)]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.trainers_seen.append(attached_trainer(self))
        if self.forget:
            forget_step_metrics(self.trainer)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).sum()
        if batch_idx == 0:
            self.log("first_only", loss.detach(), on_step=True, on_epoch=False)
        self.log("every", loss.detach(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=1)


def _steps_logging(forget: bool) -> tuple[list[int], _Tiny]:
    module, recorder = _Tiny(forget), metric_recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=recorder, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return [step for step, keys in recorder.rows if "first_only" in keys], module


def test_forget_step_metrics_stops_stale_values_and_trainer_is_found() -> None:
    stale, _ = _steps_logging(forget=False)
    assert len(stale) > 1, "Lightning no longer re-logs a stale on_step value: forget_step_metrics may be dropped"
    fresh, module = _steps_logging(forget=True)
    assert fresh == [0]
    assert module.trainers_seen[0] is None and all(t is module.trainer for t in module.trainers_seen[1:])
