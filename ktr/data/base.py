"""Datasets and the LightningDataModule base shared by every training set (layer L3).

Media are decoded in DataLoader workers, once per prompt (the G completions reuse the decoded frames). A sample
whose media cannot be decoded, whose prompt is longer than the module's `sampling.max_prompt_length`, or from which
no prompt can be built becomes a `Skipped` record: it is never replaced by another sample, the batch goes on
without it, and the module counts and logs it (`data/skipped`, by reason). Too many failures stop the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from torch.utils.data import Dataset

from ktr.config import check_number
from ktr.data.processor import VisionLanguageProcessor
from ktr.data.prompts import build_messages
from ktr.data.skips import SkipCounter, Skipped, row_source
from ktr.data.synthetic import SyntheticSpec
from ktr.data.video import ImageSettings, MediaDecodeError, VideoSettings, frames_from_array, load_image, load_video
from ktr.training.resume import ResumableDataLoader
from ktr.types import Media, PromptBatch, PromptSample

log = logging.getLogger(__name__)

MediaLoader = Callable[[dict], Media]
TargetFn = Callable[[dict, int], str]
PROMPT_TOO_LONG = "PromptTooLong"
"""Skip reason of a prompt longer than `sampling.max_prompt_length` (counted as `data/skipped/PromptTooLong`)."""


@dataclass
class StepBatch:
    """What the DataLoader yields: the prompts that decoded, and those that did not."""

    prompts: PromptBatch | None
    skipped: list[Skipped] = field(default_factory=list)

    def to(self, device) -> StepBatch:
        return StepBatch(self.prompts.to(device) if self.prompts is not None else None, self.skipped)


def decode_video_file(path: str, settings: VideoSettings) -> Media:
    clip = load_video(path, settings)
    return Media("video", clip.frames, clip.sample_fps, path, frame_times=clip.frame_times)


def decode_image_file(path: str, settings: ImageSettings) -> Media:
    return Media("image", load_image(path, settings).unsqueeze(0), None, path)


class PromptDataset(Dataset):
    """Rows in the Video-R1 schema -> `PromptSample` (or `Skipped`).

    Args:
        rows: the rows (already schema-validated by the caller).
        load_media: row -> decoded `Media`; raises `MediaDecodeError`/`FileNotFoundError`/`OSError` on bad media.
        processor: tokenises the prompt and patches the media.
        eval_prompt: use the evaluation wording of the question template.
        target: row, index -> supervised target text (SFT); None for RL.
        max_prompt_length: a prompt with more tokens (incl. vision placeholders) becomes a `Skipped` record
            (reason `PromptTooLong`) instead of failing the step; None: no limit here.

    A row no prompt can be built from (`ValueError` from the prompt, the target or the processor) is skipped
    and counted too: it is the sample's fault, so it must not end the run.
    """

    def __init__(self, rows: Sequence[dict], load_media: MediaLoader, processor: VisionLanguageProcessor,
                 eval_prompt: bool = False, target: TargetFn | None = None,
                 max_prompt_length: int | None = None) -> None:
        self.rows, self.load_media, self.processor = rows, load_media, processor
        self.eval_prompt, self.target, self.max_prompt_length = eval_prompt, target, max_prompt_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptSample | Skipped:
        row = self.rows[index]
        skip = partial(Skipped, index, str(row.get("path", "")), where=row_source(row))
        try:
            media = self.load_media(row)
        except (MediaDecodeError, FileNotFoundError, OSError, ValueError) as err:
            return skip(f"{type(err).__name__}: {err}")
        try:
            target = self.target(row, index) if self.target is not None else None
            sample = self.processor.encode(build_messages(row, eval=self.eval_prompt), media, row=row, target=target)
        except ValueError as err:  # the row's own fault (a field no prompt or target can be built from)
            return skip(f"{type(err).__name__}: {err}")
        if self.max_prompt_length is not None and len(sample.prompt_ids) > self.max_prompt_length:
            return skip(f"{PROMPT_TOO_LONG}: prompt of {len(sample.prompt_ids)} tokens exceeds "
                        f"sampling.max_prompt_length={self.max_prompt_length}")
        return sample


class BaseDataModule(L.LightningDataModule):
    """Shared loader settings. Subclasses provide `train_rows`, `val_rows` and `load_media`.

    The processor (tokenizer, token ids, patch sizes) belongs to the policy, so it is taken from the
    LightningModule at `setup` time; `processor` may also be set directly (tests, scripts).
    """

    def __init__(self, batch_size: int = 1, val_batch_size: int = 8, num_workers: int = 0,
                 video: VideoSettings | None = None, image: ImageSettings | None = None,
                 max_skip_fraction: float = 0.1, skip_min_seen: int = 20, shuffle: bool = True,
                 seed: int = 42, val_eval_prompt: bool = False) -> None:
        """
        Args:
            batch_size: prompts per step per device (each gets G completions).
            val_batch_size: prompts per validation batch.
            num_workers: DataLoader workers decoding media.
            video: frame sampling and pixel limits for videos.
            image: pixel limits for images.
            max_skip_fraction: stop the run when more than this fraction of seen samples failed to decode.
            skip_min_seen: check that fraction only once this many samples were seen.
            shuffle: shuffle the training rows each epoch.
            seed: seed of the shuffling.
            val_eval_prompt: validate with the evaluation wording of the prompt (benchmarks use it always);
                by default validation sees the training wording, so `val/acc` measures the trained task.
        """
        super().__init__()
        for key, value, low in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                ("num_workers", num_workers, 0), ("skip_min_seen", skip_min_seen, 1)):
            check_number(f"data.{key}", value, integer=True, low=low)
        check_number("data.max_skip_fraction", max_skip_fraction, low=0, high=1)
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.video = video or VideoSettings()
        self.image = image or ImageSettings()
        self.max_skip_fraction, self.skip_min_seen = max_skip_fraction, skip_min_seen
        self.shuffle, self.seed, self.val_eval_prompt = shuffle, seed, val_eval_prompt
        self.processor: VisionLanguageProcessor | None = None
        self.max_prompt_length: int | None = None
        """Longest training prompt; taken from the module's `sampling.max_prompt_length` at `setup`."""

    # --- to implement -------------------------------------------------------------------------------
    def train_rows(self) -> Sequence[dict]:
        raise NotImplementedError

    def val_rows(self) -> Sequence[dict]:
        return []

    def load_media(self, row: dict) -> Media:
        raise NotImplementedError

    def sft_target(self, row: dict, index: int) -> str | None:
        return None

    # --- shared -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "processor"):
                raise RuntimeError("BaseDataModule needs a processor: attach it to a ktr module or set .processor")
            self.processor = module.processor
        # media are resized to multiples of the policy's patch_size * merge_size (28 Qwen2/2.5-VL, 32 Qwen3-VL)
        self.video = self.video.for_factor(self.processor.resize_factor, "data.init_args.video")
        self.image = self.image.for_factor(self.processor.resize_factor, "data.init_args.image")
        module = self.trainer.lightning_module if self.trainer is not None else None
        sampling = getattr(module, "sampling", None)
        if self.max_prompt_length is None and sampling is not None:
            self.max_prompt_length = sampling.max_prompt_length  # too-long prompts are skipped, not fatal

    def load_metrics(self) -> dict[str, float]:
        """Load-time counts for the logger (`data/invalid_rows`, `data/invalid/<reason>`...); none by default."""
        return {}

    def make_skip_counter(self) -> SkipCounter:
        """The run-time counter of undecodable samples, with this module's threshold (see `ktr.data.skips`)."""
        return SkipCounter(max_fraction=self.max_skip_fraction, min_seen=self.skip_min_seen)

    def collate(self, items: list[PromptSample | Skipped]) -> StepBatch:
        skipped = [x for x in items if isinstance(x, Skipped)]
        samples = [x for x in items if not isinstance(x, Skipped)]
        return StepBatch(self.processor.collate(samples, self.video.rope_time) if samples else None, skipped)

    def _loader(self, rows: Sequence[dict], batch_size: int, shuffle: bool, sft: bool, eval_prompt: bool):
        target = self.sft_target if sft else None
        ds = PromptDataset(rows, self.load_media, self.processor, eval_prompt=eval_prompt, target=target,
                           max_prompt_length=self.max_prompt_length)
        gen = torch.Generator().manual_seed(self.seed)
        # Resumable: Lightning checkpoints its shuffle and position, so a resumed run sees the same data
        # (ktr.training.resume).
        return ResumableDataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                                   collate_fn=self.collate, generator=gen, persistent_workers=self.num_workers > 0)

    def wants_sft_targets(self) -> bool:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, "needs_targets", False))

    def train_dataloader(self):
        rows = self.train_rows()
        self._warn_short_epoch(len(rows))
        return self._loader(rows, self.batch_size, self.shuffle, self.wants_sft_targets(), False)

    def _warn_short_epoch(self, n_rows: int) -> None:
        """Warn when each device's share of the training rows is smaller than `batch_size`: every step then
        trains on fewer prompts than asked (the DataLoader's only batch is short), which nothing else shows."""
        devices = self.trainer.world_size if self.trainer is not None else 1
        per_device = -(-n_rows // devices)  # a DistributedSampler pads each rank to ceil(n / world_size)
        if 0 < per_device < self.batch_size:
            log.warning("data.batch_size is %d but the training set has %d row(s)%s: each step trains on %d "
                        "prompt(s) per device, not %d; lower data.batch_size or add rows", self.batch_size, n_rows,
                        f" for {devices} devices" if devices > 1 else "", per_device, self.batch_size)

    def val_dataloader(self):
        rows = self.val_rows()
        if not rows:
            return []
        module = self.trainer.lightning_module if self.trainer is not None else None
        targets = bool(getattr(module, "val_target_prob", False))  # for `val/p_target`
        return self._loader(rows, self.val_batch_size, False, targets, self.val_eval_prompt)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device) if isinstance(batch, StepBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx)


class SyntheticDataModule(BaseDataModule):
    """The built-in synthetic video task (see `ktr.data.synthetic`), generated on the fly, no files."""

    def __init__(self, train_size: int = 4096, val_size: int = 64, spec: SyntheticSpec = SyntheticSpec(),  # noqa: B008
                 data_seed: int = 0, **kwargs) -> None:
        """
        Args:
            train_size: training items per epoch.
            val_size: held-out items (a disjoint index range) for validation accuracy.
            spec: clip shape and question kinds.
            data_seed: seed of the item generator (items are a pure function of seed and index).
            **kwargs: see BaseDataModule.
        """
        super().__init__(**kwargs)
        self.train_size, self.val_size, self.data_seed = train_size, val_size, data_seed
        self.spec = spec
        self._frames: dict[str, torch.Tensor] = {}

    def _rows(self, start: int, count: int) -> list[dict]:
        from ktr.data.synthetic import make_item

        return [make_item(self.data_seed, i, self.spec, render=False)[0] for i in range(start, start + count)]

    def train_rows(self) -> Sequence[dict]:
        return self._rows(0, self.train_size)

    def val_rows(self) -> Sequence[dict]:
        return self._rows(10_000_000, self.val_size)  # far from the training range: disjoint items

    def load_media(self, row: dict) -> Media:
        from ktr.data.synthetic import make_item

        _, seed, index = row["problem_id"].split("-")
        _, frames = make_item(int(seed), int(index), self.spec)
        clip = frames_from_array(frames, self.spec.fps, self.video)
        return Media("video", clip.frames, clip.sample_fps, row["path"], frame_times=clip.frame_times)

    def sft_target(self, row: dict, index: int) -> str:
        """Warm-start target: the answer format with the correct option letter.

        Like the released run, which starts RL from a chain-of-thought SFT checkpoint, the policy first sees
        supervised answers; the demo stops that stage early, while the policy is only partly right, so the gain
        measured after RL comes from RL.
        """
        return f"<think>I watch the frames.</think>{row['solution']}"
