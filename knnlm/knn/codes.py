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
"""
from __future__ import annotations

import numpy as np

from ..util import UserError


class CodeDistances:
    """FAISS-style distances (squared L2 / inner product) of a query to chosen entries,
    from ``index``'s reconstructions (see the module docstring)."""

    def __init__(self, index, metric: str):
        import faiss
        from .index import refine_stage
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
            if ivf is not None:
                ivf.make_direct_map()            # entry id -> (list, offset), once
        if not hasattr(self.stage, "reconstruct_batch"):
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
        recon = self.stage.reconstruct_batch(np.ascontiguousarray(ids[valid], dtype=np.int64))
        if self.metric == "l2":
            recon -= x[rows]
            out[valid] = np.einsum("ij,ij->i", recon, recon)
        else:
            out[valid] = np.einsum("ij,ij->i", recon, x[rows])
        return out
