"""The kNN-LM as an lm-evaluation-harness model: ``knnlm`` (the ``eval`` extra, lm-eval 0.4).

    knnlm lm-eval --model_args pretrained=MODEL_DIR,dstore=DSTORE[,lmbda=0.25,knn_temp=1,k=1024]
        --tasks wikitext,lambada_openai --include_path my_tasks/
    lm_eval.simple_evaluate(model=knnlm.harness.KNNLMHarness(pretrained=..., dstore=...), ...)

Importing this module registers the model under the name ``knnlm``; lm-eval's own
command line with it registered is ``python -m knnlm.harness`` (the arguments of
``lm_eval``), and ``knnlm lm-eval`` runs tasks with the LM and the kNN-LM side by side. ``pretrained``: an HF model
(directory, ``.gguf`` or cached hub name) or a knnlm checkpoint (``.pt``, with ``data=`` its
data-bin); ``dstore``: the datastore (its index, and its ``tuned.json`` when λ, T and k
are not given); none, or ``lmbda=0``, gives the LM alone.

What each request type computes, with eval-lm's windows and kNN math:

- ``loglikelihood_rolling``: the document tokenized as a data-bin holds text (its lines,
  each followed by the line end) and scored exactly as ``eval-lm --knnlm`` scores a split
  (windows of ``tokens_per_sample`` with ``context_window`` tokens of left context), from
  the stream-start token: its log-likelihood is the negative of eval-lm's summed NLL;
- ``loglikelihood``: the context and continuation (tokenized with the data-bin's
  vocabulary) in one input after the stream-start token — the last
  ``tokens_per_sample`` − 1 tokens when longer — the continuation's kNN-LM log-probs
  summed (the kNN-LM over the whole vocabulary, one search per position: eval-lm's
  per-token scores); ``is_greedy`` when each continuation token is its argmax;
- ``generate_until``: greedy (or sampled) kNN-LM decoding, cut at the first stop string.

Requests are batched (``max_tokens`` padded tokens per forward) and cached by lm-eval's
request cache (``--use_cache``) like any model's.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from .util import UserError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:       # the optional `eval` extra
    raise UserError("the lm-evaluation-harness model needs lm-eval: pip install -e '.[eval]'"
                    ) from exc


@register_model("knnlm")
class KNNLMHarness(TemplateLM):
    """The kNN-LM of a model and a datastore, for lm-eval (see the module's docstring)."""

    def __init__(self, pretrained: str, dstore: str | None = None, data: str | None = None,
                 lmbda: float | None = None, knn_temp: float | None = None,
                 k: int | None = None, probe: int = 32, knn_keytype: str | None = None,
                 indexfile: str | None = None, exact_search: bool = False,
                 knn_sim_func: str | None = None, tokens_per_sample: int | None = None,
                 context_window: int | None = None, max_tokens: int = 8192,
                 hf_dtype: str | None = None, device: str | None = None,
                 max_gen_toks: int = 256, batch_size=None, max_batch_size=None,
                 quiet: bool = True, **unused):
        super().__init__()
        from .data.preprocess import DataBin
        from .eval_config import EvalConfig
        from .knn.search import KnnSearch
        from .lm.checkpoint import load_lm
        from .lm.device import resolve_device
        from .lm.scoring import resolve_window
        if unused:
            raise UserError(f"knnlm model_args: unknown {', '.join(sorted(unused))}")
        pretrained = str(pretrained)
        native = pretrained.endswith(".pt")
        if dstore is None and data is None:
            raise UserError("knnlm model_args: give dstore=DIR (or data=DATA_BIN for the LM "
                            "alone)")
        self.quiet = quiet
        with self._output():
            ds_data = _datastore_data_bin(dstore) if dstore is not None else None
            self.databin = DataBin(data or ds_data)
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None     # lm-eval's command line asks for cuda:0 by default
            device = resolve_device(device, False)
            self.model, fingerprint = load_lm(pretrained if native else None,
                                              None if native else pretrained, self.databin,
                                              device, hf_dtype)
            self.model.eval()
            self.T, self.C = resolve_window(self.model, tokens_per_sample, context_window)
            use_knn = dstore is not None and lmbda != 0
            keytype = knn_keytype or (_first_keytype(dstore) if dstore else "att")
            self.cfg = EvalConfig(data=str(self.databin.path),
                                  path=pretrained if native else None,
                                  hf_model=None if native else pretrained, gen_subset="harness",
                                  knnlm=use_knn, dstore_filename=dstore, indexfile=indexfile,
                                  k=k, lmbda=lmbda, knn_temp=knn_temp, probe=probe,
                                  knn_keytype=keytype, knn_sim_func=knn_sim_func,
                                  exact_search=exact_search, tokens_per_sample=self.T,
                                  context_window=self.C, max_tokens=max_tokens, quiet=True)
            self.search = KnnSearch(self.cfg, fingerprint, self.databin, device) \
                if use_knn else None
        self.fingerprint, self._device = fingerprint, device
        self.vocab = self.databin.vocab
        self.max_gen_toks = max_gen_toks

    @contextlib.contextmanager
    def lm_only(self, on: bool = True):
        """Inside (``on``): the LM alone, as with λ 0 (`knnlm lm-eval`'s LM column)."""
        search = self.search
        if on:
            self.search = None
        try:
            yield self
        finally:
            self.search = search

    @property
    def settings(self) -> dict:
        """λ, T, k of the kNN-LM and where they came from (λ 0 without a datastore)."""
        if self.search is None:
            return dict(lmbda=0.0, knn_temp=1.0, k=0, tuned_file=None)
        c = self.search.cfg
        return dict(lmbda=c.lmbda, knn_temp=c.knn_temp, k=c.k, **self.search.settings)

    def _output(self):
        """What the kNN side prints (settings, windows) is kept out of lm-eval's output."""
        return contextlib.redirect_stdout(io.StringIO()) if self.quiet else \
            contextlib.nullcontext()

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return int(self.databin.eos)

    @property
    def prefix_token_id(self) -> int:
        """The stream-start token every knnlm window begins with (BOS for HF models)."""
        return int(self.databin.eos)

    @property
    def max_length(self) -> int:
        return self.T

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return [int(i) for i in self.vocab.encode_text(string)]

    def tok_decode(self, tokens) -> str:
        return self.vocab.decode([int(t) for t in tokens])

    # ------------------------------------------------------------------ scoring
    def _scorer(self, tokens: np.ndarray):
        """eval-lm's kNN scorer of a document, on the open search."""
        from .knn.scorer import KnnScorer
        if self.search is None:
            return None
        return KnnScorer(self.cfg, self.fingerprint, self.databin, self._device, len(tokens),
                         tokens, search=self.search)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from .data.preprocess import binarize, text_lines
        from .evaluate import eval_tokens
        out = []
        for req in requests:
            (text,) = req.args
            tokens, _ = binarize(text_lines(text), self.vocab)
            if not len(tokens):
                out.append(0.0)
                continue
            with self._output(), torch.no_grad():
                res = eval_tokens(self.model, np.asarray(tokens), self.databin, self.cfg,
                                  self._device, self._scorer(tokens))
            ll = -(res["interpolated"] if "interpolated" in res else res)["nll_sum"]
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Each request's context + continuation in one window after the stream-start
        token; the requests of a batch laid end to end, each window starting afresh."""
        from .data.blocks import Window
        from .lm.scoring import iter_scored
        eos = self.prefix_token_id
        seqs, conts = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise UserError("a loglikelihood request with an empty continuation")
            seq = list(ctx) + list(cont)
            if seq and seq[0] == eos:           # lm-eval's prefix for an empty context
                seq = seq[1:]
            seqs.append(seq[-(self.T - 1):])
            conts.append(min(len(cont), self.T - 1))
        # stream: BOS s1 BOS s2 ... BOS; window i scores s_i and the BOS after it
        stream, windows, pos = [eos], [], 1
        for seq in seqs:
            windows.append(Window(pos, pos, pos + len(seq) + 1))
            stream += seq + [eos]
            pos += len(seq) + 1
        tokens = np.asarray(stream, dtype=np.int64)
        cont = np.zeros(len(tokens), dtype=bool)          # the continuations' positions
        for w, n in zip(windows, conts):
            cont[w.end - 1 - n:w.end - 1] = True
        keytype = self.search.keytype if self.search is not None else None
        hidden = (keytype,) if keytype else ()
        lp = np.zeros(len(tokens))
        greedy = np.zeros(len(tokens), dtype=bool)
        with torch.no_grad(), self._output():
            for sb in iter_scored(self.model, tokens, windows, eos=eos, pad=self.databin.pad,
                                  max_tokens=self.cfg.max_tokens, softmax_batch=4096,
                                  device=self._device, return_hidden=hidden, logprobs=False,
                                  features=True):
                rows = np.flatnonzero(cont[sb.start:sb.end])
                if not len(rows):
                    continue
                r = torch.from_numpy(rows).to(sb.hidden["features"].device)
                logits = self.model.output_layer(sb.hidden["features"][r]).float()
                t = torch.from_numpy(sb.targets[rows]).to(logits.device)
                # the kNN-LM over the whole vocabulary (one search): the targets' log-probs
                # and whether each is the argmax
                full = self.search.mix(logits, sb.hidden[keytype][r])[0] \
                    if self.search is not None else torch.log_softmax(logits.double(), -1)
                t = t.to(full.device)
                lp[sb.start + rows] = full.gather(1, t[:, None])[:, 0].cpu().numpy()
                greedy[sb.start + rows] = (full.argmax(1) == t).cpu().numpy()
        out = []
        for (key, _, _), w, n in zip(requests, windows, conts):
            span = slice(w.end - 1 - n, w.end - 1)        # the continuation's positions
            res = (float(lp[span].sum()), bool(greedy[span].all()))
            out.append(res)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .generate import GenerateConfig, generate_one
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = max(1, min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.T - 2))
            sampling = bool(kwargs.pop("do_sample", False))
            temperature = kwargs.pop("temperature", None)
            if temperature is not None and float(temperature) == 0:
                sampling = False                  # lm-eval's way of asking for greedy
            top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
            if kwargs:
                raise UserError(f"knnlm generate_until: generation options not supported here: "
                                f"{', '.join(sorted(kwargs))}")
            prompt = np.asarray(self.tok_encode(context), dtype=np.int64)[-(self.T - n - 1):]
            cfg = GenerateConfig(data=str(self.databin.path), path=self.cfg.path,
                                 hf_model=self.cfg.hf_model, prompt="-", max_new_tokens=n,
                                 sampling=sampling,
                                 temperature=float(temperature) if sampling and temperature
                                 else 1.0,
                                 sampling_topk=int(top_k) if sampling and top_k else -1,
                                 sampling_topp=float(top_p) if sampling and top_p else -1.0,
                                 knnlm=False)
            if self.search is not None:
                cfg.lmbda, cfg.knn_temp = self.search.cfg.lmbda, self.search.cfg.knn_temp
            with torch.no_grad(), self._output():
                ids, _ = generate_one(self.model, prompt, self.prefix_token_id, cfg,
                                      self.search, torch.Generator().manual_seed(1234),
                                      self._device)
            text = self.tok_decode(ids)
            cuts = [text.index(u) for u in until if u and u in text]
            if cuts:
                text = text[:min(cuts)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


def _datastore_data_bin(dstore: str) -> str:
    """The data-bin a datastore's entries came from (its own, when built in Python)."""
    from .io import read_json
    own = Path(dstore) / "data-bin"
    if (own / "data.json").is_file():
        return str(own)
    side = Path(dstore) / "datastore.json"
    if not side.is_file():
        raise UserError(f"{dstore} is not a datastore (no datastore.json)")
    return read_json(side, "datastore sidecar")["data_dir"]


def _first_keytype(dstore: str) -> str:
    from .io import read_json
    return read_json(Path(dstore) / "datastore.json", "datastore sidecar")["keytypes"][0]


def main() -> None:
    """``python -m knnlm.harness ARGS``: lm-eval's own command line (``lm_eval ARGS``) with
    the model ``knnlm`` registered, e.g. ``python -m knnlm.harness --model knnlm
    --model_args pretrained=M,dstore=D --tasks wikitext``."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
