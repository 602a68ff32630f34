"""Exact nearest-neighbour search (the paper's "real mask"): every key scored, no index.

:func:`brute_force_search` scans all keys for one batch of queries: chunked GEMMs and a
running top-k. Distances follow FAISS's conventions (squared L2, inner products).
"""
from __future__ import annotations

import numpy as np
import torch

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
