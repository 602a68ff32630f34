"""The parts of `knnlm analyze`, each a function (cfg, runner) -> JSON-able results.

:class:`Runner` runs the stages the parts share (index builds, evals with retrieval
caches, sweeps) through the same configs the CLI commands use, skips those already done,
and records for each the `knnlm` command that reproduces it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import evaluate
from ..data.preprocess import DataBin
from ..io import read_json
from ..knn import index as index_mod, sweep
from ..knn.cache import RetrievalCache
from ..knn.datastore import Datastore
from ..knn.search import default_index_path
from ..lm.checkpoint import load_checkpoint
from ..util import command_line, config_dict
from . import efficiency as eff_mod, stats
from .subsample import write_subset

OVERLAP_KS = (1, 8, 64, 256, 1024)
HEAD_FIELDS = ("softmax_input", "pseudo_vocab_ratio", "num_extra_embed", "k_mos",
               "additional_linear", "use_l2", "norm_l2")
# configuration fields that only some parts depend on
PART_FIELDS = dict(retrieval=("large_probe",), temperature=("large_probe",),
                   overlap=("large_probe",), size=("subsample",), parametric=("head",),
                   overfit=("overfit_dir", "overfit_train_tokens"))
NEVER = ("parts", "quiet", "cpu", "index_dir")


def part_identity(name: str, cfg) -> dict:
    optional = {f for fields in PART_FIELDS.values() for f in fields} - set(PART_FIELDS.get(name, ()))
    return {k: v for k, v in config_dict(cfg).items() if k not in NEVER and k not in optional}


class Runner:
    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.results_dir)
        self.timings: dict[str, float] = {}
        self._summaries: dict[tuple, dict] = {}
        self.ds = Datastore(cfg.dstore_filename)
        self.index_dir = Path(cfg.index_dir) if cfg.index_dir else self.out / "indexes"

    def index_path(self, keytype: str, metric: str) -> Path:
        return default_index_path(self.index_dir, keytype, metric)

    def _timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        res = fn(*args)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0
        return res

    # ------------------------------------------------------------------ stages
    def index(self, ds: Datastore, keytype: str, metric: str, path: Path) -> tuple[Path, str]:
        factory = self.cfg.index_factory
        if factory and factory.startswith("IVF"):  # too few keys for the lists: choose anew
            nlist = int(factory[3:].split(",")[0])
            if ds.size < nlist * index_mod.MIN_POINTS_PER_LIST:
                factory = None
        icfg = index_mod.BuildIndexConfig(
            dstore_dir=str(ds.path), knn_keytype=keytype, metric=metric, index_factory=factory,
            faiss_index=str(path), probe=self.cfg.probe, train_size=self.cfg.train_size,
            seed=self.cfg.seed, quiet=self.cfg.quiet)
        self._timed("build-index", index_mod.build_index, icfg)
        return path, command_line("build-index", icfg)

    def knn_eval(self, name: str, ds: Datastore, keytype: str, metric: str, indexfile: Path | None,
                 probe: int | None = None, exact_search: bool = False) -> tuple[RetrievalCache, str]:
        c = self.cfg
        ecfg = evaluate.EvalConfig(
            data=c.data, path=c.path, gen_subset=c.gen_subset, max_eval_tokens=c.max_eval_tokens,
            tokens_per_sample=c.tokens_per_sample, context_window=c.context_window,
            sample_break_mode=c.sample_break_mode,
            max_tokens=c.max_tokens, knnlm=True, dstore_filename=str(ds.path),
            indexfile=None if exact_search else str(indexfile), k=c.k, probe=probe or c.probe,
            lmbda=0.25, knn_temp=1.0,   # explicit: never an index's tuned settings
            knn_keytype=keytype, faiss_metric_type=metric, knn_sim_func="do_not_recomp_l2",
            exact_search=exact_search, save_retrieval=str(self.out / "caches" / name),
            save_exact_dists=not exact_search, results_path=str(self.out / "evals" / f"{name}.json"),
            cpu=c.cpu, quiet=c.quiet)
        if not self._done(ecfg, Path(ecfg.save_retrieval) / "cache.json"):
            print(f"-- eval-lm --knnlm: {name}")
            self._timed("eval-lm --knnlm", evaluate.main, ecfg)
        return RetrievalCache(ecfg.save_retrieval), command_line("eval-lm", ecfg)

    def lm_scores(self, name: str, ckpt: str, subset: str | None = None,
                  max_eval_tokens: int | None = None) -> tuple[Path, str]:
        """Per-token log-probs of a checkpoint on the eval split (or ``subset``)."""
        c = self.cfg
        ecfg = evaluate.EvalConfig(
            data=c.data, path=ckpt, gen_subset=subset or c.gen_subset,
            max_eval_tokens=c.max_eval_tokens if max_eval_tokens is None else max_eval_tokens,
            tokens_per_sample=c.tokens_per_sample, context_window=c.context_window,
            sample_break_mode=c.sample_break_mode,
            max_tokens=c.max_tokens, save_scores=str(self.out / "evals" / f"{name}_scores.npy"),
            results_path=str(self.out / "evals" / f"{name}.json"), cpu=c.cpu, quiet=c.quiet)
        if not self._done(ecfg, Path(ecfg.save_scores)):
            print(f"-- eval-lm: {name}")
            self._timed("eval-lm", evaluate.main, ecfg)
        return Path(ecfg.save_scores), command_line("eval-lm", ecfg)

    @staticmethod
    def _done(ecfg, output: Path) -> bool:
        res = Path(ecfg.results_path)
        if not (res.is_file() and output.is_file()):
            return False
        if output.name == "cache.json" and not read_json(output, "cache").get("complete"):
            return False
        return read_json(res, "eval results").get("config") == config_dict(ecfg)

    def summary(self, cache: RetrievalCache, score: str) -> dict:
        """Best λ at T = 1 and best (T, λ) over the cache, with the sweep command."""
        key = (str(cache.path), score)
        if key not in self._summaries:
            c = self.cfg
            sums = self._timed("sweep", sweep.sweep_sums, cache, score, cache.k, c.temps, c.lambdas)
            res = stats.sweep_summary(sums, c.temps, c.lambdas, cache.size)
            scfg = sweep.SweepConfig(cache=str(cache.path), lmbda=c.lmbda,
                                     knn_temp=",".join(f"{t:g}" for t in c.temps), score=score)
            res["command"] = command_line("sweep", scfg)
            res["score_mode"] = cache.mode_of(score).to_dict()
            self._summaries[key] = res
        return self._summaries[key]

    # ------------------------------------------------------------------ shared settings
    def main_eval(self, keytype: str, metric: str) -> tuple[RetrievalCache, list[str]]:
        # the path `knnlm build-index` writes by default: an index built there with the same
        # factory, training sample and seed is reused
        path = self.index_path(keytype, metric)
        _, icmd = self.index(self.ds, keytype, metric, path)
        cache, ecmd = self.knn_eval(f"{keytype}_{metric}", self.ds, keytype, metric, path)
        return cache, [icmd, ecmd]

    def retrieval_modes(self) -> list[tuple[str, RetrievalCache, str, list[str]]]:
        """(label, cache, score mode, commands) of the paper's retrieval settings (att, L2)."""
        c = self.cfg
        cache, cmds = self.main_eval("att", "l2")
        exact, ecmd = self.knn_eval("att_l2_exact", self.ds, "att", "l2", None, exact_search=True)
        big, bcmd = self.knn_eval(f"att_l2_probe{c.nprobe_large}", self.ds, "att", "l2",
                                  self.index_path("att", "l2"), probe=c.nprobe_large)
        return [(f"FAISS mask, FAISS score (nprobe {c.probe})", cache, "faiss", cmds),
                (f"FAISS mask, real score (nprobe {c.probe})", cache, "exact", cmds),
                ("real mask, real score (exact search)", exact, "faiss", [ecmd]),
                (f"FAISS mask, FAISS score (nprobe {c.nprobe_large})", big, "faiss", [bcmd]),
                (f"FAISS mask, real score (nprobe {c.nprobe_large})", big, "exact", [bcmd])]


def _row(summary: dict, **extra) -> dict:
    return dict(extra, lm_ppl=summary["lm_ppl"], t1=summary.get("t1"), best=summary["best"],
                curve=summary["curve"], score_mode=summary["score_mode"]["name"], commands=extra.pop("commands", []) + [summary["command"]])


# ---------------------------------------------------------------------- the parts
def representation(cfg, runner: Runner) -> dict:
    rows = []
    for keytype in ("att", "ffn"):
        for metric in ("l2", "ip"):
            cache, cmds = runner.main_eval(keytype, metric)
            rows.append(_row(runner.summary(cache, "faiss"), keytype=keytype, metric=metric,
                             commands=cmds))
    return dict(rows=rows)


def retrieval(cfg, runner: Runner) -> dict:
    rows = [_row(runner.summary(cache, score), mode=label, commands=cmds)
            for label, cache, score, cmds in runner.retrieval_modes()]
    return dict(rows=rows)


def temperature(cfg, runner: Runner) -> dict:
    # a list, not a dict: the JSON files sort object keys, and the column order matters
    curves = [dict(runner.summary(cache, score)["curve"], mode=label,
                   command=runner.summary(cache, score)["command"],
                   score_mode=runner.summary(cache, score)["score_mode"]["name"])
              for label, cache, score, _ in runner.retrieval_modes()]
    return dict(curves=curves)


def size(cfg, runner: Runner) -> dict:
    rows = []
    for f in sorted(cfg.fractions):
        if f == 1.0:
            ds, (cache, cmds) = runner.ds, runner.main_eval("att", "l2")
        else:
            sub_dir = runner.out / "subsets" / f"{f:g}"
            ds = runner._timed("subset", write_subset, runner.ds, sub_dir, "att", f, cfg.seed,
                               cfg.quiet)
            path, icmd = runner.index(ds, "att", "l2", default_index_path(ds.path, "att", "l2"))
            cache, ecmd = runner.knn_eval(f"att_l2_size{f:g}", ds, "att", "l2", path)
            cmds = [f"(knnlm analyze writes the subset: fraction {f:g}, seed {cfg.seed})", icmd, ecmd]
        ipath = runner.index_path("att", "l2") if f == 1.0 else default_index_path(ds.path, "att", "l2")
        meta = read_json(str(ipath) + ".json", "index sidecar")
        rows.append(_row(runner.summary(cache, "faiss"), fraction=f, keys=ds.size,
                         factory=meta["factory"], commands=cmds))
    return dict(rows=rows)


def overlap(cfg, runner: Runner) -> dict:
    modes = runner.retrieval_modes()
    exact = modes[2][1]
    rows = []
    for label, cache, _, _ in (modes[0], modes[3]):
        for k in [k for k in OVERLAP_KS if k < cfg.k] + [cfg.k]:
            ov = stats.neighbour_overlap(cache.ids, exact.ids, [k])[k]
            gaps = stats.distance_gaps(cache.exact_dists, cache.faiss_dists, exact.faiss_dists, k)
            rows.append(dict(search=label.split("(")[-1].rstrip(")"), k=k, overlap=ov, **gaps))
    return dict(rows=rows, commands=[modes[i][3][-1] for i in (0, 2, 3)])


def tokens(cfg, runner: Runner) -> dict:
    """Where retrieval helps: the main kNN-LM (att, L2, FAISS, best T and λ) against the LM
    per training-frequency bucket of the target, and the token types that gain and lose
    most (paper notes §3)."""
    cache, cmds = runner.main_eval("att", "l2")
    summ = runner.summary(cache, "faiss")
    best = summ["best"]
    lm, _, mix = sweep.token_log_probs(cache, "faiss", cache.k, best["temp"], best["lmbda"])
    targets = np.asarray(cache.targets, dtype=np.int64)
    databin = DataBin(cfg.data)
    counts = np.bincount(np.asarray(databin.split("train")), minlength=databin.vocab_size)
    top = stats.top_types(targets, lm, mix)
    for rows in top.values():
        for r in rows:
            r.update(text=databin.vocab.decode([r["token"]]), train_count=int(counts[r["token"]]))
    return dict(temp=best["temp"], lmbda=best["lmbda"], lm_ppl=summ["lm_ppl"],
                knnlm_ppl=best["ppl"], buckets=stats.frequency_buckets(targets, lm, mix, counts),
                top=top, spans=stats.extreme_spans(mix - lm), commands=cmds + [summ["command"]])


def parametric(cfg, runner: Runner) -> dict:
    base_scores, base_cmd = runner.lm_scores("base", cfg.path)
    knn_summary = runner.summary(runner.main_eval("att", "l2")[0], "faiss")
    base_ppl = knn_summary["lm_ppl"]
    rows = []
    for name, ckpt in cfg.heads.items():
        scores, cmd = runner.lm_scores(f"head_{name}", ckpt)
        res = sweep.sweep_scores(str(base_scores), str(scores), cfg.lambdas)
        mcfg = load_checkpoint(ckpt)["model_cfg"]
        head = {k: mcfg.get(k) for k in HEAD_FIELDS if k in mcfg}
        if head.get("num_extra_embed") is not None:
            head["num_extra_embed"] = f"{sum(head['num_extra_embed']):,} extra rows"
        scfg = sweep.SweepConfig(score_files=f"{base_scores},{scores}", lmbda=cfg.lmbda,
                                 out=str(runner.out / "evals" / f"sweep_{name}"))
        rows.append(dict(name=name, checkpoint=ckpt, head=head, alone_ppl=res["other_ppl"],
                         lmbda=res["best_lambda"], interp_ppl=res["interp_ppl"],
                         gain_recovered=stats.gain_recovered(base_ppl, res["interp_ppl"],
                                                             knn_summary["best"]["ppl"]),
                         commands=[base_cmd, cmd, command_line("sweep", scfg)]))
    return dict(base_ppl=base_ppl, knnlm=dict(t1=knn_summary["t1"], best=knn_summary["best"],
                                              command=knn_summary["command"]), rows=rows)


def epoch_checkpoints(save_dir: str) -> list[tuple[int, Path]]:
    """(epoch, path) of the ``checkpoint<EPOCH>.pt`` files `knnlm train --save-interval`
    keeps, in epoch order."""
    found = []
    for p in Path(save_dir).glob("checkpoint*.pt"):
        tail = p.stem[len("checkpoint"):]
        if tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)


def overfit(cfg, runner: Runner) -> dict:
    """Does memorising the training set recover the kNN-LM's gain (paper notes §3, 'ruled
    out')? The base LM trained further, past convergence (the epoch checkpoints of `knnlm
    train --restore-file BASE --save-interval 1`, typically with dropout 0): per epoch its
    perplexity on the first training tokens and on the eval split, alone and interpolated
    with the base LM, next to the kNN-LM."""
    base_scores, base_cmd = runner.lm_scores("base", cfg.path)
    base_train, base_train_cmd = runner.lm_scores("base_train", cfg.path, "train",
                                                  cfg.overfit_train_tokens)
    knn_summary = runner.summary(runner.main_eval("att", "l2")[0], "faiss")
    base_ppl, knn_ppl = knn_summary["lm_ppl"], knn_summary["best"]["ppl"]
    rows = []
    for epoch, ckpt in epoch_checkpoints(cfg.overfit_dir):
        scores, cmd = runner.lm_scores(f"overfit{epoch}", str(ckpt))
        train_scores, tcmd = runner.lm_scores(f"overfit{epoch}_train", str(ckpt), "train",
                                              cfg.overfit_train_tokens)
        res = sweep.sweep_scores(str(base_scores), str(scores), cfg.lambdas)
        train = sweep.sweep_scores(str(base_train), str(train_scores), [0.0])
        state = load_checkpoint(ckpt)["train_state"]
        scfg = sweep.SweepConfig(score_files=f"{base_scores},{scores}", lmbda=cfg.lmbda,
                                 out=str(runner.out / "evals" / f"sweep_overfit{epoch}"))
        rows.append(dict(epoch=epoch, checkpoint=str(ckpt), updates=state["num_updates"],
                         train_ppl=train["other_ppl"], alone_ppl=res["other_ppl"],
                         lmbda=res["best_lambda"], interp_ppl=res["interp_ppl"],
                         gain_recovered=stats.gain_recovered(base_ppl, res["interp_ppl"], knn_ppl),
                         commands=[cmd, tcmd, command_line("sweep", scfg)]))
    base_train_ppl = sweep.sweep_scores(str(base_train), str(base_train), [0.0])["base_ppl"]
    return dict(base_ppl=base_ppl, base_train_ppl=base_train_ppl,
                train_tokens=cfg.overfit_train_tokens, rows=rows,
                knnlm=dict(best=knn_summary["best"], command=knn_summary["command"]),
                commands=[base_cmd, base_train_cmd])


def efficiency(cfg, runner: Runner) -> dict:
    """The efficiency methods (:mod:`knnlm.analysis.efficiency`) at the main kNN-LM's tuned
    point (att, L2, FAISS neighbours scored by exact L2), on the analysis tokens; the gates
    are trained on the other held-out split."""
    cache, cmds = runner.main_eval("att", "l2")
    best = runner.summary(cache, "exact")["best"]
    meta = read_json(str(runner.index_path("att", "l2")) + ".json", "index sidecar")
    ecfg = eff_mod.EfficiencyConfig(
        data=cfg.data, path=cfg.path, dstore=cfg.dstore_filename, work=str(runner.out / "efficiency"),
        split=cfg.gen_subset, tokens=cfg.max_eval_tokens, tokens_per_sample=cfg.tokens_per_sample,
        context_window=cfg.context_window, k=cfg.k, probe=cfg.probe, lmbda=best["lmbda"],
        knn_temp=best["temp"], factory=meta["factory"], train_size=cfg.train_size,
        gate_split="test" if cfg.gen_subset == "valid" else "valid",
        gate_tokens=cfg.max_eval_tokens or 20000, pca_dim=min(64, runner.ds.dim // 2),
        quiet=cfg.quiet)
    res = runner._timed("efficiency", eff_mod.run, ecfg)
    res.update(lmbda=best["lmbda"], temp=best["temp"], factory=meta["factory"],
               commands=cmds + [runner.summary(cache, "exact")["command"]])
    return res
