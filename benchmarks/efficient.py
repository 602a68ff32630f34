"""Efficient kNN-LM: each search-saving method, alone and combined, against the plain
kNN-LM on the same tokens (JSON output and a tokens/s vs perplexity plot); the methods and
settings are :mod:`knnlm.analysis.efficiency`'s (what `knnlm analyze --parts efficiency`
reports), measured in one run so the ratios share the machine's state.

    python benchmarks/efficient.py --data runs/small/data-bin \\
        --path runs/small/checkpoints/checkpoint_best.pt --dstore runs/small/dstore \\
        --split test --work runs/small/efficient --out benchmarks/results/efficient.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["tokens_per_second"], r["ppl"], marker="*" if r["name"] in front else "o")
        ax.annotate(r["name"], (r["tokens_per_second"], r["ppl"]), fontsize=7)
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROMPTS = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans,",
           "O Romeo, Romeo", "All the world's a stage", "Is this a dagger which I see"]


def generation(a, prep, gen_tokens: int) -> list[dict]:
    """`knnlm generate` (greedy, ``gen_tokens`` new tokens per prompt) with the plain
    kNN-LM, RetoMaton pointers and the gate, against the LM alone: tokens/s and searches."""
    from knnlm import generate
    from knnlm.analysis.efficiency import knn_run
    base = prep["base"]
    runs = [("LM only", {}), ("kNN-LM", knn_run(a, *base))]
    runs += [(f"retomaton min-knns {n}", knn_run(a, *base, retomaton=True, min_knns=n))
             for n in a.min_knns]
    runs += [(f"adaptive {f:g}", knn_run(a, *base, gate=str(prep["gate_base"]),
                                         retrieval_fraction=f)) for f in a.fractions]
    rows = []
    for name, kw in runs:
        kw = {k: v for k, v in kw.items() if k != "knnlm"}
        out = [generate.main(generate.GenerateConfig(
            data=a.data, path=a.path, prompt=p, max_new_tokens=gen_tokens,
            knnlm=bool(kw), **kw)) for p in PROMPTS]
        secs = sum(o["tokens"] / o["tokens_per_second"] for o in out)
        eff = [o["efficiency"] for o in out if o.get("efficiency")]
        steps = sum(e["steps"] for e in eff)
        rows.append(dict(name=name, tokens_per_second=sum(o["tokens"] for o in out) / secs,
                         searched=(sum(e["searches"] for e in eff) / steps) if eff
                         else (1.0 if kw else 0.0)))
    plain = rows[1]["tokens_per_second"]
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / plain
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dstore", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--tokens", type=int, default=5000)
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
                   default=["retomaton", "adaptive", "merge", "pca"],
                   help="which methods (merge + pca + adaptive also runs their combination)")
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--factory", default="IVF2048,PQ32")
    p.add_argument("--train-size", type=int, default=100000)
    p.add_argument("--work", required=True, help="directory for the derived datastores, "
                   "indexes and gates (reused when there)")
    p.add_argument("--gen-tokens", type=int, default=100, help="new tokens per prompt in the "
                   "generation runs (0: none)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from knnlm.analysis.efficiency import EfficiencyConfig, prepare, run
    cfg = EfficiencyConfig(**{k: v for k, v in vars(a).items()
                              if k not in ("out", "gen_tokens")})
    res = run(cfg, log=lambda m: print(m, file=sys.stderr))
    gen = generation(cfg, prepare(cfg, Path(cfg.work)), a.gen_tokens) \
        if a.gen_tokens and {"retomaton", "adaptive"} <= set(cfg.methods) else []
    rows, front, lm = res["rows"], res["pareto"], res["lm_only"]
    out = dict(benchmark="efficient", machine=machine(), threads=torch.get_num_threads(),
               config={k: v for k, v in vars(a).items()}, lm_only=lm,
               plain_over_lm_time=res["plain_over_lm_time"], kept=res["kept"],
               prepare_seconds=res["prepare_seconds"], runs=rows, pareto=front,
               table=[{k: r[k] for k in ("name", "tokens_per_second", "ppl", "searched",
                                         "speedup", "ppl_increase")} for r in rows],
               generation=gen)
    plot(rows, front, Path(a.out).with_suffix(".png"))
    write_result(a.out, out, hide=("machine", "runs"))


if __name__ == "__main__":
    main()
