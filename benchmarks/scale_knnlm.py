"""kNN-LM evaluation and sweep throughput against datastore size (N = 100k, 1M, 10M keys),
with a trained model's real queries (JSON output).

For each N a datastore of the model's ``att`` keys is made from a real one (``--dstore``,
e.g. the small-mode run's 1.74M keys):

- N <= the real size: a seeded random subset (``knnlm.analysis.subsample``, the
  datastore-size analysis's own subsets);
- N > the real size: the real rows repeated until N, every repeat after the first with
  Gaussian noise of ``--noise`` x each dimension's standard deviation added to its keys
  (values and positions copied). Its sidecar records how it was made.

Then, each in its own process (peak RSS per stage): ``build-index`` (the same factory for
every N, so the cost of probing more codes shows), ``eval-lm`` of the first ``--tokens``
tokens of a split as LM only (the baseline, same run) and as kNN-LM with FAISS scores
(writing a retrieval cache), with exact L2 recomputed from the stored keys and with exact
(brute-force) search over all keys (on ``--exact-tokens`` tokens), and
``knnlm sweep`` of the cache over a 100-λ x 30-T grid.

    python benchmarks/scale_knnlm.py --data runs/small/data-bin \\
        --path runs/small/checkpoints/checkpoint_best.pt --dstore runs/small/dstore \\
        --out benchmarks/results/scale_knnlm.json
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish_stage, machine, run_stage, write_result  # noqa: E402

CHUNK = 1 << 20
SEED = 1


def tiled_meta(parent, n: int, noise: float) -> dict:
    meta = {k: v for k, v in parent.meta.items() if k not in ("rows_written", "complete")}
    meta.update(size=n, keytypes=["att"], rows_written=0, complete=False,
                synthetic=dict(parent_fingerprint=parent.fingerprint,
                               parent=str(parent.path.resolve()), repeats=n / parent.size,
                               noise_std_fraction=noise, seed=SEED))
    return meta


def write_tiled(parent, out: Path, n: int, noise: float) -> None:
    """Rows i = parent row i mod P; repeats after the first get seeded Gaussian noise."""
    from knnlm.knn.datastore import DatastoreWriter
    keys, size = parent.keys("att"), parent.size
    rng = np.random.default_rng(SEED)
    sample = np.sort(rng.choice(size, min(size, 100_000), replace=False))
    std = np.asarray(keys[sample], dtype=np.float32).std(axis=0)
    w = DatastoreWriter(out, tiled_meta(parent, n, noise))
    for s in range(0, n, CHUNK):
        idx = np.arange(s, min(n, s + CHUNK))
        rows = idx % size
        k = np.asarray(keys[rows], dtype=np.float32)
        jitter = idx >= size
        k[jitter] += noise * std * rng.standard_normal((int(jitter.sum()), k.shape[1]),
                                                       dtype=np.float32)
        w.write(s, {"att": k.astype(keys.dtype)}, parent.vals[rows], parent.pos[rows])
        w.commit(s + len(idx))


def stage_dstore(a) -> dict:
    from knnlm.analysis.subsample import write_subset
    from knnlm.knn.datastore import Datastore
    parent = Datastore(a.dstore)
    t0 = time.perf_counter()
    if a.n <= parent.size:
        ds = write_subset(parent, a.work_dstore, "att", a.n / parent.size, SEED)
        how = "subset"
    else:
        write_tiled(parent, Path(a.work_dstore), a.n, a.noise)
        ds, how = Datastore(a.work_dstore), "repeated with noise"
    return dict(seconds=time.perf_counter() - t0, rows=ds.size, dim=ds.dim, made_by=how,
                parent_rows=parent.size)


def stage_index(a) -> dict:
    from knnlm.knn import index
    meta = index.build_index(index.BuildIndexConfig(
        dstore_dir=a.work_dstore, knn_keytype="att", index_factory=a.factory,
        train_size=min(a.n, a.train_size), probe=a.probe, quiet=True))
    return dict(seconds=meta["train_s"] + meta["add_s"], train_s=meta["train_s"],
                add_s=meta["add_s"], factory=meta["factory"])


def _eval(a, tokens=None, **kw) -> dict:
    from knnlm import evaluate
    cfg = evaluate.EvalConfig(data=a.data, path=a.path, gen_subset=a.subset,
                              tokens_per_sample=a.tps, context_window=a.ctx,
                              max_eval_tokens=tokens or a.tokens, quiet=True, cpu=True, **kw)
    t0 = time.perf_counter()
    res = evaluate.main(cfg)
    sec = time.perf_counter() - t0
    out = dict(seconds=sec, tokens=res["tokens"], tokens_per_s=res["tokens"] / sec,
               lm_ppl=res["ppl"])
    if "interpolated" in res:
        out["knnlm_ppl"] = res["interpolated"]["ppl"]
    return out


def _knn(a) -> dict:
    return dict(knnlm=True, dstore_filename=a.work_dstore, k=a.k, probe=a.probe, lmbda=0.25,
                knn_temp=1.0)


def stage_lm(a) -> dict:
    return _eval(a)


def stage_faiss(a) -> dict:
    return _eval(a, knn_sim_func="do_not_recomp_l2", save_retrieval=a.cache, **_knn(a))


def stage_exact_dists(a) -> dict:
    return _eval(a, knn_sim_func=None, **_knn(a))


def stage_exact_search(a) -> dict:
    return _eval(a, tokens=a.exact_tokens, exact_search=True, **_knn(a))


def stage_sweep(a) -> dict:
    from knnlm.knn import sweep
    t0 = time.perf_counter()
    sweep.main(sweep.SweepConfig(cache=a.cache, lmbda="0:0.99:0.01", knn_temp="0.5:15:0.5",
                                 out=str(Path(a.cache) / "sweep"), quiet=True))
    sec = time.perf_counter() - t0
    return dict(seconds=sec, tokens=a.tokens, grid_points=100 * 30,
                token_grid_points_per_s=a.tokens * 3000 / sec)


STAGES = dict(dstore=stage_dstore, index=stage_index, lm=stage_lm, faiss=stage_faiss,
              exact_dists=stage_exact_dists, exact_search=stage_exact_search, sweep=stage_sweep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/small/data-bin")
    ap.add_argument("--path", default="runs/small/checkpoints/checkpoint_best.pt")
    ap.add_argument("--dstore", default="runs/small/dstore", help="the real datastore")
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--subset", default="valid")
    ap.add_argument("--tokens", type=int, default=10_000, help="tokens scored per eval")
    ap.add_argument("--exact-tokens", type=int, default=2000,
                    help="tokens scored by the brute-force (exact search) eval")
    ap.add_argument("--tps", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=8)
    ap.add_argument("--factory", default="IVF2048,PQ32")
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--work", default="/tmp/knnlm_scale_knnlm")
    ap.add_argument("--out", default="benchmarks/results/scale_knnlm.json")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work-dstore", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        finish_stage(STAGES[a.stage](a))
        return
    keep = ("data", "path", "dstore", "subset", "tokens", "exact_tokens", "tps", "ctx", "k",
            "probe", "factory", "train_size", "noise")
    argv = [x for k in keep for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    lm = run_stage(__file__, "lm", argv)
    runs = {}
    for n in [int(x) for x in a.sizes.split(",")]:
        d = work / f"n{n}"
        sargv = argv + ["--n", str(n), "--work-dstore", str(d / "dstore"),
                        "--cache", str(d / "cache")]
        r = {name: run_stage(__file__, name, sargv)
             for name in ("dstore", "index", "faiss", "exact_dists", "exact_search", "sweep")}
        for mode in ("faiss", "exact_dists"):
            r[mode]["time_over_lm_only"] = r[mode]["seconds"] / lm["seconds"]
        runs[str(n)] = r
        print(f"N={n:,}: index {r['index']['seconds']:.0f} s, kNN-LM eval "
              f"{r['faiss']['tokens_per_s']:.0f} tok/s (FAISS scores), "
              f"{r['exact_dists']['tokens_per_s']:.0f} tok/s (exact L2), "
              f"{r['exact_search']['tokens_per_s']:.0f} tok/s (exact search), sweep "
              f"{r['sweep']['seconds']:.1f} s; LM only {lm['tokens_per_s']:.0f} tok/s",
              flush=True)
        shutil.rmtree(d, ignore_errors=True)
    out = dict(benchmark="scale_knnlm", config={k: getattr(a, k) for k in keep},
               lm_only=lm, runs=runs, machine=machine())
    write_result(a.out, out)


if __name__ == "__main__":
    main()
