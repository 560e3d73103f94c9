"""KTRModule: a training step changes parameters; micro-batched gradients equal the single pass; GRPO = KTR
with every valid token."""

import lightning as L
import pytest
import torch

from ktr.config import KeyTokenConfig, LossConfig, OptimConfig, PolicyConfig, RewardConfig, SamplingConfig, SignalConfig
from ktr.data.base import SyntheticDataModule
from ktr.module import KTRModule
from tests.helpers import SMALL_VIDEO, metric_recorder, module_grads, rollout_for


def _module(**kw) -> KTRModule:
    torch.set_num_threads(1)
    return KTRModule(policy=PolicyConfig(attn_implementation="eager"),
                     sampling=SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0), **kw)


@pytest.mark.slow
def test_one_training_step_changes_parameters(tmp_path) -> None:
    L.seed_everything(0)
    module = _module(loss=LossConfig(beta=0.04), optim=OptimConfig(lr=1e-3),
                     rewards=RewardConfig(names=["tests.helpers:length_reward", "format"]))
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    dm = SyntheticDataModule(batch_size=2, val_size=0, train_size=8, video=SMALL_VIDEO)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    changed = [k for k, v in module.model.named_parameters() if not torch.equal(v, before[k])]
    assert any("visual" in k for k in changed) and any("language_model.layers" in k for k in changed)
    assert "train/ktr/frac_key" in trainer.callback_metrics
    assert module._ref and all(not p.requires_grad for p in module._ref[0].parameters())
    assert not any(k.startswith("_ref") for k in module.state_dict())  # reference kept out of checkpoints


def _grads(module, batch, rollout, micro):
    loss, _, grads = module_grads(module, batch, rollout, LossConfig(beta=0.04, micro_batch_size=micro),
                                  torch.tensor([1.0, -1.0, 0.5, -0.5]))
    return loss, grads


@pytest.mark.slow
def test_micro_batches_equal_single_pass() -> None:
    module = _module()
    from ktr.model.policy import Policy

    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=2, group_size=2)
    loss1, g1 = _grads(module, batch, rollout, None)
    loss2, g2 = _grads(module, batch, rollout, 1)
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("visual" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vanilla_grpo_is_config_of_the_same_module() -> None:
    module = _module(key_tokens=KeyTokenConfig(enabled=False))
    assert type(module) is KTRModule
    with pytest.raises(ValueError, match="every signal is disabled"):
        off = SignalConfig(enabled=False)
        KeyTokenConfig(visual=off, temporal=off, entropy=off)


@pytest.mark.slow
def test_metrics_are_logged_only_in_the_steps_that_compute_them() -> None:
    """The warm start's `train/sft_loss` must not be re-logged (stale) at the RL steps after it."""
    L.seed_everything(0)
    module = _module(warm_start_steps=2, warm_start_lr=1e-3, loss=LossConfig(beta=0.0))
    dm = SyntheticDataModule(batch_size=2, val_size=0, train_size=16, video=SMALL_VIDEO)
    recorder = metric_recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=recorder, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, dm)
    sft = [step for step, keys in recorder.rows if "train/sft_loss" in keys]
    rl = [step for step, keys in recorder.rows if "train/loss" in keys]
    assert len(sft) == 2 and len(rl) == 2, recorder.rows
    assert max(sft) < min(rl)  # no step logs both: the SFT value is not carried into the RL steps


@torch.no_grad()
@pytest.mark.slow
def test_target_logp_equals_huggingface_teacher_forcing() -> None:
    """`val/p_target`: the product of the target's token probabilities under transformers' own forward, for
    targets of different lengths in one batch (right padding of the targets, left padding of the prompts)."""
    from ktr.rollout.base import teacher_rollout
    from tests.helpers import synthetic_samples
    from tests.test_forward import hf_logps

    module = _module(val_target_prob=True)
    proc = module.processor
    batch = proc.collate(synthetic_samples(proc, 3, image_every=3))
    with pytest.raises(ValueError, match="needs SFT targets"):
        module.target_logp(batch)
    batch.target_ids, batch.target_mask = proc.pad_targets([proc.encode_target(t) for t in (
        "<answer>A</answer>", "B", "<think>red, then blue</think><answer>C</answer>")])
    assert batch.target_mask.sum(-1).unique().numel() == 3
    got = module.target_logp(batch)
    want = (hf_logps(module.model, batch, teacher_rollout(batch, proc)) * batch.target_mask).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert (got < 0).all() and got[1] > got[2]  # the 2-token target is likelier than the 17-token one


@pytest.mark.slow
def test_validation_logs_target_prob_from_the_datamodules_targets() -> None:
    """With `val_target_prob` an RL run (no warm start) still gets SFT targets for its held-out rows, and
    `val/p_target` equals `target_logp` of those rows under the final policy."""
    L.seed_everything(0)
    module = _module(val_target_prob=True, val_max_new_tokens=4)
    dm = SyntheticDataModule(batch_size=2, val_size=2, val_batch_size=2, train_size=8, video=SMALL_VIDEO)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    got = trainer.validate(module, datamodule=dm, verbose=False)[0]
    batch = next(iter(dm.val_dataloader())).prompts
    assert batch.target_ids is not None
    want = module.target_logp(batch)
    assert got["val/logp_target"] == pytest.approx(float(want.mean()), rel=1e-5) and want.max() < -1
    assert got["val/p_target"] == pytest.approx(float(want.exp().mean()), rel=1e-5, abs=1e-30)
    assert next(iter(dm.train_dataloader())).prompts.target_ids is None  # training rows: no targets without SFT
