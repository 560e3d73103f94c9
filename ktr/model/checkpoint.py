"""Reading Lightning checkpoints safely, with errors that name the file and what is wrong (layer L2: torch only).

`fit --ckpt_path`, `ktr test --ckpt_path` and `ktr-export --ckpt` all go through `read_checkpoint` (the CLI
checks the file before Lightning loads it). Loading is always `torch.load(weights_only=True)`: a checkpoint
carrying arbitrary pickled objects is refused, never executed. What is told apart:

- a path that does not exist, or a directory that is not a distributed (`ModelParallelStrategy`) checkpoint;
- an empty file (an interrupted save), a truncated or corrupt one (a PyTorch zip without its central directory);
- a file that is not a PyTorch checkpoint at all (a YAML config, a safetensors file, random bytes);
- a PyTorch file that holds objects safe loading refuses, or that is not a Lightning checkpoint (a plain
  `state_dict`, a Hugging Face `pytorch_model.bin`: no `state_dict` key).

`shape_mismatch` turns PyTorch's many-line `size mismatch` dump into one line naming the settings that differ.
`find_last_checkpoint` is what `--ckpt_path last` resolves to (`ktr.cli`): the newest `last.ckpt` of the run's
earlier versions, not of the new, empty version folder Lightning would look in.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = {0x80}  # legacy (pre-1.6) torch.save files start with a pickle protocol opcode
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
"""`ckpt_path` values that Lightning resolves itself (not files)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what is wrong with it."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


def read_checkpoint(path: str | Path, *, key: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The dictionary of a Lightning `.ckpt` file, loaded with `weights_only=True`, or `CheckpointError`.

    `key` is how the user named the file (`--ckpt_path`, `--ckpt`) and starts the message. `mmap=True` maps the
    tensors instead of reading them (cheap: used to check a file that Lightning then loads itself).
    """
    path = Path(path)
    where = f"{key} {str(path)!r}"
    if not path.exists():
        raise CheckpointNotFound(f"{where} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{where} is a directory; a single-file Lightning checkpoint is expected here "
                              "(a ModelParallelStrategy checkpoint directory is read by `check_checkpoint`)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty (0 bytes), probably an interrupted save")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == _ZIP_MAGIC
    if not is_zip and head[:1] and head[0] not in _PICKLE_PROTOCOLS:
        raise CheckpointError(f"{where}: not a PyTorch checkpoint (the file starts with {head!r}; a Lightning "
                              "checkpoint is a zip written by torch.save)")
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{where}: the file is truncated or corrupt ({size:,} bytes and no zip directory "
                              "at its end), probably an interrupted save or copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where}: holds objects that safe loading (torch.load weights_only=True) refuses, "
                              f"so it is not loaded: {first}") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise CheckpointError(f"{where}: the file is corrupt or truncated, torch.load failed: "
                              f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                              ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: holds a {type(state).__name__}, not a Lightning checkpoint (a dict)")
    if "state_dict" not in state:
        found = sorted(map(str, state))[:5]
        raise CheckpointError(f"{where}: not a Lightning checkpoint (no 'state_dict' key; found {found}). A plain "
                              "or Hugging Face state dict is loaded with policy.name_or_path / policy.adapter_path")
    return state


def check_checkpoint(path: str | Path, *, key: str = "checkpoint") -> None:
    """Raise `CheckpointError` unless `path` is a usable Lightning checkpoint file or distributed directory.

    A file is opened with memory-mapped tensors (nothing large is read); a directory must hold the
    `torch.distributed.checkpoint` metadata that `ModelParallelStrategy` writes.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{key} {str(path)!r}: a directory without `.metadata`, so not a distributed "
                                  "(ModelParallelStrategy) checkpoint; give a .ckpt file or such a directory")
        return
    read_checkpoint(path, key=key, mmap=True)


def find_last_checkpoint(folders: Iterable[str | Path]) -> Path | None:
    """The most recently written `last.ckpt` (or `last-vN.ckpt`, `ModelCheckpoint`'s names) in `folders`, or None.

    >>> find_last_checkpoint(["/nonexistent"]) is None
    True
    """
    found = [p for folder in map(Path, folders) if folder.is_dir() for p in folder.iterdir()
             if p.suffix == ".ckpt" and re.fullmatch(r"last(-v\d+)?", p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def flat_settings(cfg: Any, prefix: str) -> dict[str, Any]:
    """A config dataclass as `{"policy.tiny.hidden_size": 64, ...}` (stored in checkpoints as `ktr_policy`).

    >>> from ktr.config import TinyModelConfig
    >>> flat_settings(TinyModelConfig(), "policy.tiny")["policy.tiny.hidden_size"]
    64
    """
    out: dict[str, Any] = {}
    for name, value in (asdict(cfg) if is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}.{name}"))
        else:
            out[f"{prefix}.{name}"] = value
    return out


def shape_mismatch(saved: Mapping[str, Any], own: Mapping[str, Any], saved_settings: Mapping[str, Any] | None,
                   settings: Mapping[str, Any]) -> str | None:
    """One line saying why a checkpoint's tensors do not fit this model, or None when every shared key fits.

    `saved`/`own` are state dicts (name -> tensor); `saved_settings`/`settings` are `flat_settings` of the
    checkpoint's run (None for checkpoints written before ktr stored them) and of this one.
    """
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in saved.items()
           if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if not bad:
        return None
    name, theirs, ours = bad[0]
    tensors = f"{len(bad)} tensor(s) differ in shape, e.g. {name}: {list(theirs)} in the checkpoint, {list(ours)} here"
    if saved_settings is None:
        return f"the checkpoint is of another model: {tensors}; use the policy settings it was trained with"
    diff = [f"{k}: {saved_settings[k]!r} in the checkpoint, {settings.get(k)!r} here"
            for k in sorted(saved_settings) if saved_settings[k] != settings.get(k)]
    return (f"the checkpoint is of another model: {'; '.join(diff) or 'no policy setting differs'} "
            f"({tensors}); use the checkpoint's settings")
