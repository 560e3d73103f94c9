"""Reward registry: name -> pure reward function, custom rewards by dotted path (layer L1).

Reward protocol: ``fn(completion: str, solution: str, problem_type: str) -> float``. ``completion`` is
the decoded model output, ``solution`` the row's ``solution`` field (``"<answer>B</answer>"``),
``problem_type`` one of the Video-R1 types. A reward is a pure function of these strings (no logging, no
global state). A custom reward is named in the config either by a registered name or by a dotted path,
``"my_pkg.my_rewards:brevity"`` or ``"my_pkg.my_rewards.brevity"``; the module is imported only then.

Rewards never raise into training: :func:`compute_rewards` scores a failing call 0 and counts it.
Built-in rewards also report *why* through a detail function returning :class:`RewardResult`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ktr.config import ConfigError


class RewardFn(Protocol):
    """``fn(completion, solution, problem_type) -> float``; see the module docstring."""

    def __call__(self, completion: str, solution: str, problem_type: str) -> float: ...


@dataclass(frozen=True)
class RewardResult:
    """A reward value and whether the inputs could be read (``parse_ok``); ``reason`` says why not."""

    value: float
    parse_ok: bool = True
    reason: str = ""
    raised: bool = field(default=False, repr=False)
    """The reward function raised (or returned a non-finite value): a bug in the reward, not in the answer."""


DetailFn = Callable[[str, str, str], RewardResult]

REWARDS: dict[str, RewardFn] = {}
REWARD_DETAILS: dict[str, DetailFn] = {}


def register_reward(name: str, *, detail: DetailFn | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward under ``name``; ``detail`` optionally reports parse failures.

    >>> @register_reward("doc_example_length")
    ... def short_answer(completion: str, solution: str, problem_type: str) -> float:
    ...     return 1.0 if len(completion) < 100 else 0.0
    >>> get_reward("doc_example_length") is short_answer
    True
    >>> _ = REWARDS.pop("doc_example_length")
    """

    def decorator(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        # Same module and name is a re-import (e.g. importlib.reload), not a clash.
        if old is not None and _qualified(old) != _qualified(fn):
            raise ValueError(f"reward {name!r} is already registered to {_qualified(old)}")
        REWARDS[name] = fn
        if detail is not None:
            REWARD_DETAILS[name] = detail
        return fn

    return decorator


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _import_dotted(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r}: a dotted path needs a module and a name, e.g. 'pkg.mod:fn'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # any failure of the user's module (SyntaxError, its own errors...)
        raise ValueError(f"reward {path!r} could not be imported: importing module {module_name!r} failed with "
                         f"{type(err).__name__}: {err}") from err
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise ValueError(f"reward {path!r} could not be imported: module {module_name!r} has no {attr!r}") from err
    return obj


def get_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function by dotted path (``"pkg.mod:fn"``/``"pkg.mod.fn"``).

    Raises ``ValueError`` listing the registered names when ``name`` is neither, and when the function
    cannot be called as ``fn(completion, solution, problem_type)``.

    >>> get_reward("accuracy").__name__
    'accuracy_reward'
    """
    if name in REWARDS:
        return REWARDS[name]
    if "." not in name and ":" not in name:
        raise ValueError(
            f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)} "
            "(or give a dotted path 'pkg.module:function')"
        )
    fn = _import_dotted(name)
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    try:
        inspect.signature(fn).bind("completion", "solution", "problem_type")
    except TypeError as err:
        raise ValueError(f"reward {name!r} must accept (completion, solution, problem_type): {err}") from err
    except ValueError:
        pass  # some builtins have no introspectable signature; calling will tell
    return fn


def resolve_rewards(names: Sequence[str], key: str = "rewards.names") -> list[RewardFn]:
    """`get_reward` for each name, failing with the config key of the bad entry (`rewards.names[1]: ...`)."""
    out = []
    for i, name in enumerate(names):
        try:
            out.append(get_reward(name))
        except ValueError as err:
            raise ConfigError(f"{key}[{i}]: {err}") from err
    return out


def get_reward_detail(name: str) -> DetailFn:
    """Detail function of a reward: the built-in one, or a guard around ``get_reward(name)``.

    The guard scores 0 with ``parse_ok=False`` when the call raises or returns a non-finite value.
    """
    if name in REWARD_DETAILS:
        return REWARD_DETAILS[name]
    fn = get_reward(name)

    def guarded(completion: str, solution: str, problem_type: str) -> RewardResult:
        try:
            value = float(fn(completion, solution, problem_type))
        except Exception as err:  # noqa: BLE001 - rewards never raise (issue 5); the failure is counted.
            return RewardResult(0.0, False, f"{type(err).__name__}: {err}", raised=True)
        if not math.isfinite(value):
            return RewardResult(0.0, False, f"non-finite reward {value}", raised=True)
        return RewardResult(value)

    return guarded


def compute_rewards(
    completions: Sequence[str],
    solutions: Sequence[str],
    problem_types: Sequence[str],
    names: Sequence[str],
    weights: Sequence[float],
    *,
    device: torch.device | str | None = None,
    errors: dict[str, str] | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, int]]:
    """Weighted sum of the named rewards for ``N`` completions. Pure: no logging.

    Returns ``(total [N], {name: unweighted values [N]}, {name: number of failed calls})``, float32.
    ``errors``, when given, receives ``{name: first error}`` for each reward whose function raised (or returned
    a non-finite value) on some completion, so that the caller can warn about it.
    The length bonus is not included (it needs token counts); add :func:`ktr.rewards.length_bonus`.

    >>> total, per, failed = compute_rewards(
    ...     ["<think>t</think><answer>B</answer>", "B"], ["<answer>B</answer>"] * 2,
    ...     ["multiple choice"] * 2, names=["accuracy", "format"], weights=[1.0, 0.5])
    >>> total, per["format"], failed
    (tensor([1.5000, 0.0000]), tensor([1., 0.]), {'accuracy': 1, 'format': 0})
    """
    n = len(completions)
    if len(solutions) != n or len(problem_types) != n:
        raise ValueError(f"got {n} completions, {len(solutions)} solutions, {len(problem_types)} problem types")
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} reward names but {len(weights)} weights")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names repeat: {list(names)}")
    total = torch.zeros(n, dtype=torch.float32, device=device)  # [N]
    per_reward: dict[str, Tensor] = {}
    n_failed: dict[str, int] = {}
    for name, weight in zip(names, weights):
        detail = get_reward_detail(name)
        results = [detail(c, s, p) for c, s, p in zip(completions, solutions, problem_types)]
        values = torch.tensor([r.value for r in results], dtype=torch.float32, device=device)  # [N]
        per_reward[name] = values
        n_failed[name] = sum(not r.parse_ok for r in results)
        if errors is not None and (first := next((r.reason for r in results if r.raised), None)) is not None:
            errors.setdefault(name, first)
        total += weight * values
    return total, per_reward, n_failed
