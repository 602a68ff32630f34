"""Efficient kNN-LM: each search-saving method against the plain kNN-LM, measured in the
same run on the same tokens (JSON output, and a tokens/s vs perplexity plot).

Every setting is one `eval-lm --knnlm` over the first ``--tokens`` tokens of a split with
the same λ, T, k and nprobe: the LM alone (the floor of the cost), the plain kNN-LM (the
baseline every ratio is against), and the methods:

- ``retomaton-N``: RetoMaton pointers, searching only when fewer than N pointers remain
  (``--retomaton --min-knns N``).

For each: tokens/s, perplexity, the share of tokens that searched, and the ratios to the
plain kNN-LM (speed-up; perplexity increase). The Pareto front is the settings no other
setting beats on both speed and perplexity.

    python benchmarks/efficient.py --data runs/small/data-bin \\
        --path runs/small/checkpoints/checkpoint_best.pt --dstore runs/small/dstore \\
        --out benchmarks/results/efficient.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402


def settings(a) -> list[tuple[str, dict]]:
    out = [("kNN-LM", {})]
    out += [(f"retomaton-{n}", dict(retomaton=True, min_knns=n)) for n in a.min_knns]
    return out


def evaluate_one(a, **kw) -> dict:
    from knnlm import evaluate
    knn = dict(knnlm=True, dstore_filename=a.dstore, k=a.k, probe=a.probe, lmbda=a.lmbda,
               knn_temp=a.knn_temp) if kw.pop("knn", True) else {}
    cfg = evaluate.EvalConfig(data=a.data, path=a.path, gen_subset=a.split,
                              max_eval_tokens=a.tokens, tokens_per_sample=a.tokens_per_sample,
                              context_window=a.context_window, quiet=True, **knn, **kw)
    t0 = time.perf_counter()
    res = evaluate.main(cfg)
    wall = time.perf_counter() - t0
    ppl = res["interpolated"]["ppl"] if "interpolated" in res else res["ppl"]
    eff = (res.get("interpolated") or {}).get("efficiency")
    searched = 1 - eff["searches_saved"] if eff else (1.0 if knn else 0.0)
    return dict(ppl=ppl, lm_ppl=res["ppl"], seconds=res["seconds"], wall_seconds=wall,
                tokens_per_second=res["tokens_per_second"], searched=searched, efficiency=eff)


def pareto(rows: list[dict]) -> list[str]:
    """Names of the rows no other row beats on both tokens/s and perplexity."""
    front = []
    for r in rows:
        if not any(o is not r and o["tokens_per_second"] >= r["tokens_per_second"]
                   and o["ppl"] <= r["ppl"] and (o["tokens_per_second"] > r["tokens_per_second"]
                                                 or o["ppl"] < r["ppl"]) for o in rows):
            front.append(r["name"])
    return front


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dstore", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--tokens-per-sample", type=int, default=256)
    p.add_argument("--context-window", type=int, default=128)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=8)
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--knn-temp", type=float, default=4.0)
    p.add_argument("--min-knns", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 32, 128])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    lm = dict(name="LM only", **evaluate_one(a, knn=False))
    rows = []
    for name, kw in settings(a):
        print(f"-- {name}", file=sys.stderr)
        rows.append(dict(name=name, flags=kw, **evaluate_one(a, **kw)))
    base = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["ppl_increase"] = r["ppl"] / base["ppl"] - 1
    front = pareto(rows)
    out = dict(benchmark="efficient", machine=machine(), tokens=a.tokens, split=a.split,
               dstore=a.dstore, k=a.k, probe=a.probe, lmbda=a.lmbda, knn_temp=a.knn_temp,
               lm_only=lm, plain_over_lm_time=lm["tokens_per_second"] / base["tokens_per_second"],
               runs=rows, pareto=front,
               table=[{k: r[k] for k in ("name", "tokens_per_second", "ppl", "searched",
                                         "speedup", "ppl_increase")} for r in rows])
    plot(rows, front, Path(a.out).with_suffix(".png"))
    write_result(a.out, out, hide=("machine", "runs"))


if __name__ == "__main__":
    main()
