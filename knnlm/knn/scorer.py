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
from ..util import UserError, config_dict, warn
from . import math as knn_math
from .cache import CacheWriter
from .gate import Gate, adaptive_stats
from .pointers import PointerWalk
from .search import KnnSearch
from .tuned import index_fingerprint

QUERY_CHUNK = 4096   # queries per search call: one call per batch, as a GPU search wants it
                     # (recomputed distances gather 16 queries' neighbour keys at a time)


class KnnScorer:
    """Retrieves neighbours for a batch of queries and scores the targets."""

    def __init__(self, cfg, model_fingerprint: str, databin, device: torch.device, n_tokens: int,
                 tokens: np.ndarray | None = None, search: KnnSearch | None = None):
        """``tokens``: the split being scored (the gate's n-gram features read it);
        ``search``: an open search of these settings to use (one per process)."""
        self.cfg = cfg
        self.knn = search if search is not None else \
            KnnSearch(cfg, model_fingerprint, databin, device, cfg.save_exact_dists)
        # p_kNN of the targets where the search ran: on the GPU with --knnlm-gpu
        self.math_device = device if cfg.knnlm_gpu and device.type == "cuda" else torch.device("cpu")
        self.keytype, ds = self.knn.keytype, self.knn.ds
        size = getattr(cfg, "dstore_size", None)
        if size is not None and size != ds.size:
            raise UserError(f"--dstore-size {size:,} but {ds.path} holds {ds.size:,} entries")
        self.mode = mode = self.knn.mode
        self.cache = None
        if cfg.save_retrieval:
            meta = dict(config=config_dict(cfg), score_mode=mode.to_dict(), metric=mode.metric,
                        faiss_metric=mode.search_metric, datastore_fingerprint=ds.fingerprint,
                        index=self.knn.index_meta and {k: self.knn.index_meta[k] for k in
                                                       ("factory", "metric", "nprobe",
                                                        "datastore_fingerprint")},
                        index_fingerprint=index_fingerprint(self.knn.index_meta),
                        nprobe=cfg.probe, exact_search=cfg.exact_search, ignore_top=cfg.ignore_top,
                        search_backend=self.knn.backend)
            # the distances the scores come from are always kept (a sweep reproduces them)
            self.cache = CacheWriter(cfg.save_retrieval, n_tokens, cfg.k,
                                     cfg.save_exact_dists or mode.recompute, meta, ds.size,
                                     weighted=ds.counts is not None, overwrite=cfg.overwrite)
        self.progress = self.cache.progress if self.cache is not None else None
        resume = bool(self.progress)   # resuming: keep the rows already written
        self.walk = PointerWalk(self.knn, cfg.min_knns, cfg.max_knns, cfg.members) \
            if cfg.retomaton else None
        self.gate, self.batch_lambdas = None, None
        if cfg.gate:
            self.gate = Gate(cfg.gate)
            self.gate.check(ds, model_fingerprint, cfg.knn_keytype)
            self.gate_thr = self.gate.threshold(cfg.retrieval_fraction, cfg.gate_threshold)
            self.tokens, self.eos = tokens, databin.eos
            self.gate_counts = dict(steps=0, searches=0)
        if self.walk is not None and resume and "walk" in self.progress:
            self.walk.restore(self.progress["walk"])
        # --ignore-top: how often the dropped nearest neighbour was the token's own entry
        self.own_entry, self.self_hits = None, dict(tokens=0, own=0)
        if cfg.ignore_top:
            pos = np.asarray(ds.pos, dtype=np.int64)
            self.own_entry = np.full(int(pos.max()) + 1, -1, dtype=np.int64)
            self.own_entry[pos] = np.arange(len(pos))
            if resume and "self_hits" in self.progress:
                self.self_hits = dict(self.progress["self_hits"])
        self.knn_scores = self.queries = None
        if cfg.save_knn_scores:
            self.knn_scores = open_token_memmap(cfg.save_knn_scores, n_tokens, np.float32, resume)
        if cfg.save_queries:
            self.queries = open_token_memmap(cfg.save_queries, (n_tokens, ds.query_dim), np.float32,
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
        if self.own_entry is not None:
            progress = dict(progress, self_hits=self.self_hits)
        self.cache.commit(progress)

    def _count_self_hits(self, start: int, dropped: np.ndarray) -> None:
        """Count the tokens whose dropped neighbour is their own entry, or a duplicate of it
        (an entry with the same key: repeated text, a tie)."""
        p = np.arange(start, start + len(dropped))
        own = np.where(p < len(self.own_entry),
                       self.own_entry[np.minimum(p, len(self.own_entry) - 1)], -1)
        hit = dropped == own
        other = np.flatnonzero(~hit & (own >= 0) & (dropped >= 0))
        if len(other):
            keys = self.knn.ds.keys(self.keytype)
            hit[other] = (np.asarray(keys[dropped[other]]) == np.asarray(keys[own[other]])).all(1)
        self.self_hits["tokens"] += len(dropped)
        self.self_hits["own"] += int(hit.sum())

    def ignore_top_report(self) -> dict | None:
        """--ignore-top: the share of tokens whose dropped nearest neighbour was their own
        entry, warned about when low (another window or split than the datastore's)."""
        if self.own_entry is None:
            return None
        n, own = self.self_hits["tokens"], self.self_hits["own"]
        share = own / max(n, 1)
        blocking = self.knn.ds.meta.get("blocking", {})
        print(f"--ignore-top: the dropped neighbour was the token's own entry (or a duplicate "
              f"of it) for {own:,} of {n:,} tokens ({share:.1%})")
        if n and share < 0.95:
            warn(f"--ignore-top dropped the token's own entry for only {share:.1%} of the "
                 f"tokens: evaluate the datastore's split ({self.knn.ds.meta.get('split')}) "
                 f"with its window (--tokens-per-sample {blocking.get('tokens_per_sample')} "
                 f"--context-window {blocking.get('context_window')} --sample-break-mode "
                 f"{blocking.get('sample_break_mode', 'none')}), and exact or refined distances")
        return dict(tokens=n, dropped_own_entry=own, share=share)

    def efficiency(self) -> dict | None:
        """What the search-saving method did (None: every token searched)."""
        if self.walk is not None:
            return self.walk.stats()
        if self.gate is None:
            return None
        c = self.gate_counts
        return adaptive_stats(self.gate, self.cfg, self.gate_thr, c["steps"], c["searches"])

    def score(self, start: int, q: torch.Tensor, targets: np.ndarray, lm_lp: np.ndarray,
              words: np.ndarray, found: tuple | None = None,
              stats: torch.Tensor | None = None, starts: np.ndarray | None = None
              ) -> np.ndarray:
        """log p_kNN of each target, (M,) float64; writes the per-token outputs.
        ``found``: these queries' (D, I), already searched (eval-lm --exact-search).
        With a gate (``stats``: the LM's entropy and max log-prob), only the tokens it
        picks are searched; the others get p_kNN := p_LM, and ``batch_lambdas`` holds each
        token's λ (0 where skipped). ``starts``: where each scored window begins in the
        split (RetoMaton walks each window; default: the batch is one walk)."""
        q = q.float().cpu().numpy()
        if self.walk is not None:       # the batch's windows walked together, unchunked
            out = self._score_chunk(start, q, targets, lm_lp, words,
                                    starts=np.zeros(1, np.int64) if starts is None
                                    else np.asarray(starts) - start)
            self._write_outputs(start, q, out)
            return out
        out = lm_lp.astype(np.float64)
        rows = np.arange(len(q))
        if self.gate is not None:
            lam_hat = self.gate.lambdas(stats.float().cpu().numpy(), self.tokens, self.eos, start,
                                        start + len(q), q)
            keep = lam_hat >= self.gate_thr
            rows = np.flatnonzero(keep)
            self.gate_counts["steps"] += len(q)
            self.gate_counts["searches"] += len(rows)
            lam = lam_hat if self.cfg.gate_lambda else np.full(len(q), self.cfg.lmbda)
            self.batch_lambdas = np.where(keep, lam, 0.0)
        for s in range(0, len(rows), QUERY_CHUNK):
            r = rows[s:s + QUERY_CHUNK]
            part = None if found is None else (found[0][r], found[1][r])
            out[r] = self._score_chunk(start + int(r[0]), q[r], targets[r], lm_lp[r], words[r],
                                       part)
        self._write_outputs(start, q, out)
        return out

    def _write_outputs(self, start: int, q: np.ndarray, knn_lp: np.ndarray) -> None:
        if self.queries is not None:
            self.queries[start:start + len(q)] = q
        if self.knn_scores is not None:
            self.knn_scores[start:start + len(q)] = knn_lp

    def _score_chunk(self, start, q, targets, lm_lp, words, found=None,
                     starts=None) -> np.ndarray:
        if found is None and self.walk is None and self.cache is None and self.knn.on_device \
                and self.own_entry is None:
            r = self.knn.scores_on_device(q)    # the torch backend: no trip through the host
            return knn_math.knn_target_log_probs_fast(
                r["scores"], r["vals"], torch.from_numpy(targets).to(r["vals"].device),
                self.cfg.knn_temp, r["mask"], r["log_counts"]).cpu().numpy()
        r = self.walk.search_streams(q, targets, starts) if self.walk is not None else \
            self.knn.search(q, found)
        if self.own_entry is not None:
            self._count_self_hits(start, r["dropped"])
        dev, counts = self.math_device, r.get("log_counts")
        mask = None if bool(r["mask"].all()) else r["mask"]   # none missing: no masking
        lp = knn_math.knn_target_log_probs_fast(
            r["scores"].to(dev), torch.from_numpy(r["vals"]).to(dev),
            torch.from_numpy(targets).to(dev), self.cfg.knn_temp,
            None if mask is None else mask.to(dev),
            None if counts is None else counts.to(dev)).cpu()
        if self.cache is not None:
            self.cache.write(start, targets=targets, words=words, lm_logprobs=lm_lp, ids=r["I"],
                             vals=r["vals"], faiss_dists=r["D"], exact_dists=r["exact"],
                             log_counts=None if counts is None else counts.numpy())
        return lp.numpy()

    def close(self, summary: dict) -> None:
        for arr in (self.knn_scores, self.queries):
            if arr is not None:
                arr.flush()
        if self.cache is not None:
            self.cache.close(summary)
        if getattr(self, "_work", None) is not None:
            shutil.rmtree(self._work, ignore_errors=True)
