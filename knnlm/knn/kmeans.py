"""Index training in torch: k-means for the IVF coarse quantizer and the PQ sub-quantizers,
on a GPU (or the CPU) without faiss-gpu. The trained parameters go into an ordinary
faiss-cpu index, so the file is a FAISS index like any other.

The algorithm is FAISS's ``Clustering`` (Lloyd's iterations) with the parameters the
index itself carries (its ``cp`` and its PQ's ``cp``: 10 rounds for the coarse quantizer,
25 per PQ sub-space, at most 256 training points per centroid): a seeded subsample, k
distinct points as the first centroids, rounds of assignment (one GEMM per chunk) and
mean update, empty clusters refilled by splitting a populated one (chosen in proportion to
its size), and unit-norm ("spherical") coarse centroids for an inner-product index.

    index = faiss.index_factory(d, "IVF4096,PQ64", faiss.METRIC_L2)
    train_ivf(index, xt, device="cuda", seed=1)     # index.is_trained, FAISS-readable
"""
from __future__ import annotations

import numpy as np
import torch

from ..util import UserError
from .datastore import finite_rows

NITER = 25                     # FAISS's ClusteringParameters.niter
MAX_POINTS_PER_CENTROID = 256  # FAISS's ClusteringParameters.max_points_per_centroid
SPLIT_EPS = 1.0 / 1024         # FAISS's perturbation when a populated cluster is split
ASSIGN_CHUNK = 1 << 15         # points assigned per GEMM (bounds the (chunk, k) scores)


def assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(n,) the nearest centroid of each point (L2) or the largest inner product (IP)."""
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    c_norms = (centroids * centroids).sum(1)
    for s in range(0, len(x), ASSIGN_CHUNK):
        dots = x[s:s + ASSIGN_CHUNK] @ centroids.T
        scores = 2 * dots - c_norms[None] if metric == "l2" else dots   # larger = nearer
        out[s:s + ASSIGN_CHUNK] = scores.argmax(1)
    return out


def cluster_keys(keys, k: int, sample_size: int, seed: int,
                 chunk: int = 1 << 17) -> tuple[torch.Tensor, np.ndarray]:
    """(centroids, (N,) int64 cluster of every key): :func:`kmeans` on a seeded sample of
    ``sample_size`` of the (N, D) ``keys`` (a memmap is fine), then every key assigned in
    chunks of ``chunk``."""
    n = len(keys)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:sample_size])
    where = getattr(keys, "filename", None)
    cent = kmeans(torch.from_numpy(finite_rows(keys[rows], where=where, rows=rows)), k, seed=seed)
    cluster = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        x = torch.from_numpy(finite_rows(keys[s:s + chunk], s))
        cluster[s:s + chunk] = assign(x, cent).numpy()
    return cent, cluster


def kmeans(x: torch.Tensor, k: int, *, seed: int = 1234, niter: int = NITER,
           metric: str = "l2", spherical: bool = False,
           max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> torch.Tensor:
    """(k, d) float32 centroids of ``x`` (n, d), FAISS's Lloyd iterations (module docstring)."""
    n, d = x.shape
    if n < k:
        raise UserError(f"k-means needs at least {k} training points, got {n}")
    g = torch.Generator().manual_seed(seed)
    if n > k * max_points_per_centroid:
        x = x[torch.randperm(n, generator=g)[:k * max_points_per_centroid].to(x.device)]
        n = len(x)
    x = x.float()
    centroids = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(niter):
        a = assign(x, centroids, metric)
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].float()
        if not filled.all():
            centroids = _split(centroids, counts, g)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids


def _split(centroids: torch.Tensor, counts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Give every empty cluster half of a populated one (picked in proportion to its size):
    the two centroids are the old one scaled by 1 ± SPLIT_EPS."""
    counts = counts.clone().cpu().double()
    for j in torch.nonzero(counts == 0).flatten().tolist():
        ci = int(torch.multinomial(counts / counts.sum(), 1, generator=g))
        sign = torch.ones(centroids.shape[1], device=centroids.device)
        sign[1::2] = -1
        centroids[j] = centroids[ci] * (1 + SPLIT_EPS * sign)
        centroids[ci] = centroids[ci] * (1 - SPLIT_EPS * sign)
        counts[j] = counts[ci] / 2
        counts[ci] -= counts[j]
    return centroids


def train_pq(x: torch.Tensor, M: int, ksub: int = 256, seed: int = 1234, niter: int = NITER,
             max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> torch.Tensor:
    """(M, ksub, d / M) codebooks: k-means (L2) in each of the M sub-spaces."""
    n, d = x.shape
    if d % M:
        raise UserError(f"PQ{M} needs a dimension divisible by {M}, got {d}")
    dsub = d // M
    return torch.stack([kmeans(x[:, m * dsub:(m + 1) * dsub].contiguous(), ksub, seed=seed + m,
                               niter=niter, max_points_per_centroid=max_points_per_centroid)
                        for m in range(M)])


def train_ivf(index, xt: np.ndarray, device="cpu", seed: int = 1234) -> None:
    """Train a faiss-cpu IVF-Flat or IVF-PQ index (8-bit codes) with torch k-means on
    ``device``: the coarse centroids go into its quantizer, the PQ codebooks into its
    product quantizer; the index is then trained, as if FAISS had trained it."""
    import faiss
    if isinstance(index, faiss.IndexPreTransform):
        raise UserError("torch training does not learn pre-transforms (OPQ, PCA): "
                        "train this factory with FAISS (--train-backend faiss)")
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if not isinstance(ivf, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)) or \
            type(ivf) not in (faiss.IndexIVFFlat, faiss.IndexIVFPQ):
        raise UserError(f"torch training covers IVF-Flat and IVF-PQ indexes, not "
                        f"{type(ivf or index).__name__}")
    metric = "ip" if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    x = torch.from_numpy(np.ascontiguousarray(xt, dtype=np.float32)).to(device)
    cp = ivf.cp
    coarse = kmeans(x, ivf.nlist, seed=seed, metric=metric, niter=cp.niter,
                    spherical=bool(cp.spherical), max_points_per_centroid=cp.max_points_per_centroid)
    ivf.quantizer.reset()
    ivf.quantizer.add(np.ascontiguousarray(coarse.cpu().numpy()))
    if isinstance(ivf, faiss.IndexIVFPQ):
        pq = ivf.pq
        if pq.nbits != 8:
            raise UserError(f"torch training learns 8-bit PQ codes, not {pq.nbits}-bit")
        if ivf.by_residual:
            x = x - coarse[assign(x, coarse, metric)]
        books = train_pq(x, pq.M, pq.ksub, seed=seed + 1, niter=pq.cp.niter,
                         max_points_per_centroid=pq.cp.max_points_per_centroid)
        faiss.copy_array_to_vector(np.ascontiguousarray(books.cpu().numpy()).ravel(), pq.centroids)
        if ivf.by_residual:
            ivf.precompute_table()
    ivf.is_trained = True
    index.is_trained = True
