"""Offline access to HuggingFace transformers, one rule for weights and tokenizers.

A name that is a local directory loads from it; a hub name resolves from the local HF
cache only, unless ``HF_HUB_OFFLINE=0`` allows downloads. Transformers is an optional
extra (``pip install -e '.[hf]'``); its absence is a one-line :class:`UserError`.
"""
from __future__ import annotations

from pathlib import Path

import os

from .util import UserError


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("--hf-model needs transformers: pip install -e '.[hf]'")
    return transformers


def offline(name: str) -> bool:
    """Hub names resolve from the local cache only, unless HF_HUB_OFFLINE=0."""
    return not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE", "1") != "0"


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "vocab.txt", "spiece.model")


def load_hf_tokenizer(name: str):
    tf = transformers_module()
    # transformers builds an EMPTY tokenizer for some model types (Gemma, Qwen2, ...) from a
    # directory that holds no tokenizer files: refuse instead of tokenizing with it
    local = Path(name)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{name} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    try:
        tok = tf.AutoTokenizer.from_pretrained(name, local_files_only=offline(name))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the HF tokenizer {name!r} offline ({first_line(exc)})")
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{name}: only fast (tokenizers-backed) HF tokenizers are supported")
    return tok
