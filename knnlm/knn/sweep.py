"""`knnlm sweep --cache DIR`: interpolated perplexity over a grid of λ, temperature, k and
score mode, recomputed from a retrieval cache alone (no model, datastore or index).

Inputs: a retrieval cache (`eval-lm --knnlm --save-retrieval DIR`). Outputs in ``--out``
(default ``DIR/sweep``): ``sweep.json`` (every grid point), ``sweep.md`` (per score mode
and k: best λ and T, LM-only, kNN-only, interpolated and oracle perplexity) and, when
matplotlib is installed, ``ppl_vs_temp.png`` and ``ppl_vs_lambda.png``.

    knnlm sweep --cache runs/demo/cache_valid --lmbda 0:1:0.01 --knn-temp 0.5,1,2,4,8 \\
        --k 64,256,1024 --score faiss,exact

Scores (``--score``): ``faiss`` uses the distances the search returned (quantised for
IVF-PQ), ``exact`` the distances recomputed from the stored keys. By default the sweep
scores as the evaluation that wrote the cache did (its score mode, :mod:`knnlm.knn.mode`),
so the grid point at the evaluation's λ, T and k is the perplexity eval-lm printed; the
output names the mode of every row. k' < k keeps the first k' neighbours in search order.
The oracle picks, per token, the larger of p_LM and p_kNN (at the best T).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..guard import check_output
from ..io import open_npy, refuse_nonfinite, write_json_atomic
from ..util import UserError, config_dict, flag
from . import math as knn_math
from .cache import RetrievalCache
from .datastore import Datastore

ROWS_PER_CHUNK = 1024   # small chunks stay in cache: ~2x faster than 8192 here


MAX_GRID = 10_000        # values per grid axis: bounded before anything is allocated


def parse_grid(text: str, name: str) -> list[float]:
    """'a,b,c' or 'start:stop:step' (stop included); finite numbers, at most MAX_GRID."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            if n > MAX_GRID:
                raise UserError(f"{name} {text} has {n:,} values; at most {MAX_GRID:,}")
            return [round(start + i * step, 10) for i in range(n)]
        values = [float(x) for x in text.split(",") if x.strip()]
        if not all(map(math.isfinite, values)) or len(values) > MAX_GRID:
            raise ValueError
        return values
    except ValueError:
        raise UserError(f"{name} must be finite numbers, a comma list or start:stop:step "
                        f"(at most {MAX_GRID:,} values), got {text!r}")


@dataclass
class SweepConfig:
    cache: str | None = flag(None, "retrieval cache directory (eval-lm --save-retrieval)")
    score_files: str | None = flag(None, "instead of a cache: BASE.npy,OTHER.npy[,...], per-token "
                              "log-probs of models (eval-lm --save-scores) to interpolate: the "
                              "λ grid for two, the best weights (EM) for three or more")
    lmbda: str = flag("0:1:0.01", "λ values: list or start:stop:step")
    knn_temp: str = flag("1", "temperatures: list or start:stop:step")
    k: str | None = flag(None, "neighbour counts <= the cached k (default: the cached k)")
    score: str | None = flag(None, "faiss, exact or both (default: the scores the evaluation "
                             "used, its score mode)")
    dstore_filename: str | None = flag(None, "check the cache was made with this datastore")
    out: str | None = flag(None, "output directory (default: CACHE/sweep)")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        if bool(self.cache) == bool(self.score_files):
            raise UserError("give exactly one of --cache DIR and --score-files BASE.npy,OTHER.npy")
        if self.score_files and (len(self.score_files.split(",")) < 2 or not self.out):
            raise UserError("--score-files takes BASE.npy,OTHER.npy[,MORE.npy...] and needs --out DIR")
        self.lambdas = parse_grid(self.lmbda, "--lmbda")
        self.temps = parse_grid(self.knn_temp, "--knn-temp")
        if not self.lambdas or any(not 0 <= x <= 1 for x in self.lambdas):
            raise UserError(f"--lmbda values must lie in [0, 1], got {self.lmbda}")
        if not self.temps or any(t <= 0 for t in self.temps):
            raise UserError(f"--knn-temp values must be > 0, got {self.knn_temp}")
        self.ks = [int(x) for x in parse_grid(self.k, "--k")] if self.k else []
        if any(x <= 0 for x in self.ks):
            raise UserError("--k values must be > 0")
        self.scores = [s.strip() for s in self.score.split(",")] if self.score else []
        if any(s not in ("faiss", "exact") for s in self.scores):
            raise UserError(f"--score must be faiss, exact or both, got {self.score}")
        check_output(self.out, "dir", "--out")


def cache_chunks(cache: RetrievalCache, score: str, k: int, dtype=np.float32):
    """The cache ``ROWS_PER_CHUNK`` rows at a time: (start, end, scores (c, k) in the
    score mode of column ``score``, values, targets, mask of real neighbours, log counts
    of a pruned datastore's neighbours or None)."""
    metric = cache.mode_of(score).metric
    name = "exact_dists" if score == "exact" else "faiss_dists"
    dists = getattr(cache, name)
    for s in range(0, cache.size, ROWS_PER_CHUNK):
        e = min(cache.size, s + ROWS_PER_CHUNK)
        # copies (np.array): the memmaps are read-only, torch wants writable memory
        d = np.array(dists[s:e, :k], dtype=dtype)
        ids = np.array(cache.ids[s:e, :k], dtype=np.int64)
        # a missing neighbour (id -1) has FAISS's padding distance, ±inf; nothing else may
        refuse_nonfinite(d, cache.path / f"{name}.npy", "the distance", s, allowed=ids < 0)
        vals = torch.from_numpy(np.array(cache.vals[s:e, :k], dtype=np.int64))
        tgt = torch.from_numpy(np.array(cache.targets[s:e], dtype=np.int64))
        counts = None
        if cache.log_counts is not None:
            counts = np.array(cache.log_counts[s:e, :k], dtype=dtype)
            refuse_nonfinite(counts, cache.path / "log_counts.npy", "the log count", s,
                             allowed=ids < 0)
            counts = torch.from_numpy(counts)
        yield (s, e, knn_math.scores_from_distances(torch.from_numpy(d), metric), vals, tgt,
               torch.from_numpy(ids >= 0), counts)


def lm_log_probs(cache: RetrievalCache, s: int = 0, e: int | None = None) -> np.ndarray:
    """log p_LM of the cache's targets ``[s, e)``, float64, checked finite."""
    lm = np.array(cache.lm_logprobs[s:e], dtype=np.float64)
    refuse_nonfinite(lm, cache.path / "lm_logprobs.npy", "the LM log-prob", s)
    return lm


def sweep_sums(cache: RetrievalCache, score: str, k: int, temps: list[float],
               lambdas: list[float], quiet: bool = True) -> dict[str, np.ndarray]:
    """Summed log-probs over all tokens: ``interp`` (T, L), ``knn`` (T,), ``oracle`` (T,),
    ``lm`` scalar. One pass over the cache; every T and λ per chunk (vectorised)."""
    lam = torch.tensor(lambdas, dtype=torch.float64)
    log_l, log_1ml = torch.log(lam), torch.log1p(-lam)   # -inf at the ends: exact edges
    interp = torch.zeros(len(temps), len(lambdas), dtype=torch.float64)
    knn_sum = torch.zeros(len(temps), dtype=torch.float64)
    oracle = torch.zeros(len(temps), dtype=torch.float64)
    lm_sum = 0.0
    chunks = cache_chunks(cache, score, k)
    for s, e, scores, vals, tgt, mask, counts in tqdm(
            chunks, total=-(-cache.size // ROWS_PER_CHUNK), disable=True if quiet else None,
            desc=f"sweep {score} k={k}", unit="chunk"):
        lm = torch.from_numpy(lm_log_probs(cache, s, e))
        lm_sum += float(lm.sum())
        kls = knn_math.knn_target_log_probs_temps(scores, vals, tgt, temps, mask, counts)  # (T, c)
        for ti, kl in enumerate(kls):
            knn_sum[ti] += kl.sum()
            oracle[ti] += torch.maximum(kl, lm).sum()
            mix = torch.logaddexp(lm[:, None] + log_1ml[None], kl[:, None] + log_l[None])
            interp[ti] += mix.sum(0)
    # λ = 0 and 1 exactly (logaddexp with -inf terms is exact already, but keep it explicit)
    for li, l in enumerate(lambdas):
        if l == 0.0:
            interp[:, li] = lm_sum
        elif l == 1.0:
            interp[:, li] = knn_sum
    return dict(interp=interp.numpy(), knn=knn_sum.numpy(), oracle=oracle.numpy(), lm=lm_sum)


def token_log_probs(cache: RetrievalCache, score: str, k: int, temp: float, lmbda: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token of the cache: (log p_LM, log p_kNN at ``temp``, log of the interpolation
    at ``lmbda``), float64 (N,) each — the numbers a sweep point sums."""
    lm = lm_log_probs(cache)
    knn = np.empty(cache.size)
    for s, e, scores, vals, tgt, mask, counts in cache_chunks(cache, score, k, np.float64):
        knn[s:e] = knn_math.knn_target_log_probs(scores, vals, tgt, temp, mask, counts).numpy()
    mix = knn_math.interpolate(torch.from_numpy(lm), torch.from_numpy(knn), lmbda).numpy()
    return lm, knn, mix


def interpolation_sums(base: np.ndarray, other: np.ndarray, lambdas: list[float]) -> np.ndarray:
    """(L,) summed log((1-λ) p_base + λ p_other) over tokens, for per-token log-probs of two
    models on the same tokens (a parametric head vs the base LM)."""
    out = np.zeros(len(lambdas))
    for s in range(0, len(base), ROWS_PER_CHUNK * 64):
        b = torch.from_numpy(np.asarray(base[s:s + ROWS_PER_CHUNK * 64], dtype=np.float64))
        o = torch.from_numpy(np.asarray(other[s:s + ROWS_PER_CHUNK * 64], dtype=np.float64))
        for i, lam in enumerate(lambdas):
            out[i] += float(knn_math.interpolate(b, o, lam).sum())
    return out


def sweep_many(paths: list[str]) -> dict:
    """The best interpolation weights of three or more models' per-token log-probs (EM on
    the simplex), with each model's and the mixture's perplexity."""
    arrays = [open_npy(p, None, np.float32) for p in paths]
    if any(a.shape != arrays[0].shape or a.ndim != 1 for a in arrays):
        raise UserError("--score-files: the files do not score the same tokens ("
                        + ", ".join(f"{p} {a.shape}" for p, a in zip(paths, arrays)) + ")")
    lp = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]))
    w = knn_math.mixture_weights(lp)
    mix = torch.logsumexp(lp + torch.log(w)[:, None], 0)
    n = lp.shape[1]
    return dict(weights=[float(x) for x in w], tokens=n, interp_ppl=_ppl(float(mix.sum()), n),
                model_ppl=[_ppl(float(row.sum()), n) for row in lp], files=list(paths))


def sweep_scores(base_path: str, other_path: str, lambdas: list[float]) -> dict:
    """Best λ for interpolating two per-token score files; per-token perplexities."""
    base, other = (open_npy(p, None, np.float32) for p in (base_path, other_path))
    if base.shape != other.shape or base.ndim != 1:
        raise UserError(f"{base_path} {base.shape} and {other_path} {other.shape} do not score "
                        "the same tokens")
    sums = interpolation_sums(base, other, lambdas)
    n, li = len(base), int(np.argmax(sums))
    return dict(best_lambda=lambdas[li], base_ppl=_ppl(float(base.astype(np.float64).sum()), n),
                other_ppl=_ppl(float(other.astype(np.float64).sum()), n),
                interp_ppl=_ppl(sums[li], n), tokens=n,
                ppl_curve=[_ppl(v, n) for v in sums])


def _ppl(logp_sum: float, n: int) -> float:
    return math.exp(-logp_sum / n) if np.isfinite(logp_sum) else float("inf")


def summarize(sums: dict, temps, lambdas, n_tokens: int, n_words: int) -> dict:
    interp = sums["interp"]
    ti, li = np.unravel_index(np.argmax(interp), interp.shape)
    tk = int(np.argmax(sums["knn"]))
    return dict(
        best_lambda=lambdas[li], best_temp=temps[ti],
        lm_ppl=_ppl(sums["lm"], n_tokens), lm_word_ppl=_ppl(sums["lm"], n_words),
        knn_ppl=_ppl(sums["knn"][ti], n_tokens), knn_word_ppl=_ppl(sums["knn"][ti], n_words),
        best_knn_only_ppl=_ppl(sums["knn"][tk], n_tokens), best_knn_only_temp=temps[tk],
        interp_ppl=_ppl(interp[ti, li], n_tokens), interp_word_ppl=_ppl(interp[ti, li], n_words),
        oracle_ppl=_ppl(sums["oracle"][ti], n_tokens),
        ppl_grid=[[_ppl(v, n_tokens) for v in row] for row in interp],
    )


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when it is not installed
    (plots are optional: the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plots(out: Path, results: dict, temps, lambdas) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    made = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in results.items():
        grid = np.array(r["ppl_grid"])
        ax.plot(temps, grid.min(axis=1), marker="o", label=f"{key} (best λ per T)")
    ax.set_xscale("log")
    ax.set_xlabel("kNN temperature T")
    ax.set_ylabel("interpolated perplexity (per token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_temp.png", dpi=120)
    made.append("ppl_vs_temp.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in results.items():
        grid = np.array(r["ppl_grid"])
        ax.plot(lambdas, grid[temps.index(r["best_temp"])], label=f"{key} (T={r['best_temp']:g})")
    ax.set_xlabel("λ")
    ax.set_ylabel("interpolated perplexity (per token)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_lambda.png", dpi=120)
    plt.close("all")
    made.append("ppl_vs_lambda.png")
    return made


def markdown(results: dict) -> str:
    rows = ["| score | score mode | k | best λ | best T | LM ppl | kNN ppl (at T) | kNN-LM ppl |"
            " oracle ppl | kNN-LM word ppl |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        score, k = key.split("@k=")
        rows.append(f"| {score} | {r['score_mode']['name']} | {k} | {r['best_lambda']:g} | "
                    f"{r['best_temp']:g} | "
                    f"{r['lm_ppl']:.2f} | {r['knn_ppl']:.2f} | {r['interp_ppl']:.2f} | "
                    f"{r['oracle_ppl']:.2f} | {r['interp_word_ppl']:.2f} |")
    return "\n".join(rows) + "\n"


def main(cfg: SweepConfig) -> dict:
    if cfg.score_files and len(cfg.score_files.split(",")) > 2:
        res = sweep_many(cfg.score_files.split(","))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cfg.out) / "sweep.json", dict(config=config_dict(cfg), results=res))
        print(" | ".join(f"{Path(p).name} ppl {x:.2f}" for p, x in zip(res["files"], res["model_ppl"]))
              + f" | interpolated ppl {res['interp_ppl']:.2f} with weights "
              + ", ".join(f"{w:.3f}" for w in res["weights"]) + f" ({res['tokens']:,} tokens)")
        return res
    if cfg.score_files:
        res = sweep_scores(*cfg.score_files.split(","), cfg.lambdas)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cfg.out) / "sweep.json", dict(config=config_dict(cfg),
                                                             lambdas=cfg.lambdas, results=res))
        print(f"base ppl {res['base_ppl']:.2f} | other ppl {res['other_ppl']:.2f} | "
              f"interpolated ppl {res['interp_ppl']:.2f} at λ {res['best_lambda']:g} "
              f"({res['tokens']:,} tokens)")
        return res
    cache = RetrievalCache(cfg.cache)
    if cfg.dstore_filename:
        cache.check_datastore(Datastore(cfg.dstore_filename).fingerprint)
    ks = cfg.ks or [cache.k]
    if max(ks) > cache.k:
        raise UserError(f"--k {max(ks)} exceeds the cached k {cache.k}")
    mode = cache.mode
    if not cfg.scores and mode.recompute and not cache.has_exact:
        raise UserError(f"{cache.path} lacks the exact distances its evaluation scored with "
                        "(written by an older knnlm): rerun eval-lm, or sweep --score faiss")
    scores = cfg.scores or [mode.cache_score]
    modes = {score: cache.mode_of(score) for score in scores}
    print(f"score mode of the evaluation: {mode.name} ({mode.describe()})")
    n_words = int(np.asarray(cache.words).sum())
    results = {}
    for score in scores:
        for k in ks:
            sums = sweep_sums(cache, score, k, cfg.temps, cfg.lambdas, cfg.quiet)
            results[f"{score}@k={k}"] = dict(
                summarize(sums, cfg.temps, cfg.lambdas, cache.size, n_words),
                score_mode=modes[score].to_dict())
    out = Path(cfg.out) if cfg.out else cache.path / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "sweep.md").write_text(table)
    plots = _plots(out, results, cfg.temps, cfg.lambdas)
    write_json_atomic(out / "sweep.json", dict(config=config_dict(cfg), temps=cfg.temps,
                                               lambdas=cfg.lambdas, tokens=cache.size,
                                               evaluation_score_mode=mode.to_dict(),
                                               words=n_words, results=results, plots=plots))
    print(table, end="")
    print(f"wrote {out}/sweep.json, sweep.md" + (", " + ", ".join(plots) if plots else ""))
    return results
