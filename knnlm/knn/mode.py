"""The score mode: how neighbours are found and what scores them, as one recorded object.

Every kNN number depends on three choices (paper notes §3.4): the neighbours come from the
FAISS index (approximate for IVF/PQ, the paper's "FAISS mask") or from exact search over
every key ("real mask"); their scores are the distances the search returned ("FAISS
score", quantised for PQ) or distances recomputed from the stored keys ("real score"); and
the metric of those scores (squared L2 or inner product). eval-lm, the retrieval cache,
sweep, analyze, generate and neighbors all take the mode from here, record it with their
results, and print it.

The original code's flags choose it (``--faiss-metric-type`` x ``--knn-sim-func`` x
``--exact-search``); :meth:`ScoreMode.from_flags` is the one table:

- no ``--exact-search``: neighbours from the FAISS index, in its metric; scores
  - default: exact L2 recomputed from the keys for an L2 index, FAISS's inner products
    for an IP index;
  - ``--knn-sim-func l2`` / ``dot``: exact L2 / inner products recomputed from the keys;
  - ``--knn-sim-func do_not_recomp_l2``: the distances FAISS returned;
- ``--exact-search``: neighbours by brute force, scored by their exact distances, in the
  metric ``--knn-sim-func`` names (``l2``, ``dot`` -> IP), else ``--faiss-metric-type``.

As in the original, the default re-scores L2-searched neighbours with exact L2 and keeps
the FAISS scores of IP-searched ones. One deliberate difference: the original's
``do_not_recomp_l2`` negates FAISS's output whatever the metric, which turns inner
products into negated similarities; here FAISS distances always become scores with the
sign of their metric (:func:`knnlm.knn.math.scores_from_distances`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..util import UserError
from .math import METRICS

SIM_FUNCS = ("l2", "do_not_recomp_l2", "dot")
CACHE_SCORES = ("faiss", "exact")   # the cache's distance columns: as searched / from the keys


@dataclass(frozen=True)
class ScoreMode:
    exact_search: bool    # neighbours by brute force over every key, not the FAISS index
    search_metric: str    # the metric neighbours are searched by (l2 | ip)
    recompute: bool       # scores recomputed from the stored keys, not the search's distances
    metric: str           # the metric of the scores (l2 | ip)

    def __post_init__(self):
        if self.search_metric not in METRICS or self.metric not in METRICS:
            raise ValueError(f"metrics must be in {METRICS}: {self}")
        if not self.recompute and self.metric != self.search_metric:
            raise ValueError(f"scores taken from the search are in its metric: {self}")

    @classmethod
    def from_flags(cls, knn_sim_func: str | None, faiss_metric_type: str,
                   exact_search: bool) -> "ScoreMode":
        """The mode the original code's flags select (the table in the module docstring)."""
        if knn_sim_func is not None and knn_sim_func not in SIM_FUNCS:
            raise UserError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, "
                            f"got {knn_sim_func!r}")
        if faiss_metric_type not in METRICS:
            raise UserError(f"--faiss-metric-type must be l2 or ip, got {faiss_metric_type!r}")
        if exact_search:
            metric = {"dot": "ip", "l2": "l2"}.get(knn_sim_func or "", faiss_metric_type)
            return cls(True, metric, False, metric)
        if knn_sim_func == "do_not_recomp_l2" or (knn_sim_func is None and faiss_metric_type == "ip"):
            return cls(False, faiss_metric_type, False, faiss_metric_type)
        return cls(False, faiss_metric_type, True, "ip" if knn_sim_func == "dot" else "l2")

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreMode":
        try:
            return cls(bool(d["exact_search"]), d["search_metric"], bool(d["recompute"]),
                       d["metric"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"not a score mode: {d!r} ({exc})")

    def to_dict(self) -> dict:
        return dict(asdict(self), name=self.name, description=self.describe())

    @property
    def name(self) -> str:
        """A short id: ``faiss-l2+keys-l2`` (FAISS L2 search, L2 recomputed), ``faiss-ip``,
        ``exact-l2`` (brute force)."""
        base = f"{'exact' if self.exact_search else 'faiss'}-{self.search_metric}"
        return base + (f"+keys-{self.metric}" if self.recompute else "")

    def describe(self) -> str:
        m = {"l2": "L2", "ip": "inner product"}
        search = (f"exact search ({m[self.search_metric]})" if self.exact_search
                  else f"FAISS index search ({m[self.search_metric]})")
        score = (f"exact {m[self.metric]} recomputed from the keys" if self.recompute
                 else "the distances the search returned")
        return f"{search}, scored by {score}"

    @property
    def cache_score(self) -> str:
        """The cache's distance column holding the scores of this mode (sweep's --score)."""
        return "exact" if self.recompute else "faiss"

    @property
    def sim_func(self) -> str:
        """The ``--knn-sim-func`` that selects this mode (with its search metric and
        ``--exact-search``): :meth:`from_flags` inverted."""
        if self.exact_search or self.recompute:
            return "dot" if self.metric == "ip" else "l2"
        return "do_not_recomp_l2"

    @property
    def needs_keys(self) -> bool:
        return self.recompute or self.exact_search

    def with_cache_score(self, score: str, exact_metric: str) -> "ScoreMode":
        """The mode that scores this evaluation's neighbours with the cache column ``score``
        (``exact_metric``: the metric of the cache's recomputed distances)."""
        if score not in CACHE_SCORES:
            raise UserError(f"--score must be faiss or exact, got {score!r}")
        if score == "faiss":
            return ScoreMode(self.exact_search, self.search_metric, False, self.search_metric)
        if self.exact_search and exact_metric == self.search_metric:
            return self     # brute force already returned exact distances
        return ScoreMode(self.exact_search, self.search_metric, True, exact_metric)
