"""The kNN-LM inside an HF model: :class:`KNNLogitsProcessor`.

    from knnlm import KNNLogitsProcessor
    with KNNLogitsProcessor(model, "runs/hf/dstore", probe=32) as knn:  # λ, T, k: tuned.json
        out = model.generate(**batch, logits_processor=[knn], num_beams=4, max_new_tokens=40)

While attached, the model *is* the kNN-LM: a forward hook on the model replaces the logits
it returns by log((1 − λ)·p_LM + λ·p_kNN) at every position it returns logits for (one per
row in a generation step; all of them in a full forward), p_LM the softmax of the model's
logits and p_kNN scattered over the whole vocabulary from the neighbours of that
position's query (``att``: the input of the last MLP; ``ffn``: the input of the LM head;
``layer:N``: the output of decoder layer N), captured by hooks in the same forward. So
everything HF does with the logits afterwards acts on the kNN-LM's distribution: the
repetition penalty, sequence bias, no-repeat n-grams, bad words, minimum length,
classifier-free guidance (its unconditional forward is a kNN-LM forward of its own), the
sampling warpers, beam scores, assisted and prompt-lookup decoding (each position the
model verifies is mixed), and a loss computed from ``labels`` (recomputed from the mixed
logits). Rows without any neighbour keep the model's distribution.

Passed to ``generate()`` as a logits processor it leaves the scores as they are and marks
the rows that have finished (generated an end-of-sequence token) so that the next forwards
do not search for them; the steps of another model (an assistant's drafts) pass through
untouched, and a processor called only for another model's steps warns when closed.
Identical queries in a batch (beams copied from one prompt) are searched once.

The datastore must come from the same model (`knnlm build-dstore --hf-model`; checked by
fingerprint). Settings resolve as in eval-lm: explicit arguments, else the index's
``tuned.json`` (`knnlm tune`), else the defaults (:mod:`knnlm.knn.tuned`).
"""
from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .knn.options import KnnOptions
from .knn.search import MIX_CHUNK, KnnSearch
from .lm.hf import capture_input, capture_output, hf_fingerprint, locate_modules
from .util import UserError

try:
    from transformers import LogitsProcessor as _Base
except ImportError:            # transformers is the optional `hf` extra
    _Base = object


def query_hook(model, keytype: str, store: dict):
    """The context manager that records ``keytype``'s representation of every forward of
    the HF ``model`` under ``store["query"]``."""
    if keytype == "ffn":
        return capture_input(model.get_output_embeddings(), store, "query")
    layers, mlp = locate_modules(model.base_model, model.config.model_type)
    if keytype == "att":
        return capture_input(mlp, store, "query")
    try:
        i = int(keytype.split(":", 1)[1]) if keytype.startswith("layer:") else None
    except ValueError:
        i = None
    if i is None:
        raise UserError(f"knn_keytype must be att, ffn or layer:N, got {keytype!r}")
    if not -len(layers) <= i < len(layers):
        raise UserError(f"knn_keytype {keytype}: the model has {len(layers)} layers")
    return capture_output(layers[i], store, "query")


class KNNLogitsProcessor(_Base):
    """Makes an HF causal LM the kNN-LM of a knnlm datastore while attached.

    ``model``: the HF ``*ForCausalLM`` (any dtype); ``dstore``: its datastore directory;
    ``indexfile`` / ``exact_search``, ``k``, ``lmbda``, ``knn_temp``, ``probe``,
    ``knn_keytype`` (att | ffn | layer:N), ``knn_sim_func``, ``faiss_metric_type``,
    ``knn_backend``, ``knnlm_gpu`` (search on the model's GPU: faiss-gpu, else the torch
    backend, which then also computes p_kNN there): as the flags of ``knnlm eval-lm
    --knnlm``. ``eos_token_id``: the end-of-sequence ids ``generate()`` stops at (default:
    the model's generation config; give the same as generate()'s if you pass it one there):
    rows that generated one are finished, and not searched again.
    Use it as a context manager (or call :meth:`close`) to detach it; it is also detached
    when garbage-collected.
    """

    def __init__(self, model, dstore: str, *, indexfile: str | None = None, k: int | None = None,
                 lmbda: float | None = None, knn_temp: float | None = None, probe: int = 32,
                 knn_keytype: str = "att", knn_sim_func: str | None = None,
                 faiss_metric_type: str = "l2", exact_search: bool = False,
                 knn_backend: str = "auto", knnlm_gpu: bool = False,
                 fingerprint: str | None = None, eos_token_id=None, search=None, log=print):
        self.opts = KnnOptions(knnlm=True, dstore_filename=str(dstore), indexfile=indexfile, k=k,
                               lmbda=lmbda, knn_temp=knn_temp, probe=probe,
                               knn_keytype=knn_keytype, knn_sim_func=knn_sim_func,
                               faiss_metric_type=faiss_metric_type, exact_search=exact_search,
                               knn_backend=knn_backend, knnlm_gpu=knnlm_gpu)
        self.opts.check_knn()
        self.model = model
        self.store: dict = {}
        self._hooks = contextlib.ExitStack()
        if search is not None:        # a search already open (knnlm.KNNLM): its settings
            self.opts, knn_keytype = search.cfg, search.keytype
        query = query_hook(model, knn_keytype, self.store)   # refuses a bad keytype first
        if search is None:
            device = next(model.parameters()).device if knnlm_gpu else torch.device("cpu")
            fingerprint = fingerprint or hf_fingerprint(model)
            # the datastore's tokenizer is checked by the model fingerprint (same model)
            search = KnnSearch(self.opts, fingerprint, SimpleNamespace(tokenizer_sha256=None),
                               device, log=log)
        self.search = search
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id",
                                   None)
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = torch.tensor([int(e) for e in eos if e is not None], dtype=torch.long)
        self.searches = 0        # queries searched
        self.forwards = 0        # forwards mixed
        self.foreign_calls = 0   # steps of another model (assisted decoding's drafts)
        self._seen = 0           # forwards the last __call__ accounted for
        self._finished: torch.Tensor | None = None   # (B,) rows not to search next step
        self._prompt_len: int | None = None
        self._last: torch.Tensor | None = None       # the input ids of the last __call__
        self._hooks.enter_context(query)
        handle = model.register_forward_hook(self._after_forward, with_kwargs=True)
        self._hooks.callback(handle.remove)

    @property
    def settings(self) -> dict:
        """λ, T, k, the score mode and where they came from."""
        o = self.opts
        return dict(lmbda=o.lmbda, knn_temp=o.knn_temp, k=o.k, score_mode=self.search.mode.name,
                    **self.search.settings)

    def close(self) -> None:
        self._hooks.close()
        if self.foreign_calls and not self.forwards:
            self.foreign_calls = 0
            warnings.warn("KNNLogitsProcessor was called by generate() but its model never "
                          "ran: it was passed to the generate() of another model")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ the kNN-LM
    def mix(self, logits: torch.Tensor, queries) -> torch.Tensor:
        """(N, V) logits and their (N, D) queries -> (N, V) float64 kNN-LM log-probs
        (:meth:`KnnSearch.mix`)."""
        out, searched = self.search.mix(logits, queries)
        self.searches += searched
        return out

    def target_log_probs(self, logits: torch.Tensor, queries, targets: torch.Tensor
                         ) -> torch.Tensor:
        """(N,) float64 kNN-LM log-probs of the targets (:meth:`KnnSearch.mix_targets`)."""
        self.searches += len(targets)
        return self.search.mix_targets(logits, queries, targets)

    @contextlib.contextmanager
    def capture_only(self):
        """Inside: the model's forwards keep their own logits; each one's queries are left
        in ``self.last_query`` (KNNLM.loss scores the targets alone)."""
        self._capture_only = True
        try:
            yield
        finally:
            self._capture_only = False

    def _after_forward(self, module, args, kwargs, output):
        """The model's forward hook: its returned logits become the kNN-LM's."""
        q = self.store.pop("query", None)
        if getattr(self, "_capture_only", False):
            self.last_query = q
            return output
        logits = getattr(output, "logits", None)
        if logits is None or q is None:
            raise RuntimeError("KNNLogitsProcessor: the model returned no logits or no query "
                               "was captured (call the model with return_dict=True)")
        B, L, V = logits.shape
        q = q.reshape(B, -1, q.shape[-1])[:, -L:]                 # OPT flattens (B·L, D)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if L > 1 or ids is None or ids.shape[1] > 1:              # a prompt or verification
            self._finished, self._prompt_len = None, None
        use = torch.ones(B, L, dtype=torch.bool, device=logits.device)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= L:
            use &= mask[:, -L:].bool().to(use.device)             # padding: nothing to mix
        if self._finished is not None and len(self._finished) == B and L == 1:
            use &= ~self._finished[:, None].to(use.device)
        out = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        out = out.clone()
        if use.any():        # in chunks: a full forward's (positions, V) float64 is large
            rows, queries = logits[use], q[use.to(q.device)]
            mixed = torch.empty(rows.shape, dtype=out.dtype, device=out.device)
            for s in range(0, len(rows), MIX_CHUNK):
                mixed[s:s + MIX_CHUNK] = self.mix(rows[s:s + MIX_CHUNK],
                                                  queries[s:s + MIX_CHUNK]).to(out.dtype)
            out[use] = mixed
        self.forwards += 1
        output.logits = out
        labels = kwargs.get("labels")
        if labels is not None and getattr(output, "loss", None) is not None and \
                labels.shape[1] == L:
            output.loss = F.cross_entropy(out[:, :-1].reshape(-1, V).float(),
                                          labels[:, 1:].reshape(-1).to(out.device),
                                          ignore_index=-100)
        return output

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        """A generation step: the scores are already the kNN-LM's (the forward hook made
        them); note which rows have finished so the next forward skips them."""
        last = self._last
        # assisted decoding scores several positions of one forward: longer prefixes of it
        same_forward = last is not None and last.shape[0] == input_ids.shape[0] and \
            last.shape[1] < input_ids.shape[1] and \
            torch.equal(input_ids[:, :last.shape[1]], last.to(input_ids.device))
        if self.forwards == self._seen and not same_forward:
            # another model's step (assisted decoding's drafts): its scores stay its own
            self.foreign_calls += 1
            return scores
        self._seen, self._last = self.forwards, input_ids.detach()
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        if len(self.eos):
            gen = input_ids[:, self._prompt_len:]
            self._finished = torch.isin(gen, self.eos.to(gen.device)).any(1) \
                if gen.shape[1] else torch.zeros(len(input_ids), dtype=torch.bool)
        return scores
