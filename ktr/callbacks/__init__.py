"""Lightning callbacks (layer L3): benchmark evaluators that run during `fit` and under `ktr test`; key-token reports."""

from ktr.callbacks.benchmarks import MMVU, SyntheticBenchmark, TempCompass, VideoHolmes, VideoMME, VideoMMMU
from ktr.callbacks.evaluator import BenchmarkEvaluator, DecodingConfig, EvalDataModule, EvalVideoSettings
from ktr.callbacks.key_tokens import KeyTokenReport

__all__ = [
    "MMVU",
    "BenchmarkEvaluator",
    "DecodingConfig",
    "EvalDataModule",
    "EvalVideoSettings",
    "KeyTokenReport",
    "SyntheticBenchmark",
    "TempCompass",
    "VideoHolmes",
    "VideoMME",
    "VideoMMMU",
]
