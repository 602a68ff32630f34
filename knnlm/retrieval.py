"""Neighbour retrieval for kNN-LM: FAISS search, exact brute-force search, and exact
distances recomputed from the stored keys.

Distances follow FAISS's conventions everywhere (``knn.scores_from_distances`` turns them
into scores): L2 -> squared Euclidean distance, smaller is closer; IP -> inner product,
larger is closer. Missing neighbours (FAISS returns id -1 when the probed lists hold
fewer than k keys) come back with id -1 and are masked out downstream.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .util import UserError
from .datastore import Datastore
from .knn import METRICS

BRUTE_FORCE_CHUNK = 1 << 17   # keys per chunk of the exact search (bounds memory)


def brute_force_search(q: torch.Tensor, keys, k: int, metric: str,
                       chunk: int = BRUTE_FORCE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over all keys: chunked matmul + top-k, merged across chunks.

    q: (B, D) float32 on the compute device; keys: (N, D) array or memmap (any float
    dtype), or a tensor already on the device. Returns FAISS-style (D (B, k) float32,
    I (B, k) int64).
    """
    device = q.device
    q = q.float()
    qn = (q * q).sum(1, keepdim=True)
    best_s = torch.full((len(q), 0), float("-inf"), device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
    for s in range(0, len(keys), chunk):
        if isinstance(keys, torch.Tensor):
            kc = keys[s:s + chunk].float()
        else:
            kc = torch.from_numpy(np.asarray(keys[s:s + chunk], dtype=np.float32)).to(device)
        if metric == "l2":   # score = 2 q.k - ||k||^2 = ||q||^2 - ||q - k||^2, one GEMM
            sc = torch.addmm((kc * kc).sum(1).neg_()[None, :], q, kc.T, alpha=2)
        else:
            sc = q @ kc.T
        kk = min(k, sc.shape[1])
        top_s, top_i = sc.topk(kk, dim=1)
        best_s = torch.cat([best_s, top_s], 1)
        best_i = torch.cat([best_i, top_i + s], 1)
        if best_s.shape[1] > k:
            best_s, order = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, order)
    D = (qn - best_s).clamp_min(0) if metric == "l2" else best_s
    return D.cpu().numpy().astype(np.float32), best_i.cpu().numpy()


RECOMPUTE_CHUNK = 16   # queries per gather in exact_distances (keeps (C, k, D) in cache)


def key_table(keys) -> torch.Tensor:
    """A zero-copy torch view of stored keys (a read-only memmap too: it is only read)."""
    if isinstance(keys, torch.Tensor):
        return keys
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(keys))


def exact_distances(q: np.ndarray, keys, ids: np.ndarray, metric: str) -> np.ndarray:
    """FAISS-style distances of (B, D) queries to their (B, k) neighbours, recomputed in
    float32 from the stored keys (squared L2 as a sum of squared differences)."""
    table = key_table(keys)
    safe = torch.from_numpy(np.where(ids >= 0, ids, 0).astype(np.int64))
    qq = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))[:, None, :]
    out = np.empty(ids.shape, dtype=np.float32)
    for s in range(0, len(ids), RECOMPUTE_CHUNK):
        e = min(len(ids), s + RECOMPUTE_CHUNK)
        nk = table.index_select(0, safe[s:e].reshape(-1)).view(e - s, ids.shape[1], -1).float()
        if metric == "l2":
            d = nk.sub_(qq[s:e]).square_().sum(-1)
        else:
            d = nk.mul_(qq[s:e]).sum(-1)
        out[s:e] = d.numpy()
    return np.where(ids >= 0, out, np.inf if metric == "l2" else -np.inf).astype(np.float32)


class Retriever:
    """Finds the k nearest datastore entries of a batch of queries."""

    def __init__(self, ds: Datastore, keytype: str, k: int, metric: str = "l2", index=None,
                 exact_search: bool = False, load_keys: bool = True,
                 device: torch.device | None = None):
        if metric not in METRICS:
            raise UserError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if k > ds.size:
            raise UserError(f"--k {k} exceeds the datastore size {ds.size:,}")
        if index is None and not exact_search:
            raise UserError("an index is needed unless --exact-search is given")
        self.ds, self.k, self.metric, self.index = ds, k, metric, index
        self.exact_search = exact_search
        self.keys = ds.keys(keytype) if (load_keys or exact_search) else None
        self.vals = ds.vals
        self.device = device or torch.device("cpu")
        self._device_keys = None   # keys kept on the GPU for brute-force search

    def _search_keys(self):
        """The keys brute force scans: on a GPU, one fp16 copy made once (if it fits)."""
        if self.device.type != "cuda":
            return self.keys
        if self._device_keys is None:
            need = self.keys.shape[0] * self.keys.shape[1] * 2
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.8 * free:
                return self.keys   # stream the chunks from host memory instead
            host = np.array(self.keys, dtype=np.float16)  # a writable copy for torch
            self._device_keys = torch.from_numpy(host).to(self.device)
        return self._device_keys

    def search(self, q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 queries -> (D (B, k), I (B, k)), FAISS conventions."""
        k = k or self.k
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.exact_search:
            return brute_force_search(torch.from_numpy(q).to(self.device), self._search_keys(),
                                      k, self.metric)
        D, I = self.index.search(q, k)
        return D, I

    def values(self, ids: np.ndarray) -> np.ndarray:
        """(B, k) neighbour values; -1 where the neighbour is missing."""
        return np.where(ids >= 0, np.asarray(self.vals[np.where(ids >= 0, ids, 0)]), -1)

    def recompute(self, q: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
        if self.keys is None:
            raise UserError("exact distances need the stored keys (drop --no-load-keys)")
        return exact_distances(q, self.keys, ids, metric)
