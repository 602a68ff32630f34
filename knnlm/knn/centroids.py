"""`knnlm centroids`: cluster centroids of a datastore's keys as an output layer (the
original's ``cluster/`` experiments, paper notes §3.8).

Does a softmax over a few representative points of the datastore recover the kNN-LM's
gain? Two ways to choose the points:

- ``--mode kmeans``: k-means over a seeded sample of the keys (``--train-fraction``, the
  original's 20%) into C = nspecial + ratio·(V − nspecial) centroids (``--ratio``, the
  original's 2); every key is then assigned to its nearest centroid, and the distribution
  P(w | c) is the share of centroid c's keys whose value is w (the original's
  ``cluster_freq.npz``);
- ``--mode per-word``: ``--ratio`` k-means centroids of each token's own keys (all of them
  when it has that few), each centroid belonging to its token (P(w | c) one-hot; the
  original's ``kmeans_per_word``).

Outputs in ``--out``: ``centroids.npy`` (C, D) float32, ``centroid_dist.npz`` (C × V
sparse CSR in scipy's ``save_npz`` layout, readable by the original code) and
``centroids.json`` (the sidecar). ``eval-lm --load-centroids DIR/centroids.npy
--load-centroid-distribution DIR/centroid_dist.npz --centroid-scale s`` then scores
p(w | h) = Σ_c P(w | c) softmax_c(s · h·μ_c), h the representation that was clustered.

    knnlm centroids --dstore-dir runs/small/dstore --knn-keytype ffn --mode kmeans --ratio 2 \\
        --out runs/small/centroids/kmeans2
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.centroid_files import save_csr
from ..data.preprocess import DataBin
from ..guard import check_output, output_lock
from ..io import rewrite_output, write_json_atomic
from ..util import UserError, config_dict, flag
from .datastore import Datastore, finite_rows, normalize_keytype

CENTROIDS_FORMAT = "knnlm-centroids"
ASSIGN_CHUNK = 65536          # keys assigned to their nearest centroid per search call


@dataclass
class CentroidsConfig:
    dstore_dir: str = flag(help="datastore directory", aliases=("--dstore_mmap",))
    out: str = flag(help="output directory (centroids.npy, centroid_dist.npz, centroids.json)")
    knn_keytype: str = flag("ffn", "keys to cluster (ffn: the output layer's input, as the "
                            "original; att)")
    mode: str = flag("kmeans", "k-means over all keys, or per token", choices=("kmeans",
                                                                              "per-word"))
    ratio: int = flag(2, "centroids per token (kmeans: C = nspecial + ratio·(V − nspecial))")
    train_fraction: float = flag(0.2, "kmeans: share of the keys sampled to train it")
    max_per_word: int = flag(1_000_000, "per-word: keys sampled per token at most")
    niter: int = flag(20, "k-means iterations")
    seed: int = flag(1, "seed of the samples and of k-means")
    overwrite: bool = flag(False, "replace centroids computed with other settings")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        self.knn_keytype = normalize_keytype(self.knn_keytype)
        if self.ratio < 1 or self.niter < 1 or self.max_per_word < 1:
            raise UserError("--ratio, --niter and --max-per-word must be >= 1")
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        check_output(self.out, "dir", "--out")


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    import faiss
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def assign(keys, centroids: np.ndarray, quiet: bool = True) -> np.ndarray:
    """(N,) the nearest centroid (L2) of every key, in chunks."""
    import faiss
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(keys), dtype=np.int64)
    for s in tqdm(range(0, len(keys), ASSIGN_CHUNK), disable=True if quiet else None,
                  desc="assign", unit="chunk"):
        e = min(len(keys), s + ASSIGN_CHUNK)
        out[s:e] = index.search(finite_rows(keys[s:e], s), 1)[1][:, 0]
    return out


def kmeans_centroids(keys, vals: np.ndarray, vocab_size: int, nspecial: int,
                     cfg: CentroidsConfig) -> tuple[np.ndarray, tuple]:
    """Global k-means: (centroids, the C × V distribution as (rows, cols, vals))."""
    n = len(keys)
    c = nspecial + cfg.ratio * (vocab_size - nspecial)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=max(c, int(cfg.train_fraction * n)), replace=False)) \
        if int(cfg.train_fraction * n) < n else np.arange(n)
    if len(sample) < c:
        raise UserError(f"{c:,} centroids need at least as many keys; the datastore has {n:,}")
    cent = _kmeans(finite_rows(keys[sample], where=getattr(keys, "filename", None), rows=sample),
                   c, cfg.niter, cfg.seed)
    ids = assign(keys, cent, cfg.quiet)
    pair, counts = np.unique(ids * vocab_size + vals, return_counts=True)
    rows, cols = pair // vocab_size, pair % vocab_size
    size = np.bincount(ids, minlength=c)
    return cent, (rows, cols, counts / size[rows])


def per_word_centroids(keys, vals: np.ndarray, vocab_size: int, cfg: CentroidsConfig
                       ) -> tuple[np.ndarray, tuple]:
    """``ratio`` centroids of each token's keys (its keys themselves when it has fewer)."""
    order = np.argsort(vals, kind="stable")
    bounds = np.searchsorted(vals[order], np.arange(vocab_size + 1))
    rng = np.random.default_rng(cfg.seed)
    cents, owner = [], []
    for w in tqdm(range(vocab_size), disable=True if cfg.quiet else None, desc="per-word",
                  unit="type"):
        rows = order[bounds[w]:bounds[w + 1]]
        if len(rows) == 0:
            continue
        if len(rows) > cfg.max_per_word:
            rows = np.sort(rng.choice(rows, cfg.max_per_word, replace=False))
        rows = np.sort(rows)
        x = finite_rows(keys[rows], where=getattr(keys, "filename", None), rows=rows)
        cw = x if len(x) <= cfg.ratio else _kmeans(x, cfg.ratio, cfg.niter, cfg.seed)
        cents.append(cw)
        owner += [w] * len(cw)
    owner = np.asarray(owner, dtype=np.int64)
    return np.concatenate(cents), (np.arange(len(owner)), owner, np.ones(len(owner)))


def main(cfg: CentroidsConfig) -> dict:
    ds = Datastore(cfg.dstore_dir)
    keys, vals = ds.keys(cfg.knn_keytype), np.asarray(ds.vals, dtype=np.int64)
    src = Path(ds.meta.get("data_dir", ""))
    nspecial = DataBin(src).vocab.num_specials if (src / "data.json").is_file() else 0
    V = int(ds.meta["vocab_size"])
    t0 = time.perf_counter()
    with output_lock(cfg.out, "dir", "centroids"):
        rewrite_output(Path(cfg.out) / "centroids.json", "centroids", config_dict(cfg),
                       cfg.overwrite)
        if cfg.mode == "kmeans":
            cent, (rows, cols, probs) = kmeans_centroids(keys, vals, V, nspecial, cfg)
        else:
            cent, (rows, cols, probs) = per_word_centroids(keys, vals, V, cfg)
        out = Path(cfg.out)
        np.save(out / "centroids.npy", cent.astype(np.float32))
        save_csr(out / "centroid_dist.npz", rows, cols, probs, (len(cent), V))
        meta = dict(format=CENTROIDS_FORMAT, version=1, mode=cfg.mode, keytype=cfg.knn_keytype,
                    centroids=len(cent), dim=int(cent.shape[1]), vocab_size=V,
                    datastore_fingerprint=ds.fingerprint,
                    model_fingerprint=ds.meta["model_fingerprint"],
                    seconds=time.perf_counter() - t0, config=config_dict(cfg))
        write_json_atomic(out / "centroids.json", meta)
    print(f"wrote {cfg.out}: {len(cent):,} {cfg.mode} centroids of {ds.size:,} {cfg.knn_keytype} "
          f"keys, {len(rows):,} non-zero P(w|c), {meta['seconds']:.1f}s")
    return meta
