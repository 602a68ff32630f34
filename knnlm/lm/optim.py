"""Optimizers and learning-rate schedules with fairseq's names and semantics.

Schedules are functions of the update count, so resuming a run needs no scheduler state:
the learning rate of update ``u`` (0-based) is ``lr_at(u, ...)``; ``reduce_lr_on_plateau``
also takes the scale its :class:`Plateau` keeps (saved with the training state).
"""
from __future__ import annotations

import ast
import math

import torch

from ..util import UserError

OPTIMIZERS = ("adam", "nag")
SCHEDULERS = ("fixed", "inverse_sqrt", "cosine", "reduce_lr_on_plateau")
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
          warmup_init_lr: float = -1.0, max_update: int = 0, lr_period_updates: int = -1,
          max_lr: float | None = None, t_mult: float = 1.0, lr_shrink: float = 0.1,
          plateau_scale: float = 1.0) -> float:
    """Learning rate for update ``step`` (0-based), as fairseq's schedulers give it.

    - ``fixed``: ``lr`` (linear warm-up from 0 over ``warmup_updates``);
    - ``inverse_sqrt``: linear warm-up from ``warmup_init_lr`` (default 0) to ``lr``, then
      ``lr * sqrt(warmup_updates / step)``;
    - ``cosine`` (SGDR): ``lr`` is the floor and ``max_lr`` the peak. Linear warm-up from
      ``warmup_init_lr`` (default: ``lr``) to ``max_lr``, then cosine periods from the peak
      down to the floor: the first lasts ``lr_period_updates`` (default: the updates left
      after warm-up), each next one ``t_mult`` times longer, with floor and peak scaled by
      ``lr_shrink`` per restart;
    - ``reduce_lr_on_plateau``: linear warm-up from ``warmup_init_lr`` (default 0) to
      ``lr``, then ``lr`` times ``plateau_scale`` (:class:`Plateau`).
    """
    if scheduler == "fixed":
        if warmup_updates > 0 and step < warmup_updates:
            return lr * (step + 1) / warmup_updates
        return lr
    if scheduler == "inverse_sqrt":
        init = warmup_init_lr if warmup_init_lr >= 0 else (0.0 if warmup_updates > 0 else lr)
        if warmup_updates > 0 and step < warmup_updates:
            return init + step * (lr - init) / warmup_updates
        return lr * math.sqrt(max(1, warmup_updates) / max(1, step))
    if scheduler == "reduce_lr_on_plateau":
        init = warmup_init_lr if warmup_init_lr >= 0 else (0.0 if warmup_updates > 0 else lr)
        if warmup_updates > 0 and step <= warmup_updates:
            return init + step * (lr - init) / warmup_updates
        return lr * plateau_scale
    if scheduler == "cosine":
        if max_lr is None:
            raise UserError("--lr-scheduler cosine needs --max-lr (its peak; --lr is its floor)")
        init = warmup_init_lr if warmup_init_lr >= 0 else lr
        if warmup_updates > 0 and step < warmup_updates:
            return init + step * (max_lr - init) / warmup_updates
        period = lr_period_updates if lr_period_updates > 0 else max(1, max_update - warmup_updates)
        t = step - warmup_updates
        if t_mult != 1:
            i = math.floor(math.log(1 - t / period * (1 - t_mult), t_mult))
            t_i = t_mult ** i * period
            t_curr = t - (1 - t_mult ** i) / (1 - t_mult) * period
        else:
            i = t // period
            t_i, t_curr = period, t - period * i
        shrink = lr_shrink ** i
        low, high = lr * shrink, max_lr * shrink
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t_curr / t_i))
    raise UserError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")


class Plateau:
    """fairseq's ``reduce_lr_on_plateau`` (torch's ReduceLROnPlateau, mode min, relative
    threshold): after each epoch's validation, past warm-up, a loss that does not beat the
    best by ``threshold`` (relative) is a bad epoch; more than ``patience`` bad epochs in a
    row shrink the learning rate by ``shrink``. Its state is three numbers, kept with the
    training state."""

    def __init__(self, state: dict, shrink: float, threshold: float = 1e-4, patience: int = 0):
        self.state, self.shrink, self.threshold, self.patience = state, shrink, threshold, patience
        state.setdefault("plateau_scale", 1.0)
        state.setdefault("plateau_best", None)
        state.setdefault("plateau_bad", 0)

    def step(self, loss: float) -> None:
        s = self.state
        if s["plateau_best"] is None or loss < s["plateau_best"] * (1 - self.threshold):
            s["plateau_best"], s["plateau_bad"] = loss, 0
            return
        s["plateau_bad"] += 1
        if s["plateau_bad"] > self.patience:
            s["plateau_scale"] *= self.shrink
            s["plateau_bad"] = 0
