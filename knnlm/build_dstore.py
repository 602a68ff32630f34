"""`knnlm build-dstore`: one forward pass over a split, saving kNN-LM keys and values.

Inputs: ``--path`` checkpoint, a data-bin (positional) and ``--gen-subset`` (the training
split by default). Output: a datastore directory (see :mod:`knnlm.datastore`) with one key
file per ``--knn-keytype`` (several in one pass), values and positions.

    knnlm build-dstore runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-dir runs/demo/dstore --knn-keytype att,ffn \\
        --tokens-per-sample 256 --context-window 128

Blocking is eval-lm's (:mod:`knnlm.data.blocks`): entry i is the context of target i of
the split with up to ``--context-window`` tokens of extra left context; every target gets
exactly one entry. Killed at any moment, the same command resumes from the last flushed
batch, and the finished files are byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_lm
from .config import UserError, config_dict, flag
from .data.preprocess import DataBin
from .datastore import (DSTORE_FORMAT, DSTORE_VERSION, DatastoreWriter, is_built,
                        normalize_keytype, value_dtype)
from .device import resolve_device
from .evaluate import iter_scored, make_windows, resolve_window


@dataclass
class BuildDstoreConfig:
    data: str = flag(help="data-bin directory", positional=True)
    dstore_dir: str = flag(help="output datastore directory", aliases=("--dstore-mmap",))
    path: str | None = flag(None, "checkpoint whose representations become the keys")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    gen_subset: str = flag("train", "split to store")
    knn_keytype: str = flag("att", "comma-separated keytypes: att (last_ffn_input), "
                            "ffn (last_linear_input), layer:N")
    tokens_per_sample: int | None = flag(None, "longest model input, context included "
                                         "(default: the model's max positions)")
    context_window: int = flag(0, "tokens of extra left context before each block")
    max_tokens: int = flag(8192, "padded tokens per batch")
    dstore_fp32: bool = flag(False, "store keys in fp32 (default fp16)")
    dstore_size: int | None = flag(None, "expected number of entries (checked; computed anyway)")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        if bool(self.path) == bool(self.hf_model):
            raise UserError("give exactly one of --path CKPT and --hf-model NAME")
        self.keytypes = [normalize_keytype(k) for k in self.knn_keytype.split(",") if k.strip()]
        if not self.keytypes:
            raise UserError("--knn-keytype is empty")
        if len(set(self.keytypes)) != len(self.keytypes):
            raise UserError(f"--knn-keytype lists a keytype twice: {self.knn_keytype}")
        if self.context_window < 0 or self.max_tokens <= 0:
            raise UserError("--context-window must be >= 0 and --max-tokens > 0")
        if self.tokens_per_sample is not None and not 0 <= self.context_window < self.tokens_per_sample:
            raise UserError(f"--context-window ({self.context_window}) must be smaller than "
                            f"--tokens-per-sample ({self.tokens_per_sample})")


def datastore_meta(cfg: BuildDstoreConfig, model, databin: DataBin, fingerprint: str,
                   n: int, T: int) -> dict:
    return dict(
        format=DSTORE_FORMAT, version=DSTORE_VERSION, size=n, dim=model.cfg.decoder_embed_dim,
        keytypes=cfg.keytypes, key_dtype="float32" if cfg.dstore_fp32 else "float16",
        val_dtype=np.dtype(value_dtype(databin.vocab_size)).name,
        pos_dtype="int32" if n < np.iinfo(np.int32).max else "int64",
        split=cfg.gen_subset, data_dir=str(Path(databin.path).resolve()),
        blocking=dict(tokens_per_sample=T, context_window=cfg.context_window),
        model_fingerprint=fingerprint, tokenizer_sha256=databin.tokenizer_sha256,
        vocab_size=databin.vocab_size, rows_written=0, complete=False)


def build_dstore(model, databin: DataBin, cfg: BuildDstoreConfig, device: torch.device,
                 fingerprint: str, on_batch: Callable[[int], None] | None = None) -> dict:
    tokens = databin.split(cfg.gen_subset)
    n = len(tokens)
    if cfg.dstore_size is not None and cfg.dstore_size != n:
        raise UserError(f"--dstore-size {cfg.dstore_size} but the {cfg.gen_subset} split gives "
                        f"{n} entries (the size is computed; the flag can be dropped)")
    T = resolve_window(model, cfg.tokens_per_sample, cfg.context_window)
    for kt in cfg.keytypes:
        if kt.startswith("layer:"):
            i = int(kt[6:])
            if not -model.cfg.decoder_layers <= i < model.cfg.decoder_layers:
                raise UserError(f"--knn-keytype {kt}: the model has {model.cfg.decoder_layers} layers")
    meta = datastore_meta(cfg, model, databin, fingerprint, n, T)
    if is_built(cfg.dstore_dir, meta):
        print(f"{cfg.dstore_dir}: this datastore is already built")
        return dict(size=n, dim=meta["dim"], keytypes=cfg.keytypes, seconds=0.0,
                    path=str(cfg.dstore_dir))
    writer = DatastoreWriter(cfg.dstore_dir, meta)
    done = writer.rows_written
    if done:
        print(f"resuming {cfg.dstore_dir} at row {done:,} of {n:,}")
    windows = [w for w in make_windows(n, tokens, databin.eos, T, cfg.context_window, "none")
               if w.score_start >= done]
    key_dtype = np.float32 if cfg.dstore_fp32 else np.float16
    bar = tqdm(total=n, initial=done, unit="tok", desc="build-dstore",
               disable=True if cfg.quiet else None)
    t0 = time.perf_counter()
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=cfg.max_tokens, softmax_batch=4096, device=device,
                          return_hidden=tuple(cfg.keytypes), logprobs=False):
        keys = {kt: sb.hidden[kt].float().cpu().numpy().astype(key_dtype) for kt in cfg.keytypes}
        writer.write(sb.start, keys, sb.targets, np.arange(sb.start, sb.end))
        writer.commit(sb.end)
        bar.update(sb.end - sb.start)
        if on_batch is not None:
            on_batch(sb.end)
    bar.close()
    if not writer.meta["complete"]:  # nothing was left to do, or an empty split
        writer.commit(n)
    return dict(size=n, dim=writer.meta["dim"], keytypes=cfg.keytypes,
                seconds=time.perf_counter() - t0, path=str(cfg.dstore_dir))


def main(cfg: BuildDstoreConfig, on_batch: Callable[[int], None] | None = None) -> dict:
    databin = DataBin(cfg.data)
    device = resolve_device(cfg.device, cfg.cpu)
    model, fingerprint = load_lm(cfg.path, cfg.hf_model, databin, device)
    res = build_dstore(model, databin, cfg, device, fingerprint, on_batch)
    nbytes = sum(f.stat().st_size for f in Path(cfg.dstore_dir).glob("*.npy"))
    print(f"datastore {cfg.dstore_dir}: {res['size']:,} entries x {res['dim']} dims "
          f"({', '.join(res['keytypes'])}), {nbytes / 2**20:,.1f} MiB, {res['seconds']:.1f}s")
    res["config"] = config_dict(cfg)
    return res
