"""Property tests (hypothesis): random JSON values in every field of a training row and in every numeric
setting are either accepted or rejected with a message naming the field or key; nothing else is raised.

No model is built here: the loader (`load_rows`, then the prompt of each accepted row) and the config
constructors only, so the examples run fast.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

from ktr.config import (
    ConfigError,
    DecodingConfig,
    KeyTokenConfig,
    LoraSettings,
    LossConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    SignalConfig,
    TinyModelConfig,
)
from ktr.data.prompts import build_messages
from ktr.data.video import ImageSettings, VideoSettings
from ktr.data.videor1 import load_rows

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["video", "image", "multiple choice", "numerical", "OCR",
                                                    "<answer>B</answer>", "<think>x</think>", "", "./a.mp4"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3), max_leaves=6)
ROW = {"problem_id": 7, "problem": "How many?", "data_type": "video", "problem_type": "multiple choice",
       "options": ["A. 1", "B. 2"], "solution": "<answer>A</answer>", "path": "./a.mp4", "data_source": "x",
       "process": "<think>t</think>"}
FIELDS = sorted(ROW)
PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(field=st.sampled_from(FIELDS), value=JSON | st.just("__delete__"), jsonl=st.booleans(),
       cot=st.booleans())
def test_any_json_value_in_any_row_field_is_accepted_or_named(field, value, jsonl, cot) -> None:
    row = dict(ROW)
    if value == "__delete__":
        del row[field]
    else:
        row[field] = value
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / ("train.jsonl" if jsonl else "train.json")
        f.write_text(json.dumps(row) + "\n" if jsonl else json.dumps([row, ROW]))
        rows, report = load_rows(f, require_process=cot)  # raises nothing for a bad row
    kept_first = report.invalid_rows == 0
    assert len(rows) == (1 if jsonl else 2) - (not kept_first)
    if kept_first:
        build_messages(rows[0])  # an accepted row makes a prompt
    else:
        assert report.examples and all(field in p.problem for p in report.examples), report.examples


SETTINGS = {  # key prefix -> (build(field, value), numeric fields)
    "sampling": (lambda k, v: SamplingConfig(**{k: v}),
                 ["group_size", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length"]),
    "decoding": (lambda k, v: DecodingConfig(**{k: v}),
                 ["group_size", "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length",
                  "batch_size"]),
    "loss": (lambda k, v: LossConfig(**{k: v}), ["beta", "clip_low", "clip_high", "chunk_size", "micro_batch_size"]),
    "optim": (lambda k, v: OptimConfig(**{k: v}), ["lr", "weight_decay", "betas", "warmup_steps", "grad_clip"]),
    "key_tokens.visual": (lambda k, v: KeyTokenConfig(visual=SignalConfig(**{k: v})), ["ratio"]),
    "rewards": (lambda k, v: RewardConfig(**{k: v}), ["weights"]),
    "policy.tiny": (lambda k, v: TinyModelConfig(**{k: v}),
                    ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vision_depth",
                     "vision_hidden_size", "vision_heads", "seed"]),
    "policy.lora": (lambda k, v: LoraSettings(**{k: v}), ["r", "alpha", "dropout"]),
    "video": (lambda k, v: VideoSettings(**{k: v}),
              ["fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"]),
    "image": (lambda k, v: ImageSettings(**{k: v}), ["min_pixels", "max_pixels"]),
    "data": (lambda k, v: _datamodule(**{k: v}),
             ["batch_size", "val_batch_size", "num_workers", "max_skip_fraction", "skip_min_seen"]),
}
NUMERIC = st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, -1, 0.5, 1.0, 2])


def _datamodule(**kw):
    from ktr.data.base import SyntheticDataModule

    return SyntheticDataModule(**kw)


@PROPERTY
@given(section=st.sampled_from(sorted(SETTINGS)), data=st.data(),
       value=NUMERIC | JSON | st.lists(NUMERIC, min_size=2, max_size=2))
def test_any_json_value_in_any_numeric_setting_is_accepted_or_named(section, data, value) -> None:
    build, fields = SETTINGS[section]
    field = data.draw(st.sampled_from(fields))
    key = f"{section}.{field}"
    try:
        built = build(field, value)
    except ConfigError as err:
        assert key in str(err), (key, str(err))
        return
    accepted = getattr(built, field, None) if not section.startswith(("key_tokens", "data")) else value
    for v in (accepted if isinstance(accepted, (list, tuple)) else [accepted]):
        assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                             and (isinstance(v, int) or math.isfinite(v))), (key, value)
