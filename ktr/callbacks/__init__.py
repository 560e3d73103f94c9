"""Lightning callbacks (layer L3): benchmark evaluators, run during `fit` and under `ktr test`; key-token reports."""

from ktr.callbacks.benchmarks import MMVU, SyntheticBenchmark, TempCompass, VideoHolmes, VideoMME, VideoMMMU
from ktr.callbacks.evaluator import BenchmarkEvaluator, DecodingConfig, EvalVideoSettings
from ktr.callbacks.key_tokens import KeyTokenReport


def __getattr__(name: str):  # `ktr.callbacks.EvalDataModule` of older configs (ktr._moved)
    from ktr._moved import moved_attribute

    return moved_attribute(__name__, name)

__all__ = [
    "MMVU",
    "BenchmarkEvaluator",
    "DecodingConfig",
    "EvalVideoSettings",
    "KeyTokenReport",
    "SyntheticBenchmark",
    "TempCompass",
    "VideoHolmes",
    "VideoMME",
    "VideoMMMU",
]
