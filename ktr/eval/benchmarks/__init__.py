"""The five benchmarks of Video-KTR, one module each; importing this package registers them."""

from ktr.eval.benchmarks.mmvu import MMVU
from ktr.eval.benchmarks.tempcompass import TempCompass
from ktr.eval.benchmarks.videoholmes import VideoHolmes
from ktr.eval.benchmarks.videomme import VideoMME
from ktr.eval.benchmarks.videommmu import VideoMMMU
from ktr.eval.benchmarks.videor1 import DualFormatBenchmark, load_video_r1, mean_relative_accuracy, score_video_r1

__all__ = [
    "MMVU",
    "DualFormatBenchmark",
    "TempCompass",
    "VideoHolmes",
    "VideoMME",
    "VideoMMMU",
    "load_video_r1",
    "mean_relative_accuracy",
    "score_video_r1",
]
