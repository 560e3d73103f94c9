"""Optimiser and learning-rate schedule construction (layer L2: torch, optional bitsandbytes; no Lightning)."""

from __future__ import annotations

import math

import torch

from ktr.config import OptimConfig


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit / paged 8-bit AdamW) over `params` with `cfg`'s settings."""
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
