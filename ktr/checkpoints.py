"""Reading Lightning checkpoints safely, with errors that name the file and what is wrong (layer L2: torch only).

`fit --ckpt_path`, `ktr test --ckpt_path` and `ktr-export --ckpt` all go through `read_checkpoint` (the CLI
checks the file before Lightning loads it). Loading is always `torch.load(weights_only=True)`: a checkpoint
carrying arbitrary pickled objects is refused, never executed. What is told apart:

- a path that does not exist, or a directory that is not a distributed (`ModelParallelStrategy`) checkpoint;
- an empty file (an interrupted save), a truncated or corrupt one (a PyTorch zip without its central directory);
- a file that is not a PyTorch checkpoint at all (a YAML config, a safetensors file, random bytes);
- a PyTorch file that holds objects safe loading refuses, or that is not a Lightning checkpoint (a plain
  `state_dict`, a Hugging Face `pytorch_model.bin`: no `state_dict` key).
"""

from __future__ import annotations

import pickle
import zipfile
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
