"""One evaluator callback per benchmark (layer L3): `ktr.callbacks.VideoMME`, `TempCompass`, `VideoMMMU`,
`MMVU`, `VideoHolmes`, and the generated `SyntheticBenchmark` of the demo.

Each takes ``annotation_path``, ``video_root`` and ``format`` (``"video_r1"``: the Video-R1 eval JSON;
``"official"``: the benchmark's own files; see ``docs/benchmarks.md`` sections 1-6 and :mod:`ktr.eval.benchmarks`), its
own options, and the evaluator options of :class:`~ktr.callbacks.evaluator.BenchmarkEvaluator`
(``decoding``, ``video``, ``every_n_steps``, ``subset``, ``output_dir``, ``num_workers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ktr import eval as E
from ktr.callbacks.evaluator import BenchmarkEvaluator, _barrier, _rank_world
from ktr.data.synthetic import SyntheticSpec
from ktr.eval.base import Format
from ktr.eval.benchmarks.tempcompass import SCORED_TASKS
from ktr.eval.benchmarks.videommmu import VIDEO_R1_TRACK_ORDER


class VideoMME(BenchmarkEvaluator):
    """Video-MME: accuracy per duration, domain, sub-category and task type; both denominators.

    Args:
        lenient_extraction: official format only; False (default) reads answers with the official rule, True
            also removes "Answer:" and "Option:" first (not official; `results.json` names the rule).
    """

    def __init__(self, annotation_path: str, video_root: str | None = None, format: Format = "video_r1",  # noqa: A002
                 lenient_extraction: bool = False, **kwargs) -> None:
        super().__init__(E.VideoMMEBenchmark(annotation_path, video_root, format, lenient_extraction), **kwargs)


class TempCompass(BenchmarkEvaluator):
    """TempCompass: rule-based accuracy per dimension, task type and fine-grained type; unmatched counted.

    Args:
        tasks: official task files to score (captioning needs an LLM judge and is not scored).
        meta_info_path: `meta_info.json` when it is not next to the question files.
    """

    def __init__(self, annotation_path: str, video_root: str | None = None, format: Format = "video_r1",  # noqa: A002
                 tasks: Sequence[str] = SCORED_TASKS, meta_info_path: str | None = None, **kwargs) -> None:
        super().__init__(E.TempCompassBenchmark(annotation_path, video_root, format, tasks, meta_info_path), **kwargs)


class VideoMMMU(BenchmarkEvaluator):
    """Video-MMMU: accuracy per track (Perception, Comprehension, Adaptation).

    Args:
        track: the track of an official file holding a single track (rows may also carry `track`).
        track_order: track of each block of 300 rows of the Video-R1 file.
    """

    def __init__(self, annotation_path: str, video_root: str | None = None, format: Format = "video_r1",  # noqa: A002
                 track: str | None = None, track_order: Sequence[str] = VIDEO_R1_TRACK_ORDER, **kwargs) -> None:
        super().__init__(E.VideoMMMUBenchmark(annotation_path, video_root, format, track, track_order), **kwargs)


class MMVU(BenchmarkEvaluator):
    """MMVU multiple-choice subset: accuracy per discipline and subject (letter read by rule)."""

    def __init__(self, annotation_path: str, video_root: str | None = None, format: Format = "video_r1",  # noqa: A002
                 **kwargs) -> None:
        super().__init__(E.MMVUBenchmark(annotation_path, video_root, format), **kwargs)


class VideoHolmes(BenchmarkEvaluator):
    """Video-Holmes: accuracy per question type (SR, IMC, TCI, TA, MHR, PAR, CTI)."""

    def __init__(self, annotation_path: str, video_root: str | None = None, format: Format = "video_r1",  # noqa: A002
                 **kwargs) -> None:
        super().__init__(E.VideoHolmesBenchmark(annotation_path, video_root, format), **kwargs)


class SyntheticBenchmark(BenchmarkEvaluator):
    """The demo benchmark: synthetic clips (`ktr.data.synthetic`) written as Video-R1 eval JSON + mp4 files.

    The data are written on first use to `data_dir` (default `<output root>/data`) by rank 0 and then read
    back through the Video-R1 path like any real benchmark. PyAV (a core dependency) writes the clips.

    Args:
        num_questions: questions in the benchmark.
        data_seed: seed of the item generator.
        spec: clip shape and question kinds.
        data_dir: where annotation.json and the videos go.
        wording: question template of the prompt: the evaluation wording (as for real benchmarks) or the
            training wording (what the demo's tiny policy was trained on).
    """

    def __init__(self, num_questions: int = 32, data_seed: int = 0, spec: SyntheticSpec | None = None,
                 data_dir: str | None = None, wording: Literal["eval", "train"] = "eval", **kwargs) -> None:
        from ktr.eval.benchmarks.synthetic import SyntheticVideoR1

        if num_questions < 1:
            raise ValueError(f"synthetic: num_questions must be >= 1, got {num_questions}")
        self.num_questions, self.data_seed, self.spec = num_questions, data_seed, spec or SyntheticSpec()
        self.data_dir, self.wording = data_dir, wording
        # the real annotation path is known once the output root is (see prepare)
        super().__init__(SyntheticVideoR1(Path(data_dir or ".") / "annotation.json", data_dir, wording=wording),
                         **kwargs)

    def prepare(self, root: Path) -> None:
        from ktr.eval.benchmarks.synthetic import SyntheticVideoR1, write_synthetic_benchmark

        data = Path(self.data_dir) if self.data_dir is not None else root / "data"
        if _rank_world()[0] == 0:
            write_synthetic_benchmark(data, self.num_questions, self.data_seed, self.spec)
        _barrier()
        self.benchmark = SyntheticVideoR1(data / "annotation.json", data, wording=self.wording)
