"""`knnlm analyze`: the analyses of "Why do Nearest Neighbor Language Models Work?" in one
results directory (paper notes §3).

Inputs: a data-bin (positional), the checkpoint (``--path``), its datastore with both
``att`` and ``ffn`` keys (``--dstore-filename``) and optionally parametric-head
checkpoints (``--head NAME=CKPT``, trained with `knnlm train --restore-file ...`).
Outputs in ``--results-dir``: ``<part>.json`` and ``<part>.md`` per part, ``report.md``
(every table, each number with the command that made it), ``temperature.png``,
``size.png``, ``timings.json``; the retrieval caches, eval results and datastore subsets
it needed under ``caches/``, ``evals/``, ``subsets/``. Indexes go where `knnlm
build-index` puts them (``<datastore>/index_<keytype>_<metric>.faiss``, or under
``--index-dir``), and one built there already with the same factory, sample and seed is
used as it is.

    knnlm analyze runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-filename runs/demo/dstore --results-dir runs/demo/analysis \\
        --head kv3=runs/demo/ckpt_kv3/checkpoint_best.pt --max-eval-tokens 20000

Parts (``--parts``, default all): representation (att/ffn × L2/IP), retrieval (FAISS vs
real mask and score, large nprobe), temperature (curves per retrieval mode), size
(seeded datastore subsets), overlap (approximate vs exact neighbour sets), tokens (where
retrieval helps: by training frequency of the target, and the types that gain and lose
most, as text), parametric
(heads alone and interpolated with the base, next to the kNN-LM), overfit (the base LM
trained past convergence, ``--overfit-dir``: train and eval perplexity per epoch, alone
and with the base LM), efficiency (adaptive retrieval, RetoMaton pointers, pruning, PCA,
alone and combined: tokens/s, perplexity and share of tokens searched against the plain
kNN-LM, on the same tokens). Every eval writes a
retrieval cache once; all λ and T optima come from sweeps over the caches. Re-running
skips every finished part, index and eval whose recorded configuration matches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.blocks import BREAK_MODES
from ..data.preprocess import DataBin
from ..guard import check_output, output_lock
from ..io import read_json, write_json_atomic
from ..knn.datastore import Datastore
from ..knn.sweep import parse_grid
from ..lm.checkpoint import check_data_matches, load_checkpoint, model_fingerprint
from ..util import UserError, command_line, config_dict, flag
from . import parts, report

PARTS = ("representation", "retrieval", "temperature", "size", "overlap", "tokens", "parametric",
         "overfit", "efficiency")


@dataclass
class AnalyzeConfig:
    data: str = flag(help="data-bin directory", positional=True)
    path: str = flag(help="checkpoint of the base LM")
    dstore_filename: str = flag(help="datastore directory with att and ffn keys")
    results_dir: str = flag(help="directory for every table, plot and intermediate file")
    gen_subset: str = flag("valid", "split to evaluate")
    max_eval_tokens: int = flag(0, "evaluate the first N tokens of the split (0: all)")
    tokens_per_sample: int | None = flag(None, "eval window (default: the model's max positions)")
    context_window: int = flag(0, "eval left context per block")
    sample_break_mode: str = flag("none", "eval blocks: none | complete | eos (eval-lm's)",
                                  choices=BREAK_MODES)
    max_tokens: int = flag(8192, "padded tokens per eval batch")
    k: int = flag(1024, "neighbours per query")
    probe: int = flag(32, "nprobe of the approximate searches")
    large_probe: int = flag(0, "nprobe of the 'large nprobe' setting (0: 8 x --probe)")
    index_factory: str | None = flag(None, "FAISS factory (default: chosen from N and D)")
    index_dir: str | None = flag(None, "where the indexes of the full datastore are read or "
                                 "built (default: RESULTS_DIR/indexes; the datastore's own "
                                 "directory is never written)")
    train_size: int = flag(1_000_000, "keys sampled to train each index")
    lmbda: str = flag("0:1:0.01", "λ grid of every sweep")
    knn_temp: str = flag("0.1,0.25,0.5,0.75,1,1.5,2,3,4,6,8,12,16", "temperature grid (1 is "
                         "always included)")
    subsample: str = flag("0.05,0.1,0.25,0.5,1", "datastore fractions of the size part")
    head: str | None = flag(None, "parametric heads: NAME=CKPT[,NAME=CKPT...]")
    overfit_dir: str | None = flag(None, "save dir of the base LM trained past convergence "
                                   "(its checkpoint<EPOCH>.pt files: knnlm train --restore-file "
                                   "BASE --save-interval 1)")
    overfit_train_tokens: int = flag(50_000, "training tokens scored per epoch checkpoint")
    parts: str = flag("all", f"comma list of: {', '.join(PARTS)}")
    seed: int = flag(1, "seed of index training samples and datastore subsets")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        self.part_list = list(PARTS) if self.parts == "all" else [
            p.strip() for p in self.parts.split(",") if p.strip()]
        bad = [p for p in self.part_list if p not in PARTS]
        if bad or not self.part_list:
            raise UserError(f"--parts: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
        for name in ("k", "probe", "max_tokens", "train_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.large_probe < 0 or self.max_eval_tokens < 0:
            raise UserError("--large-probe and --max-eval-tokens must be >= 0")
        self.lambdas = parse_grid(self.lmbda, "--lmbda")
        self.temps = sorted(set(parse_grid(self.knn_temp, "--knn-temp")) | {1.0})
        if any(not 0 <= x <= 1 for x in self.lambdas) or any(t <= 0 for t in self.temps):
            raise UserError("--lmbda values must lie in [0, 1] and --knn-temp values be > 0")
        self.fractions = parse_grid(self.subsample, "--subsample")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise UserError(f"--subsample fractions must lie in (0, 1], got {self.subsample}")
        self.heads = {}
        for item in (self.head or "").split(","):
            if item.strip():
                name, sep, ckpt = item.partition("=")
                if not sep or not name.strip() or not ckpt.strip():
                    raise UserError(f"--head takes NAME=CKPT, got {item!r}")
                self.heads[name.strip()] = ckpt.strip()
        if "parametric" in self.part_list and self.parts != "all" and not self.heads:
            raise UserError("--parts parametric needs --head NAME=CKPT")
        if "overfit" in self.part_list and self.parts != "all" and not self.overfit_dir:
            raise UserError("--parts overfit needs --overfit-dir")
        if self.overfit_train_tokens <= 0:
            raise UserError("--overfit-train-tokens must be > 0")
        check_output(self.results_dir, "dir", "--results-dir")
        check_output(self.index_dir, "dir", "--index-dir")

    @property
    def nprobe_large(self) -> int:
        return self.large_probe or 8 * self.probe


def run_part(name: str, cfg: AnalyzeConfig, runner: "parts.Runner", timings: dict) -> dict:
    """One part, skipped when its JSON exists with the same configuration."""
    out = Path(cfg.results_dir)
    path = out / f"{name}.json"
    ident = parts.part_identity(name, cfg)
    if path.is_file():
        old = read_json(path, f"{name} results")
        if old.get("identity") == ident:
            print(f"== {name}: already done ({path})")
            return old
    print(f"== {name}")
    t0 = time.perf_counter()
    res = getattr(parts, name)(cfg, runner)
    res.update(identity=ident, command=command_line("analyze", replace(cfg, parts=name)))
    timings[name] = time.perf_counter() - t0
    write_json_atomic(path, res)
    (out / f"{name}.md").write_text(report.part_markdown(name, res))
    return res


def check_inputs(cfg: AnalyzeConfig) -> None:
    """Every input, before anything is written: the model, its datastore, and each head
    (a checkpoint of the same vocabulary)."""
    databin = DataBin(cfg.data)
    base = load_checkpoint(cfg.path)
    check_data_matches(base, databin, cfg.path)
    Datastore(cfg.dstore_filename).check_model(model_fingerprint(base["model"]),
                                               databin.tokenizer_sha256)
    for name, ckpt in cfg.heads.items():
        check_data_matches(load_checkpoint(ckpt), databin, ckpt)
    if cfg.overfit_dir:
        found = parts.epoch_checkpoints(cfg.overfit_dir)
        if not found:
            raise UserError(f"--overfit-dir {cfg.overfit_dir}: no checkpoint<EPOCH>.pt files "
                            "(train with --save-interval 1)")
        for _, ckpt in found:
            check_data_matches(load_checkpoint(ckpt), databin, str(ckpt))


def main(cfg: AnalyzeConfig) -> dict:
    check_inputs(cfg)
    with output_lock(cfg.results_dir, "dir", "results directory"):
        return _analyze(cfg)


def _analyze(cfg: AnalyzeConfig) -> dict:
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = parts.Runner(cfg)
    timings: dict[str, float] = {}
    results = {}
    for name in cfg.part_list:
        if name == "parametric" and not cfg.heads:
            print("== parametric: skipped (no --head given)")
            continue
        if name == "overfit" and not cfg.overfit_dir:
            print("== overfit: skipped (no --overfit-dir given)")
            continue
        results[name] = run_part(name, cfg, runner, timings)
    timings.update({f"stage:{k}": v for k, v in runner.timings.items()})
    old = read_json(out / "timings.json", "timings") if (out / "timings.json").is_file() else {}
    write_json_atomic(out / "timings.json", dict(old, **timings))
    plots = report.plots(out, results)
    text = report.full_report(results, config_dict(cfg), plots)
    (out / "report.md").write_text(text)
    spans = explorer_pages(cfg, runner, results.get("tokens"), out / "explore")
    (out / "report.html").write_text(report.html_report(text, spans))
    print(text)
    print(f"wrote {out}/report.md, {out}/report.html")
    return results


def explorer_pages(cfg: AnalyzeConfig, runner, tokens_part: dict | None, out: Path) -> list[dict]:
    """The explorer page (`knnlm neighbors --html`) of each span where the main kNN-LM
    gains or loses most (the tokens part), at its best λ and T, with the analysis' index;
    the spans, each with its page's path (relative to the results directory)."""
    if not tokens_part or not tokens_part.get("spans"):
        return []
    from ..neighbors import Inspector, NeighborsConfig
    databin = DataBin(cfg.data)
    split = np.asarray(databin.split(cfg.gen_subset))
    ncfg = NeighborsConfig(data=cfg.data, path=cfg.path, dstore_filename=cfg.dstore_filename,
                           indexfile=str(runner.index_path("att", "l2")), k=min(cfg.k, 64),
                           probe=cfg.probe, lmbda=tokens_part["lmbda"],
                           knn_temp=tokens_part["temp"], knn_keytype="att",
                           knn_sim_func="do_not_recomp_l2", text="-", cpu=cfg.cpu)
    insp = Inspector(ncfg, log=lambda *a: None)
    out.mkdir(parents=True, exist_ok=True)
    spans = []
    for n, span in enumerate(tokens_part["spans"], 1):
        ids = split[span["start"]:span["end"]]
        page, _ = insp.page(ids)
        name = f"{span['kind']}_{n}.html"
        (out / name).write_text(page, encoding="utf-8")
        spans.append(dict(span, page=f"{out.name}/{name}", text=databin.vocab.decode(ids)))
    return spans
