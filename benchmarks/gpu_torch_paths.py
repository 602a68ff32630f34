"""benchmarks/gpu_check.sh's last measurements (JSON on stdout): recall@10 of the
IVF256,PQ32 index that the torch k-means trained (build-index --train-backend torch)
against the one FAISS CPU trained, and the streaming exact search over N synthetic fp16
keys (256 dims) for Q queries, k 1024, on DEVICE.

    python benchmarks/gpu_torch_paths.py OUT_DIR DEVICE N Q > OUT_DIR/torch_paths.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recall_at_10(out: Path) -> dict:
    import faiss
    keys = np.load(out / "dstore_gpu" / "keys_att.npy").astype(np.float32)
    rng = np.random.default_rng(0)
    xq = keys[rng.choice(len(keys), 2000, replace=False)]
    xq = xq + 0.05 * rng.standard_normal(xq.shape).astype(np.float32)
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    truth = flat.search(xq, 10)[1]
    rec = {}
    for name, path in (("faiss_cpu", "index_shards1.faiss"), ("torch", "index_torch_train.faiss")):
        index = faiss.read_index(str(out / path))
        faiss.extract_index_ivf(index).nprobe = 16
        found = index.search(xq, 10)[1]
        rec[name] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
    return rec


def exact_stream(device: str, n: int, q: int) -> dict:
    from knnlm.knn.exact import stream_search
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(n, 256, generator=g, device=dev, dtype=torch.float16)
    queries = torch.randn(q, 256, generator=g, device=dev).cpu().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stream_search(queries, keys, 1024, "l2", device=dev)
    sec = time.perf_counter() - t0
    return dict(keys=n, queries=q, dim=256, k=1024, seconds=sec, keys_per_s=n / sec,
                query_keys_per_s=n * q / sec)


def main() -> None:
    out, device, n, q = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(dict(recall_at_10=recall_at_10(out), exact=exact_stream(device, n, q))))


if __name__ == "__main__":
    main()
