"""Exact resume: a run stopped after k steps and resumed to n ends with the weights of an uninterrupted n-step run.

What has to come back for that: weights, AdamW state, the cosine schedule (Lightning), the RNG that sampling
and the temporal probe draw from, the reference model of the KL term, and the data position inside the
shuffled pass (`ktr.training.resume`). The tiny runs sample (temperature 1, top-p 0.95) and train the whole model
with beta > 0, so each of these matters.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import Dataset

from ktr.training.resume import ResumableDataLoader, rng_state, set_rng_state

pytestmark = pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")

N_STEPS = 4
TRAIN_SIZE = 3  # batch 1: an epoch is 3 steps, so 4 steps cross into a second shuffled pass


# --- the loader alone ------------------------------------------------------------------------------------
class _Counting(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def _loader(ds: Dataset) -> ResumableDataLoader:
    return ResumableDataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3),
                               collate_fn=list)


def test_loader_replays_the_interrupted_pass_without_loading_skipped_items():
    ref = _loader(_Counting(9))
    first, second = list(ref), list(ref)  # two shuffled passes of 5 batches
    assert first != second

    run = _loader(_Counting(9))
    it = iter(run)
    seen = [next(it), next(it)]
    state = run.state_dict()
    assert state["served"] == 2

    ds = _Counting(9)
    resumed = _loader(ds)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert seen + rest == first
    assert sorted(ds.loaded) == sorted(i for b in rest for i in b)  # the two served batches were not loaded
    assert list(resumed) == second  # and the pass after continues the original shuffle sequence


def test_loader_state_at_the_end_of_a_pass_starts_the_next_pass():
    run = _loader(_Counting(5))
    first = list(run)
    state = run.state_dict()
    assert state["served"] == len(first)
    resumed = _loader(_Counting(5))
    resumed.load_state_dict(state)
    assert list(resumed) == list(run)


def test_loader_rejects_a_foreign_state():
    with pytest.raises(ValueError, match="missing"):
        _loader(_Counting(3)).load_state_dict({"served": 1})


def test_rng_state_round_trip_and_loads_as_weights_only(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # as in a Lightning checkpoint
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# --- whole runs --------------------------------------------------------------------------------------------
class _Record(Callback):
    """Which prompts each step trained on, and an optional stop after `stop_at` steps (a run that died)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.ids = stop_at, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ids.append([r["problem_id"] for r in batch.prompts.rows])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


LORA_POLICIES = {  # PolicyConfig arguments of the adapter runs
    "lora": dict(lora=dict(r=4, alpha=8, dropout=0.0)),
    "qlora": dict(lora=dict(r=4, alpha=8, dropout=0.0), quantization="nf4", dtype="bfloat16"),
}


def _fit(ckpt_dir: Path | None = None, stop_at: int | None = None, resume_from: Path | None = None, warm: int = 0,
         name: str = "tiny", adapters: str | None = None):
    from ktr.config import LoraSettings, LossConfig, OptimConfig, PolicyConfig, SamplingConfig
    from ktr.data.base import SyntheticDataModule
    from ktr.data.video import VideoSettings
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    L.seed_everything(42)
    extra = dict(LORA_POLICIES[adapters]) if adapters else {}
    if extra:
        extra["lora"] = LoraSettings(**extra["lora"])
    module = KTRModule(policy=PolicyConfig(name_or_path=name, attn_implementation="eager", **extra),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=6, temperature=1.0, top_p=0.95),
                       loss=LossConfig(beta=0.04), optim=OptimConfig(lr=1e-3, schedule="cosine", grad_clip=5.0),
                       warm_start_steps=warm)
    data = SyntheticDataModule(train_size=TRAIN_SIZE, val_size=1, batch_size=1, shuffle=True, seed=7,
                               video=VideoSettings(fps=4.0, min_frames=4, max_frames=4, min_pixels=56 * 56,
                                                   max_pixels=56 * 56))
    record = _Record(stop_at)
    callbacks: list[Callback] = [record]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_at, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=N_STEPS, logger=False, callbacks=callbacks,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data, ckpt_path=resume_from)
    return module, record.ids


@functools.cache
def _uninterrupted(warm: int = 0, name: str = "tiny", adapters: str | None = None):
    module, ids = _fit(warm=warm, name=name, adapters=adapters)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, ids


def _equal_weights(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.parametrize(("k", "warm"), [(2, 0), (3, 0), (2, 1)], ids=["mid-epoch", "epoch-end", "after-warm-start"])
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, k, warm):
    """`after-warm-start`: one SFT step, then RL; the KL reference is the post-SFT model, saved in the checkpoint."""
    want, want_ids = _uninterrupted(warm)
    first, first_ids = _fit(ckpt_dir=tmp_path, stop_at=k, warm=warm)
    (ckpt,) = tmp_path.glob("*.ckpt")
    assert f"step={k}" in ckpt.name
    start = dict(first.state_dict())
    assert _equal_weights(start, want), "the stopped run should not already hold the final weights"

    if warm:
        assert "ktr_reference" in torch.load(ckpt, weights_only=True)
    resumed, resumed_ids = _fit(resume_from=ckpt, warm=warm)
    assert first_ids + resumed_ids == want_ids  # same prompts, same order, nothing repeated or lost
    assert len(want_ids) == N_STEPS and len({tuple(i) for i in want_ids[:TRAIN_SIZE]}) == TRAIN_SIZE
    differ = _equal_weights({k_: v.detach() for k_, v in resumed.state_dict().items()}, want)
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


@pytest.mark.slow
def test_resumed_qwen3vl_run_ends_with_the_uninterrupted_weights(tmp_path):
    """The mid-epoch case on the tiny Qwen3-VL (deepstack mergers and timestamped prompts in the state)."""
    want, want_ids = _uninterrupted(0, "tiny-qwen3vl")
    first, first_ids = _fit(ckpt_dir=tmp_path, stop_at=2, name="tiny-qwen3vl")
    (ckpt,) = tmp_path.glob("*.ckpt")
    assert _equal_weights(dict(first.state_dict()), want)
    resumed, resumed_ids = _fit(resume_from=ckpt, name="tiny-qwen3vl")
    assert first_ids + resumed_ids == want_ids
    assert any("deepstack_merger_list" in k for k in want)
    differ = _equal_weights({k_: v.detach() for k_, v in resumed.state_dict().items()}, want)
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("adapters", ["lora", "qlora"])
def test_resumed_adapter_run_ends_with_the_uninterrupted_weights(tmp_path, adapters):
    """LoRA and QLoRA on one device: the checkpoint holds the adapters (the trainable tensors) and nothing of the
    frozen base, whose 4-bit quantisation state bitsandbytes cannot load back (a QLoRA run did not resume before
    2026-12-06); the resumed run ends with the uninterrupted run's weights, 4-bit base included."""
    if adapters == "qlora":
        pytest.importorskip("bitsandbytes")
    want, want_ids = _uninterrupted(0, "tiny", adapters)
    first, first_ids = _fit(ckpt_dir=tmp_path, stop_at=2, adapters=adapters)
    (ckpt,) = tmp_path.glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert saved["ktr_trainable_only"] and set(saved["state_dict"]) == trainable
    assert trainable and all("lora_" in k for k in trainable)
    resumed, resumed_ids = _fit(resume_from=ckpt, adapters=adapters)
    assert first_ids + resumed_ids == want_ids
    differ = _equal_weights({k_: v.detach() for k_, v in resumed.state_dict().items()}, want)
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


@pytest.mark.slow
def test_resume_without_the_rng_state_diverges(tmp_path):
    """The check above can fail: drop the saved RNG and the resumed run samples other completions."""
    want, _ = _uninterrupted()
    _fit(ckpt_dir=tmp_path, stop_at=2)
    (ckpt,) = tmp_path.glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)
    del state["ktr_rng"]
    torch.save(state, tmp_path / "no_rng.ckpt")
    resumed, _ = _fit(resume_from=tmp_path / "no_rng.ckpt")
    assert _equal_weights({k: v.detach() for k, v in resumed.state_dict().items()}, want)
