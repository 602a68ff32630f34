"""The kNN-LM inside HF ``model.generate()``: :class:`KNNLogitsProcessor`.

    from knnlm import KNNLogitsProcessor
    proc = KNNLogitsProcessor(model, "runs/hf/dstore", probe=32)   # λ, T, k: tuned.json
    out = model.generate(**batch, logits_processor=[proc], num_beams=4, max_new_tokens=40)

While attached, a forward hook on the model records the query of every sequence's last
position (``att``: the input of the last MLP; ``ffn``: the input of the LM head). At each
step the processor searches the datastore with those queries and replaces the scores of
each row by log((1 − λ)·p + λ·p_kNN), p the softmax of the scores it receives (the
model's, after HF's earlier processors such as the repetition penalty; beam search passes
log-probs, whose softmax is the same) and p_kNN scattered over the whole vocabulary.
Tokens an earlier processor banned (−inf) stay banned. HF applies its sampling warpers
(temperature, top-k, top-p) after custom processors, so they act on the kNN-LM's
distribution. Batched prompts (left-padded), beam search, sampling, stopping criteria and
streamers are HF's own. Rows without any neighbour keep the model's distribution.

The datastore must come from the same model (`knnlm build-dstore --hf-model`; checked by
fingerprint). Settings resolve as in eval-lm: explicit arguments, else the index's
``tuned.json`` (`knnlm tune`), else the defaults (:mod:`knnlm.knn.tuned`).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch

from .knn import math as knn_math
from .knn.options import KnnOptions
from .knn.search import KnnSearch
from .lm.hf import capture_input, hf_fingerprint, locate_modules
from .util import UserError

try:
    from transformers import LogitsProcessor as _Base
except ImportError:            # transformers is the optional `hf` extra
    _Base = object


class KNNLogitsProcessor(_Base):
    """Interpolates HF generation's next-token scores with p_kNN from a knnlm datastore.

    ``model``: the HF ``*ForCausalLM`` that generates; ``dstore``: its datastore directory;
    ``indexfile`` / ``exact_search``, ``k``, ``lmbda``, ``knn_temp``, ``probe``,
    ``knn_keytype`` (att | ffn), ``knn_sim_func``, ``faiss_metric_type``, ``knn_backend``,
    ``knnlm_gpu`` (search on the model's GPU: faiss-gpu, else the torch backend, which
    then also computes p_kNN there): as the flags of ``knnlm eval-lm --knnlm``. Use it as
    a context manager (or call :meth:`close`) to remove the hook when done; it is also
    removed when the processor is garbage-collected.
    """

    def __init__(self, model, dstore: str, *, indexfile: str | None = None, k: int | None = None,
                 lmbda: float | None = None, knn_temp: float | None = None, probe: int = 32,
                 knn_keytype: str = "att", knn_sim_func: str | None = None,
                 faiss_metric_type: str = "l2", exact_search: bool = False,
                 knn_backend: str = "auto", knnlm_gpu: bool = False,
                 fingerprint: str | None = None, log=print):
        if knn_keytype not in ("att", "ffn"):
            raise UserError(f"knn_keytype must be att or ffn for generation, got {knn_keytype!r}")
        self.opts = KnnOptions(knnlm=True, dstore_filename=str(dstore), indexfile=indexfile, k=k,
                               lmbda=lmbda, knn_temp=knn_temp, probe=probe,
                               knn_keytype=knn_keytype, knn_sim_func=knn_sim_func,
                               faiss_metric_type=faiss_metric_type, exact_search=exact_search,
                               knn_backend=knn_backend, knnlm_gpu=knnlm_gpu)
        self.opts.check_knn()
        device = next(model.parameters()).device if knnlm_gpu else torch.device("cpu")
        fingerprint = fingerprint or hf_fingerprint(model)
        # the datastore's tokenizer is checked by the model fingerprint (same model, same ids)
        self.search = KnnSearch(self.opts, fingerprint, SimpleNamespace(tokenizer_sha256=None),
                                device, log=log)
        self.model = model
        self.store: dict = {}
        self.searches = 0
        module = (locate_modules(model.base_model, model.config.model_type)[1]
                  if knn_keytype == "att" else model.get_output_embeddings())
        self._hooks = contextlib.ExitStack()
        self._hooks.enter_context(capture_input(module, self.store, "query"))

    @property
    def settings(self) -> dict:
        """λ, T, k, the score mode and where they came from."""
        o = self.opts
        return dict(lmbda=o.lmbda, knn_temp=o.knn_temp, k=o.k, score_mode=self.search.mode.name,
                    **self.search.settings)

    def close(self) -> None:
        self._hooks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        q, B = self.store.pop("query", None), scores.shape[0]
        if q is None or q.numel() % (B * q.shape[-1]):
            raise RuntimeError("KNNLogitsProcessor saw no query for these rows: pass it to "
                               "the generate() of the model it was built with")
        # (B, L, D), or (B·L, D) for families that flatten before the MLP (OPT)
        q = np.ascontiguousarray(q.reshape(B, -1, q.shape[-1])[:, -1].float().cpu().numpy())
        if self.search.on_device:     # the torch backend: scored where the neighbours are
            r = self.search.scores_on_device(q)
            vals = torch.where(r["mask"], r["vals"], 0)
        else:
            r = self.search.search(q)
            vals = torch.from_numpy(np.where(r["I"] >= 0, r["vals"], 0)).long()
        self.searches += len(q)
        dev = vals.device
        lm = torch.log_softmax(scores.to(dev).double(), -1)
        knn = knn_math.knn_full_log_probs(r["scores"], vals, scores.shape[-1],
                                          self.opts.knn_temp, r["mask"], r.get("log_counts"))
        mixed = knn_math.interpolate(lm, knn, self.opts.lmbda)
        found = r["mask"].any(1)
        mixed = torch.where(found[:, None], mixed, lm)            # no neighbour: p_LM
        mixed = mixed.masked_fill(torch.isneginf(scores.to(dev)), -torch.inf)  # stays banned
        return mixed.to(scores.dtype).to(scores.device)
