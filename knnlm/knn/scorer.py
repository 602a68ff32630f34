"""The kNN-LM side of `eval-lm --knnlm`: the neighbours of each scored block's queries,
p_kNN of its targets, and the optional per-token outputs (retrieval cache, kNN scores,
queries), committed batch by batch so a killed evaluation resumes. Search and score modes
are :class:`knnlm.knn.search.KnnSearch`'s; the math is :mod:`knnlm.knn.math`'s.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..io import open_token_memmap
from ..util import config_dict
from . import math as knn_math
from .cache import CacheWriter
from .pointers import PointerWalk
from .search import KnnSearch

QUERY_CHUNK = 256        # queries per search call (bounds the (B, k, D) neighbour keys)
EXACT_QUERY_CHUNK = 4096  # brute force reads every key per call: larger query batches


class KnnScorer:
    """Retrieves neighbours for a batch of queries and scores the targets."""

    def __init__(self, cfg, model_fingerprint: str, databin, device: torch.device, n_tokens: int):
        self.cfg = cfg
        self.knn = KnnSearch(cfg, model_fingerprint, databin, device, cfg.save_exact_dists)
        self.keytype, ds = self.knn.keytype, self.knn.ds
        self.mode = mode = self.knn.mode
        self.cache = None
        if cfg.save_retrieval:
            meta = dict(config=config_dict(cfg), score_mode=mode.to_dict(), metric=mode.metric,
                        faiss_metric=mode.search_metric, datastore_fingerprint=ds.fingerprint,
                        index=self.knn.index_meta and {k: self.knn.index_meta[k] for k in
                                                       ("factory", "metric", "nprobe",
                                                        "datastore_fingerprint")},
                        nprobe=cfg.probe, exact_search=cfg.exact_search, ignore_top=cfg.ignore_top,
                        search_backend=self.knn.backend)
            # the distances the scores come from are always kept (a sweep reproduces them)
            self.cache = CacheWriter(cfg.save_retrieval, n_tokens, cfg.k,
                                     cfg.save_exact_dists or mode.recompute, meta, ds.size)
        self.progress = self.cache.progress if self.cache is not None else None
        resume = bool(self.progress)   # resuming: keep the rows already written
        self.walk = PointerWalk(self.knn, cfg.min_knns, cfg.max_knns) if cfg.retomaton else None
        if self.walk is not None and resume and "walk" in self.progress:
            self.walk.restore(self.progress["walk"])
        self.knn_scores = self.queries = None
        if cfg.save_knn_scores:
            self.knn_scores = open_token_memmap(cfg.save_knn_scores, n_tokens, np.float32, resume)
        if cfg.save_queries:
            self.queries = open_token_memmap(cfg.save_queries, (n_tokens, ds.dim), np.float32,
                                             resume)

    @property
    def work_dir(self) -> Path:
        """Where eval-lm --exact-search keeps its passes (queries, LM scores, the running
        top-k): inside the retrieval cache (so a killed evaluation resumes), else a
        temporary directory; removed once the evaluation is complete."""
        if getattr(self, "_work", None) is None:
            self._work = (Path(self.cfg.save_retrieval) / "exact_search" if self.cfg.save_retrieval
                          else Path(tempfile.mkdtemp(prefix="knnlm-exact-")))
            self._work.mkdir(parents=True, exist_ok=True)
        return self._work

    def commit(self, progress: dict) -> None:
        """After a batch: flush every per-token output, then record the running state in the
        cache sidecar (what a killed evaluation resumes from)."""
        if self.cache is None:
            return
        for arr in (self.knn_scores, self.queries):
            if arr is not None:
                arr.flush()
        if self.walk is not None:
            progress = dict(progress, walk=self.walk.state())
        self.cache.commit(progress)

    def efficiency(self) -> dict | None:
        """What the search-saving method did (None: every token searched)."""
        return self.walk.stats() if self.walk is not None else None

    def score(self, start: int, q: torch.Tensor, targets: np.ndarray, lm_lp: np.ndarray,
              words: np.ndarray, found: tuple | None = None) -> np.ndarray:
        """log p_kNN of each target, (M,) float64; writes the per-token outputs.
        ``found``: these queries' (D, I), already searched (eval-lm --exact-search)."""
        q = q.float().cpu().numpy()
        out = np.empty(len(q), dtype=np.float64)
        step = QUERY_CHUNK if (self.mode.recompute or self.cfg.save_exact_dists) or \
            not self.cfg.exact_search else EXACT_QUERY_CHUNK
        for s in range(0, len(q), step):
            e = min(len(q), s + step)
            part = None if found is None else (found[0][s:e], found[1][s:e])
            out[s:e] = self._score_chunk(start + s, q[s:e], targets[s:e], lm_lp[s:e], words[s:e],
                                         part)
        if self.queries is not None:
            self.queries[start:start + len(q)] = q
        if self.knn_scores is not None:
            self.knn_scores[start:start + len(q)] = out
        return out

    def _score_chunk(self, start, q, targets, lm_lp, words, found=None) -> np.ndarray:
        r = self.walk.search_stream(q, targets) if self.walk is not None else \
            self.knn.search(q, found)
        lp = knn_math.knn_target_log_probs(r["scores"], torch.from_numpy(r["vals"]),
                                           torch.from_numpy(targets), self.cfg.knn_temp,
                                           r["mask"])
        if self.cache is not None:
            self.cache.write(start, targets=targets, words=words, lm_logprobs=lm_lp, ids=r["I"],
                             vals=r["vals"], faiss_dists=r["D"], exact_dists=r["exact"])
        return lp.numpy()

    def close(self, summary: dict) -> None:
        for arr in (self.knn_scores, self.queries):
            if arr is not None:
                arr.flush()
        if self.cache is not None:
            self.cache.close(summary)
        if getattr(self, "_work", None) is not None:
            shutil.rmtree(self._work, ignore_errors=True)
