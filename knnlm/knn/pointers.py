"""RetoMaton pointers (Alon et al., ICML 2022): search the datastore less by following it.

Datastore entries are a sequence: entry i + 1 is the context right after entry i. When the
kNN-LM scores token y_t with neighbours N_t, the entries of N_t whose value is y_t point to
their successors, which are natural neighbours of the next query. So at step t + 1:

    pointers P = {i + 1 : i in N_t, v_i = y_t, i + 1 < N}, closest first, at most max_knns
    |P| >= min_knns  ->  N_{t+1} = P                        (no search)
    otherwise        ->  N_{t+1} = the k best of search(q) ∪ P   (a search)

Every neighbour is scored from the stored keys (the score mode must recompute distances),
so pointers and searched neighbours share one scale. Taking the k best of the union keeps
a search step's size at k; with an exact index it is the plain kNN-LM's neighbour set, and
with an approximate one a pointer may replace a neighbour the search missed.

The walk is sequential by nature (step t + 1 depends on y_t); it runs over the token
stream in order, its state carried across batches (and kept in the retrieval cache's
progress, so a resumed evaluation walks on exactly). ``min_knns`` above k searches at
every step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..util import UserError
from . import math as knn_math


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
    if not cfg.score_mode().recompute:
        raise UserError(f"--min-knns scores pointers from the stored keys, so the score mode "
                        f"must recompute distances ({cfg.score_mode().describe()} does not): "
                        "drop --knn-sim-func do_not_recomp_l2")


class PointerWalk:
    """The RetoMaton walk over a token stream for a :class:`knnlm.knn.search.KnnSearch`."""

    def __init__(self, knn, min_knns: int, max_knns: int | None = None,
                 members: str | None = None):
        """``members``: a `knnlm cluster-dstore` file; each step's pointers are then
        joined by the other members of their clusters (up to ``max_knns`` in all)."""
        self.knn, self.min_knns = knn, min_knns
        self.k = knn.cfg.k
        self.max_knns = max_knns or self.k
        self.n = knn.ds.size
        self.metric = knn.mode.metric
        self.pointers = np.empty(0, dtype=np.int64)
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

    def reset(self) -> None:
        """Forget the pointers (a new, unrelated text starts)."""
        self.pointers = np.empty(0, dtype=np.int64)

    def state(self) -> dict:
        return dict(pointers=self.pointers.tolist(), searches=self.searches, steps=self.steps)

    def restore(self, state: dict) -> None:
        self.pointers = np.asarray(state["pointers"], dtype=np.int64)
        self.searches, self.steps = int(state["searches"]), int(state["steps"])

    def stats(self) -> dict:
        saved = 1 - self.searches / self.steps if self.steps else 0.0
        return dict(method="retomaton", min_knns=self.min_knns, max_knns=self.max_knns,
                    members=None if self.members is None else str(self.members.path),
                    steps=self.steps, searches=self.searches, searches_saved=saved)

    def neighbours(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step's (ids, exact distances) for one (D,) query: the pointers alone, or the
        k best of a search and the pointers; ids sorted closest first."""
        self.steps += 1
        q = self.knn.project(q[None])[0]
        self.searched = len(self.pointers) < self.min_knns
        ptr = self.members.extend(self.pointers, self.max_knns) if self.members is not None \
            else self.pointers[:self.max_knns]
        if not self.searched:
            ids = ptr
        else:
            self.searches += 1
            _, found = self.knn.retriever.search(q[None])
            ids = np.concatenate([found[0][found[0] >= 0], ptr])
            ids = ids[np.sort(np.unique(ids, return_index=True)[1])]   # dedupe, keep order
        dist = self._distances(q, ids)
        order = np.argsort(-knn_math.scores_from_distances(torch.from_numpy(dist), self.metric)
                           .numpy(), kind="stable")[:self.k]
        return ids[order], dist[order]

    def _distances(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact float32 distances of one query to ``ids``' stored keys, in numpy: a
        single query's few thousand products are too small to be worth torch's thread
        pool, whose wake-ups dominate them when the cores are shared."""
        if self.knn.retriever.keys is None:
            raise UserError("--retomaton needs the stored keys (drop --no-load-keys)")
        order = np.argsort(ids, kind="stable")           # ascending reads of the memmap
        nk = np.empty((len(ids), q.shape[-1]), dtype=np.float32)
        nk[order] = self.knn.retriever.keys[ids[order]]
        if self.metric == "l2":
            nk -= q.astype(np.float32)
            return np.einsum("ij,ij->i", nk, nk)
        return nk @ q.astype(np.float32)

    def advance(self, ids: np.ndarray, vals: np.ndarray, target: int) -> None:
        """After scoring ``target``: the successors of the neighbours that predicted it
        (``ids`` may be padded with -1)."""
        hit = ids[(ids >= 0) & (vals == target) & (ids < self.n - 1)]
        self.pointers = hit + 1

    def step(self, q: np.ndarray) -> dict:
        """One (D,) query -> the :meth:`KnnSearch.search` dict of a single row (D, I,
        vals, exact, scores, mask), padded with id -1 to k columns; call :meth:`advance`
        once the token is known."""
        ids, d = self.neighbours(q)
        m = len(ids)
        I = np.full((1, self.k), -1, dtype=np.int64)
        dist = np.full((1, self.k), np.inf if self.metric == "l2" else -np.inf, dtype=np.float32)
        I[0, :m], dist[0, :m] = ids, d
        vals = self.knn.retriever.values(I)
        scores = knn_math.scores_from_distances(torch.from_numpy(dist).double(), self.metric)
        return dict(D=dist, I=I, vals=vals, exact=dist, scores=scores,
                    mask=torch.from_numpy(I >= 0))

    def search_stream(self, q: np.ndarray, targets: np.ndarray) -> dict:
        """Consecutive (M, D) queries and their targets -> the :meth:`KnnSearch.search`
        dict of M rows, each step advanced by its target, and ``searched`` (M,) bool: the
        steps that searched (the others followed pointers)."""
        rows, searched = [], np.zeros(len(q), dtype=bool)
        for t in range(len(q)):
            rows.append(self.step(q[t]))
            searched[t] = self.searched
            self.advance(rows[-1]["I"][0], rows[-1]["vals"][0], int(targets[t]))
        out = {key: np.concatenate([r[key] for r in rows]) for key in ("D", "I", "vals")}
        out["exact"] = out["D"]
        out["scores"] = torch.cat([r["scores"] for r in rows])
        out["mask"] = torch.from_numpy(out["I"] >= 0)
        out["searched"] = searched
        return out
