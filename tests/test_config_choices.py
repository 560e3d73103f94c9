"""Every fixed choice of `ktr.config` is a Literal stated once, checked at construction, and equal to its registry.

The cases are generated from the dataclasses' annotations, so a new Literal-typed field is covered without
editing this file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest

import ktr.config as config
from ktr.config import ConfigError

DATACLASSES = [obj for obj in vars(config).values()
               if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__]
ALIASES = {name: obj for name, obj in vars(config).items() if get_origin(obj) is Literal}
BAD = "no-such-choice"


def _literal_values(tp) -> tuple | None:
    """The values of a Literal annotation, or of an optional one (None last); None for any other type."""
    parts = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    literals = [p for p in parts if get_origin(p) is Literal]
    if not literals or not all(get_origin(p) is Literal or p is type(None) for p in parts):
        return None
    return tuple(v for p in literals for v in get_args(p)) + ((None,) if type(None) in parts else ())


def _choice_cases() -> list[tuple[type, str, tuple]]:
    cases = []
    for cls in DATACLASSES:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            values = _literal_values(hints[f.name])
            if values is not None:
                cases.append((cls, f.name, values))
    return cases


CASES = _choice_cases()
MIN_CASES = 25  # the Literal-typed fields when this test was written; only ever grows
CASE_IDS = [f"{cls.__name__}.{name}" for cls, name, _ in CASES]


def test_cases_were_generated():
    assert len(DATACLASSES) >= 13, [c.__name__ for c in DATACLASSES]
    assert len(CASES) >= MIN_CASES, CASE_IDS
    for key in ("KeyTokenConfig.scope", "KeyTokenConfig.combine", "KeyTokenConfig.visual_perturbation",
                "KeyTokenConfig.temporal_perturbation", "SignalConfig.score", "PolicyConfig.dtype",
                "ShardingConfig.reduce_dtype", "DecodingConfig.backend", "SamplingConfig.backend"):
        assert key in CASE_IDS


def test_helper_finds_the_same_fields():
    for cls in DATACLASSES:
        assert config.choice_fields(cls) == {name: values for c, name, values in CASES if c is cls}, cls.__name__


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda c: c.__name__)
def test_every_dataclass_checks_its_choices(cls):
    post_init = vars(cls).get("__post_init__")
    assert post_init is not None, f"{cls.__name__} has no __post_init__ of its own"
    source = inspect.getsource(post_init)
    assert "check_choices(" in source or "_check_sampling(" in source, f"{cls.__name__}.__post_init__"
    assert "check_choices(" in inspect.getsource(config._check_sampling)
    cls()  # the defaults are valid


@pytest.mark.parametrize(("cls", "name", "values"), CASES, ids=CASE_IDS)
def test_bad_choice_names_key_and_values(cls, name, values):
    with pytest.raises(ConfigError) as err:
        cls(**{name: BAD})
    listing = ", ".join(map(repr, values))
    assert re.fullmatch(rf"[\w.<>]+\.{name} must be one of {re.escape(listing)}, got '{BAD}'", str(err.value)), \
        str(err.value)
    if None not in values:
        with pytest.raises(ConfigError, match=rf"\.{name} must be one of"):
            cls(**{name: None})
    with pytest.raises(ConfigError, match=rf"\.{name} must be one of"):
        cls(**{name: 1})


@pytest.mark.parametrize(("cls", "name", "values"), CASES, ids=CASE_IDS)
def test_every_valid_choice_is_accepted(cls, name, values):
    for value in values:
        assert getattr(cls(**{name: value}), name) == value


FULL_KEYS = {  # (option group, field, bad value) -> the dotted key the message must name
    ("KeyTokenConfig", "scope", BAD): "key_tokens.scope",
    ("KeyTokenConfig", "combine", BAD): "key_tokens.combine",
    ("KeyTokenConfig", "visual_perturbation", BAD): "key_tokens.visual_perturbation",
    ("KeyTokenConfig", "temporal_perturbation", BAD): "key_tokens.temporal_perturbation",
    ("SignalConfig", "score", BAD): "key_tokens.<signal>.score",
    ("SamplingConfig", "backend", BAD): "sampling.backend",
    ("DecodingConfig", "backend", "shared"): "decoding.backend",
    ("VLLMSettings", "dtype", BAD): "sampling.vllm.dtype",
    ("LossConfig", "aggregation", BAD): "loss.aggregation",
    ("RewardConfig", "length_reading", BAD): "rewards.length_reading",
    ("OptimConfig", "schedule", BAD): "optim.schedule",
    ("PolicyConfig", "attn_implementation", BAD): "policy.attn_implementation",
    ("ShardingConfig", "reduce_dtype", BAD): "policy.sharding.reduce_dtype",
}


@pytest.mark.parametrize(("case", "key"), FULL_KEYS.items(), ids=list(FULL_KEYS.values()))
def test_full_keys(case, key):
    cls, field, value = case
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be one of "):
        getattr(config, cls)(**{field: value})


def test_signal_score_is_named_by_signal_in_key_tokens():
    temporal = config.SignalConfig()
    temporal.score = BAD  # changed after its own check: KeyTokenConfig checks again, naming the signal
    with pytest.raises(ConfigError, match=r"^key_tokens\.temporal\.score must be one of 'logp_diff', 'kl'"):
        config.KeyTokenConfig(temporal=temporal)


# --- Literals that must name a registry's keys -------------------------------------------------------------
def _names(alias) -> set:
    return set(get_args(alias))


def test_rollout_backends_match_registry():
    from ktr.rollout.base import ROLLOUT_BACKENDS

    assert _names(config.RolloutBackendName) == set(ROLLOUT_BACKENDS)
    assert _names(config.EvalBackendName) <= set(ROLLOUT_BACKENDS)


def test_scores_match_registry():
    from ktr.probes.scores import SCORE_FUNCTIONS

    assert config.SCORES == get_args(config.ScoreName)
    assert _names(config.ScoreName) == set(SCORE_FUNCTIONS)


def test_perturbations_match_registries():
    from ktr.probes.temporal import TEMPORAL_PERTURBATIONS
    from ktr.probes.visual import PER_ROW_PERTURBATIONS, VISUAL_PERTURBATIONS

    assert _names(config.VisualPerturbation) == set(VISUAL_PERTURBATIONS)
    assert _names(config.TemporalPerturbation) == set(TEMPORAL_PERTURBATIONS)
    assert set(config.RANDOM_VISUAL) <= _names(config.VisualPerturbation)
    assert set(config.RANDOM_TEMPORAL) <= _names(config.TemporalPerturbation)
    assert set(PER_ROW_PERTURBATIONS) <= set(config.RANDOM_VISUAL)


def test_selection_and_weighting_match_registries():
    from ktr.probes import select
    from ktr.probes.weighting import WEIGHTINGS

    assert _names(config.Scope) == set(select.SCOPES) == _names(select.Scope)
    assert _names(config.Combine) == set(select.COMBINERS) == _names(select.Combine)
    assert _names(config.Weighting) == {"hard", *WEIGHTINGS}


def test_loss_choices_match_registries():
    from ktr.advantages import ADVANTAGES
    from ktr.losses import AGGREGATIONS

    assert _names(config.AdvantageName) == set(ADVANTAGES)
    assert _names(config.Aggregation) == set(AGGREGATIONS)


def test_signals_are_the_signal_fields():
    hints = get_type_hints(config.KeyTokenConfig)
    assert config.SIGNALS == tuple(f.name for f in dataclasses.fields(config.KeyTokenConfig)
                                   if hints[f.name] is config.SignalConfig)


# --- each choice stated once ---------------------------------------------------------------------------------
def _config_tree() -> ast.Module:
    return ast.parse(Path(config.__file__).read_text())


def test_no_literal_values_retyped():
    tree = _config_tree()
    literal_slices = {id(node.slice) for node in ast.walk(tree)
                      if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                      and node.value.id == "Literal"}
    retyped = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or id(node) in literal_slices:
            continue
        strings = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if len(strings) < 2 or len(strings) != len(node.elts):
            continue
        for name, alias in ALIASES.items():
            if set(strings) == set(get_args(alias)):
                retyped.append(f"line {node.lineno}: {tuple(strings)} repeats {name}")
    assert not retyped, retyped
    assert len(ALIASES) >= 20, sorted(ALIASES)


def test_every_literal_is_a_named_alias():
    """`Literal[...]` appears only on the right of a module-level `Alias = Literal[...]`, and no two aliases
    name the same set of values."""
    tree = _config_tree()
    at_top = {id(stmt.value) for stmt in tree.body
              if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)}
    inline = [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal"
              and id(node) not in at_top]
    assert not inline, f"inline Literal[...] at lines {inline} of ktr/config.py: name it once at module level"
    seen: dict[frozenset, str] = {}
    for name, alias in ALIASES.items():
        values = frozenset(get_args(alias))
        assert values not in seen, f"{name} and {seen[values]} name the same values"
        seen[values] = name
