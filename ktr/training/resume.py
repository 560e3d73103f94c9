"""What exact resume needs beyond Lightning's own checkpoint (layer L2: torch only, no Lightning).

Lightning restores the weights, optimizer, learning-rate scheduler and loop counters. An RL run also depends on
- the random number generators: generation samples with the global torch RNG, the temporal probe draws its
  frame permutation from it, LoRA dropout uses it; numpy and Python RNGs are saved too for user code;
- where the data is: the shuffled order of the current pass and how far into it the run got.

`rng_state` / `set_rng_state` capture and restore the generators of one process. `ResumableDataLoader` is a
`DataLoader` with the `state_dict` / `load_state_dict` pair that Lightning saves with the fit loop (its
"stateful dataloader" support): on resume it replays the shuffle of the interrupted pass and skips the batches
already trained on *by index*, without loading their media.
"""

from __future__ import annotations

import random
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def rng_state() -> dict[str, Any]:
    """The generators of this process: torch CPU, the current CUDA device (if any), numpy, Python.

    Only tensors and Python scalars, so that checkpoints stay loadable with `torch.load(weights_only=True)`.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (a CUDA state is restored only where CUDA is in use)."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class _SkipFirst:
    """An index sampler that drops the first `owner._skip_next` batches of its next pass (indices only)."""

    def __init__(self, inner, owner: ResumableDataLoader) -> None:
        self.inner, self.owner = inner, owner

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        skip, self.owner._skip_next = self.owner._skip_next, 0
        return islice(iter(self.inner), skip, None)


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose position Lightning checkpoints (same constructor as `DataLoader`).

    State: the shuffling generator's state at the start of the current pass, the generator's state now, and
    the batches served in this pass. Loading it makes the *next* pass replay the interrupted one from the first
    batch not yet served. Skipped batches are dropped at the index level, so with worker processes their media
    are never decoded. Under a distributed sampler the order depends only on the seed and the epoch (which
    Lightning restores), so the same skip applies on every rank.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pass_start: torch.Tensor | None = None
        self._served = 0
        self._skip_next = 0
        self._pending: dict[str, Any] | None = None

    @property
    def _index_sampler(self):
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self):
        skip = 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            finished = state["served"] >= len(self)
            start = state["generator_now"] if finished else state["generator_pass_start"]
            if self.generator is not None and start is not None:
                self.generator.set_state(start)
            skip = 0 if finished else state["served"]
        self._pass_start = self.generator.get_state() if self.generator is not None else None
        self._served = self._skip_next = skip
        return self._serve(super().__iter__())

    def _serve(self, it):
        for batch in it:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"served": self._served, "generator_pass_start": self._pass_start,
                "generator_now": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"served", "generator_pass_start", "generator_now"} - set(state)
        if missing:
            raise ValueError(f"ResumableDataLoader state is missing {sorted(missing)}; was it saved by another loader?")
        self._pending = dict(state)
