"""Model-free benchmark evaluation: items, prompts, answer extraction, scoring and aggregation.

No Lightning here (layer L2; the extraction and scoring rules are L1); the evaluator Callbacks in
:mod:`ktr.callbacks` generate answers and use this API. ``BENCHMARKS`` maps ``"videomme"``, ``"tempcompass"``,
``"videommmu"``, ``"mmvu"`` and ``"videoholmes"`` to their classes (``VideoMMEBenchmark``, ...: the rules and data of
a benchmark; the callback that evaluates it during `fit` or `ktr test` is ``ktr.callbacks.VideoMME``).
"""

from ktr.eval.base import (BENCHMARKS, FORMATS, Benchmark, EvalItem, Format, SchemaError, register_benchmark,
                           resolve_video_path)
from ktr.eval.benchmarks import (MMVUBenchmark, TempCompassBenchmark, VideoHolmesBenchmark,  # registers the five
                                 VideoMMEBenchmark, VideoMMMUBenchmark, get_benchmark)
from ktr.eval.extract import Extraction
from ktr.eval.metrics import append_prediction, load_predictions, pending_items, prompt_hash, summarize

__all__ = [
    "BENCHMARKS",
    "FORMATS",
    "MMVUBenchmark",
    "Benchmark",
    "EvalItem",
    "Extraction",
    "Format",
    "SchemaError",
    "TempCompassBenchmark",
    "VideoHolmesBenchmark",
    "VideoMMEBenchmark",
    "VideoMMMUBenchmark",
    "append_prediction",
    "get_benchmark",
    "load_predictions",
    "pending_items",
    "prompt_hash",
    "register_benchmark",
    "resolve_video_path",
    "summarize",
]


def __getattr__(name: str):  # `ktr.eval.VideoMME` etc. before the rename to `...Benchmark` (ktr._moved)
    from ktr._moved import moved_attribute

    return moved_attribute(__name__, name)
