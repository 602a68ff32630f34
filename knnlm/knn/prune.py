"""`knnlm prune-dstore`: a smaller datastore whose entries carry weights (efficient-knnlm's
datastore pruning, He et al. 2021).

Methods (``--method``):

- ``merge`` (greedy merging): visit the entries in order; each one not yet merged away
  absorbs those of its ``--merge-k`` nearest neighbours (found with the datastore's index)
  that carry the same value and are not merged away themselves: their counts add to its
  own and they leave the datastore. The kept entry keeps its key.
- ``random``: a seeded random ``--ratio`` of the entries, each of count 1.
- ``kmeans``: k-means of the keys into ``--clusters`` clusters; the entries of one cluster
  with one value become one entry: their mean key, that value, their number as count.

The result is an ordinary datastore directory (index it with `knnlm build-index`) with
``counts.npy``: an entry of count c weighs c · exp(s / T) in the kNN softmax
(:mod:`knnlm.knn.math`), so c merged entries count as c identical ones. Its sidecar
records ``weighted`` and ``pruned`` (method, parameters, the parent's fingerprint, how
many entries were kept).

    knnlm prune-dstore --dstore-dir runs/demo/dstore --out runs/demo/dstore_merged \\
        --method merge --merge-k 8
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..guard import check_output, output_lock
from ..io import write_json_atomic
from ..util import UserError, flag
from .datastore import (Datastore, DatastoreWriter, is_built, normalize_keytype,
                        finite_rows, subset_rows, verify_entries)
from .index_read import load_index
from .kmeans import cluster_keys
from .search import default_index_path

METHODS = ("merge", "random", "kmeans")
SEARCH_CHUNK = 4096      # queries per index search while finding the merge neighbours
COPY_CHUNK = 1 << 18


@dataclass
class PruneConfig:
    dstore_dir: str = flag(help="the datastore to prune")
    out: str = flag(help="directory of the pruned datastore")
    method: str = flag("merge", "merge (greedy merging) | random | kmeans", choices=METHODS)
    knn_keytype: str = flag("att", "keys whose neighbours (or clusters) decide")
    merge_k: int = flag(8, "merge: neighbours of each entry that may merge into it")
    indexfile: str | None = flag(None, "merge: index to find them with (default: the "
                                 "datastore's index_<keytype>_l2.faiss)")
    probe: int = flag(32, "merge: nprobe of that search")
    ratio: float = flag(0.5, "random: share of the entries kept")
    clusters: int = flag(4096, "kmeans: number of clusters")
    seed: int = flag(1, "seed of random, kmeans and the order merge visits the entries in")
    overwrite: bool = flag(False, "replace a datastore of another configuration at the "
                           "output")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        self.knn_keytype = normalize_keytype(self.knn_keytype)
        if self.merge_k <= 0 or self.probe <= 0 or self.clusters <= 0:
            raise UserError("--merge-k, --probe and --clusters must be > 0")
        if not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must be in (0, 1], got {self.ratio}")
        if Path(self.out).resolve() == Path(self.dstore_dir).resolve():
            raise UserError("--out must differ from --dstore-dir (the datastore is never "
                            "changed in place)")
        check_output(self.out, "dir", "--out")


def greedy_merge(neighbours: np.ndarray, vals: np.ndarray, counts: np.ndarray | None = None,
                 order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, their counts), efficient-knnlm's greedy merging: the entries are visited
    in ``order`` (default: by row); one not merged away absorbs those of its neighbours
    with its value that are still untouched — neither merged away nor grown by absorbing
    others — so a count never moves more than one hop (``neighbours`` (N, k'), -1 for
    none; ``counts``: the entries' counts so far, 1 each by default)."""
    n = len(vals)
    counts = np.ones(n, dtype=np.float64) if counts is None else counts.astype(np.float64)
    gone = np.zeros(n, dtype=bool)
    grown = np.zeros(n, dtype=bool)
    for i in tqdm(range(n) if order is None else order, desc="merge", unit="entry",
                  mininterval=2, disable=n < 1 << 16):
        if gone[i]:
            continue
        for j in neighbours[i]:
            if j < 0 or j == i or gone[j] or grown[j] or vals[j] != vals[i]:
                continue
            gone[j] = True
            grown[i] = True
            counts[i] += counts[j]
    kept = np.flatnonzero(~gone)
    return kept, counts[kept]


def merge_neighbours(ds: Datastore, cfg: PruneConfig) -> np.ndarray:
    """(N, merge_k) the nearest other entries of every entry (-1 where fewer)."""
    path = cfg.indexfile or default_index_path(ds.path, cfg.knn_keytype, "l2")
    index, _ = load_index(path, ds, cfg.knn_keytype, "l2", cfg.probe)
    keys = ds.keys(cfg.knn_keytype)
    out = np.empty((ds.size, cfg.merge_k), dtype=np.int64)
    for s in tqdm(range(0, ds.size, SEARCH_CHUNK), desc="merge neighbours", unit="chunk",
                  disable=True if cfg.quiet else None):
        e = min(ds.size, s + SEARCH_CHUNK)
        _, I = index.search(finite_rows(keys[s:e], s), cfg.merge_k + 1)
        own = I == np.arange(s, e)[:, None]
        # drop the entry itself (wherever it landed), else the farthest one
        drop = np.where(own.any(1), own.argmax(1), cfg.merge_k)
        keep = np.ones_like(I, dtype=bool)
        keep[np.arange(e - s), drop] = False
        out[s:e] = I[keep].reshape(e - s, cfg.merge_k)
    return out


def kmeans_entries(ds: Datastore, cfg: PruneConfig):
    """(keys, vals, pos, counts) of the (cluster, value) groups."""
    keys = ds.keys(cfg.knn_keytype)
    _, cluster = cluster_keys(keys, cfg.clusters, cfg.clusters * 64, cfg.seed, COPY_CHUNK)
    vals = np.asarray(ds.vals, dtype=np.int64)
    group = cluster * (int(vals.max()) + 1) + vals
    uniq, first, inverse, counts = np.unique(group, return_index=True, return_inverse=True,
                                             return_counts=True)
    sums = np.zeros((len(uniq), ds.dim), dtype=np.float64)
    for s in range(0, ds.size, COPY_CHUNK):
        np.add.at(sums, inverse[s:s + COPY_CHUNK], np.asarray(keys[s:s + COPY_CHUNK], np.float64))
    return (sums / counts[:, None]).astype(np.float32), vals[first], np.asarray(ds.pos)[first], \
        counts.astype(np.float32)


def pruned_meta(ds: Datastore, cfg: PruneConfig, m: int, keytypes: list[str],
                key_dtype: str) -> dict:
    params = dict(merge=dict(merge_k=cfg.merge_k, probe=cfg.probe, keytype=cfg.knn_keytype,
                             seed=cfg.seed),
                  random=dict(ratio=cfg.ratio, seed=cfg.seed),
                  kmeans=dict(clusters=cfg.clusters, seed=cfg.seed,
                              keytype=cfg.knn_keytype))[cfg.method]
    meta = {k: v for k, v in ds.meta.items() if k not in ("rows_written", "complete")}
    meta.update(size=m, keytypes=keytypes, key_dtype=key_dtype, rows_written=0, complete=False,
                weighted=True, pruned=dict(method=cfg.method, parent=str(ds.path.resolve()),
                                           parent_fingerprint=ds.fingerprint,
                                           parent_size=ds.size, kept=m, **params))
    return meta


def main(cfg: PruneConfig) -> dict:
    ds = Datastore(cfg.dstore_dir)
    if cfg.knn_keytype not in ds.keytypes:
        raise UserError(f"{ds.path} has no {cfg.knn_keytype} keys")
    if cfg.method == "kmeans" and cfg.clusters > ds.size:
        raise UserError(f"--clusters {cfg.clusters} exceeds the datastore size {ds.size:,}")
    with output_lock(cfg.out, "dir", "pruned datastore"):
        return _prune(ds, cfg)


def _prune(ds: Datastore, cfg: PruneConfig) -> dict:
    parent_counts = None if ds.counts is None else np.asarray(ds.counts)
    if cfg.method == "kmeans":
        keys, vals, pos, counts = kmeans_entries(ds, cfg)
        rows, keytypes, key_dtype = None, [cfg.knn_keytype], "float32"
    else:
        if cfg.method == "merge":
            order = np.random.default_rng(cfg.seed).permutation(ds.size)
            rows, counts = greedy_merge(merge_neighbours(ds, cfg), np.asarray(ds.vals),
                                        parent_counts, order)
        else:
            rows = subset_rows(ds.size, cfg.ratio, cfg.seed)
            counts = np.ones(len(rows)) if parent_counts is None else parent_counts[rows]
        keytypes, key_dtype = ds.keytypes, ds.meta["key_dtype"]
    m = len(counts)
    meta = pruned_meta(ds, cfg, m, keytypes, key_dtype)
    out = Path(cfg.out)
    if not is_built(out, meta):
        writer = DatastoreWriter(out, meta, cfg.overwrite)
        for s in range(0, m, COPY_CHUNK):
            e = min(m, s + COPY_CHUNK)
            if rows is None:
                writer.write(s, {cfg.knn_keytype: keys[s:e]}, vals[s:e], pos[s:e])
            else:
                r = rows[s:e]
                writer.write(s, {kt: ds.keys(kt)[r] for kt in keytypes}, ds.vals[r], ds.pos[r])
        np.save(out / "counts.npy", np.asarray(counts, dtype=np.float32))
        writer.commit(m)
    if rows is None:
        verify_entries(out, vals, pos, np.asarray(counts, dtype=np.float32))
    else:
        verify_entries(out, lambda s, e: ds.vals[rows[s:e]], lambda s, e: ds.pos[rows[s:e]],
                       np.asarray(counts, dtype=np.float32))
    print(f"{cfg.method}: kept {m:,} of {ds.size:,} entries ({m / ds.size:.1%}); "
          f"counts sum to {float(np.sum(counts)):,.0f} -> {out}")
    write_json_atomic(out / "prune.json", meta["pruned"])
    return meta["pruned"]
