"""`knnlm tune`: the best λ, T, k and score mode of an index on a held-out split, written
next to the index so that every kNN command uses them when not told otherwise.

Inputs: what `eval-lm --knnlm` takes (a data-bin, ``--path`` or ``--hf-model``,
``--dstore-filename``, ``--indexfile`` or ``--exact-search``), with ``--gen-subset``
(default valid) the held-out split, and the grids ``--lmbda``, ``--knn-temp``, ``--k``,
``--score`` (as in `knnlm sweep`). Steps:

1. `eval-lm --knnlm` on the split at the paper's settings (λ 0.25, T 1) and the largest k
   of the grid, with a retrieval cache that holds both FAISS and exact distances
   (``--save-retrieval``, default ``<index>.tune-<split>``; a complete cache of the same
   evaluation is reused, an interrupted one resumed);
2. `knnlm sweep` of the cache over λ × T × k × score mode (``<cache>/sweep``);
3. the best point — or the cheapest one that keeps all but ``--gain-tolerance`` (5%) of
   the best point's gain over the LM (in log perplexity): FAISS scores rather than exact
   ones, a smaller k — its held-out perplexity, the untuned one and this command go to
   ``<index>.tuned.json`` (:mod:`knnlm.knn.tuned`), with the index, datastore and model
   fingerprints it belongs to.

    knnlm tune runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-filename runs/demo/dstore --probe 8
    knnlm eval-lm runs/demo/data-bin --path ... --knnlm --dstore-filename runs/demo/dstore \\
        --probe 8                  # uses the tuned λ, T, k and score mode
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import evaluate
from .data.preprocess import DataBin
from .guard import check_output, output_lock
from .io import read_json, write_json_atomic
from .knn import sweep
from .knn.cache import RetrievalCache
from .knn.datastore import Datastore, normalize_keytype
from .knn.mode import CACHE_SCORES
from .knn.rank_search import sharing
from .knn.search import default_index_path
from .knn.tuned import (DEFAULTS, TUNED_FORMAT, TUNED_VERSION, identity, index_fingerprint,
                         tuned_path)
from .lm.checkpoint import load_lm
from .lm.device import resolve_device
from .util import UserError, command_line, config_dict, flag

TEMPS = "0.25,0.5,0.75,1,1.5,2,3,4,6,8,12,16,24,32,48,64"


@dataclass(kw_only=True)
class TuneConfig(evaluate.EvalConfig):
    gen_subset: str = flag("valid", "held-out split to tune on")
    lmbda: str = flag("0:1:0.01", "λ grid: list or start:stop:step")
    knn_temp: str = flag(TEMPS, "temperature grid: list or start:stop:step")
    k: str | None = flag(None, "k grid; the evaluation retrieves the largest (default: 1024, "
                         "256, 64, at most the datastore size)")
    score: str | None = flag(None, "score modes: faiss, exact or both (default: every mode "
                             "the cache holds; exact needs the stored keys)")
    gain_tolerance: float = flag(0.05, "take the cheapest point that keeps all but this share "
                                 "of the best point's gain over the LM, in log perplexity "
                                 "(FAISS scores before exact ones: no key reads; then the "
                                 "smallest k); 0: the best point")
    save_retrieval: str | None = flag(None, "retrieval cache of the held-out split (default: "
                                      "<index>.tune-<split>, kept for `knnlm sweep`)")
    overwrite: bool = flag(False, "replace a retrieval cache of another evaluation (another "
                           "index, datastore or flags) at the cache's path")

    def __post_init__(self):
        check_output(self.results_path, "file", "--results-path")
        self.knnlm = True                 # tune always evaluates a kNN-LM (--knnlm implied)
        if self.save_knnlm_dstore:
            raise UserError("knnlm tune evaluates a kNN-LM; build datastores with build-dstore")
        if not self.dstore_filename:
            raise UserError("knnlm tune needs --dstore-filename DIR")
        if not 0 <= self.gain_tolerance < 1:
            raise UserError(f"--gain-tolerance must be in [0, 1), got {self.gain_tolerance}")
        # the grids, checked as `knnlm sweep` checks them
        self.grid = sweep.SweepConfig(cache="-", lmbda=self.lmbda, knn_temp=self.knn_temp,
                                      k=self.k, score=self.score)
        ds = Datastore(self.dstore_filename)
        ks = self.grid.ks or [k for k in (64, 256, DEFAULTS["k"]) if k <= ds.size] or [ds.size]
        if max(ks) > ds.size:
            raise UserError(f"--k {max(ks)} exceeds the datastore size {ds.size:,}")
        self.ks = sorted(set(ks))
        keytype = normalize_keytype(self.knn_keytype)
        self.index_path = None if self.exact_search else Path(
            self.indexfile or default_index_path(ds.path, keytype, self.faiss_metric_type))
        base = self.index_path or tuned_path(ds.path, keytype, self.faiss_metric_type, None)
        self.cache_dir = Path(self.save_retrieval or f"{base}.tune-{self.gen_subset}")
        if "exact" in self.grid.scores and (self.exact_search or not self.load_keys):
            raise UserError("--score exact needs an index search with the stored keys "
                            "(exact search's scores are exact already)")
        self.eval_cfg = evaluate.EvalConfig(**{
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(evaluate.EvalConfig)},
            # the defaults, explicitly: the evaluation never reads tuned settings
            "knnlm": True, "lmbda": DEFAULTS["lmbda"], "knn_temp": DEFAULTS["knn_temp"], "k": max(self.ks),
            "save_retrieval": str(self.cache_dir),
            "save_exact_dists": self.load_keys and not self.exact_search})


def _reusable(cache_dir: Path, ecfg, index_meta: dict | None) -> bool:
    """A complete cache of exactly this evaluation is already there: the same flags and
    the same index (an index rebuilt at the same path, e.g. with another factory, is
    evaluated anew)."""
    side = cache_dir / "cache.json"
    if not side.is_file():
        return False
    meta = read_json(side, "cache sidecar")
    strip = lambda d: {k: v for k, v in d.items() if k != "quiet"}  # noqa: E731
    return bool(meta.get("complete")) and \
        strip(meta.get("config", {})) == strip(config_dict(ecfg)) and \
        meta.get("index_fingerprint") == index_fingerprint(index_meta)


def best_point(results: dict) -> tuple[str, dict]:
    """The sweep row (``score@k=K``) with the lowest interpolated perplexity."""
    key = min(results, key=lambda r: results[r]["interp_ppl"])
    return key, results[key]


def cost_order(key: str) -> tuple[int, int]:
    """How much a sweep row's setting costs per token: FAISS scores read no keys (cheaper
    than exact ones), then fewer neighbours."""
    score, k = key.split("@k=")
    return (0 if score == "faiss" else 1), int(k)


def choose_point(results: dict, tolerance: float) -> tuple[str, dict]:
    """The cheapest sweep row (:func:`cost_order`) that keeps all but ``tolerance`` of the
    best row's gain over the LM, log(LM ppl) − log(best ppl); the best row at tolerance 0.
    (A share of the gain, not of the perplexity: where retrieval helps little, as over a
    strong pretrained LM, a cheaper point must be nearly as good to be taken.)"""
    _, best = best_point(results)
    gain = max(0.0, math.log(best["lm_ppl"]) - math.log(best["interp_ppl"]))
    limit = math.log(best["interp_ppl"]) + tolerance * gain
    ok = [r for r in results if math.log(results[r]["interp_ppl"]) <= limit + 1e-12]
    key = min(ok, key=lambda r: (cost_order(r), results[r]["interp_ppl"]))
    return key, results[key]


def main(cfg: TuneConfig) -> dict | None:
    # under torchrun over an index kept in shards, ranks > 0 answer rank 0's searches
    with sharing(cfg, "tune") as leader:
        return _main(cfg) if leader else None


def _main(cfg: TuneConfig) -> dict:
    ecfg = cfg.eval_cfg
    databin = DataBin(cfg.data)
    device = resolve_device(cfg.device, cfg.cpu)
    model, model_fp = load_lm(cfg.path, cfg.hf_model, databin, device, cfg.hf_dtype)
    with output_lock(cfg.cache_dir, "dir", "retrieval cache"):
        return _tune(cfg, ecfg, databin, device, model, model_fp)


def _tune(cfg: TuneConfig, ecfg, databin, device, model, model_fp) -> dict:
    t0 = time.perf_counter()
    ds = Datastore(cfg.dstore_filename)
    keytype = normalize_keytype(cfg.knn_keytype)
    index_meta = None
    if cfg.index_path is not None:
        index_meta = read_json(Path(str(cfg.index_path) + ".json"), "index sidecar")
    if _reusable(cfg.cache_dir, ecfg, index_meta):
        cache = RetrievalCache(cfg.cache_dir)
        cache.check_datastore(ds.fingerprint)
        untuned = cache.meta["summary"]["interpolated"]
        print(f"{cfg.cache_dir}: the evaluation of {cfg.gen_subset} is cached")
    else:
        res = evaluate.eval_lm(model, databin, ecfg, device, model_fp)
        print(evaluate.format_results(res))
        untuned = res["interpolated"]["ppl"]
        cache = RetrievalCache(cfg.cache_dir)
    scores = cfg.grid.scores or [s for s in CACHE_SCORES if s == "faiss" or cache.has_exact]
    if cfg.exact_search:
        scores = ["faiss"]       # brute force: its distances are the exact ones
    results = sweep.main(sweep.SweepConfig(
        cache=str(cfg.cache_dir), lmbda=cfg.lmbda, knn_temp=cfg.knn_temp,
        k=",".join(map(str, cfg.ks)), score=",".join(scores), quiet=cfg.quiet))
    best_key, top = best_point(results)
    key, best = choose_point(results, cfg.gain_tolerance)
    if key != best_key:
        print(f"{key} (ppl {best['interp_ppl']:.2f}) keeps all but --gain-tolerance "
              f"{cfg.gain_tolerance:g} of the gain of the best, {best_key} "
              f"({top['interp_ppl']:.2f}; LM {top['lm_ppl']:.2f}), and is cheaper per token: "
              "it is taken (--gain-tolerance 0 takes the best)")
    score, k = key.split("@k=")[0], int(key.split("@k=")[1])
    mode = cache.mode_of(score)
    settings = dict(lmbda=best["best_lambda"], knn_temp=best["best_temp"], k=k,
                    knn_sim_func=mode.sim_func)
    out_path = tuned_path(ds.path, keytype, cfg.faiss_metric_type, cfg.index_path)
    tuned = dict(
        format=TUNED_FORMAT, version=TUNED_VERSION,
        identity=identity(ds, keytype, index_meta, model_fp, cfg.exact_search,
                          cfg.faiss_metric_type),
        settings=settings, score_mode=mode.to_dict(),
        heldout=dict(subset=cfg.gen_subset, data=str(Path(cfg.data).resolve()),
                     tokens=cache.size, ppl=best["interp_ppl"],
                     word_ppl=best["interp_word_ppl"], lm_ppl=best["lm_ppl"],
                     lm_word_ppl=best["lm_word_ppl"],
                     knn_ppl=best["knn_ppl"], untuned_ppl=untuned, probe=cfg.probe,
                     max_eval_tokens=cfg.max_eval_tokens),
        grid=dict(lmbda=cfg.lmbda, knn_temp=cfg.knn_temp, k=cfg.ks, score=scores),
        best=dict(point=best_key, ppl=top["interp_ppl"], gain_tolerance=cfg.gain_tolerance),
        command=command_line("tune", cfg), cache=str(cfg.cache_dir),
        sweep=str(cfg.cache_dir / "sweep" / "sweep.json"), seconds=time.perf_counter() - t0)
    temps = cfg.grid.temps
    if len(temps) > 1 and best["best_temp"] in (min(temps), max(temps)):
        print(f"note: the best T ({best['best_temp']:g}) is at the edge of the grid: widen "
              "--knn-temp")
    write_json_atomic(out_path, tuned)
    print(f"tuned on {cfg.gen_subset} ({cache.size:,} tokens): k {k}, λ {settings['lmbda']:g}, "
          f"T {settings['knn_temp']:g}, score mode {mode.name} -> ppl {best['interp_ppl']:.2f} "
          f"(LM {best['lm_ppl']:.2f}; λ 0.25, T 1 gave {untuned:.2f})")
    print(f"wrote {out_path}: eval-lm --knnlm, generate and neighbors use it when given no "
          "--lmbda / --knn-temp")
    if cfg.results_path:
        write_json_atomic(cfg.results_path, dict(tuned=tuned, sweep=results,
                                                 config=config_dict(cfg)))
    return tuned
