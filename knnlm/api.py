"""The Python API: a kNN-LM from an HF model object and texts, without the command line.

    import knnlm
    ds = knnlm.Datastore.build(model, tokenizer, texts, out="runs/py/dstore")  # or a Dataset
    with knnlm.KNNLM(model, ds, lmbda=0.25) as knn:       # λ, T, k: tuned.json when given
        knn.perplexity(["held-out text ..."])             # = eval-lm --knnlm on these tokens
        knn.loss(input_ids, labels=input_ids)             # the kNN-LM's mean NLL
        knn.generate(**batch, max_new_tokens=20)          # any generate() option
    ds.add(["a new document ..."])                        # more entries, the same index

A thin layer over the stages the commands run — preprocess, build-dstore, build-index,
eval-lm, the HF generate() integration — never a second copy of them: a datastore built
here is the one `knnlm build-dstore` writes from the same text (the same files and
sidecars, keys equal), and every command reads it.

Layout of ``Datastore.build``'s ``out``: the datastore files and the index (and later its
``tuned.json``), ``text/<split>.txt`` (the texts as given), ``tokenizer/`` (the model's
tokenizer) and ``data-bin/`` (the tokens; neighbours show their text from it).
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .util import UserError


def _hf_lm(model):
    """The HF model object as a knnlm LM, checked (its logits reproduced from ``ffn``)."""
    from .lm.hf import HFCausalLM
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    lm = HFCausalLM(model, name)
    with _eval_mode(model):
        lm.check_logits()
    return lm


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off while keys and scores are computed; the caller's mode restored."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class Datastore:
    """A datastore directory (see :mod:`knnlm.knn.datastore`), its index and settings."""

    def __init__(self, path: str | Path):
        from .knn.datastore import Datastore as Files
        self.path = Path(path)
        self.files = Files(self.path)
        self.meta = self.files.meta

    @classmethod
    def load(cls, path: str | Path) -> "Datastore":
        """Open a datastore directory (JSON sidecars and .npy files only: nothing is
        unpickled)."""
        return cls(path)

    def __repr__(self) -> str:
        return (f"Datastore({str(self.path)!r}, {self.size:,} entries x {self.files.dim}, "
                f"{', '.join(self.keytypes)})")

    @property
    def size(self) -> int:
        return self.files.size

    @property
    def keytypes(self) -> list[str]:
        return list(self.files.keytypes)

    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    @property
    def data_bin(self) -> Path:
        """The data-bin its entries were taken from (inside the directory when built here,
        also after the directory was copied elsewhere)."""
        own = self.path / "data-bin"
        return own if (own / "data.json").is_file() else Path(self.meta["data_dir"])

    def indexes(self) -> list[Path]:
        """The complete FAISS indexes of this datastore in its directory."""
        from .io import read_json
        out = []
        for side in sorted(self.path.glob("*.json")):
            if side.name == "datastore.json" or side.name.endswith(".tuned.json"):
                continue
            meta = read_json(side, "index sidecar")
            index = side.with_name(side.name[:-len(".json")])
            if meta.get("datastore_fingerprint") == self.fingerprint and meta.get("complete") \
                    and index.is_file():
                out.append(index)
        return out

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, model, tokenizer, texts, out: str | Path, *, keytype: str = "att",
              text_column: str = "text", split: str = "train", batch_size: int = 8192,
              tokens_per_sample: int | None = None, context_window: int | None = None,
              index: str | None = "auto", metric: str = "l2", dstore_fp32: bool = False,
              overwrite: bool = False, quiet: bool = False) -> "Datastore":
        """Build a datastore (and its index) of ``model``'s representations of ``texts``.

        ``model``: an HF ``*ForCausalLM`` in memory (any device and dtype); ``tokenizer``:
        its fast tokenizer; ``texts``: a list or iterable of strings, or rows / a
        ``datasets.Dataset`` / ``IterableDataset`` holding ``text_column`` (streamed to
        disk with a progress bar). ``keytype``: att, ffn, layer:N or several, comma
        separated; ``batch_size``: padded tokens per forward (build-dstore's
        --max-tokens); ``index``: "auto" (the factory build-index chooses), a FAISS
        factory string, or None for none (exact search then). Killed, the same call
        resumes; called again on a finished directory, it reuses it."""
        from .build_dstore import BuildDstoreConfig, build_dstore
        from .data.hf_datasets import write_texts
        from .data.preprocess import DataBin, PreprocessConfig
        from .data.preprocess import main as preprocess
        from .lm.hf import hf_fingerprint
        if split not in ("train", "valid", "test"):
            raise UserError(f"split must be train, valid or test, got {split!r}")
        out = Path(out)
        lm = _hf_lm(model)
        text = out / "text" / f"{split}.txt"
        write_texts(texts, text, text_column, quiet)
        tokenizer.save_pretrained(out / "tokenizer")
        preprocess(PreprocessConfig(destdir=str(out / "data-bin"), hf_tokenizer=str(
            out / "tokenizer"), overwrite=overwrite, quiet=quiet, **{f"{split}pref": str(text)}))
        databin = DataBin(out / "data-bin")
        cfg = BuildDstoreConfig(data=str(databin.path), hf_model=lm.name, dstore_dir=str(out),
                                gen_subset=split, knn_keytype=keytype,
                                tokens_per_sample=tokens_per_sample,
                                context_window=context_window, max_tokens=batch_size,
                                dstore_fp32=dstore_fp32, overwrite=overwrite, quiet=quiet)
        device = next(model.parameters()).device
        with _eval_mode(model), torch.no_grad():
            build_dstore(lm, databin, cfg, device, hf_fingerprint(model))
        ds = cls(out)
        if index is not None:
            ds.build_index(index, metric=metric, keytype=cfg.keytypes[0], quiet=quiet)
        return ds

    def build_index(self, factory: str = "auto", *, metric: str = "l2",
                    keytype: str | None = None, quiet: bool = False) -> Path:
        """A FAISS index of one keytype (`knnlm build-index`); its path."""
        from .knn.index import BuildIndexConfig
        from .knn.index import main as build_index
        cfg = BuildIndexConfig(dstore_dir=str(self.path), knn_keytype=keytype or self.keytypes[0],
                               index_factory=None if factory == "auto" else factory,
                               metric=metric, quiet=quiet)
        build_index(cfg)
        return cfg.index_path()

    def save(self, out: str | Path, overwrite: bool = False) -> "Datastore":
        """A copy of the whole directory (datastore, indexes, tuned settings, data-bin) at
        ``out``, opened."""
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise UserError(f"{out} is not empty (overwrite=True replaces it)")
            shutil.rmtree(out)
        shutil.copytree(self.path, out, dirs_exist_ok=True)
        return type(self)(out)


class KNNLM:
    """An HF model and a datastore as a kNN-LM: loss, perplexity and generation.

    ``datastore``: a :class:`Datastore` or its directory. The kNN settings are eval-lm's
    (``k``, ``lmbda``, ``knn_temp``, ``probe``, ``knn_keytype``, ``indexfile``,
    ``exact_search``, ``knn_sim_func``, ``faiss_metric_type``, ``knn_backend``,
    ``knnlm_gpu``); λ, T and k not given come from the index's ``tuned.json``, else the
    defaults. Used as a context manager, the model itself is the kNN-LM inside the block
    (its forward returns the kNN-LM's logits and loss: an HF ``Trainer.evaluate()`` runs
    on it); :meth:`loss`, :meth:`__call__` and :meth:`generate` attach it for their call.
    """

    def __init__(self, model, datastore, *, k: int | None = None, lmbda: float | None = None,
                 knn_temp: float | None = None, probe: int = 32, knn_keytype: str | None = None,
                 indexfile: str | None = None, exact_search: bool = False,
                 knn_sim_func: str | None = None, faiss_metric_type: str = "l2",
                 knn_backend: str = "auto", knnlm_gpu: bool = False, quiet: bool = False):
        from .knn.options import KnnOptions
        from .knn.search import KnnSearch
        from .lm.hf import hf_fingerprint
        self.model = model
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore(datastore)
        keytype = knn_keytype or self.datastore.keytypes[0]
        if indexfile is None and not exact_search and not self.datastore.indexes():
            exact_search = True              # a datastore built with index=None
        self.opts = KnnOptions(knnlm=True, dstore_filename=str(self.datastore.path),
                               indexfile=indexfile, k=k, lmbda=lmbda, knn_temp=knn_temp,
                               probe=probe, knn_keytype=keytype, knn_sim_func=knn_sim_func,
                               faiss_metric_type=faiss_metric_type, exact_search=exact_search,
                               knn_backend=knn_backend, knnlm_gpu=knnlm_gpu)
        self.opts.check_knn()
        self.quiet = quiet
        self.fingerprint = hf_fingerprint(model)
        device = next(model.parameters()).device if knnlm_gpu else torch.device("cpu")
        log = (lambda *a, **kw: None) if quiet else print
        self.search = KnnSearch(self.opts, self.fingerprint,
                                SimpleNamespace(tokenizer_sha256=None), device, log=log)
        self._processor = None
        self._depth = 0

    @property
    def settings(self) -> dict:
        """λ, T, k, the score mode and where they came from."""
        o = self.opts
        return dict(lmbda=o.lmbda, knn_temp=o.knn_temp, k=o.k, score_mode=self.search.mode.name,
                    **self.search.settings)

    # ------------------------------------------------------------------ attaching
    def __enter__(self) -> "KNNLM":
        from .hf_generate import KNNLogitsProcessor
        if self._depth == 0:
            self._processor = KNNLogitsProcessor(self.model, self.datastore.path,
                                                 search=self.search)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._processor.close()
            self._processor = None

    @property
    def processor(self):
        """The logits processor of the attached model (inside ``with``)."""
        if self._processor is None:
            raise UserError("KNNLM.processor exists inside `with knnlm.KNNLM(...) as knn:`")
        return self._processor

    def __call__(self, **inputs):
        """The model's forward, as the kNN-LM: logits are log p_kNN-LM; with ``labels``,
        ``loss`` is the kNN-LM's mean negative log-likelihood (HF's shift, -100 ignored)."""
        with self:
            return self.model(**inputs)

    def loss(self, input_ids, labels=None, attention_mask=None) -> torch.Tensor:
        """The kNN-LM's mean NLL of ``labels`` (default ``input_ids``), HF-style."""
        labels = input_ids if labels is None else labels
        with torch.no_grad():
            return self(input_ids=input_ids, labels=labels, attention_mask=attention_mask).loss

    def generate(self, *args, logits_processor=None, **kwargs):
        """``model.generate()`` with the kNN-LM: every option is HF's (see
        :mod:`knnlm.hf_generate`)."""
        with self:
            procs = list(logits_processor or []) + [self._processor]
            with torch.no_grad():
                return self.model.generate(*args, logits_processor=procs, **kwargs)

    # ------------------------------------------------------------------ perplexity
    def perplexity(self, texts, *, text_column: str = "text", tokens_per_sample: int | None = None,
                   context_window: int | None = None, max_tokens: int = 8192) -> dict:
        """eval-lm --knnlm's results for ``texts`` (strings or rows / a dataset holding
        ``text_column``), tokenized as the datastore's data-bin and scored with eval-lm's
        windows (``tokens_per_sample``, ``context_window``; defaults as eval-lm's): the
        LM's, the kNN's and the interpolated perplexity per token and per word."""
        from .data.hf_datasets import iter_texts
        from .data.preprocess import DataBin, binarize, text_lines
        from .eval_config import EvalConfig
        from .evaluate import eval_tokens
        from .knn.scorer import KnnScorer
        databin = DataBin(self.datastore.data_bin)
        lines = [line for t in iter_texts(texts, text_column)[0]
                 for line in text_lines(t + "\n")]     # as Datastore.build writes them
        tokens, _ = binarize(lines, databin.vocab)
        if not len(tokens):
            raise UserError("no tokens to score")
        o = self.opts
        cfg = EvalConfig(data=str(databin.path), hf_model=str(self.datastore.path),
                         gen_subset="text", knnlm=True, dstore_filename=o.dstore_filename,
                         indexfile=o.indexfile, k=o.k, lmbda=o.lmbda, knn_temp=o.knn_temp,
                         probe=o.probe, knn_keytype=o.knn_keytype, knn_sim_func=o.knn_sim_func,
                         faiss_metric_type=o.faiss_metric_type, exact_search=o.exact_search,
                         knn_backend=o.knn_backend, knnlm_gpu=o.knnlm_gpu,
                         tokens_per_sample=tokens_per_sample, context_window=context_window,
                         max_tokens=max_tokens, quiet=True)
        lm = _hf_lm(self.model)
        device = next(self.model.parameters()).device
        tokens = np.asarray(tokens)
        with _eval_mode(self.model), torch.no_grad(), contextlib.redirect_stdout(
                io.StringIO()) if self.quiet else contextlib.nullcontext():
            scorer = KnnScorer(cfg, self.fingerprint, databin, device, len(tokens), tokens)
            return eval_tokens(lm, tokens, databin, cfg, device, scorer)
