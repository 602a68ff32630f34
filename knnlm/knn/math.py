"""kNN-LM math: pure functions, log space, no I/O.

Notation (paper notes §1): for a query q with k retrieved neighbours i = 1..k, each with a
*score* s_i (higher = closer) and a value v_i (the token that followed the neighbour),

    log p_kNN(w | q) = logsumexp_{i: v_i = w} (s_i / T) - logsumexp_i (s_i / T)
    log p(w | q)     = logaddexp(log(1 - λ) + log p_LM(w | q), log λ + log p_kNN(w | q))

Scores: with the L2 metric s_i = -||q - k_i||² (FAISS returns the squared distance, so
s = -D); with the inner-product metric s_i = <q, k_i> (FAISS returns it, so s = D).
A token with no matching neighbour has log p_kNN = -inf; the interpolation still gives a
finite log p for λ < 1. λ = 0 returns log p_LM and λ = 1 returns log p_kNN exactly.

A pruned datastore (``knnlm prune-dstore``) gives each entry a weight c_i (how many entries
it stands for): the neighbour's term becomes c_i · exp(s_i / T), i.e. ``log_counts``
log c_i is added to s_i / T, and c merged entries count as c identical ones.

Shapes: B queries, k neighbours, V vocabulary, D dimensions.
"""
from __future__ import annotations

import math

import torch

METRICS = ("l2", "ip")
NEG_INF = float("-inf")
FAST_ROWS = 512     # rows per block of the float32 path: (512, 1024) floats stay in cache


def scores_from_distances(D: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, k) FAISS output -> scores, higher = closer (the sign convention in one place)."""
    if metric == "l2":
        return -D
    if metric == "ip":
        return D
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def log_weights(scores: torch.Tensor, temp: float,
                log_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k) log softmax of scores / T (+ the entries' log counts) over the neighbours."""
    if temp <= 0:
        raise ValueError(f"temperature must be > 0, got {temp}")
    s = scores / temp
    return torch.log_softmax(s if log_counts is None else s + log_counts, dim=-1)


def knn_target_log_probs(scores: torch.Tensor, vals: torch.Tensor, targets: torch.Tensor,
                         temp: float = 1.0, mask: torch.Tensor | None = None,
                         log_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) log p_kNN(target): log of the softmax mass of neighbours whose value is the target.

    ``mask`` (B, k) bool drops neighbours (e.g. all but the first k' <= k, or self-hits);
    a row with no kept neighbour matching the target gets -inf. ``log_counts`` (B, k):
    the neighbours' log counts (a pruned datastore).
    """
    s = scores / temp
    if log_counts is not None:
        s = s + log_counts
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    log_z = torch.logsumexp(s, dim=-1)
    hit = s.masked_fill(vals != targets[:, None], NEG_INF)
    out = torch.logsumexp(hit, dim=-1) - log_z
    # rows whose every neighbour is masked: no distribution at all
    return torch.where(torch.isfinite(log_z), out, torch.full_like(out, NEG_INF))


def knn_target_log_probs_temps(scores: torch.Tensor, vals: torch.Tensor, targets: torch.Tensor,
                               temps: list[float], mask: torch.Tensor | None = None,
                               log_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(len(temps), B) log p_kNN(target) at several temperatures, for sweeps.

    Equal to :func:`knn_target_log_probs` at each T (to float32 rounding: ~1e-6 in log p,
    tests/test_knn_math.py), and several times cheaper: the row maximum and the target
    mask are computed once, and each T costs one exp pass in float32 (the maximum of s/T is
    max(s)/T). This is the hot path of eval-lm and of the sweeps. Rows whose matching
    neighbours all underflow in float32 (more than ~87 nats below the nearest) are
    recomputed in log space in float64, so no finite value turns into -inf.
    ``mask`` None: every neighbour is kept. Rows go through in blocks of ``FAST_ROWS``, so
    the (rows, k) float32 temporaries stay in the CPU's cache.
    """
    if len(scores) > FAST_ROWS:
        return torch.cat([knn_target_log_probs_temps(
            scores[s:s + FAST_ROWS], vals[s:s + FAST_ROWS], targets[s:s + FAST_ROWS], temps,
            None if mask is None else mask[s:s + FAST_ROWS],
            None if log_counts is None else log_counts[s:s + FAST_ROWS])
            for s in range(0, len(scores), FAST_ROWS)], dim=1)
    s = scores.float()
    hit = vals == targets[:, None].to(vals.dtype)
    if mask is not None:
        hit &= mask
        s = s.masked_fill(~mask, NEG_INF)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d0 = s - m                                                  # <= 0; -inf where dropped
    w = None if log_counts is None else torch.exp(log_counts.float())   # counts: >= 1
    zero = torch.zeros((), dtype=d0.dtype, device=d0.device)
    out = torch.empty(len(temps), len(scores), dtype=torch.float64, device=scores.device)
    for i, T in enumerate(temps):
        if T <= 0:
            raise ValueError(f"temperature must be > 0, got {T}")
        e = torch.exp(d0 if T == 1 else d0 * (1.0 / T))
        if w is not None:
            e = e * w
        z, h = e.sum(-1), torch.where(hit, e, zero).sum(-1)
        row = torch.log(h.double()) - torch.log(z.double())
        # z = 0 only where no neighbour is kept (the nearest kept one contributes exp(0))
        row.masked_fill_(z == 0, NEG_INF)
        redo = (h == 0) & (z > 0)
        if redo.any():
            redo[redo.clone()] = hit[redo].any(-1)   # a matching neighbour that underflowed
            if redo.any():
                row[redo] = knn_target_log_probs(
                    scores[redo].double(), vals[redo], targets[redo], T,
                    None if mask is None else mask[redo],
                    None if log_counts is None else log_counts[redo].double()).double()
        out[i] = row
    return out


def knn_target_log_probs_fast(scores: torch.Tensor, vals: torch.Tensor, targets: torch.Tensor,
                              temp: float = 1.0, mask: torch.Tensor | None = None,
                              log_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float64 :func:`knn_target_log_probs` by the float32 path of
    :func:`knn_target_log_probs_temps` (what eval-lm scores with)."""
    return knn_target_log_probs_temps(scores, vals, targets, [temp], mask, log_counts)[0]


def knn_full_log_probs(scores: torch.Tensor, vals: torch.Tensor, vocab_size: int,
                       temp: float = 1.0, mask: torch.Tensor | None = None,
                       log_counts: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) log p_kNN over the whole vocabulary (for generation).

    The neighbour weights are scattered into V in a numerically safe way: subtract each
    row's maximum before exponentiating, sum per token, take the log, add it back. A row
    whose every neighbour is masked has no distribution: all -inf (p_kNN = 0), never NaN.
    """
    s = (scores / temp).double()
    if log_counts is not None:
        s = s + log_counts.double()
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    m = s.max(dim=-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m)                                   # (B, k) in [0, 1]
    mass = torch.zeros(s.shape[0], vocab_size, dtype=w.dtype, device=w.device)
    mass.scatter_add_(1, vals.long(), w)
    log_z = torch.log(w.sum(-1, keepdim=True))
    out = torch.log(mass) - log_z
    empty = ~torch.isfinite(log_z)[:, 0]            # no neighbour kept: 0 / 0
    out[empty] = NEG_INF
    return out.to(scores.dtype)


def knn_sparse_log_probs(scores: torch.Tensor, vals: torch.Tensor, vocab_size: int,
                         temp: float = 1.0, mask: torch.Tensor | None = None,
                         log_counts: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's p_kNN where it is not zero: (tokens (u,), float64 log p_kNN (u,)) for
    the values of its (k,) kept neighbours (a token repeats when several neighbours carry
    it; empty when none is kept). Equal to :func:`knn_full_log_probs` on those tokens (-inf
    elsewhere), at O(k) cost plus one zeroed (V,) scratch row."""
    keep = None if mask is None or bool(mask.all()) else mask
    s = (scores if keep is None else scores[keep]).double() / temp
    tokens = (vals if keep is None else vals[keep]).long()
    if log_counts is not None:
        s = s + (log_counts if keep is None else log_counts[keep]).double()
    if not len(s):
        return tokens, s
    w = torch.exp(s - s.max())
    mass = torch.zeros(vocab_size, dtype=w.dtype).index_add_(0, tokens, w)
    return tokens, torch.log(mass[tokens]) - torch.log(w.sum())


def interpolate_sparse(lm_log_probs: torch.Tensor, tokens: torch.Tensor,
                       knn_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """(V,) log((1-λ) p_LM + λ p_kNN) for one position, p_kNN given on ``tokens`` only
    (:func:`knn_sparse_log_probs`): one pass over V for log(1-λ) + log p_LM, then the
    kNN's tokens mixed in. Equal to :func:`interpolate` of the dense p_kNN."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return lm_log_probs.clone()
    if lmbda == 1.0:
        out = torch.full_like(lm_log_probs, NEG_INF)
        out[tokens] = knn_log_probs.to(out.dtype)
        return out
    out = lm_log_probs + math.log1p(-lmbda)
    out[tokens] = torch.logaddexp(out[tokens], knn_log_probs.to(out.dtype) + math.log(lmbda))
    return out


EM_MAX_ITERS = 2000
EM_TOL = 1e-10        # stop when no weight moves more than this


def mixture_weights(log_probs: torch.Tensor) -> torch.Tensor:
    """(M,) weights on the simplex that maximise Σ_i log Σ_j w_j p_j(i) for (M, N) per-token
    log-probs of M models (the best linear interpolation of M models, as the λ grid is for
    two). EM, in log space: the objective is concave, EM climbs it monotonically."""
    lp = log_probs.double()
    M = lp.shape[0]
    w = torch.full((M,), 1.0 / M, dtype=torch.float64)
    for _ in range(EM_MAX_ITERS):
        joint = lp + torch.log(w)[:, None]                      # (M, N) log w_j p_j(i)
        resp = torch.exp(joint - torch.logsumexp(joint, 0, keepdim=True))
        new = resp.mean(1)
        if (new - w).abs().max() < EM_TOL:
            return new
        w = new
    return w


def interpolate_each(lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor,
                     lmbdas: torch.Tensor) -> torch.Tensor:
    """log((1-λ_i) p_LM + λ_i p_kNN) with a λ per element; λ_i = 0 and 1 are exact."""
    lam = lmbdas.to(lm_log_probs.dtype)
    if ((lam < 0) | (lam > 1)).any():
        raise ValueError("every lambda must be in [0, 1]")
    mid = torch.logaddexp(lm_log_probs + torch.log1p(-lam), knn_log_probs + torch.log(lam))
    return torch.where(lam == 0, lm_log_probs, torch.where(lam == 1, knn_log_probs, mid))


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor,
                lmbda: float) -> torch.Tensor:
    """log((1-λ) p_LM + λ p_kNN), elementwise; λ = 0 and λ = 1 are exact."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return lm_log_probs.clone()
    if lmbda == 1.0:
        return knn_log_probs.clone()
    return torch.logaddexp(lm_log_probs + math.log1p(-lmbda), knn_log_probs + math.log(lmbda))
