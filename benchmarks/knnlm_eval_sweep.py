"""kNN-LM evaluation overhead and sweep speed (JSON output).

eval: ``eval-lm --knnlm`` (FAISS scores) on a split, against the two costs it cannot avoid,
measured in the same run on the same queries: the LM forward pass that produces the
queries and log-probs, and a raw FAISS search of those queries (same k, nprobe and
chunking). Ratio = total / (forward + search), target <= 1.10. Each stage runs in its own
process, which also gives its peak RSS.

sweep: ``knnlm sweep`` over a synthetic retrieval cache of N tokens x k neighbours with a
100-λ x 30-T grid (target: under a minute for 200k x 1024 on 2 cores); the cache is
written by a separate process, so the sweep's peak RSS is its own.

    python benchmarks/knnlm_eval_sweep.py --data runs/demo/data-bin \\
        --path runs/demo/checkpoints/checkpoint_best.pt --dstore runs/demo/dstore
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish_stage, machine, run_stage, write_result  # noqa: E402


def _eval_cfg(a, **kw):
    from knnlm import evaluate
    return evaluate.EvalConfig(data=a.data, path=a.path, gen_subset=a.subset,
                               tokens_per_sample=a.tps, context_window=a.ctx, quiet=True, cpu=True,
                               **kw)


def stage_knnlm(a) -> dict:
    from knnlm import evaluate
    cfg = _eval_cfg(a, knnlm=True, dstore_filename=a.dstore, k=a.k, probe=a.probe,
                    lmbda=0.25, knn_temp=1.0, knn_sim_func="do_not_recomp_l2")
    t0 = time.perf_counter()
    res = evaluate.main(cfg)
    return dict(seconds=time.perf_counter() - t0, tokens=res["tokens"], lm_ppl=res["ppl"],
                knnlm_ppl=res["interpolated"]["ppl"])


def stage_bare(a) -> dict:
    import faiss
    import torch
    from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
    from knnlm.data.preprocess import DataBin
    from knnlm.lm.scoring import iter_scored, make_windows
    from knnlm.knn.scorer import QUERY_CHUNK
    db = DataBin(a.data)
    tokens = db.split(a.subset)
    model = model_from_checkpoint(load_checkpoint(a.path))
    windows = make_windows(len(tokens), tokens, db.eos, a.tps, a.ctx, "none")
    index = faiss.read_index(str(Path(a.dstore) / "index_att_l2.faiss"))
    faiss.extract_index_ivf(index).nprobe = a.probe
    t0 = time.perf_counter()
    queries = [sb.hidden["att"].float().numpy() for sb in iter_scored(
        model, tokens, windows, eos=db.eos, pad=db.pad, max_tokens=8192, softmax_batch=4096,
        device=torch.device("cpu"), return_hidden=("att",))]
    forward_s = time.perf_counter() - t0
    q = np.concatenate(queries)
    t1 = time.perf_counter()
    for s in range(0, len(q), QUERY_CHUNK):
        index.search(q[s:s + QUERY_CHUNK], a.k)
    return dict(forward_seconds=forward_s, search_seconds=time.perf_counter() - t1, tokens=len(q))


def stage_synth_cache(a) -> dict:
    """A synthetic retrieval cache (N x k, sorted gamma distances) for the sweep."""
    from knnlm.knn.cache import CacheWriter
    from knnlm.knn.mode import ScoreMode
    rng = np.random.default_rng(0)
    mode = ScoreMode.from_flags("do_not_recomp_l2", "l2", False)
    w = CacheWriter(a.cache_dir, a.sweep_tokens, a.k, False, dict(
        metric="l2", faiss_metric="l2", score_mode=mode.to_dict(),
        datastore_fingerprint="synthetic"), datastore_size=10 ** 6)
    for s in range(0, a.sweep_tokens, 10_000):
        n = min(10_000, a.sweep_tokens - s)
        d = np.sort(rng.gamma(4.0, 10.0, (n, a.k)).astype(np.float32), axis=1)
        w.write(s, targets=rng.integers(0, 8000, n).astype(np.int32),
                words=np.ones(n, bool), lm_logprobs=-rng.gamma(2.0, 2.5, n).astype(np.float32),
                ids=rng.integers(0, 10 ** 6, (n, a.k)).astype(np.int32),
                vals=rng.integers(0, 8000, (n, a.k)).astype(np.int32), faiss_dists=d)
    w.close({})
    return dict(tokens=a.sweep_tokens, k=a.k)


def stage_sweep(a) -> dict:
    from knnlm.knn import sweep
    t0 = time.perf_counter()
    sweep.main(sweep.SweepConfig(cache=a.cache_dir, lmbda="0:0.99:0.01", knn_temp="0.5:15:0.5",
                                 out=str(Path(a.cache_dir) / "out"), quiet=True))
    return dict(seconds=time.perf_counter() - t0, tokens=a.sweep_tokens, k=a.k,
                lambdas=100, temps=30)


STAGES = dict(knnlm=stage_knnlm, bare=stage_bare, synth_cache=stage_synth_cache,
              sweep=stage_sweep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/demo/data-bin")
    ap.add_argument("--path", default="runs/demo/checkpoints/checkpoint_best.pt")
    ap.add_argument("--dstore", default="runs/demo/dstore")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--tps", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=8)
    ap.add_argument("--sweep-tokens", type=int, default=200_000)
    ap.add_argument("--skip-eval", action="store_true", help="only the sweep benchmark")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/knnlm_eval_sweep.json")
    a = ap.parse_args()
    if a.stage:
        finish_stage(STAGES[a.stage](a))
        return
    tmp = tempfile.TemporaryDirectory()
    a.cache_dir = tmp.name
    argv = [x for k, v in vars(a).items() if k not in ("stage", "out", "skip_eval")
            for x in (f"--{k.replace('_', '-')}", str(v))]
    out = dict(machine=machine(),
               config={k: v for k, v in vars(a).items() if k not in ("stage", "cache_dir")})
    if not a.skip_eval:
        bare = run_stage(__file__, "bare", argv)
        knnlm = run_stage(__file__, "knnlm", argv)
        bare2 = run_stage(__file__, "bare", argv)   # bracket: noise hits both sides
        base = min(b["forward_seconds"] + b["search_seconds"] for b in (bare, bare2))
        out.update(knnlm_tokens_per_s=knnlm["tokens"] / knnlm["seconds"],
                   overhead_ratio=knnlm["seconds"] / base, knnlm=knnlm, bare=[bare, bare2])
    run_stage(__file__, "synth_cache", argv)   # written in its own process: its pages
    sw = run_stage(__file__, "sweep", argv)    # do not count in the sweep's peak RSS
    tmp.cleanup()
    out.update(sweep=sw)
    write_result(a.out, out)


if __name__ == "__main__":
    main()
