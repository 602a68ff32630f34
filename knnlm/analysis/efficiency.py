"""The cost of retrieval, and the methods that lower it, against the plain kNN-LM on the
same tokens (paper notes §8): what `knnlm analyze --parts efficiency` reports and
`benchmarks/efficient.py` measures.

Every setting is one `eval-lm --knnlm` over the first ``tokens`` tokens of ``split``
with the same λ, T, k and nprobe: the LM alone, then

- the reference, "kNN-LM": the ``factory`` index (``IVF2048,PQ32`` in the benchmark),
  neighbours scored by exact L2 recomputed from the stored keys (the default score mode);
- the fast paths: the same index scored by FAISS's distances (``--knn-sim-func
  do_not_recomp_l2``); a fast-scan index (``fast_factory``, default build-index's choice)
  scored exactly and by its own distances; the fast-scan index with a refine stage
  (``refine``: exact re-ranking in C++, at k_factor 1 and 2);
- the search-saving methods, on top of the fast path (fast-scan, FAISS scores):
  RetoMaton pointers (``--retomaton --min-knns N``, pointers scored from the index's
  codes); adaptive retrieval (``--gate``, trained by `knnlm train-gate` on the first
  ``gate_tokens`` tokens of ``gate_split``, another held-out split, with the query vector
  among its features unless ``gate_query`` is off); greedy-merge pruning (`knnlm
  prune-dstore --method merge`) and random pruning to the same size; PCA to ``pca_dim``
  (`knnlm reduce-dstore`) and FAISS's ``PCAR`` prefix; PCA + adaptive retrieval; merge +
  PCA + adaptive retrieval (efficient-knnlm's combination); with ``fast_probe``, the fast
  path and the gate at that nprobe too.

Each setting is timed ``repeats`` times (the median counts; the first run of all, untimed,
warms the caches when ``warmup``); every row reports its time over the LM's, its
speed-up over the reference and its perplexity change. The derived datastores, indexes and
gates are made once under ``work`` and reused.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import evaluate, train_gate
from ..knn import index as index_mod, prune, reduce
from ..knn.datastore import Datastore


METHODS = ("fast", "retomaton", "adaptive", "merge", "pca")
FAISS_SCORES = dict(knn_sim_func="do_not_recomp_l2")


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
    fast_factory: str | None = None     # None: build-index's choice for the datastore
    refine: str | None = "Refine(SQfp16)"   # the refine rows' suffix (None: no such rows)
    fast_probe: int | None = None   # also the fast path (and with the gate) at this nprobe
    train_size: int = 100000
    gate_split: str = "valid"
    gate_tokens: int = 0            # 0: the whole gate split
    gate_query: bool = True         # the query vector among the gate's features
    merge_k: int = 8
    pca_dim: int = 64
    min_knns: list[int] = field(default_factory=lambda: [1, 8, 32])
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    repeats: int = 1
    warmup: bool = False
    quiet: bool = True

    def fast(self, n: int, d: int) -> str:
        """The fast-scan factory for N keys of D dims (a given one when its PQ fits D)."""
        auto = index_mod.auto_factory(n, d)
        if self.fast_factory is None:
            return auto
        m = re.search(r"PQ(\d+)", self.fast_factory)
        return self.fast_factory if m is None or d % int(m.group(1)) == 0 else auto


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


def measure(a: EfficiencyConfig, **kw) -> dict:
    """:func:`evaluate_one` ``repeats`` times: the median speed, every run's, and the
    perplexity (the same in every run)."""
    runs = [evaluate_one(a, **kw) for _ in range(max(1, a.repeats))]
    out = dict(runs[0])
    out["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in runs)
    out["runs_tokens_per_second"] = [r["tokens_per_second"] for r in runs]
    return out


def prepare(a: EfficiencyConfig, work: Path) -> dict:
    """The datastores, indexes and gates the settings need (made once, reused)."""
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

    def fast_index(ds_dir, name, prefix="", dim=None):
        d = Datastore(ds_dir)
        return build_index(ds_dir, work / f"index_{name}.faiss",
                           prefix + a.fast(d.size, dim or d.dim))

    def gate(name, ds_dir, index):
        out = work / f"gate_{name}"
        if not (out / "gate.json").is_file():
            cache = work / f"cache_{name}"
            if not (cache / "cache.json").is_file() or \
                    '"complete": true' not in (cache / "cache.json").read_text():
                timed(f"gate cache {name}", evaluate_one, a, a.gate_split, a.gate_tokens,
                      **knn_run(a, ds_dir, index, save_retrieval=str(cache), **FAISS_SCORES))
            timed(f"train-gate {name}", train_gate.main,
                  train_gate.TrainGateConfig(cache=str(cache), out=str(out),
                                             gate_query=a.gate_query, quiet=True))
        return out

    ds = Path(a.dstore)
    parent = Datastore(ds)
    n, dim = parent.size, parent.dim
    on = set(a.methods)
    p = dict(base=(ds, build_index(ds, work / "index_base.faiss")), kept=None, seconds=t,
             fast_factory=a.fast(n, dim))
    p["fast"] = (ds, fast_index(ds, "fast"))
    if a.refine and "fast" in on:
        p["refine"] = (ds, build_index(ds, work / "index_refine.faiss",
                                       f"{p['fast_factory']},{a.refine}"))
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
        p["merged"] = (merged, fast_index(merged, "merged"))
        p["random"] = (rand, fast_index(rand, "random"))
    if "pca" in on:
        pca = reduced(a, ds, work / f"dstore_pca{a.pca_dim}", timed)
        p["pca"] = (pca, fast_index(pca, "pca"))
        p["pcar"] = (ds, fast_index(ds, "pcar", f"PCAR{a.pca_dim},", a.pca_dim))
    if "adaptive" in on:
        p["gate_fast"] = gate("fast", *p["fast"])
    if {"pca", "adaptive"} <= on:
        p["gate_pca"] = gate("pca", *p["pca"])
    if {"merge", "pca", "adaptive"} <= on:
        combo = reduced(a, p["merged"][0], work / f"dstore_merged_pca{a.pca_dim}", timed)
        p["combo"] = (combo, fast_index(combo, "combo"))
        p["gate_combo"] = gate("combo", *p["combo"])
    return p


def reduced(a: EfficiencyConfig, ds: Path, out: Path, timed) -> Path:
    if not (out / "datastore.json").is_file():
        timed(f"reduce {out.name}", reduce.main, reduce.ReduceConfig(
            dstore_dir=str(ds), out=str(out), pca_dim=a.pca_dim, train_size=a.train_size,
            quiet=True))
    return out


def settings(a: EfficiencyConfig, p) -> list[tuple[str, dict]]:
    base, fast, pca, ff = p["base"], p["fast"], a.pca_dim, p["fast_factory"]
    fs = FAISS_SCORES
    out = [("kNN-LM", knn_run(a, *base))]
    if "fast" in a.methods:
        out += [("FAISS scores", knn_run(a, *base, **fs)),
                (f"fast-scan {ff}, exact scores", knn_run(a, *fast)),
                (f"fast-scan {ff}", knn_run(a, *fast, **fs))]
        if "refine" in p:
            out += [(f"fast-scan + {a.refine}", knn_run(a, *p["refine"])),
                    (f"fast-scan + {a.refine}, k_factor 2", knn_run(a, *p["refine"],
                                                                     k_factor=2))]
    top = "fast-scan + "

    def gated(label, store, gate, suffix="", **extra):
        """The rows of ``store`` searched where ``gate`` says, at each fraction."""
        return [(f"{top}{label}adaptive {f:g}{suffix}",
                 dict(knn_run(a, *store, gate=str(gate), retrieval_fraction=f, **fs), **extra))
                for f in a.fractions]
    if "retomaton" in a.methods:
        out += [(f"{top}RetoMaton min-knns {n}", knn_run(a, *fast, retomaton=True, min_knns=n,
                                                         **fs)) for n in a.min_knns]
    if "gate_fast" in p:
        out += gated("", fast, p["gate_fast"])
    if a.fast_probe and "fast" in a.methods:
        np_ = a.fast_probe
        out.append((f"fast-scan {ff}, nprobe {np_}", dict(knn_run(a, *fast, **fs), probe=np_)))
        if "gate_fast" in p:
            out += gated("", fast, p["gate_fast"], f", nprobe {np_}", probe=np_)
    if "merged" in p:
        out += [(f"{top}merge k'={a.merge_k} ({p['kept']:.0%} kept)", knn_run(a, *p["merged"],
                                                                               **fs)),
                (f"{top}random prune ({p['kept']:.0%} kept)", knn_run(a, *p["random"], **fs))]
    if "pca" in p:
        out += [(f"{top}PCA {pca}", knn_run(a, *p["pca"], **fs)),
                (f"{top}FAISS PCAR{pca}", knn_run(a, *p["pcar"], **fs))]
    if "gate_pca" in p:
        out += gated(f"PCA {pca} + ", p["pca"], p["gate_pca"])
    if "combo" in p:
        out.append((f"{top}merge + PCA {pca}", knn_run(a, *p["combo"], **fs)))
        out += gated(f"merge + PCA {pca} + ", p["combo"], p["gate_combo"])
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
    """Every setting: tokens/s, its time over the LM's, perplexity, share of tokens
    searched, and the ratios to the reference (speed-up, perplexity increase); the
    Pareto front."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(a, work)
    todo = settings(a, prep)
    if a.warmup:        # page cache, index files, imports: then every run starts warm
        evaluate_one(a)
        evaluate_one(a, **todo[0][1])
    lm = dict(name="LM only", **measure(a))
    rows = []
    for name, kw in todo:
        log(f"-- {name}")
        rows.append(dict(name=name, flags={k: v for k, v in kw.items() if k != "knnlm"},
                         **measure(a, **kw)))
    base = rows[0]
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["ppl_increase"] = r["ppl"] / base["ppl"] - 1
        r["time_over_lm"] = lm["tokens_per_second"] / r["tokens_per_second"]
    return dict(lm_only=lm, rows=rows, pareto=pareto(rows), prepare_seconds=prep["seconds"],
                kept=prep["kept"], fast_factory=prep["fast_factory"],
                plain_over_lm_time=lm["tokens_per_second"] / base["tokens_per_second"])
