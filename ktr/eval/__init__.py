"""Model-free benchmark evaluation: items, prompts, answer extraction, scoring and aggregation.

No Lightning here (layer L2; the extraction and scoring rules are L1); the evaluator Callbacks in
:mod:`ktr.callbacks` generate answers and use this API. ``BENCHMARKS`` maps ``"videomme"``, ``"tempcompass"``, ``"videommmu"``, ``"mmvu"`` and
``"videoholmes"`` to their classes.
"""

from ktr.eval.base import (BENCHMARKS, FORMATS, Benchmark, EvalItem, Format, SchemaError, register_benchmark,
                           resolve_video_path)
from ktr.eval.benchmarks import MMVU, TempCompass, VideoHolmes, VideoMME, VideoMMMU, get_benchmark  # registers the five
from ktr.eval.extract import Extraction
from ktr.eval.metrics import append_prediction, load_predictions, pending_items, prompt_hash, summarize

__all__ = [
    "BENCHMARKS",
    "FORMATS",
    "MMVU",
    "Benchmark",
    "EvalItem",
    "Extraction",
    "Format",
    "SchemaError",
    "TempCompass",
    "VideoHolmes",
    "VideoMME",
    "VideoMMMU",
    "append_prediction",
    "get_benchmark",
    "load_predictions",
    "pending_items",
    "prompt_hash",
    "register_benchmark",
    "resolve_video_path",
    "summarize",
]
