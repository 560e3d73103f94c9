"""The five benchmarks of Video-KTR, one module each; importing this package registers them."""

from ktr.eval.base import BENCHMARKS, Benchmark
from ktr.eval.benchmarks.mmvu import MMVUBenchmark
from ktr.eval.benchmarks.tempcompass import TempCompassBenchmark
from ktr.eval.benchmarks.videoholmes import VideoHolmesBenchmark
from ktr.eval.benchmarks.videomme import VideoMMEBenchmark
from ktr.eval.benchmarks.videommmu import VideoMMMUBenchmark
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, load_video_r1, mean_relative_accuracy, score_video_r1


def get_benchmark(name: str) -> type[Benchmark]:
    """The benchmark class registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = [
    "MMVUBenchmark",
    "DualFormatBenchmark",
    "TempCompassBenchmark",
    "VideoHolmesBenchmark",
    "VideoMMEBenchmark",
    "VideoMMMUBenchmark",
    "get_benchmark",
    "load_video_r1",
    "mean_relative_accuracy",
    "score_video_r1",
]
