"""Distances from an index's own codes: what the index's search would return for given
entries, without searching and without reading the stored keys.

RetoMaton's pointers (:mod:`knnlm.knn.pointers`) are entries that no search returned; in
the score modes that use FAISS's distances they must be scored on the same scale as the
searched neighbours, i.e. against the index's reconstruction of each entry, in the space
the index measures distances in:

- a refine stage (``RFlat``, ``Refine(SQfp16)``): its codes, in the keys' space (flat or
  float16 codes of float16 keys are the keys themselves);
- an IVF-PQ or fast-scan index: centroid + decoded PQ residual (``reconstruct_batch`` over
  a direct map of the inverted lists). 8-bit PQ returns these asymmetric distances to
  float rounding; fast-scan quantises its lookup tables to 8 bits, so its own search
  distances differ from them by that rounding (on an ``IVF2048,PQ64x4fs`` index of the demo,
  0.7% of a query's largest distance on average: the pointers' are the more accurate);
- behind a pre-transform (OPQ, PCA(R)): reconstructed in the transformed space, against
  the transformed query, where the search measured.

    dist = CodeDistances(index, "l2")(xq, ids)   # (W, c) FAISS-style distances

FAISS reconstructs one entry at a time (a direct-map lookup and a decode: 1–2 µs an
entry), which would cost a RetoMaton step more than the search it saves; so an IVF-PQ
index's codes (8- or 4-bit) are read once into an id-ordered table (:class:`CodeTable`,
the size of the index's codes) and a step's entries are decoded together, to the same
float32 vectors.
"""
from __future__ import annotations

import numpy as np
import torch

from ..util import UserError

CODE_TABLE_BUDGET = 4 << 30    # bytes of codes (+ list ids) read into a CodeTable at most


class CodeTable:
    """Every entry's PQ code (and IVF list, when codes are residuals), by id: vectorised
    reconstruction of an ``IndexIVFPQ`` or ``IndexIVFPQFastScan``'s entries."""

    def __init__(self, ivf):
        import faiss
        pq = ivf.pq
        self.M, self.ksub, self.nbits = pq.M, pq.ksub, pq.nbits
        self.d = ivf.d
        self.codebooks = torch.from_numpy(
            faiss.vector_to_array(pq.centroids).reshape(pq.M * pq.ksub, pq.dsub))
        self.by_residual = bool(ivf.by_residual)
        self.centroids = torch.from_numpy(faiss.downcast_index(ivf.quantizer).reconstruct_n(
            0, ivf.nlist)) if self.by_residual else None
        size = pq.code_size
        self.codes = np.zeros((ivf.ntotal, size), dtype=np.uint8)
        self.lists = np.zeros(ivf.ntotal, dtype=np.int32) if self.by_residual else None
        inv = ivf.invlists
        packer = ivf.get_CodePacker() if isinstance(ivf, faiss.IndexIVFFastScan) else None
        for lno in range(ivf.nlist):
            n = inv.list_size(lno)
            if not n:
                continue
            ids = faiss.rev_swig_ptr(inv.get_ids(lno), n)
            if packer is None:
                flat = faiss.rev_swig_ptr(inv.get_codes(lno), n * size).reshape(n, size)
            else:      # fast-scan: blocks of packer.nvec codes interleaved for SIMD
                blocks = -(-n // packer.nvec)
                packed = faiss.rev_swig_ptr(inv.get_codes(lno), blocks * packer.block_size)
                flat = np.empty((blocks * packer.nvec, size), dtype=np.uint8)
                for b in range(blocks):
                    packer.unpack_all(faiss.swig_ptr(packed[b * packer.block_size:]),
                                      faiss.swig_ptr(flat[b * packer.nvec:]))
            self.codes[ids] = flat[:n]
            if self.lists is not None:
                self.lists[ids] = lno
        self.offsets = torch.arange(self.M, dtype=torch.int64) * self.ksub

    @staticmethod
    def fits(ivf) -> bool:
        return ivf.pq.nbits in (4, 8) and \
            ivf.ntotal * (ivf.pq.code_size + 4) <= CODE_TABLE_BUDGET

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, d) float32 reconstructions (what FAISS's ``reconstruct`` gives)."""
        c = torch.from_numpy(self.codes[ids])
        if self.nbits == 4:               # two codes a byte, the first in the low nibble
            c = torch.stack([c & 15, c >> 4], dim=2).view(len(ids), -1)[:, :self.M]
        rows = c.to(torch.int64) + self.offsets
        out = self.codebooks.index_select(0, rows.view(-1)).view(len(ids), self.d)
        if self.centroids is not None:
            out += self.centroids.index_select(0, torch.from_numpy(self.lists[ids]).long())
        return out.numpy()


class CodeDistances:
    """FAISS-style distances (squared L2 / inner product) of a query to chosen entries,
    from ``index``'s reconstructions (see the module docstring)."""

    def __init__(self, index, metric: str):
        import faiss
        from .index_read import refine_stage
        self.metric = metric
        self.transforms = []
        refine = refine_stage(index)
        if refine is not None:
            self.stage = refine
        else:
            outer = faiss.downcast_index(index)
            if isinstance(outer, faiss.IndexPreTransform):
                self.transforms = [faiss.downcast_VectorTransform(outer.chain.at(i))
                                   for i in range(outer.chain.size())]
                outer = faiss.downcast_index(outer.index)
            self.stage = outer
            ivf = faiss.try_extract_index_ivf(outer)
            ivf = faiss.downcast_index(ivf) if ivf is not None else None
            if isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)) and \
                    CodeTable.fits(ivf):
                self.stage = CodeTable(ivf)
            elif ivf is not None:
                ivf.make_direct_map()            # entry id -> (list, offset), once
        self.reconstruct = self.stage.reconstruct if isinstance(self.stage, CodeTable) else \
            getattr(self.stage, "reconstruct_batch", None)
        if self.reconstruct is None:
            raise UserError(f"cannot score entries from the codes of a "
                            f"{type(self.stage).__name__} index")

    def __call__(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(W, D) queries, (W, c) entry ids (-1: none) -> (W, c) float32 distances (+inf
        for L2, -inf for IP where there is no entry)."""
        out = np.full(ids.shape, np.inf if self.metric == "l2" else -np.inf, dtype=np.float32)
        valid = ids >= 0
        if not valid.any():
            return out
        x = np.ascontiguousarray(q, dtype=np.float32)
        for t in self.transforms:
            x = t.apply(x)
        rows = np.nonzero(valid)[0]
        recon = self.reconstruct(np.ascontiguousarray(ids[valid], dtype=np.int64))
        if self.metric == "l2":
            recon -= x[rows]
            out[valid] = np.einsum("ij,ij->i", recon, recon)
        else:
            out[valid] = np.einsum("ij,ij->i", recon, x[rows])
        return out
