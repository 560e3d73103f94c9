"""KTR training under FSDP2 (Lightning `ModelParallelStrategy`, 2 gloo processes on CPU); run by test_distributed.py.

    python tests/_fsdp_worker.py OUT_DIR SCENARIO

Lightning re-runs this script for rank 1. Each rank trains on one fixed prompt: rank 0 a video, rank 1 an image
(the dataset is [video, image] and the distributed sampler does not shuffle). Rank 0 writes
`OUT_DIR/SCENARIO.json`: the global loss, gradient norm and KL of every step (means over ranks), the full final
weights (`SCENARIO.pt`), and the run's sharded Lightning checkpoint (`SCENARIO.ckpt/`).
`run(...)` with `devices=1` is the single-process run on both prompts at once, for comparison (the tests run it
with the naive layout, `shared_prefix=False`, and the ranks with the shared prompt prefix).

Sampling is made independent of the batch layout: each prompt is generated on its own with a seed of its own
(`per_prompt_generate`), so that the 2-rank and 1-process runs draw the same completions. Everything after the
rollout (scoring passes, probes, loss, backward, optimizer) is the module's own code.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the slow imports: a hang or a slow start shows where each rank is
    from tests.hangs import progress, stacks_on_timeout

    stacks_on_timeout()  # both ranks (Lightning runs this script again for rank 1)
    progress("started")

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ktr.rollout.base import RolloutBackend

SCENARIOS = {
    # full fine-tuning, float32 compute (comparable to one process), reference model sharded too
    "full": dict(lora=False, param_dtype="float32", beta=0.04, steps=2),
    # LoRA adapters, bf16 mixed precision, reference = adapters disabled, untied embeddings (as the 7B model)
    "lora_bf16": dict(lora=True, param_dtype="bfloat16", beta=0.04, steps=2, tied=False),
    # "full" on the tiny Qwen3-VL (deepstack features, timestamped video prompt; 64 x 64 media)
    "full_qwen3vl": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, name="tiny-qwen3vl", side=64),
    # ... on the tiny Qwen3.5 (DeltaNet and attention layers, each its own FSDP unit; tests/test_qwen35.py)
    "full_qwen35": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, name="tiny-qwen35", side=64),
    # "full" with SDPA: the ranks score with split attention in the packed row (`ktr.model.attention`)
    "full_sdpa": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, attn="sdpa"),
    # ... with micro-batches of one completion: the prompt's keys and values shared across them (MicroBatches)
    "full_sdpa_micro": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, attn="sdpa", micro=1),
    # "full" with one token mean over all completions, the ranks holding different numbers of tokens: the counts
    # all-reduced (`loss.normalize: global`), and as released (`rank`: each rank's own, for comparison)
    "token_mean_global": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, aggregation="token-mean",
                              normalize="global"),
    "token_mean_rank": dict(lora=False, param_dtype="float32", beta=0.04, steps=2, aggregation="token-mean",
                            normalize="rank"),
}


def _one_prompt(batch, i: int):
    """Prompt i of a collated batch, its left padding removed, as a batch of one."""
    keep = batch.attention_mask[i].bool()
    sizes = batch.grid_thw.prod(-1).tolist()
    start = sum(sizes[:i])
    return replace(batch, rows=[batch.rows[i]], input_ids=batch.input_ids[i:i + 1, keep],
                   attention_mask=batch.attention_mask[i:i + 1, keep],
                   mm_token_type_ids=batch.mm_token_type_ids[i:i + 1, keep], media=[batch.media[i]],
                   pixel_values=batch.pixel_values[start:start + sizes[i]], grid_thw=batch.grid_thw[i:i + 1],
                   second_per_grid_ts=batch.second_per_grid_ts[i:i + 1])


def _merge(parts, batch, pad: int):
    """Rollouts of single prompts -> the rollout of `batch` (prompts left-padded, completions right-padded)."""
    from ktr.types import Rollout

    g, length = parts[0].group_size, batch.input_ids.shape[1]
    t = max(p.completion_ids.shape[1] for p in parts)
    comp = torch.full((len(parts) * g, t), pad, dtype=torch.long)
    valid = torch.zeros((len(parts) * g, t), dtype=torch.bool)
    for i, p in enumerate(parts):
        comp[i * g:(i + 1) * g, :p.completion_ids.shape[1]] = p.completion_ids
        valid[i * g:(i + 1) * g, :p.completion_mask.shape[1]] = p.completion_mask
    prompt = batch.input_ids.repeat_interleave(g, 0)
    types = batch.mm_token_type_ids.repeat_interleave(g, 0)
    assert prompt.shape[1] == length
    return Rollout(group_size=g, input_ids=torch.cat([prompt, comp], 1),
                   attention_mask=torch.cat([batch.attention_mask.repeat_interleave(g, 0), valid.long()], 1),
                   mm_token_type_ids=torch.cat([types, torch.zeros_like(comp, dtype=types.dtype)], 1),
                   completion_ids=comp, completion_mask=valid, texts=[x for p in parts for x in p.texts])


def per_prompt_generate(model, processor, batch, cfg, **kwargs):
    from ktr.rollout.hf import generate

    # one draw from the global RNG per call (the same on every rank and in one process; restored on resume)
    base = int(torch.randint(0, 2**30, (1,)))
    parts = []
    for i, row in enumerate(batch.rows):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base + int(row["problem_id"].rsplit("-", 1)[1]))
            parts.append(generate(model, processor, _one_prompt(batch, i), cfg, **kwargs))
    return _merge(parts, batch, processor.pad_token_id)


class PerPromptBackend(RolloutBackend):
    """A rollout backend whose samples do not depend on how prompts are split over ranks (the base class's
    `on_weights_updated`, `release` and `metrics`: nothing to sync, hand back or report)."""

    def generate(self, model, processor, batch, cfg, **kwargs):
        return per_prompt_generate(model, processor, batch, cfg, **kwargs)


def datamodule(batch_size: int, side: int = 56):
    from ktr.data.base import SyntheticDataModule
    from ktr.data.synthetic import make_item
    from ktr.data.video import VideoSettings
    from ktr.types import Media

    class VideoAndImage(SyntheticDataModule):
        """Two prompts: a synthetic video, and the first frame of another item as an image."""

        def train_rows(self):
            rows = self._rows(0, 2)
            return [rows[0], dict(rows[1], data_type="image")]

        def load_media(self, row):
            if row["data_type"] == "video":
                return super().load_media(row)
            _, seed, index = row["problem_id"].split("-")
            _, frames = make_item(int(seed), int(index), self.spec)
            return Media("image", frames[:1].clone(), None, row["path"])  # side x side: no resize needed

    from ktr.data.synthetic import SyntheticSpec

    return VideoAndImage(train_size=2, val_size=1, batch_size=batch_size, shuffle=False,
                         spec=SyntheticSpec(size=side, square=side // 2),
                         video=VideoSettings(fps=4.0, min_frames=4, max_frames=4, min_pixels=side * side,
                                             max_pixels=side * side))


def run(scenario: str, devices: int, save: Path | None = None, resume: Path | None = None,
        max_steps: int | None = None, shared_prefix: bool = True) -> dict:
    """Train `scenario` on `devices` CPU processes; returns (on rank 0) losses per step and final weights.

    `save`: also write a Lightning checkpoint there at the end (a sharded directory under FSDP); `resume`: start
    from such a checkpoint; `max_steps`: instead of the scenario's; `shared_prefix`: `loss.shared_prefix` (the
    one-process comparison runs the naive layout, so the 2-rank shared-prefix runs are checked against it)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ktr.config import (KeyTokenConfig, LoraSettings, LossConfig, OptimConfig, PolicyConfig, RewardConfig,
                            SamplingConfig, ShardingConfig, TinyModelConfig)
    from ktr.module import KTRModule

    from tests.hangs import progress

    mark = progress if devices > 1 else (lambda what: None)
    s = SCENARIOS[scenario]
    torch.set_num_threads(1)
    L.seed_everything(0)
    policy = PolicyConfig(name_or_path=s.get("name", "tiny"), attn_implementation=s.get("attn", "eager"),
                          gradient_checkpointing=True,
                          tiny=TinyModelConfig(tie_word_embeddings=s.get("tied", True)),
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0) if s["lora"] else None,
                          sharding=ShardingConfig(param_dtype=s["param_dtype"]))
    module = KTRModule(policy=policy, sampling=SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0),
                       key_tokens=KeyTokenConfig(temporal_perturbation="reverse"),
                       loss=LossConfig(beta=s["beta"], shared_prefix=shared_prefix, micro_batch_size=s.get("micro"),
                                       aggregation=s.get("aggregation", "seq-mean-token-mean"),
                                       normalize=s.get("normalize", "rank")),
                       optim=OptimConfig(lr=1e-3, schedule="constant"),
                       rewards=RewardConfig(names=["tests._fsdp_worker:text_length"]))
    module.rollout_backend = PerPromptBackend()
    mark(f"{scenario}: module built")
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics  # grad norm: global (the same on every rank); kl: per rank
            kl = pl_module.all_gather(m["train/kl"].detach()).float().mean()
            loss = pl_module.all_gather(outputs["loss"].detach()).float().mean()
            losses.append([float(loss), float(m["train/grad_norm"]), float(kl)])

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps or s["steps"],
                        logger=False, callbacks=[Losses()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule(batch_size=1 if devices > 1 else 2, side=s.get("side", 56)), ckpt_path=resume)
    mark(f"{scenario}: fit returned")
    if save is not None:
        trainer.save_checkpoint(save)
        mark(f"{scenario}: checkpoint saved")
    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    mark(f"{scenario}: full state dict gathered")
    return {"losses": losses, "rank": trainer.global_rank,
            "weights": {k: v.float() for k, v in full.items()}}


def text_length(completion: str, solution: str, problem_type: str) -> float:
    """A reward that differs between random completions, so that advantages are not all zero."""
    return len(completion) / 10


if __name__ == "__main__":
    from ktr.cli import end_process_group

    progress("imported")
    out_dir, name = Path(sys.argv[1]), sys.argv[2]
    result = run(name, devices=2, save=out_dir / f"{name}.ckpt")
    progress("first run done")
    summary = {"losses": result["losses"]}
    if name == "full":  # exact resume under FSDP: 2 steps + 1 resumed step == 3 uninterrupted steps
        resumed = run(name, devices=2, resume=out_dir / f"{name}.ckpt", max_steps=3)
        straight = run(name, devices=2, max_steps=3)
        w, r = straight["weights"], resumed["weights"]
        summary["resume_differs"] = sorted(k for k in w if not torch.equal(w[k], r[k])) if result["rank"] == 0 else []
        summary["resume_changed"] = any(not torch.equal(w[k], result["weights"][k]) for k in w)
    if name == "token_mean_global":  # the same run with each rank's own counts
        summary["rank_losses"] = run("token_mean_rank", devices=2)["losses"]
    if result["rank"] == 0:
        torch.save(result["weights"], out_dir / f"{name}.pt")
        (out_dir / f"{name}.json").write_text(json.dumps(summary))
    progress("all runs done")
    end_process_group()
