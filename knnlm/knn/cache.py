"""The retrieval cache: what `eval-lm --knnlm --save-retrieval DIR` saw for every scored
token, enough to recompute p_kNN for any temperature, any k' <= k, any λ and FAISS vs
exact scores without the model, the datastore or the index (see :mod:`knnlm.knn.sweep`).

Files in DIR (row i = token i of the evaluated split):

- ``targets.npy`` (N,) int32 and ``words.npy`` (N,) bool (the token counts as a word);
- ``lm_logprobs.npy`` (N,) float32: log p_LM(target), natural log;
- ``ids.npy`` (N, k) int32 (int64 for datastores beyond int32), ``vals.npy`` (N, k) int32:
  neighbours and their values (-1: none);
- ``faiss_dists.npy`` (N, k) float32: the distances search returned (FAISS conventions);
- ``exact_dists.npy`` (N, k) float32: recomputed from the keys, in the score mode's metric;
  always there when the evaluation scored with them, else with ``--save-exact-dists``;
- ``log_counts.npy`` (N, k) float32: the neighbours' log counts, for a pruned datastore
  (``weighted`` in the sidecar);
- ``cache.json``: the eval config, its score mode (:mod:`knnlm.knn.mode`), k, N,
  datastore and index fingerprints, ``complete``.

So the cache always holds the distances its evaluation scored with: a sweep at the
evaluation's λ, T and k reproduces its perplexity.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..guard import other_configuration
from ..io import open_npy, read_json, read_sidecar, write_json_atomic
from ..util import UserError
from .mode import ScoreMode

CACHE_FORMAT = "knnlm-retrieval-cache"
CACHE_VERSION = 2     # 2: the score mode recorded; version 1 caches still read


def _columns(k: int, exact: bool, ids_dtype: str, weighted: bool = False) -> dict[str, tuple]:
    cols = dict(targets=("int32", ()), words=("bool", ()), lm_logprobs=("float32", ()),
                ids=(ids_dtype, (k,)), vals=("int32", (k,)), faiss_dists=("float32", (k,)))
    if exact:
        cols["exact_dists"] = ("float32", (k,))
    if weighted:
        cols["log_counts"] = ("float32", (k,))
    return cols


PROGRESS_KEYS = ("complete", "progress", "summary")
# eval flags that shape no row of the cache (what is printed, where other outputs go)
NOT_IDENTITY = ("quiet", "results_path", "save_scores", "save_tokens", "save_knn_scores",
                "save_queries", "overwrite", "heartbeat_timeout")


def cache_identity(meta: dict) -> dict:
    """What defines a cache: its sidecar less progress, with the evaluation's flags spelt
    out (so that the output rule names the flag that differs)."""
    ident = {k: v for k, v in meta.items() if k not in PROGRESS_KEYS and k != "config"}
    for name, value in (meta.get("config") or {}).items():
        if name not in NOT_IDENTITY:
            ident["--" + name.replace("_", "-")] = value
    return ident


class CacheWriter:
    """Writes a cache row block by row block. An incomplete cache of the same evaluation
    (same sidecar) is reopened: ``progress`` is what its last :meth:`commit` recorded."""

    def __init__(self, path: str | Path, n: int, k: int, exact: bool, meta: dict,
                 datastore_size: int, weighted: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        ids_dtype = "int32" if datastore_size < np.iinfo(np.int32).max else "int64"
        self.meta = dict(meta, format=CACHE_FORMAT, version=CACHE_VERSION, size=n, k=k,
                         exact_dists=exact, ids_dtype=ids_dtype, complete=False)
        if weighted:
            self.meta["weighted"] = True
        self.progress = None
        side = self.path / "cache.json"
        if side.is_file():
            # the output rule: the same evaluation resumes (or, complete, is written again
            # to the same bytes); another is refused unless --overwrite
            old = read_json(side, "cache sidecar")
            other = other_configuration(self.path, "retrieval cache", cache_identity(old),
                                        cache_identity(self.meta), overwrite)
            if not other and not old.get("complete") and old.get("progress"):
                self.progress = old["progress"]
        mode = "r+" if self.progress else "w+"
        if mode == "w+":
            write_json_atomic(side, self.meta)
        try:
            self.arrays = {name: np.lib.format.open_memmap(self.path / f"{name}.npy", mode=mode,
                                                           dtype=dt, shape=(n, *shape))
                           for name, (dt, shape) in _columns(k, exact, ids_dtype,
                                                             weighted).items()}
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot reopen the cache files in {self.path} to resume ({exc}); "
                            "remove the directory")

    def commit(self, progress: dict) -> None:
        """Flush the rows so far, then record ``progress`` (the evaluation's running state).
        The commit point is the sidecar's rename: rows past its progress are rewritten, to
        the same bytes, by a resumed evaluation."""
        for arr in self.arrays.values():
            arr.flush()
        self.meta["progress"] = progress
        write_json_atomic(self.path / "cache.json", self.meta)

    def write(self, start: int, **cols: np.ndarray) -> None:
        for name, arr in cols.items():
            if name in self.arrays:
                self.arrays[name][start:start + len(arr)] = arr

    def close(self, summary: dict) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.meta.pop("progress", None)
        self.meta.update(complete=True, summary=summary)
        write_json_atomic(self.path / "cache.json", self.meta)


class RetrievalCache:
    """A complete cache, opened read-only (memmaps)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_sidecar(self.path, "cache.json", CACHE_FORMAT, "retrieval cache")
        if not self.meta.get("complete"):
            raise UserError(f"{self.path} is incomplete (the eval that wrote it did not finish)")
        if self.meta.get("version", 0) > CACHE_VERSION:
            raise UserError(f"{self.path} was written by a newer knnlm (cache format "
                            f"{self.meta['version']})")
        if not self.meta.get("size"):
            raise UserError(f"{self.path} holds no tokens")
        self.size, self.k, self.metric = self.meta["size"], self.meta["k"], self.meta["metric"]
        cols = _columns(self.k, self.meta["exact_dists"], self.meta["ids_dtype"],
                        bool(self.meta.get("weighted")))
        self.log_counts = None
        for name, (dt, shape) in cols.items():
            setattr(self, name, open_npy(self.path / f"{name}.npy", (self.size, *shape), dt))

    @property
    def has_exact(self) -> bool:
        return bool(self.meta["exact_dists"])

    @property
    def mode(self) -> ScoreMode:
        """The score mode of the evaluation that wrote the cache."""
        if "score_mode" in self.meta:
            return ScoreMode.from_dict(self.meta["score_mode"])
        # a version 1 cache: its evaluation recomputed scores unless it searched exactly or
        # was told not to (--knn-sim-func do_not_recomp_l2)
        exact_search = bool(self.meta.get("exact_search"))
        sim = (self.meta.get("config") or {}).get("knn_sim_func")
        recompute = not exact_search and sim != "do_not_recomp_l2"
        search = self.meta.get("faiss_metric", self.metric)
        return ScoreMode(exact_search, search, recompute, self.metric if recompute else search)

    def mode_of(self, score: str) -> ScoreMode:
        """The score mode of the cache column ``score`` (faiss | exact) for these neighbours."""
        if score == "exact" and not self.has_exact:
            raise UserError(f"{self.path} holds no exact distances (eval-lm --save-exact-dists)")
        return self.mode.with_cache_score(score, self.metric)

    def check_datastore(self, fingerprint: str) -> None:
        if self.meta["datastore_fingerprint"] != fingerprint:
            raise UserError(f"{self.path} was computed with another datastore")
