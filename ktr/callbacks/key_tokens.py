"""Key-token reports during training (layer L3): which tokens each signal selected, on real samples.

Every `every_n_steps` RL steps (counted from the first RL step, so the first one is always reported) the
callback reads the step's :class:`ktr.report.StepRecord` (`KTRModule.last_step`) and writes, under
`<log_dir>/key_tokens/` (or `output_dir`):

- `step_NNNNNNN.html`: a self-contained page (frames, question, each completion with reward, advantage, key
  fraction, every token highlighted by the signals that selected it, raw scores and thresholds on hover/focus);
- `step_NNNNNNN.json`: the data behind it (read by `ktr explain --stats`);
- `index.html`: a link to every report of the folder;
- a compact text version to TensorBoard's text tab (`key_tokens/report`) when the logger is TensorBoard.

At the end of training (`at_train_end`) it also explains the last training batch with the final policy
(`step_NNNNNNN_final.html`): a run whose steps were all warm-start (SFT) steps, which have no key tokens,
still gets a report. Only rank 0 writes, about its own prompts; the final report is made on one process only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from ktr.report.attribution import explain_batch
from ktr.report.html import markdown_summary
from ktr.report.record import StepRecord, head_prompts, report_data, thumbnails
from ktr.report.write import write_index, write_report

log = logging.getLogger(__name__)


class KeyTokenReport(Callback):
    """Write key-token report pages during `fit`; see the module docstring.

    Args:
        every_n_steps: report every this many RL steps (the first RL step always).
        num_prompts: prompts of the step shown per report.
        num_completions: completions shown per prompt (null: all G).
        output_dir: where reports go (default `<log_dir>/key_tokens`).
        tensorboard: also add a compact text version to TensorBoard (when the logger is TensorBoard).
        at_train_end: explain the last training batch with the final policy when training ends.
        max_frames: frame thumbnails shown per prompt.
        thumbnail_height: thumbnail height in pixels.
    """

    def __init__(self, every_n_steps: int = 10, num_prompts: int = 2, num_completions: int | None = None,
                 output_dir: str | None = None, tensorboard: bool = True, at_train_end: bool = True,
                 max_frames: int = 16, thumbnail_height: int = 64) -> None:
        for name, v in (("every_n_steps", every_n_steps), ("num_prompts", num_prompts),
                        ("max_frames", max_frames), ("thumbnail_height", thumbnail_height)):
            if v < 1:
                raise ValueError(f"KeyTokenReport.{name} must be >= 1, got {v}")
        if num_completions is not None and num_completions < 1:
            raise ValueError(f"KeyTokenReport.num_completions must be >= 1 or null, got {num_completions}")
        self.every_n_steps, self.num_prompts, self.num_completions = every_n_steps, num_prompts, num_completions
        self.output_dir, self.tensorboard, self.at_train_end = output_dir, tensorboard, at_train_end
        self.max_frames, self.thumbnail_height = max_frames, thumbnail_height
        self.written: list[Path] = []  # pages written by this process (tests, scripts)
        self._last_step: int | None = None
        self._last_prompts = None

    def report_dir(self, trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "key_tokens"

    # --- Lightning hooks ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        prompts = getattr(batch, "prompts", None)
        if prompts is not None:
            self._last_prompts = prompts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record: StepRecord | None = getattr(pl_module, "last_step", None)
        if record is None or record.step == self._last_step:
            return  # a warm-start (SFT) step or a batch without prompts: no key tokens
        self._last_step = record.step
        first_rl = getattr(pl_module, "warm_start_steps", 0)
        if (record.step - first_rl) % self.every_n_steps == 0 and trainer.is_global_zero:
            self.write(trainer, pl_module, record, "train", f"step_{record.step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_train_end or self._last_prompts is None:
            return
        if trainer.world_size > 1:  # explaining needs the same forward calls on every rank: not at teardown
            log.info("KeyTokenReport: no end-of-training report under %d processes", trainer.world_size)
            return
        prompts = head_prompts(self._last_prompts, self.num_prompts)
        was_training = pl_module.training
        pl_module.eval()
        try:
            record = explain_batch(pl_module.model, pl_module.processor, prompts, pl_module.key_cfg,
                                   pl_module.sampling, chunk_size=pl_module.chunk_size, step=trainer.global_step)
        finally:
            pl_module.train(was_training)
        self.write(trainer, pl_module, record, "final", f"step_{trainer.global_step:07d}_final",
                   title=f"Key tokens after training (step {trainer.global_step}, final policy, last batch)")

    # --- writing --------------------------------------------------------------------------------------
    def write(self, trainer, pl_module, record: StepRecord, kind: str, stem: str, title: str | None = None) -> Path:
        """Page + JSON + index for `record`; the text version to TensorBoard."""
        tokenizer = pl_module.processor.tokenizer
        data = report_data(record, tokenizer, getattr(pl_module, "key_cfg", None), self.num_prompts,
                           self.num_completions, kind=kind, title=title)
        thumbs = [thumbnails(m, self.max_frames, self.thumbnail_height)
                  for m in record.prompts.media[:self.num_prompts]]
        out = self.report_dir(trainer)
        page = write_report(data, thumbs, out, stem)
        write_index(out)
        self.written.append(page)
        if self.tensorboard:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("key_tokens/report", markdown_summary(data), global_step=record.step)
        log.info("key-token report: %s", page)
        return page
