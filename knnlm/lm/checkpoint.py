"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain data and tensors:
``format``, ``version``, ``model_cfg`` (ModelConfig as a dict), ``model`` (state dict),
``data`` (vocabulary size and tokenizer fingerprint of the data-bin it was trained on),
and for training checkpoints ``train_state`` / ``optimizer`` (see train.py).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..guard import temp_path
from ..util import UserError
from .transformer import ModelConfig, TransformerLM

CKPT_FORMAT = "knnlm-checkpoint"
CKPT_VERSION = 1
HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Write to a temporary file, fsync, then rename: a kill never leaves half a file."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():   # torch warns before refusing a raw pickle
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:   # weights_only: nothing runs; any failure means "unreadable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a "
                        f"torch file: {first[:200]})")
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a knnlm checkpoint")
    if obj.get("version", 0) > CKPT_VERSION:
        raise UserError(f"{path} was written by a newer knnlm (format {obj['version']})")
    return obj


def model_from_checkpoint(ckpt: dict) -> TransformerLM:
    model = TransformerLM(ModelConfig.from_dict(ckpt["model_cfg"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit its config ({str(exc).splitlines()[0]})")
    return model


def model_fingerprint(state_dict: dict) -> str:
    """A short hash of the weights: binds datastores and caches to one checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_data_matches(ckpt: dict, databin, ckpt_path: str | Path) -> None:
    """Refuse a data-bin whose vocabulary differs from the one the model was trained on."""
    want = ckpt.get("data", {}).get("tokenizer_sha256")
    if want and want != databin.tokenizer_sha256:
        raise UserError(f"{databin.path} was tokenized with another vocabulary than the one "
                        f"{ckpt_path} was trained on (tokenizer fingerprints differ)")
    if ckpt["model_cfg"]["vocab_size"] != databin.vocab_size:
        raise UserError(f"model vocabulary {ckpt['model_cfg']['vocab_size']} != data-bin "
                        f"vocabulary {databin.vocab_size}")


def check_model_source(path: str | None, hf_model: str | None) -> None:
    """The configs that load a model take exactly one of --path and --hf-model."""
    if bool(path) == bool(hf_model):
        raise UserError("give exactly one of --path CKPT and --hf-model NAME")


def load_lm(path: str | None, hf_model: str | None, databin, device, hf_dtype=None) -> tuple:
    """(model, fingerprint) of a knnlm checkpoint (``--path``) or an HF causal LM
    (``--hf-model``, its weights loaded in ``hf_dtype`` when given: a torch dtype or
    --hf-dtype's name), checked against the
    data-bin's vocabulary, on ``device``."""
    if hf_model:
        from .hf import check_hf_data, hf_fingerprint, load_hf_model
        if isinstance(hf_dtype, str):
            hf_dtype = HF_DTYPES[hf_dtype]
        model = load_hf_model(hf_model, hf_dtype)
        check_hf_data(model, databin)
        return model.to(device), hf_fingerprint(model.hf)
    ckpt = load_checkpoint(path)
    check_data_matches(ckpt, databin, path)
    return model_from_checkpoint(ckpt).to(device), model_fingerprint(ckpt["model"])
