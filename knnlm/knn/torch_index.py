"""A torch search backend over a FAISS index's own data: the same neighbours and distances
as FAISS's CPU search, on any torch device, without faiss-gpu.

faiss-gpu's wheels exist for CUDA 12 only, so a CUDA 13 or ROCm machine has no FAISS on
its GPUs. :class:`TorchIndex` reads what a faiss-cpu index holds — the coarse centroids,
the PQ codebooks, the inverted lists (codes and ids), an optional linear pre-transform
(OPQ) — into torch tensors and searches them:

1. the coarse step: one GEMM of the queries against the centroids, top-nprobe lists;
2. the scan: for every probed list, its codes are decoded (PQ: one codebook row per
   sub-quantizer) and scored against the queries that probe it with one GEMM — the
   asymmetric distance ``||q - c - p||² = ||q - c||² - 2 (q - c)·p + ||p||²`` (L2, by
   residual) or ``q·c + q·p`` (inner product), the same sums FAISS's per-query lookup
   tables add up, in another order;
3. a top-k over the candidates of each query.

Supported: Flat, IVF-Flat and IVF-PQ (8-bit codes, by residual or not), L2 and inner
product, behind an optional linear transform; several devices by splitting the lists
between them and merging the top-k (:class:`ShardedTorchIndex`). Results follow FAISS's
conventions (squared L2 / inner products; id -1 where fewer than k candidates exist).

    index = TorchIndex.from_faiss(faiss.read_index("index_att_l2.faiss"), device="cuda")
    index.nprobe = 32
    D, I = index.search(xq, 1024)
"""
from __future__ import annotations

import numpy as np
import torch

from ..util import UserError
from .exact import brute_force_search, merge_topk

QUERY_BATCH = 8192         # queries per scan (bounds the (B, nprobe, longest list) buffer)
DECODE_CHUNK = 1 << 16     # codes decoded at once when the whole table is built
CPU_DECODE_BUDGET = 4 << 30   # PQ vectors kept reconstructed (fp32) up to this many bytes


def decode_budget(device: torch.device) -> int:
    """Bytes of reconstructed PQ vectors worth keeping: a quarter of a GPU's free memory,
    CPU_DECODE_BUDGET on the CPU (else codes are decoded list by list at every search)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return CPU_DECODE_BUDGET


class TorchIndex:
    """The data of one FAISS index as tensors on ``device`` (see the module docstring)."""

    def __init__(self, *, d: int, metric: str, device, centroids=None, codebooks=None,
                 by_residual: bool = True, codes=None, ids=None, offsets=None, vectors=None,
                 transform=None):
        self.d, self.metric, self.device = d, metric, torch.device(device)
        self.transform = transform          # (A (d_out, d_in), b (d_out,)) or None
        self.centroids = centroids          # (nlist, d) float32 or None (Flat)
        self.codebooks = codebooks          # (M, 256, dsub) float32 or None (IVF-Flat)
        self.by_residual = by_residual
        self.codes, self.ids, self.offsets = codes, ids, offsets
        self.vectors = vectors              # (N, d) for Flat / IVF-Flat
        self.nprobe = 1
        self.ntotal = int(ids.shape[0]) if ids is not None else int(vectors.shape[0])
        self.table = None                   # (N, d + 2) [p, 1, ||p||²] of every stored vector
        if self.centroids is not None and self.ntotal * (self.d + 2) * 4 <= decode_budget(self.device):
            self.table = torch.cat([self._rows(s, min(self.ntotal, s + DECODE_CHUNK))
                                    for s in range(0, self.ntotal, DECODE_CHUNK)]) \
                if self.ntotal else torch.zeros(0, self.d + 2, device=self.device)
            self.codes = self.vectors = None  # the table holds them

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_faiss(cls, index, device="cpu", lists: range | None = None) -> "TorchIndex":
        """Copy a faiss-cpu index's data to ``device``; ``lists``: only these inverted lists
        (a shard of the index, see :class:`ShardedTorchIndex`)."""
        import faiss
        transform = None
        if isinstance(index, faiss.IndexPreTransform):
            transform = _linear_transform(index)
            index = faiss.downcast_index(index.index)
        index = faiss.downcast_index(index)
        dev = torch.device(device)
        metric = _metric(index.metric_type)
        if isinstance(index, faiss.IndexFlat):
            xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
            vectors = torch.from_numpy(np.array(xb, dtype=np.float32).reshape(index.ntotal, index.d))
            return cls(d=index.d, metric=metric, device=dev, vectors=vectors.to(dev),
                       transform=transform)
        if not isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFPQ)) or \
                type(index) not in (faiss.IndexIVFFlat, faiss.IndexIVFPQ):
            raise UserError(f"the torch backend searches Flat, IVF-Flat and IVF-PQ indexes, "
                            f"not {type(index).__name__}")
        quantizer = faiss.downcast_index(index.quantizer)
        centroids = torch.from_numpy(quantizer.reconstruct_n(0, index.nlist).astype(np.float32))
        codebooks, by_residual = None, False         # IVF-Flat stores the vectors as they are
        if isinstance(index, faiss.IndexIVFPQ):
            pq = index.pq
            if pq.nbits != 8:
                raise UserError(f"the torch backend reads 8-bit PQ codes, not {pq.nbits}-bit")
            codebooks = torch.from_numpy(
                faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub))
            by_residual = bool(index.by_residual)
        codes, ids, offsets = _inverted_lists(index, lists or range(index.nlist))
        kw = dict(codes=codes.to(dev)) if codebooks is not None else \
            dict(vectors=codes.view(torch.float32).view(-1, index.d).to(dev))
        out = cls(d=index.d, metric=metric, device=dev, centroids=centroids.to(dev),
                  codebooks=None if codebooks is None else codebooks.to(dev),
                  by_residual=by_residual, ids=ids.to(dev), offsets=offsets,
                  transform=None if transform is None else tuple(t.to(dev) for t in transform),
                  **kw)
        out.nprobe = index.nprobe
        return out

    def _rows(self, start: int, end: int) -> torch.Tensor:
        """(n, d + 2) float32 ``[p, 1, ||p||²]`` of stored vectors ``[start, end)`` (PQ codes
        reconstructed): one GEMM with :meth:`_query_rows` gives whole distances."""
        if self.table is not None:
            return self.table[start:end]
        if self.codebooks is None:
            p = self.vectors[start:end]
        else:
            M, ksub, dsub = self.codebooks.shape
            c = self.codes[start:end].long() + torch.arange(M, device=self.device) * ksub
            p = self.codebooks.view(M * ksub, dsub)[c].view(end - start, M * dsub)
        return torch.cat([p, torch.ones_like(p[:, :1]), (p * p).sum(1, keepdim=True)], 1)

    def _query_rows(self, q: torch.Tensor, coarse: torch.Tensor, lst: int) -> torch.Tensor:
        """(n_q, d + 2) rows whose products with :meth:`_rows` are the distances:
        L2 ``||r||² - 2 r·p + ||p||²`` (r = q - c with residuals, ||r||² the coarse term),
        IP ``q·p (+ q·c)``."""
        one, zero = torch.ones_like(q[:, :1]), torch.zeros_like(q[:, :1])
        if self.metric == "ip":
            return torch.cat([q, coarse[:, None] if self.by_residual else zero, zero], 1)
        if self.by_residual:
            return torch.cat([-2 * (q - self.centroids[lst]), coarse[:, None], one], 1)
        return torch.cat([-2 * q, (q * q).sum(1, keepdim=True), one], 1)

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) queries -> FAISS-style (D (B, k) float32, I (B, k) int64) numpy arrays."""
        q = torch.as_tensor(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        if self.transform is not None:
            A, b = self.transform
            q = q @ A.T + b
        if self.centroids is None:
            return brute_force_search(q, self.vectors, k, self.metric)
        D = np.empty((len(q), k), dtype=np.float32)
        I = np.empty((len(q), k), dtype=np.int64)
        for s in range(0, len(q), QUERY_BATCH):
            d, i = self._search_ivf(q[s:s + QUERY_BATCH], k)
            D[s:s + len(d)], I[s:s + len(d)] = d.cpu().numpy(), i.cpu().numpy()
        return D, I

    def coarse(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, nprobe) coarse terms (||q - c||² for L2, q·c for IP) and list numbers."""
        nprobe = min(self.nprobe, len(self.centroids))
        dots = q @ self.centroids.T
        if self.metric == "l2":
            d = (q * q).sum(1, keepdim=True) - 2 * dots + (self.centroids ** 2).sum(1)[None]
            d, lists = d.topk(nprobe, dim=1, largest=False)
            return d.clamp_min(0), lists
        return dots.topk(nprobe, dim=1)

    def _search_ivf(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        B = len(q)
        coarse, lists = self.coarse(q)
        offsets = self.offsets.to(self.device)
        lens = offsets[1:] - offsets[:-1]
        # each query's candidates side by side: probe p's list at seg[b, p] .. + its length
        plen = lens[lists]                                     # (B, nprobe)
        seg = torch.cumsum(plen, 1) - plen
        width = max(1, int(plen.sum(1).max()))
        worst = float("inf") if self.metric == "l2" else float("-inf")
        cand = torch.full((B, width), worst, device=self.device)
        order = torch.argsort(lists.reshape(-1), stable=True)   # (query, probe) pairs by list
        flat_lists = lists.reshape(-1)[order]
        # host-side bounds, read once: the loop below never waits for the device
        bounds = torch.searchsorted(flat_lists, torch.arange(len(lens) + 1, device=self.device)).tolist()
        host_offsets = self.offsets.tolist()
        for lst in torch.unique(flat_lists).tolist():
            start, end = host_offsets[lst], host_offsets[lst + 1]
            if end == start:
                continue
            pairs = order[bounds[lst]:bounds[lst + 1]]
            rows, slot = pairs // lists.shape[1], pairs % lists.shape[1]
            # (n, n_q): stored rows times query rows (the faster operand order for BLAS)
            d = self._rows(start, end) @ self._query_rows(q[rows], coarse[rows, slot], lst).T.contiguous()
            dest = (rows * width + seg[rows, slot])[None, :] + torch.arange(end - start,
                                                                            device=self.device)[:, None]
            cand.view(-1).index_copy_(0, dest.view(-1), d.view(-1))
        kk = min(k, width)
        best, pos = cand.topk(kk, dim=1, largest=self.metric != "l2")
        if self.metric == "l2":
            best = best.clamp_min(0)         # rounding can take a distance a hair below 0
        # candidate position -> its probe (segment) -> the stored row it came from
        probe = (torch.searchsorted(seg, pos, right=True) - 1).clamp_min(0)
        within = pos - seg.gather(1, probe)
        lst = lists.gather(1, probe)
        row = offsets[lst] + within
        found = within < lens[lst]
        ids = torch.where(found, self.ids[row.clamp(max=self.ntotal - 1)], -1)
        if kk < k:
            ids = torch.cat([ids, torch.full((B, k - kk), -1, device=self.device)], 1)
            best = torch.cat([best, torch.full((B, k - kk), worst, device=self.device)], 1)
        return best, ids

def _metric(metric_type) -> str:
    import faiss
    if metric_type == faiss.METRIC_L2:
        return "l2"
    if metric_type == faiss.METRIC_INNER_PRODUCT:
        return "ip"
    raise UserError(f"the torch backend searches L2 and inner-product indexes, not metric {metric_type}")


def _linear_transform(index) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss
    if index.chain.size() != 1:
        raise UserError("the torch backend reads one linear pre-transform (OPQ), not a chain")
    lt = faiss.downcast_VectorTransform(index.chain.at(0))
    if not isinstance(lt, faiss.LinearTransform):
        raise UserError(f"the torch backend reads linear pre-transforms, not {type(lt).__name__}")
    A = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in).astype(np.float32)
    b = faiss.vector_to_array(lt.b).astype(np.float32) if lt.have_bias else np.zeros(lt.d_out, np.float32)
    return torch.from_numpy(A), torch.from_numpy(b)


def _inverted_lists(index, lists: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes (N, code_size) uint8, ids (N,) int64 and offsets (nlist + 1,) of the
    inverted lists, concatenated in list order (lists outside ``lists`` left empty)."""
    import faiss
    inv = index.invlists
    sizes = np.array([inv.list_size(l) if l in lists else 0 for l in range(index.nlist)],
                     dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    codes = np.empty((offsets[-1], inv.code_size), dtype=np.uint8)
    ids = np.empty(offsets[-1], dtype=np.int64)
    for l in lists:
        n = int(sizes[l])
        if n:
            s = int(offsets[l])
            codes[s:s + n] = faiss.rev_swig_ptr(inv.get_codes(l), n * inv.code_size).reshape(n, -1)
            ids[s:s + n] = faiss.rev_swig_ptr(inv.get_ids(l), n)
    return torch.from_numpy(codes), torch.from_numpy(ids), torch.from_numpy(offsets)


class ShardedTorchIndex:
    """One index over several devices: each holds every centroid but a contiguous share of
    the inverted lists; a query's top-k is merged from the shards' top-k lists."""

    def __init__(self, index, devices: list):
        import faiss
        ivf = faiss.extract_index_ivf(index)
        n = len(devices)
        bounds = [ivf.nlist * i // n for i in range(n + 1)]
        self.shards = [TorchIndex.from_faiss(index, dev, range(bounds[i], bounds[i + 1]))
                       for i, dev in enumerate(devices)]
        self.metric, self.ntotal = self.shards[0].metric, sum(s.ntotal for s in self.shards)

    @property
    def nprobe(self) -> int:
        return self.shards[0].nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for s in self.shards:
            s.nprobe = value

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(xq, k) for s in self.shards], k, self.metric)
