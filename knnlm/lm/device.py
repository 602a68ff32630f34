"""Device choice and mixed precision, shared by every stage."""
from __future__ import annotations

import contextlib

import torch

from ..util import UserError


def resolve_device(device: str | None = None, cpu: bool = False) -> torch.device:
    """``--cpu`` wins; then ``--device``; else CUDA when present, else CPU."""
    if cpu:
        return torch.device("cpu")
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UserError(f"--device {device}: {exc}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {device}: CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_context(device: torch.device, dtype):
    """Autocast to ``dtype`` (fp16/bf16) on GPU; a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
