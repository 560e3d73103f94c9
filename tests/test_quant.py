"""QLoRA on the bitsandbytes CPU backend: NF4 layers where they belong, a KTR step trains adapters only, and the
reference (adapters disabled) is exactly the 4-bit base model.

The training step runs generate (eval, no grad) and then the gradient pass: on CPUs with AVX512-BF16 that is the
pattern bitsandbytes' weight repacking breaks, so the step itself checks the fix.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from ktr.config import LoraSettings, PolicyConfig  # noqa: E402
from ktr.model.families import core
from ktr.model.policy import load_policy

NF4 = dict(quantization="nf4", dtype="bfloat16", attn_implementation="eager")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def text_length(completion: str, solution: str, problem_type: str) -> float:
    """A reward that differs between random completions, so that the advantages are not all zero."""
    return len(completion) / 10


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3vl"])
def trained(request):
    """A KTR module on a 4-bit tiny base (each tiny family), its weights before, and after one training step."""
    from ktr.config import LossConfig, OptimConfig, RewardConfig, SamplingConfig
    from ktr.data.base import SyntheticDataModule
    from ktr.data.video import VideoSettings
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    L.seed_everything(0)
    module = KTRModule(policy=PolicyConfig(name_or_path=request.param, **NF4, lora=LORA, gradient_checkpointing=True),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0),
                       loss=LossConfig(beta=0.04, micro_batch_size=1),
                       rewards=RewardConfig(names=["tests.test_quant:text_length"]),
                       optim=OptimConfig(lr=1e-2, optimizer="adamw_8bit"))
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    data = SyntheticDataModule(train_size=2, val_size=1, batch_size=1,
                               video=VideoSettings(fps=4.0, min_frames=4, max_frames=4, min_pixels=56 * 56,
                                                   max_pixels=56 * 56))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, data)
    return module, before


@pytest.mark.slow
def test_language_model_linears_are_nf4_and_the_rest_stays_high_precision(trained):
    module, _ = trained
    base = core(module.model)
    lm_linears = [m for m in base.model.language_model.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in lm_linears if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * len(base.model.language_model.layers)  # q k v o gate up down per layer
    for m in quantized:
        assert m.weight.quant_type == "nf4" and m.weight.quant_state.nested  # double quantisation
        assert m.compute_dtype == torch.bfloat16 and m.support_avx512bf16_for_cpu is False
        assert not m.weight.requires_grad
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.visual.modules())
    assert type(base.lm_head) is nn.Linear and base.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in base.model.visual.parameters())
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)


def test_qlora_step_changes_only_adapter_weights(trained):
    module, before = trained
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)[:5]
    assert any("lora_B" in k for k in changed)  # B starts at zero: the adapters now do something


@pytest.mark.slow
def test_reference_logps_equal_the_4bit_base_model(trained):
    from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
    from tests.helpers import rollout_for

    module, _ = trained
    batch, rollout = rollout_for(module, n_prompts=2, group_size=2, max_new_tokens=6, image_every=2)
    ids, valid = rollout.completion_ids, rollout.completion_mask
    view = SequenceView.of(module.model, rollout, batch)
    with torch.no_grad():
        feats = encode_media(module.model, batch.pixel_values, batch.grid_thw)
        ref = module.reference_logps(batch, rollout, view, feats)
        policy = completion_logps(module.model, completion_hidden(module.model, view, feats, ids.shape[1]),
                                  ids, valid)[0]
        name = module.policy_cfg.name_or_path  # same seed: the same weights, quantised alike
        base = load_policy(PolicyConfig(name_or_path=name, **NF4)).model.eval()
        base_feats = encode_media(base, batch.pixel_values, batch.grid_thw)
        want = completion_logps(base, completion_hidden(base, view, base_feats, ids.shape[1]), ids, valid)[0]
    assert torch.equal(ref, want)
    assert not torch.equal(policy, want)  # the trained adapters change the policy; disabling them undoes it


def test_in_memory_quantisation_needs_linear_layers():
    from ktr.model.quant import quantize_language_model

    model = load_policy(PolicyConfig(**NF4)).model  # already quantised: no nn.Linear left to replace
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_language_model(model, torch.bfloat16)


def test_nf4_without_adapters_cannot_train():
    from ktr.module import KTRModule

    module = KTRModule(policy=PolicyConfig(**NF4))
    with pytest.raises(ValueError, match="policy.lora"):
        module.configure_optimizers()


def _nf4_layer() -> nn.Module:
    torch.manual_seed(0)
    q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4",
                                 module=q).to("cpu")
    return nn.Sequential(q)


def _grad_after_no_grad_pass(layer: nn.Module) -> torch.Tensor | None:
    """RL's pattern on one layer: an eval forward without grad (rollout), then a forward with grad (update)."""
    with torch.no_grad():
        layer.eval()(torch.ones(2, 64, dtype=torch.bfloat16))
    x = torch.ones(2, 64, dtype=torch.bfloat16, requires_grad=True)
    try:
        layer.train()(x).sum().backward()
    except RuntimeError:  # "a view of a leaf Variable ..." when adapters sit on top of the layer
        return None
    return x.grad


def test_cpu_repacking_fix_keeps_gradients_after_a_no_grad_pass():
    from bitsandbytes.nn.modules import has_avx512bf16

    from ktr.model.quant import disable_cpu_repacking

    fresh = _nf4_layer()
    x = torch.ones(2, 64, dtype=torch.bfloat16, requires_grad=True)
    fresh(x).sum().backward()
    fixed = _nf4_layer()
    assert disable_cpu_repacking(fixed) == 1
    assert torch.equal(_grad_after_no_grad_pass(fixed), x.grad)
    if has_avx512bf16():  # on such CPUs the unfixed layer loses its gradient: the fix is what makes the step work
        assert _grad_after_no_grad_pass(_nf4_layer()) is None
