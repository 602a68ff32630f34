"""Exact nearest-neighbour search (the paper's "real mask"): every key scored, no index.

- :func:`brute_force_search`: one batch of queries against all keys (generate, neighbors).
- :func:`stream_search`: every query of a split against all keys in ONE pass over the
  keys — key chunks outer, query blocks inner, a running top-k per query — so a datastore
  of 10^8 keys (211 GB for WikiText-103) is read once per split, not once per batch.
  Resumable per key chunk (the running top-k is saved with the number of keys done); a
  ``key_range`` lets torchrun ranks take contiguous shares of the keys, whose top-k lists
  :func:`merge_topk` joins (`torchrun ... knnlm eval-lm --exact-search`).

Scores are "higher is nearer" (2 q·k − ||k||² for L2, q·k for IP); results come back in
FAISS's conventions (squared L2 distances or inner products; id -1 where a query has
fewer than k keys).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io import save_atomic
from ..util import UserError
from .datastore import finite_rows

BRUTE_FORCE_CHUNK = 1 << 17   # keys per chunk of the exact search (bounds memory)
# stream_search's default blocks: (query block x key chunk) float32 scores at once
STREAM_BLOCKS = dict(cpu=(512, 1 << 18), cuda=(8192, 1 << 18))


def chunk_scores(q: torch.Tensor, kc: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, n) scores, higher = nearer: 2 q·k − ||k||² (= ||q||² − ||q − k||²) or q·k."""
    if metric == "l2":
        return torch.addmm((kc * kc).sum(1).neg_()[None, :], q, kc.T, alpha=2)
    return q @ kc.T


def merge_into(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k (by score) of a running top-k and new candidates."""
    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    if s.shape[1] <= k:
        return s, i
    top, order = s.topk(k, dim=1)
    return top, i.gather(1, order)


def finish(q: torch.Tensor, best_s: torch.Tensor, best_i: torch.Tensor, metric: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest first, as FAISS-style numpy (D, I)."""
    best_s, order = best_s.sort(dim=1, descending=True)
    best_i = best_i.gather(1, order)
    D = ((q * q).sum(1, keepdim=True) - best_s).clamp_min(0) if metric == "l2" else best_s
    return D.cpu().numpy().astype(np.float32), best_i.cpu().numpy()


def brute_force_search(q: torch.Tensor, keys, k: int, metric: str,
                       chunk: int = BRUTE_FORCE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over all keys: chunked matmul + top-k, merged across chunks.

    q: (B, D) float32 on the compute device; keys: (N, D) array or memmap (any float
    dtype), or a tensor already on the device. Returns FAISS-style (D (B, k) float32,
    I (B, k) int64).
    """
    device = q.device
    q = q.float()
    best_s = torch.full((len(q), 0), float("-inf"), device=device)
    best_i = torch.zeros((len(q), 0), dtype=torch.long, device=device)
    for s in range(0, len(keys), chunk):
        kc = _key_chunk(keys, s, s + chunk, device)
        sc = chunk_scores(q, kc, metric)
        top_s, top_i = sc.topk(min(k, sc.shape[1]), dim=1)
        best_s, best_i = merge_into(best_s, best_i, top_s, top_i + s, k)
    return finish(q, best_s, best_i, metric)


def _key_chunk(keys, start: int, end: int, device) -> torch.Tensor:
    if isinstance(keys, torch.Tensor):
        return keys[start:end].to(device).float()
    chunk = finite_rows(keys[start:end], start)
    if not chunk.flags.writeable:
        chunk = np.array(chunk)      # fp32 keys on a read-only memmap: torch wants writable
    return torch.from_numpy(chunk).to(device)


def queries_fingerprint(queries) -> str:
    """A short identity of a query matrix: its shape and a sample of its rows."""
    h = hashlib.sha256(str(tuple(queries.shape)).encode())
    n = len(queries)
    for r in sorted({0, n // 3, n // 2, n - 1} - {-1}):
        if 0 <= r < n:
            h.update(np.ascontiguousarray(queries[r], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def stream_search(queries, keys, k: int, metric: str, *, device=None,
                  key_range: tuple[int, int] | None = None, state_dir: str | Path | None = None,
                  identity: dict | None = None, query_block: int | None = None,
                  key_chunk: int | None = None, save_interval_s: float = 300.0,
                  quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """FAISS-style (D (Q, k), I (Q, k)) of every query against keys ``key_range`` (default:
    all), reading each key once. With ``state_dir`` the running top-k is saved at most
    every ``save_interval_s`` seconds and after the last chunk, and a rerun with the same
    ``identity`` resumes after the last saved chunk."""
    device = torch.device(device or "cpu")
    lo, hi = key_range or (0, len(keys))
    qb, kcn = STREAM_BLOCKS["cuda" if device.type == "cuda" else "cpu"]
    query_block, key_chunk = query_block or qb, key_chunk or kcn
    Q = len(queries)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device)
    ident = dict(identity or {}, k=k, metric=metric, key_range=[lo, hi], key_chunk=key_chunk,
                 queries=queries_fingerprint(queries))
    best_s = torch.full((Q, 0), float("-inf"), device=device)
    best_i = torch.zeros((Q, 0), dtype=torch.long, device=device)
    done = lo
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        best_s, best_i, done = _resume(state_dir, ident, best_s, best_i, lo, device)
    bar = tqdm(total=hi - lo, initial=done - lo, unit="key", desc="exact search",
               disable=True if quiet else None)
    last_save = time.perf_counter()
    for s in range(done, hi, key_chunk):
        e = min(hi, s + key_chunk)
        kc = _key_chunk(keys, s, e, device)
        new_s, new_i = [], []
        for b in range(0, Q, query_block):
            sc = chunk_scores(q_all[b:b + query_block], kc, metric)
            top_s, top_i = sc.topk(min(k, e - s), dim=1)
            m_s, m_i = merge_into(best_s[b:b + query_block], best_i[b:b + query_block],
                                  top_s, top_i + s, k)
            new_s.append(m_s)
            new_i.append(m_i)
        best_s, best_i = torch.cat(new_s), torch.cat(new_i)
        bar.update(e - s)
        if state_dir is not None and (e == hi or time.perf_counter() - last_save >= save_interval_s):
            _save(state_dir, ident, best_s, best_i, e)
            last_save = time.perf_counter()
    bar.close()
    return _pad(*finish(q_all, best_s, best_i, metric), k, metric)


def _pad(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Fewer than k keys: FAISS's padding (id -1, the worst distance)."""
    if D.shape[1] >= k:
        return D, I
    worst = np.inf if metric == "l2" else -np.inf
    pad = k - D.shape[1]
    return (np.concatenate([D, np.full((len(D), pad), worst, np.float32)], 1),
            np.concatenate([I, np.full((len(I), pad), -1, np.int64)], 1))


STATE_FILE = "state.npz"   # the running top-k and how many keys it covers, in one file


def _save(state_dir: Path, ident: dict, best_s: torch.Tensor, best_i: torch.Tensor, done: int):
    """The commit point of the pass: the running top-k, the keys it covers and what it is
    for, in one file made visible by one rename (a kill leaves the previous state whole)."""
    save_atomic(lambda fh: np.savez(
        fh, scores=best_s.cpu().numpy(), ids=best_i.cpu().numpy(), keys_done=np.int64(done),
        identity=np.array(json.dumps(ident, sort_keys=True))), state_dir / STATE_FILE)


def _resume(state_dir: Path, ident: dict, best_s, best_i, lo: int, device):
    path = state_dir / STATE_FILE
    if not path.is_file():
        return best_s, best_i, lo
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = json.loads(str(z["identity"]))
            s, i, done = z["scores"], z["ids"], int(z["keys_done"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot resume the exact search from {path} ({exc}); remove it")
    if saved != json.loads(json.dumps(ident, sort_keys=True)):
        print(f"{state_dir}: saved exact-search state is for other queries or keys; "
              "starting over")
        return best_s, best_i, lo
    print(f"resuming the exact search at key {done:,}")
    return torch.from_numpy(s).to(device), torch.from_numpy(i).to(device), done


def merge_topk(parts: list[tuple], k: int, metric: str) -> tuple:
    """One FAISS-style top-k from several (D, I) over disjoint keys (shards, ranks); ties
    keep the parts' order. numpy arrays give numpy arrays; tensors are merged on the
    first part's device and stay there."""
    if len(parts) == 1 and parts[0][0].shape[1] <= k:
        return parts[0]                      # one search's list: already in order
    tensors = [(torch.as_tensor(d), torch.as_tensor(i)) for d, i in parts]
    dev = tensors[0][0].device
    D = torch.cat([d.to(dev) for d, _ in tensors], 1)
    I = torch.cat([i.to(dev) for _, i in tensors], 1)
    order = torch.sort(D, dim=1, descending=metric != "l2", stable=True).indices[:, :k]
    D, I = D.gather(1, order), I.gather(1, order)
    return (D.numpy(), I.numpy()) if isinstance(parts[0][0], np.ndarray) else (D, I)
