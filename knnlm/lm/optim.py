"""Optimizers and learning-rate schedules with fairseq's names and semantics.

Schedules are pure functions of the update count, so resuming a run needs no scheduler
state: the learning rate of update ``u`` (0-based) is ``lr_at(u, ...)``.
"""
from __future__ import annotations

import ast
import math

import torch

from ..util import UserError

OPTIMIZERS = ("adam", "nag")
SCHEDULERS = ("fixed", "inverse_sqrt", "cosine")
NAG_MOMENTUM = 0.99  # fairseq's NAG default


def parse_betas(text: str) -> tuple[float, float]:
    """fairseq's ``--adam-betas '(0.9, 0.98)'``, parsed without eval."""
    try:
        betas = ast.literal_eval(text)
        b1, b2 = (float(b) for b in betas)
    except (ValueError, SyntaxError, TypeError):
        raise UserError(f"--adam-betas must look like '(0.9, 0.98)', got {text!r}")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise UserError(f"--adam-betas must lie in [0, 1), got {text!r}")
    return b1, b2


def build_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                    adam_betas: str = "(0.9, 0.999)", adam_eps: float = 1e-8,
                    momentum: float = NAG_MOMENTUM) -> torch.optim.Optimizer:
    if name == "adam":  # fairseq's adam decouples weight decay (AdamW)
        return torch.optim.AdamW(params, lr=lr, betas=parse_betas(adam_betas), eps=adam_eps,
                                 weight_decay=weight_decay)
    if name == "nag":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True,
                               weight_decay=weight_decay)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_at(step: int, *, scheduler: str, lr: float, warmup_updates: int = 0,
          warmup_init_lr: float = -1.0, min_lr: float = 0.0, max_update: int = 0,
          lr_period_updates: int = -1) -> float:
    """Learning rate for update ``step`` (0-based).

    - ``fixed``: ``lr`` (linear warm-up from 0 over ``warmup_updates``);
    - ``inverse_sqrt``: linear warm-up from ``warmup_init_lr`` to ``lr``, then
      ``lr * sqrt(warmup_updates / step)``;
    - ``cosine``: linear warm-up, then one cosine from ``lr`` down to ``min_lr`` over
      ``lr_period_updates`` (default: the updates left after warm-up), ``min_lr`` after.
    """
    if warmup_init_lr < 0:
        warmup_init_lr = 0.0 if warmup_updates > 0 else lr
    if scheduler == "fixed":
        if warmup_updates > 0 and step < warmup_updates:
            return lr * (step + 1) / warmup_updates
        return lr
    if warmup_updates > 0 and step < warmup_updates:
        return warmup_init_lr + step * (lr - warmup_init_lr) / warmup_updates
    if scheduler == "inverse_sqrt":
        return lr * math.sqrt(max(1, warmup_updates) / max(1, step))
    if scheduler == "cosine":
        period = lr_period_updates if lr_period_updates > 0 else max(1, max_update - warmup_updates)
        t = step - warmup_updates
        if t >= period:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / period))
    raise UserError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
