"""The cost of a kNN-LM token: the reference kNN-LM (IVF-PQ, exact L2 recomputed from the
keys), the fast paths (FAISS scores, fast-scan indexes, a refine stage) and the
search-saving methods on top of them, each against the LM alone on the same tokens (JSON
output and a tokens/s vs perplexity plot). The settings are
:mod:`knnlm.analysis.efficiency`'s (what `knnlm analyze --parts efficiency` reports).

Threads are pinned (one by default, for FAISS, torch and BLAS) and recorded; a warm-up
pass precedes the timed runs, and each setting is timed ``--repeats`` times (median).

    python benchmarks/efficient.py --data runs/demo/data-bin \\
        --path runs/demo/checkpoints/checkpoint_best.pt --dstore runs/demo/dstore \\
        --work runs/demo/efficient --out benchmarks/results/efficient.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# pinned before torch, numpy or faiss start their thread pools
THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = THREADS

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402


def plot(rows: list[dict], front: list[str], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in rows:
        ax.scatter(r["time_over_lm"], r["ppl"], marker="*" if r["name"] in front else "o",
                   s=60 if r["name"] in front else 20)
        ax.annotate(r["name"], (r["time_over_lm"], r["ppl"]), fontsize=6)
    ax.axvline(2.0, color="grey", lw=0.5, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("time per token / the LM's (log scale)")
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROMPTS = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans,",
           "O Romeo, Romeo", "All the world's a stage", "Is this a dagger which I see"]


def generation(a, prep, gen_tokens: int, repeats: int) -> list[dict]:
    """`knnlm generate` (greedy, ``gen_tokens`` new tokens per prompt) with the reference
    kNN-LM, the fast path and the methods on it, against the LM alone: tokens/s (the
    median of ``repeats``), the share of steps searched."""
    from knnlm import generate
    from knnlm.analysis.efficiency import FAISS_SCORES, knn_run
    base, fast = prep["base"], prep["fast"]
    runs = [("LM only", {}), ("kNN-LM", knn_run(a, *base)),
            (f"fast-scan {prep['fast_factory']}", knn_run(a, *fast, **FAISS_SCORES))]
    if "retomaton" in a.methods:
        runs += [(f"fast-scan + RetoMaton min-knns {n}",
                  knn_run(a, *fast, retomaton=True, min_knns=n, **FAISS_SCORES))
                 for n in a.min_knns[:2]]
    if "gate_fast" in prep:
        runs += [(f"fast-scan + adaptive {f:g}", knn_run(a, *fast, gate=str(prep["gate_fast"]),
                                                         retrieval_fraction=f, **FAISS_SCORES))
                 for f in a.fractions[:2]]
    rows = []
    for name, kw in runs:
        kw = {k: v for k, v in kw.items() if k != "knnlm"}
        speeds, searched = [], None
        for _ in range(repeats):
            out = [generate.main(generate.GenerateConfig(
                data=a.data, path=a.path, prompt=p, max_new_tokens=gen_tokens,
                knnlm=bool(kw), **kw)) for p in PROMPTS]
            secs = sum(o["tokens"] / o["tokens_per_second"] for o in out)
            speeds.append(sum(o["tokens"] for o in out) / secs)
            eff = [o["efficiency"] for o in out if o.get("efficiency")]
            steps = sum(e["steps"] for e in eff)
            searched = (sum(e["searches"] for e in eff) / steps) if eff \
                else (1.0 if kw else 0.0)
        rows.append(dict(name=name, tokens_per_second=statistics.median(speeds),
                         runs_tokens_per_second=speeds, searched=searched))
    ref, lm = rows[1]["tokens_per_second"], rows[0]["tokens_per_second"]
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / ref
        r["time_over_lm"] = lm / r["tokens_per_second"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dstore", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--tokens", type=int, default=10000)
    p.add_argument("--tokens-per-sample", type=int, default=256)
    p.add_argument("--context-window", type=int, default=128)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=8)
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--knn-temp", type=float, default=4.0)
    p.add_argument("--min-knns", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 32])
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.25, 0.5, 0.75])
    p.add_argument("--gate-split", default="valid")
    p.add_argument("--gate-tokens", type=int, default=0, help="0: the whole --gate-split")
    p.add_argument("--no-gate-query", dest="gate_query", action="store_false")
    p.add_argument("--merge-k", type=int, default=8)
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=["fast", "retomaton", "adaptive", "merge", "pca"],
                   help="which settings (fast: FAISS scores, fast-scan, refine; merge + pca + "
                   "adaptive also runs their combination)")
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--factory", default="IVF2048,PQ32", help="the reference's index")
    p.add_argument("--fast-factory", default=None, help="the fast-scan index (default: "
                   "build-index's choice)")
    p.add_argument("--refine", default="Refine(SQfp16)", help="the refine rows' factory "
                   "suffix ('' for none)")
    p.add_argument("--fast-probe", type=int, default=None, help="also the fast path, alone "
                   "and with the gate, at this nprobe")
    p.add_argument("--train-size", type=int, default=200000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--threads", default=THREADS, help="threads of FAISS, torch and BLAS "
                   "(write --threads=N: read before the imports)")
    p.add_argument("--work", required=True, help="directory for the derived datastores, "
                   "indexes and gates (reused when there)")
    p.add_argument("--gen-tokens", type=int, default=100, help="new tokens per prompt in the "
                   "generation runs (0: none)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import faiss
    torch.set_num_threads(int(THREADS))
    faiss.omp_set_num_threads(int(THREADS))
    from knnlm.analysis.efficiency import EfficiencyConfig, prepare, run
    cfg = EfficiencyConfig(**{k: v for k, v in vars(a).items()
                              if k not in ("out", "gen_tokens", "threads", "refine")},
                           refine=a.refine or None)
    res = run(cfg, log=lambda m: print(m, file=sys.stderr))
    gen = generation(cfg, prepare(cfg, Path(cfg.work)), a.gen_tokens, a.repeats) \
        if a.gen_tokens else []
    rows, front, lm = res["rows"], res["pareto"], res["lm_only"]
    out = dict(benchmark="efficient", machine=machine(),
               threads=dict(torch=torch.get_num_threads(), faiss=faiss.omp_get_max_threads(),
                            env={v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")}),
               config={k: v for k, v in vars(a).items()}, lm_only=lm,
               fast_factory=res["fast_factory"],
               reference_over_lm_time=res["plain_over_lm_time"], kept=res["kept"],
               prepare_seconds=res["prepare_seconds"], runs=rows, pareto=front,
               table=[{k: r[k] for k in ("name", "tokens_per_second", "time_over_lm", "ppl",
                                         "searched", "speedup", "ppl_increase")} for r in rows],
               generation=gen)
    plot(rows, front, Path(a.out).with_suffix(".png"))
    write_result(a.out, out, hide=("machine", "runs"))


if __name__ == "__main__":
    main()
