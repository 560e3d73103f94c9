"""Optimiser and learning-rate schedule construction (layer L2: torch, optional bitsandbytes; no Lightning)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ktr.config import OptimConfig


_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters of `model` as optimiser groups: those that decay, then (`cfg.no_decay:
    bias_norm`) those exempt with weight decay 0. Exempt, as Hugging Face's `Trainer` (transformers >= 4.49) exempts
    them: the parameters of `nn.LayerNorm` modules and those whose lower-cased name contains `bias`, `layernorm` or
    `rmsnorm`, or has a `norm` or `*_norm` component (Qwen's RMSNorm weights `input_layernorm`, `norm`, `q_norm`;
    not the vision blocks' `norm1`/`norm2`, which that rule decays too). One group when nothing is exempt, so a
    checkpoint's optimiser state from before the split still loads there."""
    exempt: set[int] = set()
    if cfg.no_decay == "bias_norm" and cfg.weight_decay > 0:
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if isinstance(module, nn.LayerNorm) or _NO_DECAY_NAMES.search(full.lower()):
                    exempt.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in exempt]
    rest = [p for p in params if id(p) in exempt]
    groups = [{"params": decay}] if decay else []
    return groups + ([{"params": rest, "weight_decay": 0.0}] if rest else [])


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit / paged 8-bit AdamW) over `params` (tensors or groups, `decay_groups`) with
    `cfg`'s settings."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    from ktr._imports import BITSANDBYTES_AVAILABLE, require

    require(BITSANDBYTES_AVAILABLE, "bitsandbytes", "quant")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)


def lr_lambda(step: int, total: int, cfg: OptimConfig, warm_start_steps: int = 0,
              warm_start_factor: float = 1.0) -> float:
    """Multiplier of the peak rate at optimizer step `step` of `total`: warm-start steps at
    `warm_start_factor`, then linear warm-up, then constant or cosine decay to 0 over the RL steps."""
    if step < warm_start_steps:  # SFT warm start at its own rate; the RL schedule starts after it
        return warm_start_factor
    step, total = step - warm_start_steps, total - warm_start_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
