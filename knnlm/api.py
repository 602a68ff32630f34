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


def _lines(texts, text_column: str) -> list[str]:
    """The lines of ``texts`` as Datastore.build writes them to its text file (each text
    followed by a newline), to be tokenized as the data-bin is."""
    from .data.hf_datasets import iter_texts
    from .data.preprocess import text_lines
    return [line for t in iter_texts(texts, text_column)[0] for line in text_lines(t + "\n")]


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
        from .io import read_json
        from .knn.datastore import Datastore as Files
        from .knn.datastore import fingerprint
        self.path = Path(path)
        self.model = None            # the model of build() (add() uses it)
        side = self.path / "datastore.json"
        meta = read_json(side, "datastore sidecar") if side.is_file() else {}
        if meta.get("grown") and not meta.get("complete"):
            # an add() that was stopped: open for add() to finish it, and for nothing else
            self.files, self.meta, self._fingerprint = None, meta, fingerprint(meta)
            return
        self.files = Files(self.path)
        self.meta = self.files.meta
        self._fingerprint = self.files.fingerprint

    @classmethod
    def load(cls, path: str | Path) -> "Datastore":
        """Open a datastore directory (JSON sidecars and .npy files only: nothing is
        unpickled)."""
        return cls(path)

    def __repr__(self) -> str:
        state = "" if self.files is not None else ", an add() to finish"
        return (f"Datastore({str(self.path)!r}, {self.size:,} entries x {self.meta['dim']}, "
                f"{', '.join(self.keytypes)}{state})")

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def keytypes(self) -> list[str]:
        return list(self.meta["keytypes"])

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

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
                    and (index.is_file() or meta.get("layout") == "shards"):
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
        ds.model = model
        if index is not None:
            ds.build_index(index, metric=metric, keytype=cfg.keytypes[0], quiet=quiet)
        return ds

    def add(self, texts, model=None, *, text_column: str = "text", batch_size: int = 8192,
            quiet: bool = False) -> "Datastore":
        """Append the entries of ``texts`` (as :meth:`build` takes them) to the datastore,
        its data-bin and every index of it (the trained quantizer is kept: no retraining),
        with ``model`` (default: the one this datastore was built with in this session;
        it must be the datastore's, by fingerprint). The new entries are those a build of
        the longer data gives (the texts continue the token stream; the keys of the first
        new rows take their context from the old text); the grown datastore's fingerprint
        is that build's, and its tuned settings carry over, marked as tuned before it
        grew. Killed, the same call resumes; repeated at once, it adds nothing twice."""
        import hashlib
        from .build_dstore import BuildDstoreConfig, build_dstore
        from .data.preprocess import DataBin, append_split, binarize
        from .guard import output_lock
        from .io import read_json, write_json_atomic
        from .knn.datastore import Datastore as Files
        from .knn.grow import carry_tuned, extend_index
        from .knn.tuned import index_fingerprint
        from .lm.hf import hf_fingerprint
        model = model if model is not None else self.model
        if model is None:
            raise UserError("Datastore.add needs the datastore's model: add(texts, model=...)")
        own = self.path / "data-bin"
        if self.data_bin != own or Path(self.meta["data_dir"]).resolve() != own.resolve():
            raise UserError(f"{self.path}: add() grows the datastore's own data-bin; this "
                            "datastore reads another (build it with knnlm.Datastore.build)")
        if self.meta.get("first_tokens"):
            raise UserError(f"{self.path} holds a slice of its split (--max-dstore-tokens): "
                            "it cannot grow")
        if hf_fingerprint(model) != self.meta["model_fingerprint"]:
            raise UserError(f"{self.path} was built with another model than the one given")
        lines = _lines(texts, text_column)
        databin = DataBin(own)
        ids, _ = binarize(lines, databin.vocab)
        if not len(ids):
            raise UserError("no tokens to add")
        record = dict(lines=len(lines), tokens=int(len(ids)), sha256=hashlib.sha256(
            np.asarray(ids, dtype=np.int64).tobytes()).hexdigest())
        split, grown = self.meta["split"], self.meta.get("grown", [])
        resumed = bool(grown) and grown[-1]["texts"] == record
        old_fp, old_size = (grown[-1]["from_fingerprint"], grown[-1]["from_size"]) if resumed \
            else (self.fingerprint, self.size)
        indexes = {p: read_json(Path(str(p) + ".json"), "index sidecar")
                   for p in self.indexes()} if not resumed else {}
        with output_lock(own, "dir", "data-bin"):
            append_split(own, split, np.asarray(ids), len(lines), record)
        databin = DataBin(own)
        n = len(databin.split(split))
        if not resumed:       # the grown sidecar: the commit point of the growth
            if self.meta["size"] + len(ids) != n:
                raise UserError(f"{own}: its {split} split holds {n:,} tokens, not the "
                                f"datastore's {self.size:,} and the {len(ids):,} added")
            step = dict(from_size=old_size, from_fingerprint=old_fp, texts=record,
                        indexes={str(p): index_fingerprint(m) for p, m in indexes.items()})
            with output_lock(self.path, "dir", "datastore"):
                write_json_atomic(self.path / "datastore.json", dict(
                    self.meta, size=n, rows_written=old_size, complete=False,
                    grown=[*grown, step]))
        step = read_json(self.path / "datastore.json", "datastore sidecar")["grown"][-1]
        block = self.meta["blocking"]
        cfg = BuildDstoreConfig(data=str(own), hf_model=str(getattr(model, "name_or_path", "")
                                                                or "model"),
                                dstore_dir=str(self.path), gen_subset=split,
                                knn_keytype=",".join(self.keytypes),
                                tokens_per_sample=block["tokens_per_sample"],
                                context_window=block["context_window"],
                                sample_break_mode=block.get("sample_break_mode", "none"),
                                max_tokens=batch_size,
                                dstore_fp32=self.meta["key_dtype"] == "float32", quiet=quiet)
        lm = _hf_lm(model)
        with _eval_mode(model), torch.no_grad():
            build_dstore(lm, databin, cfg, next(model.parameters()).device, hf_fingerprint(model))
        files = Files(self.path)
        for path, old_index_fp in step["indexes"].items():
            new_meta = extend_index(path, files, step["from_fingerprint"], quiet)
            carry_tuned(files, new_meta["keytype"], new_meta["metric"], Path(path), old_index_fp,
                        new_meta, step["from_fingerprint"], step["from_size"])
        for kt in self.keytypes:             # tuned settings of exact search
            for metric in ("l2", "ip"):
                carry_tuned(files, kt, metric, None, None, None, step["from_fingerprint"],
                            step["from_size"])
        grown_ds = type(self)(self.path)
        grown_ds.model = model
        return grown_ds

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
        """The kNN-LM's mean NLL of ``labels`` (default ``input_ids``), HF-style: position
        t predicts ``labels[:, t + 1]``, -100 ignored. Only the targets' kNN-LM
        probabilities are computed (eval-lm's kNN math), not the whole vocabulary's: the
        value of ``model(..., labels=...).loss`` inside ``with knn:`` at eval-lm's cost."""
        labels = input_ids if labels is None else labels
        with self, self._processor.capture_only(), torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            B, L, V = logits.shape
            q = self._processor.last_query.reshape(B, -1, self._processor.last_query.shape[-1])
            targets = labels[:, 1:].to(logits.device)
            keep = targets != -100
            if not keep.any():
                raise UserError("no label to score (every label is -100)")
            lp = self._processor.target_log_probs(logits[:, :-1][keep], q[:, :L - 1][keep.to(
                q.device)], targets[keep])
        return -lp.mean().float()

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
        from .data.preprocess import DataBin, binarize
        from .eval_config import EvalConfig
        from .evaluate import eval_tokens
        from .knn.scorer import KnnScorer
        databin = DataBin(self.datastore.data_bin)
        lines = _lines(texts, text_column)
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
