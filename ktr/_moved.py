"""The one deprecation path: import paths that moved when the package took its layered layout (2026-12-05).

Configs and saved runs name classes by dotted path (`class_path: ktr.sft.SFTModule`), and user code imports
modules by path (`from ktr.policy import load_policy`). Every path that moved is in `MODULES` or `CLASSES`,
old -> new; an
old module path imports the new module under the old name, an old class path resolves to the new class, each
with one `DeprecationWarning` naming the new path. Nothing else in the package re-exports for old paths.
docs/architecture.md lists the moves. Old paths stop working in ktr 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MODULES = {
    "ktr.policy": "ktr.model.policy",
    "ktr.forward": "ktr.model.forward",
    "ktr.prefix": "ktr.model.prefix",
    "ktr.quant": "ktr.model.quant",
    "ktr.distributed": "ktr.model.fsdp",
    "ktr.tokenizer": "ktr.model.tokenizer",
    "ktr.checkpoints": "ktr.model.checkpoint",
    "ktr.families": "ktr.model.families",
    "ktr.rollout_shared": "ktr.rollout.shared",
    "ktr.rollout_vllm": "ktr.rollout.vllm",
    "ktr.sampling": "ktr.rollout.sampling",
    "ktr.baseline_rollout": "ktr.rollout.shuffled",
    "ktr.policy_module": "ktr.training.base",
    "ktr.sft": "ktr.training.sft",
    "ktr.optim": "ktr.training.optim",
    "ktr.resume": "ktr.training.resume",
    "ktr.checkpoint_io": "ktr.training.checkpoint_io",
}
CLASSES = {  # class paths that configs or user code name
    "ktr.module.SFTModule": "ktr.training.sft.SFTModule",
    "ktr.callbacks.EvalDataModule": "ktr.data.eval.EvalDataModule",
}
CLASSES |= {f"ktr.eval.{name}": f"ktr.eval.{name}Benchmark"  # benchmark rules, renamed apart from the callbacks
            for name in ("VideoMME", "TempCompass", "VideoMMMU", "MMVU", "VideoHolmes")}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path stops working in ktr 0.3", DeprecationWarning, stacklevel=3)


def moved_attribute(module: str, name: str):
    """The object a moved class path `module.name` now names; AttributeError (as Python raises) otherwise.
    For a module's `__getattr__`: `def __getattr__(name): return moved_attribute(__name__, name)`."""
    new = CLASSES.get(f"{module}.{name}")
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", new)
    where, _, attr = new.rpartition(".")
    return getattr(importlib.import_module(where), attr)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module's new path when its old path is asked for."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MODULES else None

    def create_module(self, spec):
        _warn(spec.name, MODULES[spec.name])
        return importlib.import_module(MODULES[spec.name])

    def exec_module(self, module) -> None:  # the new module ran already
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
