"""Pure summaries behind the analysis tables: sweep optima, neighbour-set overlap and
distance gaps between approximate and exact search, share of the kNN-LM gain recovered.

Shapes: N tokens, k neighbours, T temperatures, L λ values.
"""
from __future__ import annotations

import math

import numpy as np

from ..data.counts import FREQ_EDGES, bucket_names

OVERLAP_CHUNK = 4096


def ppl(logp_sum: float, n: int) -> float:
    return math.exp(-logp_sum / n) if np.isfinite(logp_sum) and n else float("inf")


def sweep_summary(sums: dict, temps: list[float], lambdas: list[float], n: int) -> dict:
    """From :func:`knnlm.knn.sweep.sweep_sums` output: the best λ at T = 1 and the best (T, λ),
    each with kNN-only and interpolated perplexity, and the curve best-λ ppl per T."""
    interp, knn = np.asarray(sums["interp"]), np.asarray(sums["knn"])
    out = dict(lm_ppl=ppl(sums["lm"], n), tokens=n,
               curve=dict(temps=list(temps), ppl=[ppl(v, n) for v in interp.max(1)],
                          lmbda=[lambdas[i] for i in interp.argmax(1)]))
    if 1.0 in temps:
        t1 = temps.index(1.0)
        li = int(np.argmax(interp[t1]))
        out["t1"] = dict(temp=1.0, lmbda=lambdas[li], ppl=ppl(interp[t1, li], n),
                         knn_ppl=ppl(knn[t1], n))
    ti, li = np.unravel_index(int(np.argmax(interp)), interp.shape)
    out["best"] = dict(temp=temps[ti], lmbda=lambdas[li], ppl=ppl(interp[ti, li], n),
                       knn_ppl=ppl(knn[ti], n))
    return out


def neighbour_overlap(ids_a: np.ndarray, ids_b: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Mean over rows of |A[:k'] ∩ B[:k']| / k' for each k' (ids within a row are distinct;
    -1, "no neighbour", never counts)."""
    totals = {k: 0.0 for k in ks}
    n = len(ids_a)
    for s in range(0, n, OVERLAP_CHUNK):
        a = np.asarray(ids_a[s:s + OVERLAP_CHUNK], dtype=np.int64)
        b = np.asarray(ids_b[s:s + OVERLAP_CHUNK], dtype=np.int64)
        for k in ks:
            both = np.sort(np.concatenate([a[:, :k], b[:, :k]], axis=1), axis=1)
            same = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
            totals[k] += float(same.sum()) / k
    return {k: totals[k] / max(1, n) for k in ks}


def distance_gaps(approx_exact: np.ndarray, approx_faiss: np.ndarray, true_exact: np.ndarray,
                  k: int) -> dict[str, float]:
    """Mean gaps over the first k neighbours (float64):

    - ``approx_minus_true``: exact distance of the approximate neighbours minus that of
      the true ones (how much farther approximate search reaches);
    - ``faiss_minus_exact``: quantised minus exact distance of the same neighbours;
    - ``abs_faiss_error``: mean |quantised − exact|, and the mean exact distances."""
    acc = dict(approx=0.0, true=0.0, diff=0.0, absdiff=0.0)
    n = len(approx_exact)
    for s in range(0, n, OVERLAP_CHUNK):
        ae = np.asarray(approx_exact[s:s + OVERLAP_CHUNK, :k], dtype=np.float64)
        af = np.asarray(approx_faiss[s:s + OVERLAP_CHUNK, :k], dtype=np.float64)
        te = np.asarray(true_exact[s:s + OVERLAP_CHUNK, :k], dtype=np.float64)
        acc["approx"] += ae.mean(1).sum()
        acc["true"] += te.mean(1).sum()
        acc["diff"] += (af - ae).mean(1).sum()
        acc["absdiff"] += np.abs(af - ae).mean(1).sum()
    n = max(1, n)
    return dict(mean_exact_dist_approx=acc["approx"] / n, mean_exact_dist_true=acc["true"] / n,
                approx_minus_true=(acc["approx"] - acc["true"]) / n,
                faiss_minus_exact=acc["diff"] / n, abs_faiss_error=acc["absdiff"] / n)


def gain_recovered(base_ppl: float, other_ppl: float, knn_ppl: float) -> float:
    """Share of the kNN-LM's perplexity reduction that ``other`` achieves (log scale)."""
    full = math.log(base_ppl) - math.log(knn_ppl)
    return (math.log(base_ppl) - math.log(other_ppl)) / full if full > 0 else float("nan")




def frequency_buckets(targets: np.ndarray, lm: np.ndarray, mix: np.ndarray,
                      train_counts: np.ndarray) -> list[dict]:
    """Where the kNN-LM helps, by how often the target occurs in the training data: per
    bucket of counts, its tokens, LM and kNN-LM perplexity, and share of the total gain in
    log-probability."""
    count = train_counts[targets]
    gain = mix - lm
    total = float(gain.sum())
    rows = []
    edges = list(FREQ_EDGES) + [np.inf]
    for name, lo, hi in zip(bucket_names(), edges, edges[1:]):
        m = (count >= lo) & (count < hi)
        if lo == 0:
            m = count == 0
        if not m.any():
            continue
        n = int(m.sum())
        rows.append(dict(counts=name, tokens=n, share=n / len(targets),
                         lm_ppl=ppl(float(lm[m].sum()), n), knnlm_ppl=ppl(float(mix[m].sum()), n),
                         gain_share=float(gain[m].sum()) / total if total else float("nan")))
    return rows


def top_types(targets: np.ndarray, lm: np.ndarray, mix: np.ndarray, n: int = 15) -> dict:
    """The target types with the largest total gain and the largest total loss (kNN-LM vs
    LM log-probability, summed over their occurrences)."""
    types, inv = np.unique(targets, return_inverse=True)
    total = np.bincount(inv, weights=mix - lm)
    occ = np.bincount(inv)
    order = np.argsort(total)

    def rows(idx):
        return [dict(token=int(types[i]), occurrences=int(occ[i]), gain=float(total[i]),
                     mean_gain=float(total[i] / occ[i])) for i in idx]
    return dict(gain=rows(order[::-1][:n]), loss=rows(order[:n][total[order[:n]] < 0]))


SPAN = 48           # tokens of an "interesting span" of the evaluated text


def extreme_spans(gain: np.ndarray, n: int = 3, width: int = SPAN) -> list[dict]:
    """The ``n`` non-overlapping windows of ``width`` tokens with the largest total gain
    (kNN-LM over LM log-probability) and the ``n`` with the largest loss."""
    g = np.asarray(gain, dtype=np.float64)
    if len(g) < width:
        width = len(g)
    if width == 0:
        return []
    sums = np.convolve(g, np.ones(width), "valid")           # sums[i] = g[i:i + width]
    out = []
    for kind, order in (("gain", np.argsort(-sums, kind="stable")),
                        ("loss", np.argsort(sums, kind="stable"))):
        taken: list[int] = []
        for i in order:
            if all(abs(int(i) - j) >= width for j in taken):
                taken.append(int(i))
                out.append(dict(kind=kind, start=int(i), end=int(i) + width,
                                gain=float(sums[i])))
            if len(taken) == n:
                break
    return out
