"""The search and training paths that run without faiss-gpu, against their FAISS baselines
measured in the same run (JSON output; ratios, since the machine is shared):

- search: the torch backend over a FAISS IVF-PQ index vs faiss-cpu's own search of it
  (same queries, k, nprobe): ms/query, time ratio, neighbour overlap, distance agreement;
  and the other scan schedule's time (the CPU's per-list GEMMs, the GPU's grouped ones);
- training: torch k-means (coarse + PQ) vs FAISS's training of the same factory on the
  same sample: seconds, and recall@10 of the built indexes on held-out queries;
- exact search: one streaming pass over the keys for all queries vs brute force batch by
  batch (what eval-lm did before: the keys read once per batch): keys/s, bytes read.

    python benchmarks/torch_backend.py --index runs/demo/dstore/index_att_l2.faiss \\
        --keys runs/demo/dstore/keys_att.npy --out benchmarks/results/torch_backend.json
    python benchmarks/torch_backend.py --device cuda ...      # the same on a GPU

Without --index/--keys a synthetic clustered datastore (200k x 128) is built first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2048, d)).astype(np.float32) * 3
    sizes = rng.zipf(1.5, 2048).astype(np.float64)
    which = rng.choice(2048, n, p=sizes / sizes.sum())
    return (centres[which] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float16)


def queries_from(keys: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """Held-out-like queries: stored keys moved by a little noise."""
    rng = np.random.default_rng(seed)
    q = np.asarray(keys[np.sort(rng.choice(len(keys), n, replace=False))], dtype=np.float32)
    return q + 0.1 * q.std() * rng.standard_normal(q.shape).astype(np.float32)


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def bench_search(index, xq: np.ndarray, k: int, nprobe: int, device: str) -> dict:
    import faiss
    from knnlm.knn.torch_index import SCANS, TorchIndex
    faiss.extract_index_ivf(index).nprobe = nprobe
    ti, load_s = timed(lambda: TorchIndex.from_faiss(index, device))
    ti.nprobe = nprobe
    default = ti.scan
    ti.search(xq[:256], k)                                   # warm-up
    (Df, If), faiss_s = timed(lambda: index.search(xq, k))
    (Dt, It), torch_s = timed(lambda: ti.search(xq, k))
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(If, It)]))
    out = dict(queries=len(xq), k=k, nprobe=nprobe, device=device, load_s=load_s, scan=default,
               faiss_ms_per_query=1e3 * faiss_s / len(xq), torch_ms_per_query=1e3 * torch_s / len(xq),
               torch_over_faiss=torch_s / faiss_s, neighbour_overlap=overlap,
               max_abs_distance_diff=float(np.abs(Df - Dt).max()))
    for scan in SCANS:                       # the other schedule, on the same queries
        if scan != default:
            ti.scan = scan
            ti.search(xq[:256], k)
            _, sec = timed(lambda: ti.search(xq, k))
            out[f"{scan}_scan_ms_per_query"] = 1e3 * sec / len(xq)
            out[f"{scan}_scan_over_faiss"] = sec / faiss_s
    return out


def bench_training(keys: np.ndarray, factory: str, train_size: int, device: str) -> dict:
    import faiss
    from knnlm.knn.index import train_index
    from knnlm.knn.kmeans import train_ivf
    rng = np.random.default_rng(2)
    rows = np.sort(rng.choice(len(keys), min(len(keys), train_size), replace=False))
    xt = np.asarray(keys[rows], dtype=np.float32)
    base = np.asarray(keys[:200_000], dtype=np.float32)
    xq = queries_from(keys[:200_000], 2000, seed=3)
    flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(base)
    truth = flat.search(xq, 10)[1]
    out = dict(factory=factory, train_size=len(xt), device=device)
    for how in ("faiss", "torch"):
        index = faiss.index_factory(base.shape[1], factory)
        _, sec = timed(lambda: train_index(index, xt, False) if how == "faiss"
                       else train_ivf(index, xt, device, seed=1))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        out[f"{how}_coarse_mse"], out[f"{how}_pq_mse"] = quantization_errors(ivf, xq)
        index.add(base)
        ivf.nprobe = 8
        I = index.search(xq, 10)[1]
        out[f"{how}_train_s"] = sec
        out[f"{how}_recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10
                                                    for a, b in zip(I, truth)]))
    out["torch_over_faiss_time"] = out["torch_train_s"] / out["faiss_train_s"]
    return out


def quantization_errors(ivf, x: np.ndarray) -> tuple[float, float]:
    """Held-out mean squared distance to the assigned coarse centroid, and of the PQ
    reconstruction of the residual (the k-means objectives, less noisy than recall)."""
    c = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    r = x - c[ivf.quantizer.search(x, 1)[1][:, 0]]
    rec = ivf.pq.decode(ivf.pq.compute_codes(r))
    return float((r ** 2).sum(1).mean()), float(((r - rec) ** 2).sum(1).mean())


def bench_exact(keys: np.ndarray, n_queries: int, k: int, batch: int, device: str) -> dict:
    from knnlm.knn.exact import brute_force_search, stream_search
    xq = queries_from(keys, n_queries, seed=4)
    (Ds, Is), stream_s = timed(lambda: stream_search(xq, keys, k, "l2", device=device))
    dev = torch.device(device)

    def per_batch():
        for s in range(0, len(xq), batch):
            brute_force_search(torch.from_numpy(xq[s:s + batch]).to(dev), keys, k, "l2")
    _, batch_s = timed(per_batch)
    n, passes = len(keys), -(-n_queries // batch)
    key_bytes = keys.dtype.itemsize * keys.shape[1]
    return dict(keys=n, dim=keys.shape[1], queries=n_queries, k=k, device=device,
                stream_s=stream_s, stream_keys_per_s=n / stream_s,
                stream_key_gib_read=n * key_bytes / 2 ** 30,
                per_batch_s=batch_s, per_batch_queries=batch, per_batch_passes=passes,
                per_batch_key_gib_read=passes * n * key_bytes / 2 ** 30,
                per_batch_over_stream=batch_s / stream_s,
                query_key_pairs_per_s=n * n_queries / stream_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="a FAISS IVF-PQ index over --keys")
    ap.add_argument("--keys", help="the keys (.npy, fp16) the index holds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--train-factory", default="IVF1024,PQ32")
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--exact-keys", type=int, default=500_000)
    ap.add_argument("--exact-queries", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/torch_backend.json")
    a = ap.parse_args()
    import faiss
    from knnlm.knn.index import train_index
    if a.keys:
        keys = np.load(a.keys, mmap_mode="r")
    else:
        keys = synthetic(200_000, 128)
    if a.index:
        index = faiss.read_index(a.index)
    else:
        index = faiss.index_factory(keys.shape[1], "IVF1024,PQ32")
        train_index(index, np.asarray(keys[:100_000], dtype=np.float32), False)
        index.add(np.asarray(keys, dtype=np.float32))
    out = dict(machine=machine(), torch_threads=torch.get_num_threads())
    out["search"] = bench_search(index, queries_from(keys, a.queries), a.k, a.nprobe, a.device)
    out["training"] = bench_training(keys, a.train_factory, a.train_size, a.device)
    out["exact"] = bench_exact(keys[:a.exact_keys], a.exact_queries, a.k, 1024, a.device)
    write_result(a.out, out)


if __name__ == "__main__":
    main()
