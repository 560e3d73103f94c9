"""4-bit NF4 base weights for QLoRA (layer L2: torch, transformers, bitsandbytes; no Lightning).

What is quantised: every linear layer of the *language model* (attention and MLP projections). The vision
tower, the input embeddings and the output projection stay in the load dtype: they are a small share of the
7B model's weights (about 1.3 + 1.1 + 1.1 GB in bf16) but the most sensitive to quantisation, and the fused
loss (`ktr.fused`) needs the output projection as a plain ``[V, H]`` matrix.

Settings (QLoRA's): NF4 with double quantisation (the block scales are themselves quantised, ~0.4 bit/weight
saved), computation in the policy's ``dtype`` (bf16 in `configs/qwen7b_qlora.yaml`).

Two ways in, one result (``bnb.nn.Linear4bit`` modules):
- a checkpoint is quantised while it loads (`from_pretrained_kwargs`), so its full-precision weights are never
  all in memory at once;
- a model already in memory (the built-in `tiny` model, the random-init real architecture of
  `scripts/bench_step.py`) is quantised in place, layer by layer (`quantize_language_model`).

Then `prepare_for_kbit_training` freezes the base and fixes a CPU quirk of bitsandbytes; unlike peft's
`prepare_model_for_kbit_training` it does *not* upcast every non-quantised weight to float32 (that would add
~7 GB for the 7B model's vision tower, embeddings and output projection). Norm layers need no upcast: Qwen2's
RMSNorm already computes in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ktr._imports import BITSANDBYTES_AVAILABLE, require
from ktr.model.families import QUANT_SKIP_MODULES, core, family_of

# Modules kept in high precision, as transformers' `llm_int8_skip_modules` prefixes (per family).
SKIP_MODULES = QUANT_SKIP_MODULES
QUANT_TYPE = "nf4"
BLOCKSIZE = 64


def _bnb():
    require(BITSANDBYTES_AVAILABLE, "bitsandbytes", "quant")
    import bitsandbytes as bnb

    return bnb


def nf4_config(compute_dtype: torch.dtype, skip_modules: tuple[str, ...] = SKIP_MODULES):
    """transformers' `BitsAndBytesConfig` for NF4 + double quantisation, `skip_modules` (vision, head) skipped."""
    from transformers import BitsAndBytesConfig

    _bnb()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(skip_modules))


def from_pretrained_kwargs(compute_dtype: torch.dtype,
                           skip_modules: tuple[str, ...] = SKIP_MODULES) -> dict[str, Any]:
    """Extra `from_pretrained` arguments to load a checkpoint directly in NF4.

    On a GPU machine the weights are quantised on this process's GPU (`LOCAL_RANK`), never staged in full
    precision on it; on CPU they are quantised on the CPU.
    """
    import os

    kwargs: dict[str, Any] = {"quantization_config": nf4_config(compute_dtype, skip_modules)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kwargs


def is_quantized(model: nn.Module) -> bool:
    bnb = _bnb()
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def quantize_language_model(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every `nn.Linear` of the language model by an NF4 `Linear4bit`, in place. Returns how many.

    Layers whose name ends in one of the family's `quant_skip_modules` stay as they are (as transformers' loader
    skips them by suffix): Qwen3.5's DeltaNet `in_proj_a` / `in_proj_b`; no other family has such a layer.

    Quantisation happens on the device the weight is on; the full-precision weight of each layer is released
    as soon as that layer is replaced, so peak memory grows by one layer only.
    """
    bnb = _bnb()
    lm = core(model).model.language_model
    skip = family_of(model).quant_skip_modules  # name suffixes kept in high precision (Qwen3.5: DeltaNet a / b)
    count = 0
    for prefix, parent in list(lm.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exact type: never re-wrap peft or already-quantised layers
                continue
            if any(f"{prefix}.{name}".endswith(s) for s in skip):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type=QUANT_TYPE,
                                  device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=BLOCKSIZE,
                                       compress_statistics=True, quant_type=QUANT_TYPE, module=q)
            q.weight = weight.to(child.weight.device)  # Params4bit quantises when it first moves to a device
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            count += 1
    if count == 0:
        raise ValueError("quantize_language_model: the language model has no nn.Linear layers to quantise")
    return count


def disable_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs. Returns the layers touched.

    On such CPUs a `Linear4bit` in eval mode without grad (exactly RL's rollout) rewrites its weight in a
    CPU-specific packed layout *in place*; the next forward with grad then fails with "a view of a leaf
    Variable that requires grad is being used in an in-place operation". Generate-then-train is every RL step,
    so the repacking is turned off (it only speeds up CPU inference).
    """
    bnb = _bnb()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Freeze every base weight (adapters are added afterwards) and apply the CPU repacking fix.

    Nothing is upcast (see the module docstring). Gradient checkpointing and input gradients are enabled by
    `ktr.model.policy.load_policy` when the policy config asks for them, as for unquantised LoRA.
    """
    model.requires_grad_(False)
    disable_cpu_repacking(model)
    return model


def prepare_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Quantise an in-memory model if it is not already (checkpoints are quantised at load), then prepare it."""
    if not is_quantized(model):
        quantize_language_model(model, compute_dtype)
    return prepare_for_kbit_training(model)
