"""FSDP2 sharding of a Qwen-VL policy (layer L2: torch.distributed, no Lightning).

`ktr.module` calls `shard_policy` from `configure_model` when the Trainer's strategy is Lightning's
`ModelParallelStrategy`. Units (each all-gathered just before it runs and freed after):

- every vision block, then the vision tower (its patch embedding and merger);
- every decoder layer, the input embeddings, the output projection, then the language model (final norm);
- the root (the peft wrapper or the bare model).

Units are chosen by what `ktr.model.forward` *calls*, not only by size: the single forward path calls the vision
tower, the embeddings, the language model and the output projection directly rather than through the root
forward, so each of them must own its weights to be gathered in its own forward hook.

Two more things make RL work under FSDP2:
- `generate` must keep ranks in step when one finishes early (its completions hit end-of-sequence first):
  transformers does so (`synced_gpus`) for modules marked FSDP-managed, which is set here;
- the first FSDP module to run becomes the root of its subtree; the SFT warm start and the reference pass call
  the vision tower first, so `ensure_root_initialized` fixes the real root before the first step.

Tied input/output embeddings (small Qwen models, the tiny test model) cannot be one FSDP unit here: a grouped
unit registers its backward hooks only on the output of the module that completes the group, and the single
forward path runs a no-grad head pass (probe log-probs) between the embedding's grad forward and the backward,
which loses the embedding's gradient. So `shard_policy` unties them into two equal weights, and
`tied_gradients` (around gradient clipping) sums their gradients into one and mirrors it back, so both receive
the same update and stay equal: the same maths as one shared weight, at the cost of a second (sharded) copy.

Mixed precision is FSDP's: parameters all-gathered and computed in `param_dtype`, gradients reduced in
`reduce_dtype`, float32 master weights and optimizer state sharded across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ktr.config import ShardingConfig
from ktr.model.families import core, family_of

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(model: nn.Module) -> bool:
    FSDPModule, _, _ = _fsdp()
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_policy(model: nn.Module, mesh, cfg: ShardingConfig | None = None,
                 activation_checkpointing: bool = False) -> nn.Module:
    """Apply `fully_shard` bottom-up to `model` (in place) over the 1-D data-parallel `mesh`. Returns `model`.

    `activation_checkpointing` turns on the model's gradient checkpointing (decoder layers and vision blocks
    recompute their activations in backward; FSDP re-gathers their weights for the recomputation).
    """
    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    cfg = cfg or ShardingConfig()
    base = core(model)
    if _has_4bit(model):
        raise NotImplementedError("FSDP2 with 4-bit (nf4) base weights is not supported; use quantization: none "
                                  "under ModelParallelStrategy, or a single GPU for QLoRA")
    if is_sharded(model):
        raise RuntimeError("shard_policy: the model is already sharded")
    if activation_checkpointing and not getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[cfg.param_dtype], reduce_dtype=_DTYPES[cfg.reduce_dtype])
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    for unit in family_of(model).shard_units(model):  # vision blocks, vision tower, decoder layers
        fully_shard(unit, **kw)
    lm = base.model.language_model
    embed, head = base.get_input_embeddings(), base.lm_head
    if embed.weight is head.weight:  # see the module docstring
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        base._ktr_untied_embeddings = True
    fully_shard(embed, **kw)
    fully_shard(head, **kw)
    fully_shard(lm, **kw)
    fully_shard(model, **kw)
    # transformers' generate passes synced_gpus=True for modules carrying this mark (its own FSDP2 helper sets
    # it): a rank whose completions all ended keeps running forwards so that the all-gathers stay matched.
    base._is_fsdp_managed_module = True
    return model


def ensure_root_initialized(model: nn.Module) -> None:
    """Make `model` the FSDP root of all its units, before any unit runs on its own.

    FSDP2 picks the root lazily: the first unit to run forward. The single forward path may call the vision
    tower before the root ever runs (SFT steps, the reference model); that unit would then claim the root role
    and the real root's first forward would fail. Must run after the module has been moved to its device.
    """
    FSDPModule, _, _ = _fsdp()
    if not isinstance(model, FSDPModule):
        raise TypeError(f"{type(model).__name__} is not sharded; call shard_policy first")
    model._get_fsdp_state()._lazy_init()  # idempotent; the public API only initialises on the first forward


@contextmanager
def gathered_for_rollout(model: nn.Module, cfg: ShardingConfig | None = None) -> Iterator[None]:
    """Keep every unit's weights gathered across `generate` (one all-gather per unit, not one per token).

    Costs the full model in `param_dtype` on each rank for the rollout's duration; freed on exit. A no-op for
    unsharded models or when `cfg.gather_for_rollout` is false.
    """
    FSDPModule, _, _ = _fsdp()
    cfg = cfg or ShardingConfig()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or not cfg.gather_for_rollout:
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            # the root keeps its weights between forward and backward anyway (FSDP's own default for it)
            m.set_reshard_after_forward(cfg.reshard_after_forward and m is not model, recurse=False)
            m.reshard()


@contextmanager
def tied_gradients(model: nn.Module) -> Iterator[None]:
    """Wrap gradient clipping: embeddings untied by `shard_policy` are clipped and updated as one weight.

    On entry the output projection's gradient is added to the input embedding's and removed (so the clipping
    norm counts the shared weight once, as unsharded); on exit the clipped sum is copied back to the
    projection, so the optimizer gives both copies the same update. A no-op for models that were not untied.
    """
    base = core(model)
    if not getattr(base, "_ktr_untied_embeddings", False):
        yield
        return
    e, h = base.get_input_embeddings().weight, base.lm_head.weight
    if h.grad is not None:
        e.grad = h.grad if e.grad is None else e.grad.add_(h.grad)
        h.grad = None
    try:
        yield
    finally:
        if e.grad is not None:
            h.grad = e.grad.clone()


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel sub-mesh of Lightning's `(data_parallel, tensor_parallel)` mesh.

    ktr shards data-parallel only; a tensor-parallel size above 1 would silently replicate the work, so it is
    refused with the setting to change.
    """
    tp = device_mesh["tensor_parallel"].size()
    if tp != 1:
        raise ValueError(f"ModelParallelStrategy has tensor_parallel_size={tp}; ktr shards with FSDP2 only: set "
                         "strategy.init_args.data_parallel_size to the world size (nodes x devices) and "
                         "tensor_parallel_size: 1")
    return device_mesh["data_parallel"]


def _has_4bit(model: nn.Module) -> bool:
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())
