"""Sharded search across torchrun ranks against one process, at equal total threads:

- single: one process, 2 threads, the index merged from the shards (the same trained
  quantizer), every query searched in blocks of 4,096 (what eval-lm does on one index);
- ranks: 2 gloo ranks of 1 thread each, the index kept in 2 shards; each rank loads only its
  shard and searches every query (``ShardedIndex.search_every``, committing its progress
  as eval-lm does), writes its lists, and rank 0 merges them (``exact_neighbours``, eval-lm's
  pass 2 under torchrun).

Times exclude process start-up and index loading (reported apart). Both sides return
the same distances (checked; ids equal up to the order of tied distances). Queries: stored
keys moved by a little noise. At the demo's nprobe a query's fixed costs (lookup tables,
the k-best selection) outweigh its scan, and every rank pays them; a larger nprobe shows
the regime a datastore too large for one machine is in.

    python benchmarks/sharded_search.py --dstore runs/demo/dstore \\
        --out benchmarks/results/sharded_search.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, finish_stage, machine, run_stage, write_result  # noqa: E402


def _load(args, part=(0, 1)):
    import faiss
    from knnlm.knn.datastore import Datastore
    from knnlm.knn.index_read import ShardedIndex, load_index
    ds = Datastore(args.dstore)
    t0 = time.perf_counter()
    idx, _ = load_index(args.index, ds, "att", nprobe=args.probe, part=part)
    if not isinstance(idx, ShardedIndex):
        idx = ShardedIndex([(idx, 0)], "l2")
    return idx, time.perf_counter() - t0, faiss


def stage_single(args) -> None:
    idx, load_s, faiss = _load(args)
    faiss.omp_set_num_threads(args.threads)
    q = np.load(Path(args.work) / "queries.npy")[:args.count or None]
    idx.search_every(q[:256], args.k)                       # warm
    t0 = time.perf_counter()
    D, I = idx.search_every(q, args.k, block=args.batch)
    sec = time.perf_counter() - t0
    np.save(Path(args.work) / "single_D.npy", D)
    np.save(Path(args.work) / "single_I.npy", I)
    finish_stage(dict(seconds=sec, load_s=load_s, threads=args.threads))


def stage_ranks(args) -> None:
    from knnlm.distributed import setup_distributed
    from knnlm.evaluate import exact_neighbours
    dist = setup_distributed(cpu=True)
    r, w = dist.rank, dist.world_size
    idx, load_s, faiss = _load(args, part=(r, w))
    faiss.omp_set_num_threads(1)
    q = np.load(Path(args.work) / "queries.npy", mmap_mode="r")
    work = Path(args.work) / f"probe{args.probe}_rep{args.rep}"
    timing = {}

    def search_all(queries, state_dir, quiet, part):
        t0 = time.perf_counter()
        out = idx.search_every(queries, args.k, state_dir=state_dir, identity=dict(rep=args.rep))
        timing["search_s"] = time.perf_counter() - t0
        return out
    knn = SimpleNamespace(search_all=search_all, k_search=args.k,
                          mode=SimpleNamespace(search_metric="l2"))
    idx.search(np.ascontiguousarray(q[:256]), args.k)       # warm
    dist.wait("start")
    prof = None
    if args.profile and r == 0:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    out = exact_neighbours(knn, q, work, dist, quiet=True)
    sec = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    dist.close()
    if r == 0:
        np.save(Path(args.work) / "ranks_D.npy", out[0])
        np.save(Path(args.work) / "ranks_I.npy", out[1])
        finish_stage(dict(seconds=sec, search_s=timing["search_s"], load_s=load_s, ranks=w))


def stage_serve(args) -> None:
    """The commands' path (generate, neighbors, tune, eval-lm without a cache): rank 0
    searches batch by batch through a RankedIndex, rank 1 answers each batch."""
    from knnlm.distributed import setup_distributed
    from knnlm.knn.rank_search import RankedIndex, Service, STOP, serve
    dist = setup_distributed(cpu=True, collective_timeout=120)
    r, w = dist.rank, dist.world_size
    idx, load_s, faiss = _load(args, part=(r, w))
    faiss.omp_set_num_threads(1)
    q = np.load(Path(args.work) / "queries.npy")[:args.count or None]
    idx.search(np.ascontiguousarray(q[:256]), args.k)       # warm
    if r != 0:
        dist.wait("serve")
        serve(idx, dist)
        dist.close()
        return
    service = Service(dist)
    ranked = RankedIndex(idx, service)
    service.start()
    ranked.search(np.ascontiguousarray(q[:64]), args.k)     # warm the collectives
    t0 = time.perf_counter()
    D, I = ranked.search_every(q, args.k, block=args.batch)
    sec = time.perf_counter() - t0
    service.announce(STOP)
    dist.close()
    np.save(Path(args.work) / "ranks_D.npy", D)
    np.save(Path(args.work) / "ranks_I.npy", I)
    finish_stage(dict(seconds=sec, load_s=load_s, ranks=w))


def run_ranks(args, rep: int) -> dict:
    shutil.rmtree(Path(args.work) / f"probe{args.probe}_rep{rep}", ignore_errors=True)
    port = 29600 + (os.getpid() + rep) % 300
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), __file__, "--stage", args.path,
                        "--rep", str(rep), *stage_argv(args, args.kept)],
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        raise SystemExit(f"ranks failed:\n{p.stderr[-3000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def stage_argv(args, index: str) -> list[str]:
    return ["--dstore", args.dstore, "--index", index, "--work", args.work, "--k",
            str(args.k), "--probe", str(args.probe), "--threads", str(args.threads),
            "--batch", str(args.batch), "--count", str(args.count)] + \
        (["--profile", args.profile] if args.profile else [])


def build(args) -> None:
    from knnlm.knn import index
    from torch_backend import queries_from
    from knnlm.knn.datastore import Datastore
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ds = Datastore(args.dstore)
    for name, keep in (("merged", False), ("kept", True)):
        index.main(index.BuildIndexConfig(
            dstore_dir=args.dstore, faiss_index=str(work / f"{name}.faiss"), seed=1,
            index_factory=args.factory, train_size=args.train_size, shards=2,
            keep_shards=keep, quiet=True))
    np.save(work / "queries.npy", queries_from(ds.keys("att"), args.queries))
    args.merged, args.kept = str(work / "merged.faiss"), str(work / "kept.faiss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["single", "ranks", "serve"])
    ap.add_argument("--path", choices=["ranks", "serve"], default="ranks",
                    help="ranks: eval-lm's pass over a split (lists through files); serve: "
                    "the commands' batch-by-batch search (lists through collectives)")
    ap.add_argument("--batch", type=int, default=4096, help="queries searched at once")
    ap.add_argument("--count", type=int, default=0, help="queries searched (0: all)")
    ap.add_argument("--dstore", default="runs/demo/dstore")
    ap.add_argument("--index")
    ap.add_argument("--work", default="runs/demo/sharded_search")
    ap.add_argument("--factory", help="default: the datastore's index's (the demo's)")
    ap.add_argument("--train-size", type=int, help="default: the datastore's index's")
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--probes", default="8,128", help="nprobe values (the demo's is 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/sharded_search.json")
    ap.add_argument("--profile", help="ranks: rank 0's cProfile of its pass to this file")
    args = ap.parse_args()
    if args.stage == "single":
        return stage_single(args)
    if args.stage == "ranks":
        return stage_ranks(args)
    if args.stage == "serve":
        return stage_serve(args)
    side = Path(args.dstore) / "index_att_l2.faiss.json"
    meta = json.loads(side.read_text()) if side.is_file() else {}
    args.factory = args.factory or meta.get("factory", "IVF2048,PQ32")
    args.train_size = args.train_size or meta.get("train_size", 100_000)
    build(args)
    n = min(args.count or args.queries, args.queries)
    out = dict(machine=machine(), dstore=args.dstore, factory=args.factory,
               queries=n, k=args.k, path=args.path, batch=args.batch, by_nprobe={})
    for probe in [int(p) for p in args.probes.split(",")]:
        args.probe = probe
        single, ranks = [], []
        for rep in range(args.reps):         # interleaved: the machine's noise hits both
            single.append(run_stage(__file__, "single", stage_argv(args, args.merged)))
            ranks.append(run_ranks(args, rep))
        got = {name: [np.load(Path(args.work) / f"{name}_{x}.npy") for x in "DI"]
               for name in ("single", "ranks")}
        (Da, Ia), (Db, Ib) = got["single"], got["ranks"]
        s = statistics.median(x["seconds"] for x in single)
        t = statistics.median(x["seconds"] for x in ranks)
        out["by_nprobe"][probe] = dict(
            single=dict(threads=args.threads, seconds=s, ms_per_query=s / n * 1e3,
                        load_s=statistics.median(x["load_s"] for x in single)),
            ranks=dict(ranks=2, threads_each=1, seconds=t, ms_per_query=t / n * 1e3,
                       search_s=statistics.median(x.get("search_s", 0.0) for x in ranks),
                       load_s=statistics.median(x["load_s"] for x in ranks)),
            ratio=t / s,
            # 4-bit PQ distances tie a lot: the same distances, ids equal up to tied order
            same_distances=float(np.mean(np.isclose(Da, Db, rtol=1e-6))),
            same_ids_as_sets=float(np.mean([len(np.intersect1d(a, b)) / len(a)
                                            for a, b in zip(Ia, Ib)])),
            runs=dict(single=single, ranks=ranks))
    write_result(args.out, out, hide=("machine",))

if __name__ == "__main__":
    main()
