"""Benchmark evaluators as Lightning callbacks (layer L3): one code path for `ktr fit` and `ktr test`.

A :class:`BenchmarkEvaluator` owns one :class:`ktr.eval.Benchmark` and its own decoding and frame/pixel
settings (defaults: the released evaluation). It runs

- under ``ktr test`` / ``ktr validate`` at the end of the (placeholder) evaluation epoch, writing to
  ``<log_dir>/eval/<benchmark>/``;
- during ``ktr fit`` at validation ends where ``global_step % every_n_steps == 0``, writing to
  ``<log_dir>/eval/<benchmark>/step_<N>/`` (each step's answers are its own: never resumed from another
  step or another process).

Each run: questions not yet answered in ``predictions.jsonl`` are sharded over ranks (question ``i`` of the
pending list goes to rank ``i % world``), their videos decoded (missing or unreadable: a skipped record,
counted and listed, never replaced), answered in batches with ``ktr.rollout.hf.generate`` (``decoding.backend: hf``)
or a vLLM engine (``vllm``: the training module's own when it rolls out with vLLM too, else one of the evaluator's,
re-synced with the weights before every run), scored, gathered
on every rank after each batch (``all_gather_object``) and appended by rank 0, so that a killed run
resumes where it stopped. Scoring is exact across ranks: the summary is computed once from the gathered
per-question records; a torchmetrics all-reduce of the same scores cross-checks the gathering.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import SumMetric

from ktr.config import DecodingConfig
from ktr.data.base import decode_video_file
from ktr.data.processor import VisionLanguageProcessor
from ktr.data.video import MediaDecodeError, VideoSettings
from ktr.eval import Benchmark, EvalItem, append_prediction, load_predictions, pending_items, prompt_hash, summarize
from ktr.rollout.base import RolloutBackend, rollout_backend
from ktr.rollout.hf import generate
from ktr.types import PromptSample

Record = dict[str, Any]


# Named evaluation pixel settings (min_pixels, max_pixels); the 1.05 rule of VideoSettings applies to both.
PIXEL_PRESETS: dict[str, tuple[int, int]] = {
    # Video-R1's README asks for 256*28*28 per frame at evaluation.
    "video_r1_readme": (128 * 28 * 28, 256 * 28 * 28),
    # The shipped eval_bench.py passes no max_pixels, so the vendored qwen-vl-utils' 128*28*28 applies, raised to
    # int(min_pixels * 1.05) = 105,369 per frame by the 1.05 rule.
    "released_eval_bench": (128 * 28 * 28, 128 * 28 * 28),
}


@dataclass
class EvalVideoSettings(VideoSettings):
    """Frames at evaluation (released: fps 2, up to 16 frames; 32/64 via `max_frames`), 256*28*28 pixels per frame."""

    max_pixels: int = 256 * 28 * 28
    """Per-frame area cap at evaluation (training uses 128*28*28, a known cause of lower scores)."""
    preset: Literal["video_r1_readme", "released_eval_bench"] | None = None
    """Named pixel setting (`PIXEL_PRESETS`), recorded in results.json: `video_r1_readme` (256*28*28 per frame)
    or `released_eval_bench` (128*28*28, i.e. ~105k with the 1.05 rule, what the shipped eval_bench.py ran).
    It sets min_pixels / max_pixels; null keeps the two fields as given."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PIXEL_PRESETS:
                raise ValueError(f"video.preset must be one of {sorted(PIXEL_PRESETS)} or null, got {self.preset!r}")
            lo, hi = PIXEL_PRESETS[self.preset]
            defaults = (128 * 28 * 28, 256 * 28 * 28)
            for name, given, want, default in (("min_pixels", self.min_pixels, lo, defaults[0]),
                                               ("max_pixels", self.max_pixels, hi, defaults[1])):
                if given not in (want, default):
                    raise ValueError(f"video.preset {self.preset!r} sets {name}={want}, but {name}={given} was given; "
                                     "drop one of them")
            self.min_pixels, self.max_pixels = lo, hi
        super().__post_init__()


class QuestionDataset(Dataset):
    """One rank's questions -> ``(item, PromptSample)``, or ``(item, reason)`` when the video cannot be used."""

    def __init__(self, items: list[EvalItem], processor: VisionLanguageProcessor, video: VideoSettings,
                 max_prompt_length: int) -> None:
        self.items, self.processor, self.video, self.max_prompt_length = items, processor, video, max_prompt_length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[EvalItem, PromptSample | str]:
        item = self.items[index]
        try:
            media = decode_video_file(item.video_path, self.video)
        except (FileNotFoundError, MediaDecodeError, OSError, ValueError) as err:
            return item, f"{type(err).__name__}: {err}"
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": item.prompt_text}]}]
        sample = self.processor.encode(messages, media, row={"problem_id": item.qid})
        if len(sample.prompt_ids) > self.max_prompt_length:
            return item, f"prompt of {len(sample.prompt_ids)} tokens exceeds max_prompt_length={self.max_prompt_length}"
        return item, sample


def _as_list(batch: list) -> list:
    return batch


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _all_gather(records: list[Record]) -> list[Record]:
    """Every rank's records, in rank order (a copy of the input when not distributed)."""
    world = _rank_world()[1]
    if world == 1:
        return list(records)
    out: list[list[Record] | None] = [None] * world
    dist.all_gather_object(out, records)
    return [r for part in out for r in part]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class BenchmarkEvaluator(Callback):
    """Evaluate one benchmark during `fit` and under `ktr test`; see the module docstring.

    Args:
        benchmark: the benchmark (items, extraction, scoring); subclasses build it from their arguments.
        decoding: generation settings (default: the released evaluation).
        video: frame sampling and pixel limits (default: the released evaluation).
        every_n_steps: during `fit`, evaluate at validation ends where `global_step % every_n_steps == 0`;
            null = not during `fit` (only `ktr test` / `ktr validate`).
        subset: evaluate only the first `subset` questions (the same ones every time, so curves compare).
        output_dir: where results go (default `<log_dir>/eval/<benchmark>`); reuse it to resume a run.
        num_workers: DataLoader workers decoding videos (0 = in the main process).
    """

    def __init__(self, benchmark: Benchmark, decoding: DecodingConfig | None = None,
                 video: EvalVideoSettings | None = None, every_n_steps: int | None = None,
                 subset: int | None = None, output_dir: str | None = None, num_workers: int = 0) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"{benchmark.name}: every_n_steps must be >= 1 or null, got {every_n_steps}")
        if subset is not None and subset < 1:
            raise ValueError(f"{benchmark.name}: subset must be >= 1 or null, got {subset}")
        self.benchmark = benchmark
        self.decoding = decoding or DecodingConfig()  # validated where it is built (ktr.config)
        self.video = video or EvalVideoSettings()
        self.every_n_steps, self.subset, self.output_dir = every_n_steps, subset, output_dir
        self.num_workers = num_workers
        self.last_generated: list[str] = []  # qids this rank generated in the last run (auditing, tests)
        self._last_fit_step: int | None = None
        self.backend: RolloutBackend | None = None  # decoding.backend other than hf: built on first use
        self._shared_backend = False

    # --- Lightning hooks ------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":  # `ktr validate`: same as `ktr test`
            self.run(trainer, pl_module)
            return
        step = trainer.global_step
        if self.every_n_steps is None or step % self.every_n_steps or step == self._last_fit_step:
            return
        self._last_fit_step = step
        self.run(trainer, pl_module, subdir=f"step_{step:07d}", fresh=True)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer, pl_module, subdir: str | None = None, fresh: bool = False) -> dict[str, Any]:
        """Evaluate ``pl_module.model`` and log ``eval/<benchmark>/...``; returns the results."""
        if self.output_dir is not None:
            root = Path(self.output_dir)
        else:  # trainer.log_dir is broadcast from rank 0, so every rank writes to / reads from the same place
            root = Path(trainer.log_dir or trainer.default_root_dir) / "eval" / self.benchmark.name
        cfg = getattr(pl_module, "policy_cfg", None)
        checkpoint = {"ckpt_path": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
                      "name_or_path": getattr(cfg, "name_or_path", None),
                      "adapter_path": getattr(cfg, "adapter_path", None),
                      "global_step": trainer.global_step if trainer.state.fn == "fit" else None}
        own = getattr(pl_module, "rollout_backend", None)
        if self.decoding.backend != "hf" and getattr(getattr(pl_module, "sampling", None), "backend", None) == \
                self.decoding.backend and own is not None:
            self.backend, self._shared_backend = own, True  # one engine per rank, kept in sync by training
        results = self.evaluate(pl_module.model, pl_module.processor, root, subdir, checkpoint, fresh)
        self.log_results(pl_module, results)
        return results

    # --- evaluation without Lightning -----------------------------------------------------------------
    def prepare(self, root: Path) -> None:
        """Called on every rank before the benchmark is loaded (e.g. to write a generated benchmark)."""

    def evaluate(self, model: nn.Module, processor: VisionLanguageProcessor, root: str | os.PathLike,
                 subdir: str | None = None, checkpoint: dict[str, Any] | None = None,
                 fresh: bool = False) -> dict[str, Any]:
        """Answer the pending questions, write ``predictions.jsonl`` and ``results.json``; the results.

        ``fresh`` discards earlier files in the output folder instead of resuming from them: during `fit`, a
        step folder left by an interrupted earlier process holds answers of weights that no longer exist
        (a resumed run re-trains from its last checkpoint). Works with or without an initialised process
        group; every rank must call it.
        """
        rank, world = _rank_world()
        root = Path(root)
        out = root / subdir if subdir else root
        self.prepare(root)
        items = self.benchmark.load()
        if self.subset is not None:
            items = items[: self.subset]
        settings = self.settings(checkpoint, world)
        pred_path = out / "predictions.jsonl"
        if fresh:
            _barrier()  # nobody may still be reading the folder
            if rank == 0:
                for name in ("predictions.jsonl", "results.json", "settings.json"):
                    if (out / name).is_file():
                        rank_zero_warn(f"{out / name}: left by an earlier run at this step; replaced")
                        (out / name).unlink()
            _barrier()
        self._check_resume(out, settings)  # every rank raises alike, before anything is written
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "settings.json", self._resume_key(settings))
            done = load_predictions(pred_path, repair=True)
        _barrier()  # the others read predictions only once rank 0 has repaired a cut-short last line
        if rank != 0:
            done = load_predictions(pred_path)
        if self.backend is not None and not self._shared_backend:
            self.backend.on_weights_updated(model)  # the evaluator's own engine: the weights may have moved
        new, mine = self._generate_all(model, processor, pending_items(items, done), rank, world, pred_path)
        if self.backend is not None:
            self.backend.release()  # vLLM: the engine sleeps again (training, or the next benchmark, follows)
        done.update(new)
        records = [done[it.qid] for it in items]
        results = summarize(records, self.benchmark.excluded)
        resumed = [r for r in records if r["qid"] not in new] if rank == 0 else []  # counted once, by rank 0
        self._cross_check(results, mine + resumed, model)
        results = {"benchmark": self.benchmark.name, **results, "settings": settings}
        if rank == 0:
            _write_json(out / "results.json", results)
            if results["n_skipped"]:
                first = results["skipped"][0]
                rank_zero_warn(f"{self.benchmark.name}: {results['n_skipped']} of {results['n_questions']} questions "
                               f"were skipped (first: {first['qid']}: {first['reason']}) and count as wrong in acc, "
                               f"as in the official scripts; acc over the readable ones: "
                               f"{results['overall_readable']}. All reasons: {out / 'results.json'}")
        _barrier()
        return results

    def _generate_all(self, model: nn.Module, processor: VisionLanguageProcessor, pending: list[EvalItem],
                      rank: int, world: int, pred_path: Path) -> tuple[dict[str, Record], list[Record]]:
        """Answer ``pending`` sharded over ranks: all new records by qid (every rank), and this rank's own."""
        bs = self.decoding.batch_size
        shard = pending[rank::world]
        rounds = math.ceil(math.ceil(len(pending) / world) / bs)  # the same on every rank: gathers pair up
        video = self.video.for_factor(processor.resize_factor, "video")  # the policy's patch_size*merge_size
        loader = DataLoader(QuestionDataset(shard, processor, video, self.decoding.max_prompt_length),
                            batch_size=bs, num_workers=self.num_workers, collate_fn=_as_list)
        batches = iter(loader)
        self.last_generated = []
        new: dict[str, Record] = {}
        mine: list[Record] = []
        for _ in range(rounds):
            local = self._answer(model, processor, next(batches, []))
            mine.extend(local)
            for rec in _all_gather(local):
                new[rec["qid"]] = rec
                if rank == 0:
                    append_prediction(pred_path, rec)
        return new, mine

    def _answer(self, model: nn.Module, processor: VisionLanguageProcessor,
                batch: list[tuple[EvalItem, PromptSample | str]]) -> list[Record]:
        """Records of one batch: skipped ones for unusable videos, scored answers for the others."""
        records: list[Record | None] = [None] * len(batch)
        ready = [i for i, (_, got) in enumerate(batch) if not isinstance(got, str)]
        for i, (item, got) in enumerate(batch):
            if isinstance(got, str):
                records[i] = self.benchmark.skipped(item, got, prompt_hash(item.prompt_text))
        if ready:
            device = next(model.parameters()).device
            prompts = processor.collate([batch[i][1] for i in ready], self.video.rope_time).to(device)
            greedy = self.decoding.temperature == 0
            if self.decoding.backend == "hf":
                rollout = generate(model, processor, prompts, self.decoding, group_size=1, greedy=greedy)
            else:
                if self.backend is None:
                    self.backend = rollout_backend(self.decoding.backend)
                rollout = self.backend.generate(model, processor, prompts, self.decoding, group_size=1, greedy=greedy)
            for i, text in zip(ready, rollout.texts):
                item = batch[i][0]
                records[i] = self.benchmark.evaluate(text, item, prompt_hash(item.prompt_text))
                self.last_generated.append(item.qid)
        return [r for r in records if r is not None]

    def _cross_check(self, results: dict[str, Any], counted: list[Record], model: nn.Module) -> None:
        """All-reduce (torchmetrics) the scores of ``counted`` (each record on one rank only); they must equal
        the summary of the gathered records, so a lost or doubled question fails loudly."""
        device = next(model.parameters()).device
        scores = [float(r["score"]) for r in counted if not r.get("skipped")]
        total, count = SumMetric().to(device), SumMetric().to(device)
        total.set_dtype(torch.float64)
        count.set_dtype(torch.float64)
        total.update(torch.tensor(scores, dtype=torch.float64, device=device))
        count.update(torch.tensor(float(len(scores)), dtype=torch.float64, device=device))
        n, s = int(count.compute().item()), float(total.compute().item())
        expected = results["overall_readable"] * results["n_scored"] if results["n_scored"] else 0.0
        if n != results["n_scored"] or abs(s - expected) > 1e-6 * max(1, n):
            raise RuntimeError(f"{self.benchmark.name}: gathered records ({results['n_scored']} scored, sum "
                               f"{expected}) disagree with the all-reduced scores ({n}, sum {s})")

    # --- settings, resume, logging -----------------------------------------------------------------
    def settings(self, checkpoint: dict[str, Any] | None, world: int) -> dict[str, Any]:
        """The ``settings`` of ``results.json``: decoding, frames, pixels, prompt, extraction, checkpoint."""
        v = self.video
        decoding = {k: val for k, val in asdict(self.decoding).items() if k != "group_size"}  # always 1
        return {"decoding": decoding,
                "frames": {"fps": v.fps, "min_frames": v.min_frames, "max_frames": v.max_frames},
                "pixels": {"min_pixels": v.min_pixels, "max_pixels": v.max_pixels, "total_pixels": v.total_pixels,
                           "preset": getattr(v, "preset", None), "rope_time": v.rope_time},
                "prompt_variant": self.benchmark.prompt_variant, "extraction_rule": self.benchmark.extraction_rule,
                "checkpoint": checkpoint or {}, "benchmark": self.benchmark.settings(), "subset": self.subset,
                "world_size": world}

    @staticmethod
    def _resume_key(settings: dict[str, Any]) -> dict[str, Any]:
        """What must not change between a run and its resumption (the batch size and subset may)."""
        decoding = {k: v for k, v in settings["decoding"].items() if k != "batch_size"}
        return {"decoding": decoding, "frames": settings["frames"], "pixels": settings["pixels"],
                "checkpoint": settings["checkpoint"], "extraction_rule": settings["extraction_rule"]}

    def _check_resume(self, out: Path, settings: dict[str, Any]) -> None:
        saved_path, key = out / "settings.json", self._resume_key(settings)
        if not saved_path.is_file():
            return
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if saved != key:
            changed = sorted(k for k in key.keys() | saved.keys() if saved.get(k) != key.get(k))
            raise ValueError(f"{out}: its predictions were made with other settings ({', '.join(changed)}: "
                             f"{ {k: saved.get(k) for k in changed} } now { {k: key.get(k) for k in changed} }); "
                             "delete that folder or evaluate into another one (output_dir, or the logger version)")

    def log_results(self, pl_module, results: dict[str, Any]) -> None:
        """``eval/<benchmark>/acc`` (every question, a skipped one wrong), ``acc_answered``, ``acc_readable``, counts,
        and one scalar per group."""
        name = self.benchmark.name
        metrics = {f"eval/{name}/acc": results["overall"], f"eval/{name}/acc_answered": results["overall_answered"],
                   f"eval/{name}/acc_readable": results["overall_readable"],
                   **{f"eval/{name}/{k}": results[k] for k in ("n_scored", "n_skipped", "n_unparsable")}}
        for field_name, groups in results["breakdown"].items():
            for group, cell in groups.items():
                metrics[f"eval/{name}/{field_name}/{group.replace('/', '_')}"] = cell["acc"]
        # every rank holds the same gathered results: no reduction needed
        pl_module.log_dict({k: float(v) for k, v in metrics.items() if v is not None}, sync_dist=False)
