"""A torch search backend over a FAISS index's own data: the same neighbours and distances
as FAISS's CPU search, on any torch device, without faiss-gpu.

faiss-gpu's wheels exist for CUDA 12 only, so a CUDA 13 or ROCm machine has no FAISS on
its GPUs. :class:`TorchIndex` reads what a faiss-cpu index holds — the coarse centroids,
the PQ codebooks, the inverted lists (codes and ids), an optional linear pre-transform
(OPQ) — into torch tensors and searches them:

1. the coarse step: one GEMM of the queries against the centroids, top-nprobe lists;
2. the scan: every probed list's codes are decoded (PQ: one codebook row per
   sub-quantizer) and scored against the queries that probe it with one GEMM — the
   asymmetric distance ``||q - c - p||² = ||q - c||² - 2 (q - c)·p + ||p||²`` (L2, by
   residual) or ``q·c + q·p`` (inner product), the same sums FAISS's per-query lookup
   tables add up, in another order. Two schedules compute the same products:
   ``"lists"`` loops over the probed lists (one GEMM each: what a CPU does best), and
   ``"buckets"`` groups the lists by length and by how many queries probe them (powers
   of two) and scores each group with one batched GEMM, padded — a few dozen kernel
   launches per batch of queries instead of a dozen per list, which is what a GPU needs
   (the default on CUDA devices);
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

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..util import UserError
from .exact import brute_force_search, merge_topk

QUERY_BATCH = 8192         # queries per scan (bounds the (B, nprobe, longest list) buffer)
DECODE_CHUNK = 1 << 16     # codes decoded at once when the whole table is built
SCAN_ELEMENTS = 1 << 24    # the bucketed scan's padded (list, row, query) products per GEMM
                           # (4x on a GPU)
CANDIDATE_ELEMENTS = 1 << 28   # a batch's candidate distances (B x its longest probed set)
SCANS = ("lists", "buckets")
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
        self.scan = "buckets" if self.device.type == "cuda" else "lists"   # see SCANS
        self.ntotal = int(ids.shape[0]) if ids is not None else int(vectors.shape[0])
        self.table = None                   # (N, d + 2) [p, 1, ||p||²] of every stored vector
        if offsets is not None:             # list bounds, on the host and on the device
            self.host_lens = np.diff(offsets.numpy())
            self.dev_offsets = offsets.to(self.device)
            self.dev_lens = self.dev_offsets[1:] - self.dev_offsets[:-1]
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
            raise UserError(f"the torch backend searches Flat, IVF-Flat and IVF-PQ (8-bit) "
                            f"indexes, not {type(index).__name__} (fast-scan and refine "
                            "indexes: --knn-backend faiss, on the CPU)")
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
        return self._decode(torch.arange(start, end, device=self.device))

    def _rows_at(self, idx: torch.Tensor) -> torch.Tensor:
        """:meth:`_rows` of the stored vectors at positions ``idx`` (any shape)."""
        if self.table is not None:
            return self.table[idx]
        return self._decode(idx.reshape(-1)).view(*idx.shape, self.d + 2)

    def _decode(self, idx: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            p = self.vectors[idx]
        else:
            M, ksub, dsub = self.codebooks.shape
            c = self.codes[idx].long() + torch.arange(M, device=self.device) * ksub
            p = self.codebooks.view(M * ksub, dsub)[c].view(len(idx), M * dsub)
        return torch.cat([p, torch.ones_like(p[:, :1]), (p * p).sum(1, keepdim=True)], 1)

    def _query_rows(self, q: torch.Tensor, coarse: torch.Tensor, lists: torch.Tensor,
                    pairs: torch.Tensor) -> torch.Tensor:
        """(*pairs.shape, d + 2) rows whose products with :meth:`_rows` are the distances,
        for (query, probe) pairs numbered ``query * nprobe + probe`` in ``coarse`` and
        ``lists`` (B, nprobe): L2 ``||r||² - 2 r·p + ||p||²`` (r = q - c with residuals,
        ||r||² the coarse term), IP ``q·p (+ q·c)``."""
        x = q[pairs // lists.shape[1]]
        cz = coarse.reshape(-1)[pairs][..., None]
        one, zero = torch.ones_like(cz), torch.zeros_like(cz)
        if self.metric == "ip":
            return torch.cat([x, cz if self.by_residual else zero, zero], -1)
        if self.by_residual:
            c = self.centroids[lists.reshape(-1)[pairs]]
            return torch.cat([-2 * (x - c), cz, one], -1)
        return torch.cat([-2 * x, (x * x).sum(-1, keepdim=True), one], -1)

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) queries -> FAISS-style (D (B, k) float32, I (B, k) int64) numpy arrays."""
        q = torch.as_tensor(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
        if self.centroids is None:
            return brute_force_search(self._transformed(q), self.vectors, k, self.metric)
        D, I = self.search_tensors(q, k)
        return D.cpu().numpy(), I.cpu().numpy()

    @torch.no_grad()
    def search_tensors(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` of a (B, d) float32 tensor, the results left on the index's
        device (what a GPU evaluation scores without a round trip through the host)."""
        q = self._transformed(q.to(self.device, torch.float32))
        if self.centroids is None:
            return tuple(torch.from_numpy(x).to(self.device)
                         for x in brute_force_search(q, self.vectors, k, self.metric))
        parts = [self._search_ivf(q[s:s + QUERY_BATCH], k) for s in range(0, len(q), QUERY_BATCH)]
        if not parts:
            return (torch.zeros(0, k, device=self.device),
                    torch.zeros(0, k, dtype=torch.long, device=self.device))
        return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])

    def _transformed(self, q: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return q
        A, b = self.transform
        return q @ A.T + b

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
        offsets, lens = self.dev_offsets, self.dev_lens
        # each query's candidates side by side: probe p's list at seg[b, p] .. + its length
        plen = lens[lists]                                     # (B, nprobe)
        seg = torch.cumsum(plen, 1) - plen
        width = max(1, int(plen.sum(1).max()))
        if B > 1 and B * max(width, lists.shape[1] * (self.d + 2)) > CANDIDATE_ELEMENTS:
            halves = [self._search_ivf(h, k) for h in (q[:B // 2], q[B // 2:])]
            return tuple(torch.cat(x) for x in zip(*halves))
        worst = float("inf") if self.metric == "l2" else float("-inf")
        # one slot past the candidates takes the bucketed scan's padding
        flat = torch.full((B * width + 1,), worst, device=self.device)
        base = (torch.arange(B, device=self.device)[:, None] * width + seg).reshape(-1)
        scan = self._scan_buckets if self.scan == "buckets" else self._scan_lists
        scan(q, coarse, lists, base, flat)
        cand = flat[:-1].view(B, width)
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

    def _scan_lists(self, q, coarse, lists, base, flat) -> None:
        """Write every (query, probe) pair's distances to ``flat[base[pair]:][:len]``: a
        GEMM per probed list."""
        flat_lists = lists.reshape(-1)
        order = torch.argsort(flat_lists, stable=True)   # (query, probe) pairs by list
        # host-side bounds, read once: the loop below never waits for the device
        bounds = torch.searchsorted(flat_lists[order], torch.arange(
            len(self.offsets), device=self.device)).tolist()
        host_offsets = self.offsets.tolist()
        for lst in torch.unique(flat_lists).tolist():
            start, end = host_offsets[lst], host_offsets[lst + 1]
            if end == start:
                continue
            pairs = order[bounds[lst]:bounds[lst + 1]]
            # (n, n_q): stored rows times query rows (the faster operand order for BLAS)
            d = self._rows(start, end) @ self._query_rows(q, coarse, lists, pairs).T.contiguous()
            dest = base[pairs][None, :] + torch.arange(end - start, device=self.device)[:, None]
            flat.index_copy_(0, dest.view(-1), d.view(-1))

    def _scan_buckets(self, q, coarse, lists, base, flat) -> None:
        """:meth:`_scan_lists`' distances, a batched GEMM per group of lists of similar
        length probed by similar numbers of queries (padding goes to ``flat[-1]``)."""
        dev = self.device
        flat_lists = lists.reshape(-1)
        order = torch.argsort(flat_lists, stable=True)             # pairs in list order
        n_q = torch.bincount(flat_lists, minlength=len(self.host_lens))
        first = torch.cumsum(n_q, 0) - n_q                          # a list's first pair
        rows_q = self._query_rows(q, coarse, lists, order)         # (pairs, d + 2)
        dest_q = base[order]
        # the probed lists, grouped by powers of two of their lengths and query counts
        h_nq = n_q.cpu().numpy()
        used = np.flatnonzero((h_nq > 0) & (self.host_lens > 0))
        h_len, h_nq = self.host_lens[used], h_nq[used]
        key = np.ceil(np.log2(h_len)).astype(np.int64) * 64 + np.ceil(np.log2(h_nq)).astype(np.int64)
        by_key = np.argsort(key, kind="stable")
        used, h_len, h_nq = used[by_key], h_len[by_key], h_nq[by_key]
        L = torch.from_numpy(used).to(dev)
        start, lens, nq, firsts = self.dev_offsets[L], self.dev_lens[L], n_q[L], first[L]
        budget = SCAN_ELEMENTS * (4 if dev.type == "cuda" else 1)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(key[by_key])) + 1, [len(used)]])
        for g0, g1 in zip(bounds[:-1], bounds[1:]):
            R, Q = int(h_len[g0:g1].max()), int(h_nq[g0:g1].max())
            # queries and lists per GEMM: its (n, R, Qs) products and the (n, R | Qs, d + 2)
            # operands stay within the budget
            Qs = max(1, min(Q, budget // R))
            per = max(1, budget // max(R * Qs, (R + Qs) * (self.d + 2)))
            r = torch.arange(R, device=dev)
            for a in range(g0, g1, per):
                b = min(g1, a + per)
                rvalid = r < lens[a:b, None]                                # (n, R)
                X = self._rows_at(torch.where(rvalid, start[a:b, None] + r, 0))
                for q0 in range(0, Q, Qs):
                    j = torch.arange(q0, min(Q, q0 + Qs), device=dev)
                    qvalid = j < nq[a:b, None]                               # (n, Qs)
                    at = torch.where(qvalid, firsts[a:b, None] + j, 0)       # pairs, list order
                    d = torch.bmm(X, rows_q[at].transpose(1, 2))             # (n, R, Qs)
                    dest = torch.where(rvalid[:, :, None] & qvalid[:, None, :],
                                       dest_q[at][:, None, :] + r[:, None], len(flat) - 1)
                    flat.index_copy_(0, dest.view(-1), d.view(-1))


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

    @property
    def device(self) -> torch.device:
        return self.shards[0].device

    def search(self, xq, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(np.ascontiguousarray(xq, dtype=np.float32))
        D, I = self.search_tensors(q, k)
        return D.cpu().numpy(), I.cpu().numpy()

    def search_tensors(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every shard's top-k (the shards on distinct GPUs search at the same time, one
        thread each), merged on the first shard's device (:func:`knnlm.knn.exact.merge_topk`)."""
        search = lambda shard: shard.search_tensors(q, k)   # noqa: E731
        devices = {str(s.device) for s in self.shards}
        if len(devices) == len(self.shards) and self.device.type == "cuda":
            with ThreadPoolExecutor(len(self.shards)) as pool:
                parts = list(pool.map(search, self.shards))
        else:
            parts = [search(s) for s in self.shards]
        return merge_topk(parts, k, self.metric)
