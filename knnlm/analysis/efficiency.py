"""The efficiency methods against the plain kNN-LM on the same tokens (paper notes §8):
what `knnlm analyze --parts efficiency` reports and `benchmarks/efficient.py` measures.

Every setting is one `eval-lm --knnlm` over the first ``tokens`` tokens of ``split``
with the same λ, T, k, nprobe and index factory: the LM alone, the plain kNN-LM (the
baseline of every ratio), and the methods, alone and combined:

- RetoMaton pointers (``--retomaton --min-knns N``);
- adaptive retrieval (``--gate``, trained by `knnlm train-gate` on the first
  ``gate_tokens`` tokens of ``gate_split``, another held-out split, with the query vector
  among its features unless ``gate_query`` is off), searching a share of
  the tokens with the fixed λ or with the gate's λ̂;
- greedy-merge pruning (`knnlm prune-dstore --method merge`), and random pruning to the
  same size;
- PCA to ``pca_dim`` (`knnlm reduce-dstore`), and FAISS's ``PCAR`` factory prefix;
- merge + PCA + adaptive retrieval (efficient-knnlm's combination).

The derived datastores, indexes and gates are made once under ``work`` and reused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import evaluate, train_gate
from ..knn import index as index_mod, prune, reduce
from ..knn.datastore import Datastore


METHODS = ("retomaton", "adaptive", "merge", "pca")


@dataclass
class EfficiencyConfig:
    data: str
    path: str
    dstore: str
    work: str
    split: str = "test"
    tokens: int = 5000
    tokens_per_sample: int | None = None
    context_window: int | None = None
    k: int = 1024
    probe: int = 8
    lmbda: float = 0.25
    knn_temp: float = 1.0
    factory: str = "IVF2048,PQ32"
    train_size: int = 100000
    gate_split: str = "valid"
    gate_tokens: int = 0            # 0: the whole gate split
    gate_query: bool = True         # the query vector among the gate's features
    merge_k: int = 8
    pca_dim: int = 64
    min_knns: list[int] = field(default_factory=lambda: [1, 8, 32])
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    quiet: bool = True


def knn_run(a: EfficiencyConfig, dstore, index, **kw) -> dict:
    return dict(knnlm=True, dstore_filename=str(dstore), indexfile=str(index), k=a.k,
                probe=a.probe, lmbda=a.lmbda, knn_temp=a.knn_temp, **kw)


def evaluate_one(a: EfficiencyConfig, split=None, tokens=None, **kw) -> dict:
    cfg = evaluate.EvalConfig(data=a.data, path=a.path, gen_subset=split or a.split,
                              max_eval_tokens=a.tokens if tokens is None else tokens,
                              tokens_per_sample=a.tokens_per_sample,
                              context_window=a.context_window, quiet=True, **kw)
    t0 = time.perf_counter()
    res = evaluate.main(cfg)
    wall = time.perf_counter() - t0
    ppl = res["interpolated"]["ppl"] if "interpolated" in res else res["ppl"]
    eff = (res.get("interpolated") or {}).get("efficiency")
    searched = 1 - eff["searches_saved"] if eff else (1.0 if kw.get("knnlm") else 0.0)
    return dict(ppl=ppl, lm_ppl=res["ppl"], seconds=res["seconds"], wall_seconds=wall,
                tokens_per_second=res["tokens_per_second"], searched=searched, efficiency=eff)


def prepare(a: EfficiencyConfig, work: Path) -> dict:
    """The datastores, indexes and gates the methods need (made once, reused)."""
    t = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        fn(*args, **kw)
        t[name] = time.perf_counter() - t0

    def build_index(ds_dir, out, factory=None):
        if not Path(out).is_file():
            timed(f"build-index {Path(out).name}", index_mod.build_index,
                  index_mod.BuildIndexConfig(dstore_dir=str(ds_dir), knn_keytype="att",
                                             index_factory=factory or a.factory,
                                             faiss_index=str(out), probe=a.probe,
                                             train_size=a.train_size, seed=1, quiet=True))
        return out

    def gate(name, ds_dir, index):
        out = work / f"gate_{name}"
        if not (out / "gate.json").is_file():
            cache = work / f"cache_{name}"
            if not (cache / "cache.json").is_file() or \
                    '"complete": true' not in (cache / "cache.json").read_text():
                timed(f"gate cache {name}", evaluate_one, a, a.gate_split, a.gate_tokens,
                      **knn_run(a, ds_dir, index, save_retrieval=str(cache)))
            timed(f"train-gate {name}", train_gate.main,
                  train_gate.TrainGateConfig(cache=str(cache), out=str(out),
                                             gate_query=a.gate_query, quiet=True))
        return out

    ds = Path(a.dstore)
    on = set(a.methods)
    p = dict(base=(ds, build_index(ds, work / "index_base.faiss")), kept=None, seconds=t)
    if "merge" in on:
        merged = work / "dstore_merged"
        if not (merged / "datastore.json").is_file():
            timed("prune merge", prune.main, prune.PruneConfig(
                dstore_dir=str(ds), out=str(merged), method="merge", merge_k=a.merge_k,
                indexfile=str(p["base"][1]), probe=a.probe, quiet=True))
        p["kept"] = kept = Datastore(merged).size / Datastore(ds).size
        rand = work / "dstore_random"
        if not (rand / "datastore.json").is_file():
            timed("prune random", prune.main, prune.PruneConfig(
                dstore_dir=str(ds), out=str(rand), method="random", ratio=kept, quiet=True))
        p["merged"] = (merged, build_index(merged, work / "index_merged.faiss"))
        p["random"] = (rand, build_index(rand, work / "index_random.faiss"))
    if "pca" in on:
        pca = reduced(a, ds, work / f"dstore_pca{a.pca_dim}", timed)
        p["pca"] = (pca, build_index(pca, work / "index_pca.faiss"))
        p["pcar"] = (ds, build_index(ds, work / "index_pcar.faiss", f"PCAR{a.pca_dim},{a.factory}"))
    if "adaptive" in on:
        p["gate_base"] = gate("base", *p["base"])
    if {"merge", "pca", "adaptive"} <= on:
        combo = reduced(a, p["merged"][0], work / f"dstore_merged_pca{a.pca_dim}", timed)
        p["combo"] = (combo, build_index(combo, work / "index_combo.faiss"))
        p["gate_combo"] = gate("combo", *p["combo"])
    return p


def reduced(a: EfficiencyConfig, ds: Path, out: Path, timed) -> Path:
    if not (out / "datastore.json").is_file():
        timed(f"reduce {out.name}", reduce.main, reduce.ReduceConfig(
            dstore_dir=str(ds), out=str(out), pca_dim=a.pca_dim, train_size=a.train_size,
            quiet=True))
    return out


def settings(a: EfficiencyConfig, p) -> list[tuple[str, dict]]:
    base, pca = p["base"], a.pca_dim
    out = [("kNN-LM", knn_run(a, *base))]
    if "retomaton" in a.methods:
        out += [(f"retomaton min-knns {n}", knn_run(a, *base, retomaton=True, min_knns=n))
                for n in a.min_knns]
    if "gate_base" in p:
        for lam in (False, True):
            out += [(f"adaptive {f:g}" + (", λ̂" if lam else ""),
                     knn_run(a, *base, gate=str(p["gate_base"]), retrieval_fraction=f,
                             gate_lambda=lam)) for f in a.fractions]
    if "merged" in p:
        out += [(f"merge k'={a.merge_k} ({p['kept']:.0%} kept)", knn_run(a, *p["merged"])),
                (f"random prune ({p['kept']:.0%} kept)", knn_run(a, *p["random"]))]
    if "pca" in p:
        out += [(f"PCA {pca}", knn_run(a, *p["pca"])),
                (f"FAISS PCAR{pca}", knn_run(a, *p["pcar"]))]
    if "combo" in p:
        out.append((f"merge + PCA {pca}", knn_run(a, *p["combo"])))
        for lam in (False, True):
            out += [(f"merge + PCA {pca} + adaptive {f:g}" + (", λ̂" if lam else ""),
                     knn_run(a, *p["combo"], gate=str(p["gate_combo"]), retrieval_fraction=f,
                             gate_lambda=lam)) for f in a.fractions]
    return out


def pareto(rows: list[dict]) -> list[str]:
    """Names of the rows no other row beats on both tokens/s and perplexity."""
    front = []
    for r in rows:
        if not any(o is not r and o["tokens_per_second"] >= r["tokens_per_second"]
                   and o["ppl"] <= r["ppl"] and (o["tokens_per_second"] > r["tokens_per_second"]
                                                 or o["ppl"] < r["ppl"]) for o in rows):
            front.append(r["name"])
    return front


def run(a: EfficiencyConfig, log=print) -> dict:
    """Every setting: tokens/s, perplexity, share of tokens searched, and the ratios to
    the plain kNN-LM (speed-up, perplexity increase); the Pareto front."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(a, work)
    lm = dict(name="LM only", **evaluate_one(a))
    rows = []
    for name, kw in settings(a, prep):
        log(f"-- {name}")
        rows.append(dict(name=name, flags={k: v for k, v in kw.items() if k != "knnlm"},
                         **evaluate_one(a, **kw)))
    base = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["ppl_increase"] = r["ppl"] / base["ppl"] - 1
    return dict(lm_only=lm, rows=rows, pareto=pareto(rows), prepare_seconds=prep["seconds"],
                kept=prep["kept"],
                plain_over_lm_time=lm["tokens_per_second"] / base["tokens_per_second"])
