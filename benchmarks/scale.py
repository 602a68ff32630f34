"""Scale run: synthetic datastores of N = 100k, 1M and 10M fp16 keys (256 dims, clustered,
not i.i.d. noise) are written, indexed (IVF + PQ, chunked adds) and searched, each stage in
its own process with its peak RSS; unsharded vs sharded index build at 1M; and a
projection of disk, RAM, build and search cost for WikiText-103 (103M x 1024) and a
1B-key datastore (4096 dims) from the measured per-key costs (JSON output).

    python benchmarks/scale.py --work /tmp/knnlm_scale --out benchmarks/results/scale.json
    python benchmarks/scale.py --sizes 100000,1000000 ...     # without the 10M run

Synthetic keys: 4096 cluster centres with Zipf-distributed sizes; a key is its centre
plus Gaussian noise (a fifth of the centres' spread), so IVF lists are uneven as with
real LM states. 10M x 256 fp16 keys are 4.9 GiB on disk; no stage holds them in RAM.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish_stage, machine, run_stage, write_result  # noqa: E402

DIM = 256
CENTRES = 4096
CHUNK = 1 << 20
VOCAB = 32768
N_QUERIES = 1000
K = 1024


def factory_for(n: int) -> str:
    nlist = 256 if n <= 200_000 else 1024
    return f"IVF{nlist},PQ32"


def stage_synth(a) -> dict:
    """Write the datastore in 1M-row chunks (seeded)."""
    from knnlm.knn.datastore import DSTORE_FORMAT, DSTORE_VERSION, DatastoreWriter
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    p = 1.0 / np.arange(1, CENTRES + 1) ** 0.8
    p /= p.sum()
    meta = dict(format=DSTORE_FORMAT, version=DSTORE_VERSION, size=a.n, dim=DIM, keytypes=["att"],
                key_dtype="float16", val_dtype="int32", pos_dtype="int32", split="train",
                data_dir="synthetic", blocking=dict(tokens_per_sample=0, context_window=0),
                model_fingerprint="synthetic", tokenizer_sha256="synthetic", vocab_size=VOCAB,
                rows_written=0, complete=False)
    t0 = time.perf_counter()
    w = DatastoreWriter(a.dstore, meta)
    for s in range(0, a.n, CHUNK):
        m = min(CHUNK, a.n - s)
        c = rng.choice(CENTRES, m, p=p)
        keys = centres[c] + 0.2 * rng.standard_normal((m, DIM), dtype=np.float32)
        w.write(s, {"att": keys.astype(np.float16)}, (c * 7919 % VOCAB).astype(np.int32),
                np.arange(s, s + m, dtype=np.int32))
        w.commit(s + m)
    return dict(seconds=time.perf_counter() - t0, rows=a.n)


def stage_index(a) -> dict:
    from knnlm.knn import index
    meta = index.build_index(index.BuildIndexConfig(
        dstore_dir=a.dstore, knn_keytype="att", index_factory=factory_for(a.n),
        train_size=min(a.n, 200_000), faiss_index=a.index, shards=a.shards, workers=a.workers,
        num_keys_to_add_at_a_time=CHUNK, quiet=True))
    return dict(seconds=meta.get("train_s", 0) + meta.get("add_s", 0) + meta.get("merge_s", 0),
                train_s=meta.get("train_s"), add_s=meta.get("add_s"), merge_s=meta.get("merge_s"),
                index_bytes=Path(a.index).stat().st_size, factory=meta["factory"])


def stage_search(a) -> dict:
    from knnlm.knn.datastore import Datastore
    from knnlm.knn.index_read import load_index
    ds = Datastore(a.dstore)
    idx, _ = load_index(a.index, ds, "att", nprobe=a.nprobe)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(ds.size, N_QUERIES, replace=False))
    xq = np.asarray(ds.keys("att")[rows], dtype=np.float32)
    xq += 0.1 * rng.standard_normal(xq.shape, dtype=np.float32)
    t0 = time.perf_counter()
    for s in range(0, N_QUERIES, 256):
        D, I = idx.search(xq[s:s + 256], K)
    sec = time.perf_counter() - t0
    return dict(ms_per_query=1000 * sec / N_QUERIES, nprobe=a.nprobe, k=K)


STAGES = dict(synth=stage_synth, index=stage_index, search=stage_search)


def project(per_key: dict, n: int, d: int, nlist: int, m: int, gflops: float) -> dict:
    """Linear projection from the measured per-key costs at 256 dims: `knnlm plan`'s model
    (:func:`knnlm.knn.plan.plan`) fed with this run's costs."""
    from knnlm.knn.plan import MEASURED, PlanConfig, plan
    costs = dict(MEASURED, dim=DIM, m=32, **{k: per_key[k] for k in (
        "add_s_per_key", "nlist", "search_ms_fixed", "search_ms_per_probed_code") if k in per_key})
    cfg = PlanConfig(dstore_size=n, dimension=d, probe=32)
    return plan(n, d, f"IVF{nlist},PQ{m}", cfg, costs, gflops)


def projections(per_key: dict) -> dict:
    from knnlm.knn.plan import gemm_gflops
    g = gemm_gflops()
    return dict(gemm_gflops=g,
                wikitext103=project(per_key, 103_225_485, 1024, 4096, 64, g),
                one_billion_4096d=project(per_key, 1_000_000_000, 4096, 65536, 64, g))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=list(STAGES))
    p.add_argument("--work", default="/tmp/knnlm_scale")
    p.add_argument("--out", default="benchmarks/results/scale.json")
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--n", type=int)
    p.add_argument("--dstore")
    p.add_argument("--index")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--project-only", action="store_true",
                   help="recompute the projection of an existing --out JSON")
    a = p.parse_args()
    if a.stage:
        finish_stage(STAGES[a.stage](a))
        return
    if a.project_only:
        import json
        out = json.loads(Path(a.out).read_text())
        out["projection"] = projections(out["per_key"])
        write_result(a.out, out, hide=("machine", "runs"))
        return
    work = Path(a.work)
    runs = {}
    for n in [int(x) for x in a.sizes.split(",")]:
        d = work / f"n{n}"
        shutil.rmtree(d, ignore_errors=True)
        common = ["--n", str(n), "--dstore", str(d / "ds"), "--index", str(d / "index.faiss")]
        r = dict(synth=run_stage(__file__, "synth", common))
        r["index"] = run_stage(__file__, "index", common)
        r["search"] = run_stage(__file__, "search", common)
        if n == 1_000_000:
            sharded = common[:-1] + [str(d / "sharded.faiss"), "--shards", "4", "--workers", "2"]
            r["index_sharded_4x2"] = run_stage(__file__, "index", sharded)
            r["sharded_over_unsharded_time"] = r["index_sharded_4x2"]["seconds"] / r["index"]["seconds"]
        r["disk_bytes"] = sum(f.stat().st_size for f in (d / "ds").glob("*.npy"))
        runs[n] = r
        print(f"N={n:,}: " + ", ".join(f"{k} {v['seconds'] if 'seconds' in v else v.get('ms_per_query'):.2f}"
                                       f" ({v['peak_rss_mib']:.0f} MiB)" for k, v in r.items()
                                       if isinstance(v, dict)))
        shutil.rmtree(d, ignore_errors=True)
    big = max(runs)
    rb = runs[big]
    codes = {n: 32 * n / int(r["index"]["factory"][3:].split(",")[0]) for n, r in runs.items()}
    ms = {n: r["search"]["ms_per_query"] for n, r in runs.items()}
    if len(runs) > 1:   # ms = fixed + per_code * probed codes, through the two largest runs
        n1, n2 = sorted(runs)[-2:]
        per_code = (ms[n2] - ms[n1]) / (codes[n2] - codes[n1])
        fixed = max(0.0, ms[n2] - per_code * codes[n2])
    else:
        per_code, fixed = ms[big] / codes[big], 0.0
    per_key = dict(add_s_per_key=rb["index"]["add_s"] / big,
                   nlist=int(rb["index"]["factory"][3:].split(",")[0]),
                   search_ms_per_probed_code=per_code, search_ms_fixed=fixed,
                   disk_bytes_per_key=rb["disk_bytes"] / big,
                   index_bytes_per_key=rb["index"]["index_bytes"] / big)
    out = dict(benchmark="scale", dim=DIM, runs={str(n): r for n, r in runs.items()},
               per_key_at=big, per_key=per_key,
               projection=projections(per_key),
               machine=machine())
    write_result(a.out, out, hide=("machine",))


if __name__ == "__main__":
    main()
