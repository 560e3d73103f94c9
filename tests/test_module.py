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


class _Modes(L.Callback):
    """Records, after each training step, whether the policy, its decoder layers and the reference were training."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from ktr.model.families import language_model

        layers = language_model(pl_module.model).layers
        recomputing = sum(bool(getattr(m, "gradient_checkpointing", False)) and m.training for m in layers)
        self.seen.append((pl_module.model.training, recomputing, len(layers), pl_module._ref[0].training))


@pytest.mark.slow
def test_a_loaded_checkpoint_trains_in_training_mode_with_gradient_checkpointing(tmp_path) -> None:
    """`from_pretrained` returns a model in eval mode and Lightning does not switch it: the policy of a loaded
    checkpoint used to train in eval mode, where transformers never runs gradient checkpointing (every layer's
    activations kept). `on_fit_start` puts the policy in training mode, the reference stays in eval mode."""
    from ktr.model.policy import load_policy
    from ktr.model.saving import export_policy

    torch.set_num_threads(1)
    export_policy(load_policy(PolicyConfig(attn_implementation="eager")), tmp_path / "policy")
    module = KTRModule(policy=PolicyConfig(name_or_path=str(tmp_path / "policy"), attn_implementation="eager",
                                           gradient_checkpointing=True),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=4, top_p=1.0), loss=LossConfig(beta=0.04))
    assert not module.model.training  # the premise: loaded in eval mode
    modes = _Modes()
    dm = SyntheticDataModule(batch_size=1, val_size=0, train_size=2, video=SMALL_VIDEO)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[modes],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    ((training, recomputing, layers, ref_training),) = modes.seen
    assert training and recomputing == layers > 0 and not ref_training


def test_key_tokens_refuse_a_policy_with_dropout() -> None:
    """The probes compare separate passes of the policy; dropout would draw a mask in each. LoRA dropout is
    refused with key tokens (named by its key) and allowed for GRPO without them."""
    from ktr.config import ConfigError, LoraSettings

    torch.set_num_threads(1)
    lora = PolicyConfig(attn_implementation="eager", lora=LoraSettings(r=2, alpha=4, dropout=0.05))
    with pytest.raises(ConfigError, match=r"^policy\.lora\.dropout: .*lora_dropout"):
        KTRModule(policy=lora, sampling=SamplingConfig(group_size=2, max_new_tokens=4))
    KTRModule(policy=lora, sampling=SamplingConfig(group_size=2, max_new_tokens=4),
              key_tokens=KeyTokenConfig(enabled=False))
    assert LoraSettings().dropout == 0.0


@torch.no_grad()
def test_probes_are_exact_in_training_mode_without_dropout() -> None:
    """The policy trains in training mode (LoRA, gradient checkpointing on): the identity perturbation still
    scores exactly 0. With a LoRA dropout on trained adapters (what the guard above refuses) it does not."""
    from ktr.config import LoraSettings
    from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
    from ktr.model.policy import load_policy
    from ktr.probes.visual import visual_scores

    torch.set_num_threads(1)
    batch, rollout = rollout_for(load_policy(PolicyConfig(attn_implementation="eager")), n_prompts=2, group_size=2,
                                 max_new_tokens=6)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    spread = {}
    for dropout in (0.0, 0.05):
        torch.manual_seed(0)
        model = load_policy(PolicyConfig(attn_implementation="eager", gradient_checkpointing=True,
                                         lora=LoraSettings(r=4, alpha=8, dropout=dropout))).model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # trained adapters (B starts at 0, where dropout changes nothing)
        model.train()
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        view = SequenceView.of(model, rollout, batch)
        base = completion_logps(model, completion_hidden(model, view, feats, ids.shape[1]), ids, valid, 8)[0]
        scores = visual_scores(model, batch, view, feats, ids, valid, base, "identity")
        spread[dropout] = scores.abs().max().item()
    assert spread[0.0] == 0.0 and spread[0.05] > 1e-3, spread


def test_weight_decay_spares_biases_and_norms_as_the_released_trainer() -> None:
    """`optim.no_decay: bias_norm` (default): biases and normalisation weights get weight decay 0, by Hugging Face
    Trainer's rule (nn.LayerNorm modules; names with bias / layernorm / rmsnorm / a norm component), the rest decays;
    one step at lr 0.1 with zero gradients shrinks exactly the decaying weights by lr x decay."""
    from torch import nn

    from ktr.training.optim import decay_groups, make_optimizer

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)  # weight decays, bias not
            self.ln = nn.LayerNorm(2)  # by type
            self.input_layernorm, self.q_norm = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)  # by name
            self.norm1 = nn.Linear(2, 2, bias=False)  # "norm1" is no norm component: decays (as the Trainer's rule)
            self.frozen = nn.Linear(2, 2, bias=False).requires_grad_(False)

    toy = Toy()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, schedule="constant")
    decay, exempt = decay_groups(toy, cfg)
    names = {id(p): n for n, p in toy.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["norm1.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in exempt["params"]) == ["input_layernorm.bias", "input_layernorm.weight",
                                                              "ln.bias", "ln.weight", "proj.bias", "q_norm.weight"]
    assert exempt["weight_decay"] == 0.0
    before = {n: p.detach().clone() for n, p in toy.named_parameters()}
    opt = make_optimizer([decay, exempt], cfg)
    for p in toy.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for n, p in toy.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in ("norm1.weight", "proj.weight") else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=0, atol=1e-7, msg=n)
    everything = decay_groups(toy, OptimConfig(no_decay="none"))
    assert len(everything) == 1 and len(everything[0]["params"]) == 8  # the frozen one in neither
    assert len(decay_groups(toy, OptimConfig(weight_decay=0.0))) == 1  # nothing to exempt from: one group
