"""Shared fixtures: a synthetic corpus, data-bins in both vocabulary kinds, a tiny model."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from knnlm.lm.checkpoint import CKPT_FORMAT, CKPT_VERSION, save_checkpoint
from knnlm.data import preprocess
from knnlm.data.preprocess import DataBin
from knnlm.lm.transformer import build_model

WORDS = ("the king queen lord lady good sweet night day love death heart noble "
         "speak hear come go my thy thou art what shall not be to of and in").split()


def synthetic_text(n_lines: int, seed: int) -> str:
    """Pseudo-verse with learnable regularities (fixed phrases, repeated refrains)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 6:
            lines.append("")
        elif i % 5 == 0:
            lines.append("Enter the king, and my lady, with sweet music.")
        else:
            n = rng.randint(3, 12)
            words = [rng.choice(WORDS) for _ in range(n)]
            lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for split, (n, seed) in dict(train=(1500, 1), valid=(150, 2), test=(150, 3)).items():
        (d / f"{split}.txt").write_text(synthetic_text(n, seed))
    return d


@pytest.fixture(scope="session")
def bpe_databin(corpus_dir, tmp_path_factory) -> DataBin:
    dest = tmp_path_factory.mktemp("databin_bpe")
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest), srcdir=str(corpus_dir),
                                                vocab_size=300, quiet=True))
    return DataBin(dest)


@pytest.fixture(scope="session")
def dict_databin(corpus_dir, tmp_path_factory) -> DataBin:
    dest = tmp_path_factory.mktemp("databin_dict")
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest), srcdir=str(corpus_dir),
                                                only_source=True, quiet=True))
    return DataBin(dest)


def free_port() -> int:
    """A TCP port nobody listens on now (torchrun's rendezvous; a fixed one can be taken)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(vocab_size: int, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("dropout", 0.0)
    model = build_model("tiny", vocab_size, **overrides)
    model.eval()
    return model


def write_model_checkpoint(model, databin: DataBin, path: Path) -> Path:
    save_checkpoint(dict(format=CKPT_FORMAT, version=CKPT_VERSION,
                         model_cfg=model.cfg.to_dict(), model=model.state_dict(),
                         data=dict(tokenizer_sha256=databin.tokenizer_sha256,
                                   vocab_size=databin.vocab_size)), path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(bpe_databin, tmp_path_factory) -> Path:
    """A randomly initialised tiny model saved as a checkpoint for the BPE data-bin."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return write_model_checkpoint(tiny_model(bpe_databin.vocab_size), bpe_databin, path)


@pytest.fixture(scope="session")
def trained_ckpt(bpe_databin, tmp_path_factory) -> Path:
    """A tiny model trained for 40 updates on the synthetic corpus."""
    from knnlm.lm import train
    root = tmp_path_factory.mktemp("trained")
    train.main(train.TrainConfig(data=str(bpe_databin.path), arch="tiny", save_dir=str(root),
                                 optimizer="adam", adam_betas="(0.9, 0.98)", clip_norm=0.0,
                                 tokens_per_sample=64, max_tokens=512, lr=3e-3, max_update=40,
                                 validate_interval=0, max_valid_tokens=256, quiet=True))
    return root / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def trained_dstore(bpe_databin, trained_ckpt, tmp_path_factory):
    """att and ffn keys of the trained tiny model over the training split (~13k entries)."""
    from knnlm import build_dstore
    from knnlm.knn.datastore import Datastore
    out = tmp_path_factory.mktemp("dstore_train") / "ds"
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_dir=str(out),
        knn_keytype="att,ffn", tokens_per_sample=64, context_window=32, quiet=True))
    return Datastore(out)


def refused(argv, capsys, needle: str = "") -> tuple | None:
    """None when ``knnlm argv`` is refused as it should be (exit 2, one line on stderr
    holding ``needle``, no traceback); else what happened."""
    from knnlm.cli import run
    capsys.readouterr()
    try:
        rc = run(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    if rc != 2 or len(err.strip().splitlines()) != 1 or "Traceback" in err or needle not in err:
        return rc, err[-400:]
    return None
