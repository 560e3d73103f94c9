"""Lightning callbacks (layer L3): benchmark evaluators that run during `fit` and under `ktr test`."""

from ktr.callbacks.benchmarks import MMVU, SyntheticBenchmark, TempCompass, VideoHolmes, VideoMME, VideoMMMU
from ktr.callbacks.evaluator import BenchmarkEvaluator, DecodingConfig, EvalDataModule, EvalVideoSettings

__all__ = [
    "MMVU",
    "BenchmarkEvaluator",
    "DecodingConfig",
    "EvalDataModule",
    "EvalVideoSettings",
    "SyntheticBenchmark",
    "TempCompass",
    "VideoHolmes",
    "VideoMME",
    "VideoMMMU",
]
