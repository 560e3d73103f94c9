"""Run-time accounting of samples that could not be used (pure Python: no torch, no Lightning): media that do not
decode, prompts longer than `sampling.max_prompt_length`, rows no prompt can be built from.

The DataLoader never replaces a broken sample by another one: it returns a `Skipped` record next to the
prompts that did decode (`ktr.data.base.StepBatch.skipped`). The training loop feeds each batch to one
`SkipCounter`, which

- counts seen and skipped samples, by reason (the exception class: `FileNotFoundError`, `MediaDecodeError`,
  `PromptTooLong`...);
- warns once per path (a bad file seen again in the next epoch is counted again but not warned again);
- raises `SkipLimitExceeded` naming counts, fraction, threshold and example paths once more than
  `max_fraction` of the samples seen so far were skipped (checked after `min_seen` samples, so that one
  bad file among the first few does not stop a run); the training module saves `last.ckpt` before the error
  ends the run (`ktr.training.base`), so the steps already made are kept.

Counts are per process; under DDP each rank counts its own shard of the data. The counts (and which paths were
already warned about) go into checkpoints, so a resumed run keeps its totals (`ktr.training.base`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)



class SourcedRow(dict):
    """A data row (a plain `dict` for every reader and for `==`) that also knows where it is in its file.

    `source` (`train.json row 12 (line 13)`) is the row's place in the file as written, before invalid rows
    were dropped: what skip messages name. It survives pickling into DataLoader workers.
    """

    source: str = ""

    @classmethod
    def of(cls, row: dict, source: str) -> SourcedRow:
        out = cls(row)
        out.source = source
        return out


def row_source(row: Any) -> str:
    """Where `row` is in its file, or `""` when its data module does not say."""
    return getattr(row, "source", "")


@dataclass
class Skipped:
    """A sample that could not be prepared, with where and why."""

    index: int
    """Index of the row in its dataset."""
    path: str
    """The row's `path` field as written in the data file."""
    reason: str
    """`"<ExceptionClass>: <message>"`; the message names the resolved file."""
    where: str = ""
    """Where the row is in its data file (`train.json row 12 (line 13)`), when the data module knows it."""

    @property
    def kind(self) -> str:
        """Short reason key for logs, e.g. `MediaDecodeError` (the text before the first colon)."""
        return self.reason.split(":", 1)[0].strip() or "unknown"


class SkipLimitExceeded(RuntimeError):
    """Too many samples of a run could not be decoded."""


class SkipCounter:
    """Seen vs skipped samples of one run, with reasons; raises past the allowed fraction.

    Args:
        max_fraction: largest allowed `skipped / seen`; exceeding it (strictly) raises `SkipLimitExceeded`.
        min_seen: the fraction is checked only once at least this many samples were seen.
        max_examples: how many distinct skipped paths the error message and `summary()` list.

    >>> c = SkipCounter(max_fraction=0.5, min_seen=4)
    >>> c.update(4, [Skipped(0, "./a.mp4", "FileNotFoundError: no such file")])
    >>> c.seen, c.skipped, dict(c.by_reason)
    (4, 1, {'FileNotFoundError': 1})
    """

    def __init__(self, max_fraction: float = 0.1, min_seen: int = 20, max_examples: int = 5) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        if min_seen < 1:
            raise ValueError(f"min_seen must be >= 1, got {min_seen}")
        self.max_fraction, self.min_seen, self.max_examples = max_fraction, min_seen, max_examples
        self.seen = 0
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[Skipped] = []  # first skipped sample of each of the first few paths
        self._warned: set[str] = set()

    @property
    def fraction(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def update(self, n_seen: int, skipped: Sequence[Skipped]) -> None:
        """Count one batch: `n_seen` samples drawn from the loader, *including* the `skipped` ones.

        Warns once per new path, then raises `SkipLimitExceeded` if the limit is passed (see `check`).
        """
        if n_seen < len(skipped):
            raise ValueError(f"n_seen ({n_seen}) counts all samples of the batch, so it cannot be smaller than "
                             f"the number skipped ({len(skipped)})")
        self.seen += n_seen
        self.skipped += len(skipped)
        for item in skipped:
            self.by_reason[item.kind] += 1
            if item.path not in self._warned:
                self._warned.add(item.path)
                log.warning("skipping %s (%s): %s", item.where or f"sample {item.index}", item.path, item.reason)
                if len(self.examples) < self.max_examples:
                    self.examples.append(item)
        self.check()

    def update_batch(self, batch: Any) -> None:
        """`update` from a `StepBatch` (anything with `.prompts` of some length, or None, and `.skipped`)."""
        decoded = len(batch.prompts) if batch.prompts is not None else 0
        self.update(decoded + len(batch.skipped), batch.skipped)

    def check(self, final: bool = False) -> None:
        """Raise `SkipLimitExceeded` when `skipped / seen > max_fraction` and `seen >= min_seen`.

        `final=True` ignores `min_seen` (call it at the end of an epoch shorter than `min_seen`).
        """
        if self.seen == 0 or (self.seen < self.min_seen and not final):
            return
        if self.fraction > self.max_fraction:
            raise SkipLimitExceeded(
                f"{self.skipped} of {self.seen} samples ({self.fraction:.1%}) could not be used, more than "
                f"max_skip_fraction={self.max_fraction:g}. {self.summary()}. Check media_root and the media "
                f"files, or raise the data module's max_skip_fraction.")

    def summary(self) -> str:
        """By-reason counts and example paths, one line."""
        reasons = ", ".join(f"{k}: {n}" for k, n in self.by_reason.most_common()) or "none"
        examples = "; ".join(f"{s.path!r}{f' at {s.where}' if s.where else ''} ({s.reason})"
                             for s in self.examples) or "none"
        return f"Skipped by reason: {reasons}. Examples: {examples}"

    def metrics(self, prefix: str = "data") -> dict[str, float]:
        """Cumulative counts for logging: `data/seen`, `data/skipped_total`, `data/skipped_fraction`,
        `data/skipped/<reason>`."""
        out = {f"{prefix}/seen": float(self.seen), f"{prefix}/skipped_total": float(self.skipped),
               f"{prefix}/skipped_fraction": self.fraction}
        out.update({f"{prefix}/skipped/{k}": float(n) for k, n in self.by_reason.items()})
        return out

    def state_dict(self) -> dict:
        """Counts to store in a checkpoint so that a resumed run keeps its totals."""
        return {"seen": self.seen, "skipped": self.skipped, "by_reason": dict(self.by_reason),
                "warned": sorted(self._warned), "examples": [vars(e).copy() for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.by_reason = Counter(state["by_reason"])
        self._warned.update(state.get("warned", []))
        self.examples = [Skipped(**e) for e in state.get("examples", [])][: self.max_examples]
