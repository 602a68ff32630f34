"""RetoMaton pointers (Alon et al., ICML 2022): search the datastore less by following it.

Datastore entries are a sequence: entry i + 1 is the context right after entry i. When the
kNN-LM scores token y_t with neighbours N_t, the entries of N_t whose value is y_t point to
their successors, which are natural neighbours of the next query. So at step t + 1:

    pointers P = {i + 1 : i in N_t, v_i = y_t, i + 1 < N}, closest first, at most max_knns
    |P| >= min_knns  ->  N_{t+1} = P                        (no search)
    otherwise        ->  N_{t+1} = the k best of search(q) ∪ P   (a search)

Pointers and searched neighbours share one scale, the score mode's: exact distances
recomputed from the stored keys, or, in the modes that score with FAISS's distances, the
index's own (the searched neighbours' as returned, the pointers' from the index's codes,
:class:`knnlm.knn.codes.CodeDistances`: no key is read). Taking the k best of the union
keeps a search step's size at k; with an exact index it is the plain kNN-LM's neighbour
set, and with an approximate one a pointer may replace a neighbour the search missed.

A walk is sequential by nature (step t + 1 depends on y_t). As in the reference
implementation, each scored block of eval-lm is its own walk, starting without pointers;
the blocks of a batch are walked together, one step of all of them at a time
(:meth:`PointerWalk.search_streams`): the searches of a step go to the index in one call,
and the candidates, their distances and the next pointers are (blocks, candidates)
arrays — no Python loop per token. Generation and `neighbors` walk one stream
(:meth:`PointerWalk.step`, :meth:`PointerWalk.advance`). ``min_knns`` above k searches at
every step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..util import UserError
from . import math as knn_math
from .search import exact_distances


def check_pointer_flags(cfg) -> None:
    """Validate --retomaton's flags against the other kNN flags."""
    if cfg.members and not cfg.retomaton:
        raise UserError("--members goes with --retomaton")
    if cfg.members and not Path(cfg.members).is_file():
        raise UserError(f"--members file not found: {cfg.members}")
    if cfg.min_knns < 0 or (cfg.max_knns is not None and cfg.max_knns <= 0):
        raise UserError("--min-knns must be >= 0 and --max-knns > 0")
    if cfg.exact_search:
        raise UserError("--retomaton with --exact-search: the exact search runs once over all "
                        "queries, so pointers save nothing; use an index")
    if cfg.ignore_top:
        raise UserError("--min-knns and --ignore-top are exclusive (a pointer may be the "
                        "query's own entry)")
    if not cfg.score_mode().recompute and cfg.knn_backend == "torch":
        raise UserError("--retomaton with FAISS scores scores its pointers from the index's "
                        "codes: use --knn-backend faiss (or recompute scores from the keys)")


def compact(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(W, c) ids -> (W, c') the kept ones of each row moved to its front in their order,
    -1 after them; c' the most any row keeps."""
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
    return out[:, :int(keep.sum(1).max(initial=0))]


class PointerWalk:
    """The RetoMaton walk for a :class:`knnlm.knn.search.KnnSearch`."""

    def __init__(self, knn, min_knns: int, max_knns: int | None = None,
                 members: str | None = None):
        """``members``: a `knnlm cluster-dstore` file; each step's pointers are then
        joined by the other members of their clusters (up to ``max_knns`` in all)."""
        self.knn, self.min_knns = knn, min_knns
        self.k = knn.cfg.k
        self.max_knns = max_knns or self.k
        self.n = knn.ds.size
        self.metric = knn.mode.metric
        self.missing = np.float32(np.inf if self.metric == "l2" else -np.inf)
        self.pointers = np.empty((1, 0), dtype=np.int64)   # the one stream of step()
        self.searches = 0
        self.steps = 0
        if knn.ds.meta.get("pruned") or knn.ds.meta.get("subset"):
            raise UserError(f"--retomaton follows entry i to entry i + 1 of the training text; "
                            f"{knn.ds.path} is pruned or a subset, so its entries are not a "
                            "sequence")
        self.members = None
        if members:
            from .clusters import Members
            self.members = Members(members, knn.ds)
        # pointers are scored as the searched neighbours are: from the keys, or (FAISS
        # scores, or a refine index's exact ones) from the index's codes
        self.from_index = not knn.mode.recompute or knn.exact_from_index
        self.codes = None
        if self.from_index:
            from .codes import CodeDistances
            from .torch_index import ShardedTorchIndex, TorchIndex
            if isinstance(knn.retriever.index, (TorchIndex, ShardedTorchIndex)):
                raise UserError("--retomaton with FAISS scores scores its pointers from the "
                                "index's codes: use --knn-backend faiss")
            self.codes = CodeDistances(knn.retriever.index, self.metric)
        elif knn.retriever.keys is None:
            raise UserError("--retomaton needs the stored keys (drop --no-load-keys)")

    def reset(self) -> None:
        """Forget the pointers of :meth:`step`'s stream (a new, unrelated text starts)."""
        self.pointers = np.empty((1, 0), dtype=np.int64)

    def state(self) -> dict:
        """The counters (a resumed evaluation continues them; walks end with their blocks)."""
        return dict(searches=self.searches, steps=self.steps)

    def restore(self, state: dict) -> None:
        self.searches, self.steps = int(state["searches"]), int(state["steps"])

    def stats(self) -> dict:
        saved = 1 - self.searches / self.steps if self.steps else 0.0
        return dict(method="retomaton", min_knns=self.min_knns, max_knns=self.max_knns,
                    members=None if self.members is None else str(self.members.path),
                    steps=self.steps, searches=self.searches, searches_saved=saved)

    # ------------------------------------------------------------------ one step of W walks
    def _candidates(self, pointers: np.ndarray) -> np.ndarray:
        """(W, P) pointers (closest first, -1 padded) -> (W, ≤ max_knns) the candidates
        they offer: themselves, joined by their clusters' members (``--members``)."""
        if self.members is None:
            return pointers[:, :self.max_knns]
        rows = [self.members.extend(p[p >= 0], self.max_knns) for p in pointers]
        out = np.full((len(rows), max(map(len, rows), default=0)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    def _distances(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(W, D) queries, (W, c) ids (-1: none) -> (W, c) float32 distances, from the
        index's codes (FAISS-score modes) or exact from the stored keys."""
        if self.codes is not None:
            return self.codes(q, ids)
        return exact_distances(q, self.knn.retriever.keys, ids, self.metric)

    def _steps(self, q: np.ndarray, pointers: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
        """One step of W walks: (W, D) projected queries and their (W, P) pointers ->
        (ids (W, c), distances (W, c), searched (W,)), ids closest first, -1 padded, c <= k
        (the most candidates a walk has)."""
        W = len(q)
        searched = (pointers >= 0).sum(1) < self.min_knns
        self.steps += W
        self.searches += int(searched.sum())
        ptr = self._candidates(pointers)
        found = np.full((W, 0), -1, dtype=np.int64)
        found_d = np.empty((W, 0), dtype=np.float32)
        if searched.any():
            D, I = self.knn.retriever.search(q[searched])
            found = np.full((W, I.shape[1]), -1, dtype=np.int64)
            found_d = np.full(found.shape, self.missing, dtype=np.float32)
            found[searched], found_d[searched] = I, D
        cand = np.concatenate([found, ptr], axis=1)
        if searched.any() and ptr.shape[1]:
            # a pointer the search found too is dropped (the searched copy comes first);
            # pointers alone are distinct already
            sub = cand[searched]
            order = np.argsort(sub, axis=1, kind="stable")
            s = np.take_along_axis(sub, order, axis=1)
            dup = np.zeros(sub.shape, dtype=bool)
            np.put_along_axis(dup, order[:, 1:], (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0),
                              axis=1)
            sub[dup] = -1
            cand[searched] = sub
        if self.from_index:      # the search's own distances, the pointers' from the codes
            dist = np.concatenate([found_d, self._distances(q, cand[:, found.shape[1]:])], 1)
            dist[cand < 0] = self.missing
        else:
            dist = self._distances(q, cand)
        scores = knn_math.scores_from_distances(torch.from_numpy(dist), self.metric).numpy()
        top = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        return np.take_along_axis(cand, top, axis=1), np.take_along_axis(dist, top, axis=1), \
            searched

    def _advance(self, ids: np.ndarray, vals: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """After scoring ``targets`` (W,): the successors of each walk's neighbours that
        predicted its target, closest first -> (W, P) pointers, -1 padded."""
        hit = (ids >= 0) & (vals == targets[:, None]) & (ids < self.n - 1)
        return compact(ids + 1, hit)

    def _rows(self, q: np.ndarray, ids: np.ndarray, dist: np.ndarray,
              vals: np.ndarray | None = None) -> dict:
        """The :meth:`KnnSearch.search` dict of walked rows: D, I, vals, exact (the
        distances from the keys when scored so or asked for, else None), scores, mask."""
        exact = None
        if not self.from_index or self.knn.exact_from_index:
            exact = dist
        elif self.knn.need_exact:
            exact = exact_distances(q, self.knn.retriever.keys, ids, self.metric)
        return dict(D=dist, I=ids, vals=self.knn.retriever.values(ids) if vals is None else vals,
                    exact=exact,
                    scores=knn_math.scores_from_distances(torch.from_numpy(dist), self.metric),
                    mask=torch.from_numpy(ids >= 0))

    # ------------------------------------------------------------------ the callers' API
    def step(self, q: np.ndarray) -> dict:
        """One (D,) query of the single stream (generation, neighbors) -> the
        :meth:`KnnSearch.search` dict of one row; call :meth:`advance` once the token is
        known."""
        q = self.knn.project(q[None])
        ids, dist, searched = self._steps(q, self.pointers)
        self.searched = bool(searched[0])
        return self._rows(q, ids, dist)

    def advance(self, ids: np.ndarray, vals: np.ndarray, target: int) -> None:
        """After scoring ``target`` with the (k,) ``ids`` and ``vals`` of :meth:`step`."""
        self.pointers = self._advance(ids[None], vals[None], np.array([target]))

    def search_streams(self, q: np.ndarray, targets: np.ndarray, starts: np.ndarray) -> dict:
        """(M, D) queries and their (M,) targets, cut into walks at the sorted row
        offsets ``starts`` (the first 0; eval-lm: each scored block), every walk from no
        pointers -> the :meth:`KnnSearch.search` dict of the M rows, and ``searched`` (M,)
        bool: the steps that searched (the others followed pointers). The walks advance
        together, step by step."""
        q = self.knn.project(np.ascontiguousarray(q, dtype=np.float32))
        M = len(q)
        bounds = np.append(np.asarray(starts, dtype=np.int64), M)
        begin, length = bounds[:-1], np.diff(bounds)
        ids = np.full((M, self.k), -1, dtype=np.int64)
        vals = np.full((M, self.k), -1, dtype=self.knn.retriever.vals.dtype)
        dist = np.full((M, self.k), self.missing, dtype=np.float32)
        searched = np.zeros(M, dtype=bool)
        pointers = np.full((len(begin), 0), -1, dtype=np.int64)
        for t in range(int(length.max(initial=0))):
            live = length > t                   # walks not yet at their end
            rows = begin[live] + t
            i, d, s = self._steps(q[rows], pointers[live])
            v = self.knn.retriever.values(i)
            c = i.shape[1]
            ids[rows, :c], dist[rows, :c], vals[rows, :c], searched[rows] = i, d, v, s
            nxt = self._advance(i, v, targets[rows])
            pointers = np.full((len(begin), nxt.shape[1]), -1, dtype=np.int64)
            pointers[live] = nxt
        out = self._rows(q, ids, dist, vals)
        out["searched"] = searched
        return out

    def search_stream(self, q: np.ndarray, targets: np.ndarray) -> dict:
        """One walk over consecutive (M, D) queries (:meth:`search_streams` of one)."""
        return self.search_streams(q, targets, np.zeros(1, dtype=np.int64))
