"""`knnlm build-dstore`: one forward pass over a split, saving kNN-LM keys and values.

Inputs: ``--path`` checkpoint, a data-bin (positional) and ``--gen-subset`` (the training
split by default). Output: a datastore directory (see :mod:`knnlm.knn.datastore`) with one key
file per ``--knn-keytype`` (several in one pass), values and positions.

    knnlm build-dstore runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-dir runs/demo/dstore --knn-keytype att,ffn \\
        --tokens-per-sample 256 --context-window 128

Blocking is eval-lm's (:mod:`knnlm.data.blocks`): entry i is the context of target i of
the split with up to ``--context-window`` tokens of extra left context; every target gets
exactly one entry. Killed at any moment, the same command resumes from the last flushed
batch, and the finished files are byte-identical to an uninterrupted run.

Several processes (``torchrun --nproc_per_node N -m knnlm build-dstore ...``, across nodes
too) split the batches of the single-process run into N contiguous ranges; each rank
writes its rows straight into the shared memmaps and records its progress in
``progress.rank<R>.json``, so a killed rank resumes its own range. The files are
byte-identical to a single-process build; rank 0 marks the datastore complete. Across
nodes, ``--dstore-dir`` must be on a filesystem every node mounts: a rank that does not see
the files rank 0 allocated is refused before anything is written.
"""
from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .data.blocks import BREAK_MODES, batch_windows
from .data.preprocess import DataBin
from .distributed import setup_distributed
from .guard import check_output, output_lock
from .io import read_json, write_json_atomic
from .knn.datastore import fingerprint as dstore_fingerprint
from .knn.datastore import (DSTORE_FORMAT, DSTORE_VERSION, DatastoreWriter, is_built,
                            normalize_keytype, value_dtype, verify_entries)
from .lm.checkpoint import check_model_source, load_lm
from .lm.device import resolve_device
from .lm.scoring import iter_scored, make_windows, resolve_window
from .util import UserError, config_dict, flag


@dataclass
class BuildDstoreConfig:
    data: str = flag(help="data-bin directory (with --hf-dataset: made from the dataset)",
                     positional=True)
    dstore_dir: str = flag(help="output datastore directory", aliases=("--dstore-mmap",))
    path: str | None = flag(None, "checkpoint whose representations become the keys")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    hf_dtype: str | None = flag(None, "--hf-model: load its weights as fp32, bf16 or fp16 "
                                "(default fp32; datastores match across dtypes)",
                                choices=("fp32", "bf16", "fp16"))
    hf_dataset: str | None = flag(None, "--hf-model: first make the data-bin from this HF "
                                  "dataset with the model's tokenizer (a save_to_disk "
                                  "directory, data files, or a cached hub name; offline)")
    split: str = flag("train", "--hf-dataset: the dataset's split to store")
    text_column: str = flag("text", "--hf-dataset: the column holding the text")
    gen_subset: str = flag("train", "split to store")
    knn_keytype: str = flag("att", "comma-separated keytypes: att (last_ffn_input), "
                            "ffn (last_linear_input), layer:N (the output of decoder layer N, "
                            "0-based or from the end, before any final norm)")
    tokens_per_sample: int | None = flag(None, "longest model input, context included "
                                         "(default: the model's max positions)")
    context_window: int | None = flag(None, "tokens of extra left context before each block "
                                      "(default 0; HF models given no --tokens-per-sample: "
                                      "half the window)")
    sample_break_mode: str = flag("none", "blocks ignore lines (none), hold whole lines "
                                  "(complete) or one line each (eos), as eval-lm's",
                                  choices=BREAK_MODES)
    max_tokens: int = flag(8192, "padded tokens per batch")
    max_dstore_tokens: int = flag(0, "only the first N tokens of the split (0: all): a "
                                  "datastore of a slice")
    dstore_fp32: bool = flag(False, "store keys in fp32 (default fp16)")
    dstore_fp16: bool = flag(False, "fp16 keys: the default (the original code's flag)")
    dstore_size: int | None = flag(None, "expected number of entries (checked; computed anyway)")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    overwrite: bool = flag(False, "replace a datastore of another configuration at the "
                           "output")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        if self.dstore_fp16 and self.dstore_fp32:
            raise UserError("--dstore-fp16 and --dstore-fp32 are exclusive")
        check_model_source(self.path, self.hf_model)
        check_output(self.dstore_dir, "dir", "--dstore-dir")
        if self.hf_dataset:
            from .data.hf_datasets import SPLIT_NAMES
            if "," in self.split:
                raise UserError("--split: build-dstore stores one split of the dataset")
            self.gen_subset = SPLIT_NAMES.get(self.split, self.split)
        self.keytypes = [normalize_keytype(k) for k in self.knn_keytype.split(",") if k.strip()]
        if not self.keytypes:
            raise UserError("--knn-keytype is empty")
        if len(set(self.keytypes)) != len(self.keytypes):
            raise UserError(f"--knn-keytype lists a keytype twice: {self.knn_keytype}")
        if self.tokens_per_sample is not None and self.tokens_per_sample <= 0:
            raise UserError(f"--tokens-per-sample must be > 0, got {self.tokens_per_sample}")
        if self.max_dstore_tokens < 0:
            raise UserError(f"--max-dstore-tokens must be >= 0, got {self.max_dstore_tokens}")
        if (self.context_window is not None and self.context_window < 0) or self.max_tokens <= 0:
            raise UserError("--context-window must be >= 0 and --max-tokens > 0")
        if None not in (self.tokens_per_sample, self.context_window) and \
                not self.context_window < self.tokens_per_sample:
            raise UserError(f"--context-window ({self.context_window}) must be smaller than "
                            f"--tokens-per-sample ({self.tokens_per_sample})")


def datastore_meta(cfg: BuildDstoreConfig, model, databin: DataBin, fingerprint: str,
                   n: int, T: int, C: int) -> dict:
    return dict(
        format=DSTORE_FORMAT, version=DSTORE_VERSION, size=n, dim=model.cfg.decoder_embed_dim,
        keytypes=cfg.keytypes, key_dtype="float32" if cfg.dstore_fp32 else "float16",
        val_dtype=np.dtype(value_dtype(databin.vocab_size)).name,
        pos_dtype="int32" if n < np.iinfo(np.int32).max else "int64",
        split=cfg.gen_subset, data_dir=str(Path(databin.path).resolve()),
        **({"first_tokens": cfg.max_dstore_tokens} if cfg.max_dstore_tokens else {}),
        blocking=dict(tokens_per_sample=T, context_window=C,
                      **({"sample_break_mode": cfg.sample_break_mode}
                         if cfg.sample_break_mode != "none" else {})),
        model_fingerprint=fingerprint, tokenizer_sha256=databin.tokenizer_sha256,
        vocab_size=databin.vocab_size, rows_written=0, complete=False)


def build_dstore(model, databin: DataBin, cfg: BuildDstoreConfig, device: torch.device,
                 fingerprint: str, on_batch: Callable[[int], None] | None = None,
                 dist=None) -> dict:
    tokens = databin.split(cfg.gen_subset)
    if cfg.max_dstore_tokens:   # a prefix: its entries equal the full dump's first ones
        tokens = tokens[:cfg.max_dstore_tokens]
    n = len(tokens)
    if n == 0:
        raise UserError(f"the {cfg.gen_subset} split of {databin.path} is empty: no datastore")
    if cfg.dstore_size is not None and cfg.dstore_size != n:
        raise UserError(f"--dstore-size {cfg.dstore_size} but the {cfg.gen_subset} split gives "
                        f"{n} entries (the size is computed; the flag can be dropped)")
    T, C = resolve_window(model, cfg.tokens_per_sample, cfg.context_window)
    for kt in cfg.keytypes:
        if kt.startswith("layer:"):
            i = int(kt[6:])
            if not -model.cfg.decoder_layers <= i < model.cfg.decoder_layers:
                raise UserError(f"--knn-keytype {kt}: the model has {model.cfg.decoder_layers} layers")
    meta = datastore_meta(cfg, model, databin, fingerprint, n, T, C)
    built = is_built(cfg.dstore_dir, meta)
    if dist is not None and dist.enabled:
        _agree(cfg, meta, dist, built)
    if built:
        print(f"{cfg.dstore_dir}: this datastore is already built")
        return dict(size=n, dim=meta["dim"], keytypes=cfg.keytypes, seconds=0.0,
                    path=str(cfg.dstore_dir))
    check_output(cfg.dstore_dir, "dir", "--dstore-dir", need_bytes=_bytes_to_write(meta, cfg))
    # one writer per datastore (under torchrun, rank 0 holds the lock for the ranks)
    lock = output_lock(cfg.dstore_dir, "dir", "datastore") if dist is None or dist.is_main \
        else contextlib.nullcontext()
    with lock:
        res = _dump(model, databin, cfg, device, tokens, meta, T, C, on_batch, dist)
        if dist is None or dist.is_main:     # entry i is the target at position i
            verify_entries(cfg.dstore_dir, tokens, lambda s, e: np.arange(s, e))
        return res


def _dump(model, databin: DataBin, cfg: BuildDstoreConfig, device: torch.device,
          tokens: np.ndarray, meta: dict, T: int, C: int, on_batch, dist) -> dict:
    """The forward passes and writes of :func:`build_dstore` (resumable, rank-aware)."""
    n = len(tokens)
    windows = make_windows(n, tokens, databin.eos, T, C, cfg.sample_break_mode)
    if dist is not None and dist.enabled:
        writer, progress, windows = _open_rank(cfg, meta, windows, dist)
        done = progress["done"]
    else:
        writer, progress = DatastoreWriter(cfg.dstore_dir, meta, cfg.overwrite), None
        done = writer.rows_written
    if done and (progress is None or done > progress["start"]):
        print(f"resuming {cfg.dstore_dir} at row {done:,}" + (f" (rank {dist.rank})" if progress else ""))
    # the windows holding rows still to write; one may begin before ``done`` (a datastore
    # grown by Datastore.add ends inside a window of the longer stream): its rows before
    # ``done`` are computed for their context only, and not written again
    windows = [w for w in windows if w.end > done]
    key_dtype = np.float32 if cfg.dstore_fp32 else np.float16
    total = progress["end"] - progress["start"] if progress else n
    bar = tqdm(total=total, initial=done - (progress["start"] if progress else 0), unit="tok",
               desc="build-dstore", disable=True if cfg.quiet or (dist and not dist.is_main) else None)
    t0 = time.perf_counter()
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=cfg.max_tokens, softmax_batch=4096, device=device,
                          return_hidden=tuple(cfg.keytypes), logprobs=False):
        skip = max(0, done - sb.start)
        with np.errstate(over="ignore"):   # an overflow is refused by the writer, by row
            keys = {kt: sb.hidden[kt][skip:].float().cpu().numpy().astype(key_dtype)
                    for kt in cfg.keytypes}
        writer.write(sb.start + skip, keys, sb.targets[skip:], np.arange(sb.start + skip, sb.end))
        if progress is None:
            writer.commit(sb.end)
        else:
            writer.flush()
            write_json_atomic(_progress_path(cfg, dist.rank), dict(progress, done=sb.end))
        bar.update(sb.end - sb.start - skip)
        if on_batch is not None:
            on_batch(sb.end)
    bar.close()
    if progress is not None:
        _finish_ranks(cfg, writer, dist)
    elif not writer.meta["complete"]:  # nothing was left to do, or an empty split
        writer.commit(n)
    return dict(size=n, dim=writer.meta["dim"], keytypes=cfg.keytypes,
                seconds=time.perf_counter() - t0, path=str(cfg.dstore_dir))


def _bytes_to_write(meta: dict, cfg: BuildDstoreConfig) -> int:
    """Disk the dump still needs: every key, value and position, less what the files
    already there occupy (a resumed dump)."""
    n, d = meta["size"], meta["dim"]
    total = n * d * np.dtype(meta["key_dtype"]).itemsize * len(meta["keytypes"]) + \
        n * (np.dtype(meta["val_dtype"]).itemsize + np.dtype(meta["pos_dtype"]).itemsize)
    have = sum(f.stat().st_blocks * 512 for f in Path(cfg.dstore_dir).glob("*.npy"))
    return max(0, total - have)


def _progress_path(cfg: BuildDstoreConfig, rank: int) -> Path:
    return Path(cfg.dstore_dir) / f"progress.rank{rank}.json"


def rank_windows(windows: list, max_tokens: int, rank: int, world: int) -> list:
    """This rank's contiguous share of the single-process batches (whole batches, so every
    batch is computed exactly as in one process)."""
    batches = list(batch_windows(windows, max_tokens))
    per = math.ceil(len(batches) / world)
    return [w for b in batches[rank * per:(rank + 1) * per] for w in b]


def _agree(cfg: BuildDstoreConfig, meta: dict, dist, built: bool) -> None:
    """All ranks build the same datastore into the same --dstore-dir and find it in the
    same state (a node that does not mount the others' directory finds another)."""
    import torch.distributed as tdist
    seen = [None] * dist.world_size
    tdist.all_gather_object(seen, (dstore_fingerprint(meta), cfg.dstore_dir, built,
                                   socket.gethostname()))
    if len({s[:2] for s in seen}) > 1:
        raise UserError("the ranks disagree on the datastore (data, checkpoint, flags or "
                        "--dstore-dir differ between them)")
    if len({s[2] for s in seen}) > 1:
        raise UserError(_not_shared(cfg, [(r, s[3]) for r, s in enumerate(seen) if s[2] != built],
                                    "see the datastore in another state than"))


def _not_shared(cfg: BuildDstoreConfig, ranks: list, what: str) -> str:
    names = ", ".join(f"{r} on {host}" for r, host in ranks)
    return (f"--dstore-dir {cfg.dstore_dir} is not one directory for all ranks: rank(s) {names} "
            f"{what} rank 0; with several nodes it must be on a filesystem that every node mounts")


def _open_rank(cfg: BuildDstoreConfig, meta: dict, windows: list, dist):
    """Rank 0 allocates the files; every rank checks that it sees them (a file named by a
    fresh token) before opening them; (writer, this rank's progress record, its windows)."""
    import torch.distributed as tdist
    token = [secrets.token_hex(8) if dist.is_main else None]
    tdist.broadcast_object_list(token, src=0)
    check = Path(cfg.dstore_dir) / f"shared-check.{token[0]}"
    if dist.is_main:
        DatastoreWriter(cfg.dstore_dir, dict(meta), cfg.overwrite)
        check.write_text(token[0])
    tdist.barrier()
    sees = [None] * dist.world_size
    tdist.all_gather_object(sees, (check.is_file(), socket.gethostname()))
    if dist.is_main:
        check.unlink(missing_ok=True)
    blind = [(r, host) for r, (ok, host) in enumerate(sees) if not ok]
    if blind:
        raise UserError(_not_shared(cfg, blind, "do not see the files created by"))
    writer = DatastoreWriter(cfg.dstore_dir, meta)
    mine = rank_windows(windows, cfg.max_tokens, dist.rank, dist.world_size)
    start = mine[0].score_start if mine else meta["size"]
    end = mine[-1].end if mine else meta["size"]
    progress = dict(world_size=dist.world_size, rank=dist.rank, start=start, end=end, done=start)
    path = _progress_path(cfg, dist.rank)
    if path.is_file():
        old = read_json(path, "rank progress")
        if {k: old.get(k) for k in ("world_size", "rank", "start", "end")} == \
                {k: progress[k] for k in ("world_size", "rank", "start", "end")}:
            progress["done"] = int(old["done"])
    return writer, progress, mine


def _finish_ranks(cfg: BuildDstoreConfig, writer: DatastoreWriter, dist) -> None:
    """Once every rank has flushed its range, rank 0 marks the datastore complete."""
    import torch.distributed as tdist
    tdist.barrier()
    if dist.is_main:
        writer.commit(writer.meta["size"])
        for r in range(dist.world_size):
            _progress_path(cfg, r).unlink(missing_ok=True)
    tdist.barrier()


def dataset_databin(cfg: BuildDstoreConfig) -> None:
    """--hf-dataset: the data-bin DATA of the dataset's split, in the model's tokenizer
    (what `knnlm preprocess --hf-dataset --hf-tokenizer` makes)."""
    from .data.preprocess import PreprocessConfig
    from .data.preprocess import main as preprocess
    preprocess(PreprocessConfig(destdir=cfg.data, hf_dataset=cfg.hf_dataset, split=cfg.split,
                                text_column=cfg.text_column, hf_tokenizer=cfg.hf_model,
                                overwrite=cfg.overwrite, quiet=cfg.quiet))


def main(cfg: BuildDstoreConfig, on_batch: Callable[[int], None] | None = None) -> dict:
    if cfg.hf_dataset:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("under torchrun, make the data-bin first (knnlm preprocess "
                            "--hf-dataset ... --hf-tokenizer MODEL), then build from it")
        dataset_databin(cfg)
    databin = DataBin(cfg.data)
    dist = setup_distributed(cfg.cpu) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    device = dist.device if dist is not None else resolve_device(cfg.device, cfg.cpu)
    model, fp = load_lm(cfg.path, cfg.hf_model, databin, device, cfg.hf_dtype)
    try:
        res = build_dstore(model, databin, cfg, device, fp, on_batch, dist)
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and not dist.is_main:
        return res
    nbytes = sum(f.stat().st_size for f in Path(cfg.dstore_dir).glob("*.npy"))
    print(f"datastore {cfg.dstore_dir}: {res['size']:,} entries x {res['dim']} dims "
          f"({', '.join(res['keytypes'])}), {nbytes / 2**20:,.1f} MiB, {res['seconds']:.1f}s")
    res["config"] = config_dict(cfg)
    return res
