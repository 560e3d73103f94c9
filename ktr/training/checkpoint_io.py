"""Checkpoint files written next to where they go (layer L3: a Lightning `CheckpointIO`).

Lightning's `.ckpt` writer (`_atomic_save`) serialises the whole checkpoint into memory, writes it to a temporary
file in the system temp directory (fsspec's transaction) and then moves it into place: a save killed midway leaves
a whole checkpoint (gigabytes at 7B) in /tmp, /tmp needs room for one, and across filesystems the move is a copy,
not atomic. `RunFolderCheckpointIO` writes `<name>.tmp-<pid>` in the checkpoint's own folder, syncs it, renames it
over the target (atomic on one filesystem) and removes it when the save fails. The RL and SFT modules install it
at `setup` in place of Lightning's default writer (never in place of one the user chose).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class RunFolderCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose temporary file lives in the checkpoint's folder (remote paths: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomically(checkpoint, Path(path))


def save_atomically(obj: Any, path: Path) -> None:
    """`torch.save(obj)` to `path` through `<path>.tmp-<pid>` in the same folder: `path` is either the old file or
    the whole new one, and a failed save leaves no temporary file behind (a killed one leaves it beside `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def use_run_folder_io(trainer) -> None:
    """Replace the strategy's default `TorchCheckpointIO` (exactly that class) by `RunFolderCheckpointIO`."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = RunFolderCheckpointIO()
