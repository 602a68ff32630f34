"""Adaptive retrieval (efficient-knnlm, He et al. 2021): a small network that predicts, per
token and from the LM alone, how much the kNN distribution will help, so only the tokens
it ranks highest are searched.

Features of position t (all known before its target):

- the LM's entropy and max log-prob at t;
- ``log(1 + count)`` in the datastore's text of the n-gram of the last n input tokens,
  n = 1..4 (hashed n-grams of the training stream, counted once into ``ngrams.npz``);
- their fertility, ``log(1 + the number of distinct tokens that follow them)`` there
  (efficient-knnlm's ``fert``);
- the query vector itself (``ctxt``; ``--no-gate-query`` leaves it out). With these the
  gate has the reference's "all" features.

The network (an MLP) outputs λ̂ = σ(z) and is trained, on a held-out split's retrieval
cache, to maximise log((1 − λ̂) p_LM + λ̂ p_kNN): efficient-knnlm's objective. At eval
time the tokens whose λ̂ is below a threshold are not searched and keep p_LM; the
threshold comes from ``--retrieval-fraction`` (the quantile of λ̂ over the training
tokens, stored with the gate) or ``--gate-threshold``. With ``--gate-lambda`` the searched
tokens use λ̂ itself instead of the fixed λ.

Files (``knnlm train-gate --out DIR``): ``gate.pt`` (the MLP's state dict, loaded with
``weights_only=True``), ``ngrams.npz`` (sorted n-gram hashes and counts, no pickles),
``gate.json`` (features, normalisation, λ̂ quantiles, held-out curves, fingerprints).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import read_json, refuse_nonfinite
from ..util import UserError, first_line

NGRAM_ORDERS = (1, 2, 3, 4)
HASH_MULT = np.uint64(0x9E3779B97F4A7C15)   # odd: a bijective multiply mod 2^64
HIDDEN = 128
COUNT_FEATURES = tuple(f"log1p_count_{n}gram" for n in NGRAM_ORDERS)
FERTILITY_FEATURES = tuple(f"log1p_fertility_{n}gram" for n in NGRAM_ORDERS)
FEATURES = ("lm_entropy", "lm_max_logprob") + COUNT_FEATURES + FERTILITY_FEATURES


def context_hashes(tokens: np.ndarray, eos: int, n: int, start: int, end: int) -> np.ndarray:
    """(end - start,) uint64 hash of the n input tokens that precede each target position
    t in [start, end) of ``tokens`` (the stream starts after an ``eos``, as the model's
    inputs do; positions before it read ``eos``)."""
    pad = max(NGRAM_ORDERS)
    lo = max(0, start - pad)
    window = np.concatenate([np.full(pad - (start - lo), eos, dtype=np.int64),
                             np.asarray(tokens[lo:end], dtype=np.int64)])
    window = window[: pad + end - start]   # window[pad + i] is target start + i
    with np.errstate(over="ignore"):
        h = np.zeros(end - start, dtype=np.uint64)
        for j in range(n, 0, -1):          # tokens t - j .. t - 1
            tok = window[pad - j: pad - j + end - start].astype(np.uint64) + np.uint64(1)
            h = h * HASH_MULT + tok
    return h


def count_ngrams(tokens: np.ndarray, eos: int, chunk: int = 1 << 22) -> dict[str, np.ndarray]:
    """Sorted unique n-gram hashes, their counts and their fertilities (distinct next
    tokens) over a token stream, n in NGRAM_ORDERS (the contexts of every position, as
    :func:`context_hashes` makes them)."""
    out = {}
    nxt = np.asarray(tokens, dtype=np.int64)
    for n in NGRAM_ORDERS:
        h = np.concatenate([context_hashes(tokens, eos, n, s, min(len(tokens), s + chunk))
                            for s in range(0, len(tokens), chunk)])
        keys, counts = np.unique(h, return_counts=True)
        out[f"keys{n}"], out[f"counts{n}"] = keys, counts.astype(np.int64)
        order = np.lexsort((nxt, h))                       # by context, then next token
        hs, ts = h[order], nxt[order]
        first = np.ones(len(hs), dtype=bool)
        first[1:] = (hs[1:] != hs[:-1]) | (ts[1:] != ts[:-1])
        ctx, fert = np.unique(hs[first], return_counts=True)   # the same sorted keys
        out[f"fert{n}"] = fert.astype(np.int64)
    return out


def lookup_counts(tables: dict, hashes: np.ndarray, n: int, what: str = "counts") -> np.ndarray:
    """The ``what`` (counts | fert) of each context hash; 0 for contexts never seen."""
    keys, values = tables[f"keys{n}"], tables[f"{what}{n}"]
    i = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
    return np.where(keys[i] == hashes, values[i], 0)


def features(stats: np.ndarray, tokens: np.ndarray, eos: int, start: int, end: int,
             tables: dict, query: np.ndarray | None = None) -> np.ndarray:
    """(M, F) float32 features of positions [start, end): ``stats`` (M, 2) the LM's entropy
    and max log-prob there, the n-gram counts of their contexts and (tables that have them:
    a gate trained before they were added has not) their fertilities, and ``query``
    (M, D)."""
    cols = [np.asarray(stats, dtype=np.float32)]
    hashes = {n: context_hashes(tokens, eos, n, start, end) for n in NGRAM_ORDERS}
    kinds = ("counts", "fert") if f"fert{NGRAM_ORDERS[0]}" in tables else ("counts",)
    for what in kinds:
        for n in NGRAM_ORDERS:
            c = lookup_counts(tables, hashes[n], n, what)
            cols.append(np.log1p(c.astype(np.float32))[:, None])
    if query is not None:
        cols.append(np.asarray(query, dtype=np.float32))
    return np.concatenate(cols, axis=1)


class GateNet(nn.Module):
    """Normalised features -> the logit of λ̂."""

    def __init__(self, n_features: int, hidden: int = HIDDEN, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, 0]

    @torch.no_grad()
    def lambdas(self, x: np.ndarray) -> np.ndarray:
        self.eval()
        return torch.sigmoid(self(torch.from_numpy(np.asarray(x, dtype=np.float32)))).numpy()


def mixture_nll(logit: torch.Tensor, lm: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
    """Mean −log((1 − σ(z)) p_LM + σ(z) p_kNN) (log-probs in; -inf p_kNN allowed)."""
    knn = torch.clamp(knn, min=-1e4)   # no neighbour matched: p_kNN = 0, a finite gradient
    mix = torch.logaddexp(nn.functional.logsigmoid(-logit) + lm,
                          nn.functional.logsigmoid(logit) + knn)
    return -mix.mean()


class Gate:
    """A trained gate (``knnlm train-gate``'s directory), ready to score positions."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_json(self.path / "gate.json", "gate sidecar")
        if not self.meta.get("complete"):
            raise UserError(f"{self.path}: the gate was not completely written; train it again")
        try:
            # weights only: a pickle that would run code is refused, not executed
            state = torch.load(self.path / "gate.pt", map_location="cpu", weights_only=True)
            with np.load(self.path / "ngrams.npz", allow_pickle=False) as z:
                self.tables = {k: z[k] for k in z.files}
            self.net = GateNet(int(self.meta["n_features"]))
            self.net.load_state_dict(state)
            self.use_query = bool(self.meta["use_query"])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError,
                pickle.UnpicklingError) as exc:
            raise UserError(f"{self.path}: unreadable gate files ({first_line(exc)})")
        for name, tensor in state.items():
            refuse_nonfinite(tensor.detach().numpy(), self.path / "gate.pt", f"parameter {name}")

    def check(self, ds, model_fingerprint: str, keytype: str) -> None:
        m = self.meta
        if m["datastore_fingerprint"] != ds.fingerprint or m["keytype"] != keytype:
            raise UserError(f"the gate {self.path} was trained for another datastore or keytype")
        if m["model_fingerprint"] != model_fingerprint:
            raise UserError(f"the gate {self.path} was trained with another model")

    def threshold(self, fraction: float | None, threshold: float | None) -> float:
        """λ̂ at or above which a token is searched."""
        if threshold is not None:
            return threshold
        if fraction >= 1:
            return -1.0
        if fraction <= 0:
            return 2.0
        q = np.asarray(self.meta["quantiles"])
        return float(np.interp(1 - fraction, np.linspace(0, 1, len(q)), q))

    def lambdas(self, stats, tokens, eos, start, end, query=None) -> np.ndarray:
        x = features(stats, tokens, eos, start, end, self.tables,
                     query if self.use_query else None)
        return self.net.lambdas(x)


def adaptive_stats(gate: Gate, cfg, threshold: float, steps: int, searches: int) -> dict:
    """The results JSON's record of a gated run (``interpolated.efficiency``)."""
    return dict(method="adaptive", gate=str(gate.path), retrieval_fraction=cfg.retrieval_fraction,
                threshold=threshold, gate_lambda=cfg.gate_lambda, steps=steps, searches=searches,
                searches_saved=1 - searches / steps if steps else 0.0)


class StepGate:
    """The gate one position at a time (generation): whether to search, and the λ."""

    def __init__(self, gate: Gate, cfg, eos: int):
        self.gate, self.cfg, self.eos = gate, cfg, eos
        self.threshold = gate.threshold(cfg.retrieval_fraction, cfg.gate_threshold)
        self.steps = self.searches = 0

    def decide(self, lm_log_probs: torch.Tensor, context: list[int], query: np.ndarray
               ) -> float | None:
        """The λ of the next token (None: do not search), from p_LM over the vocabulary,
        the tokens so far (prompt and generated, no start symbol) and the query."""
        lp = lm_log_probs.double()
        stats = np.array([[float(-(lp.exp() * lp).sum()), float(lp.max())]], dtype=np.float32)
        t = len(context)
        lam = float(self.gate.lambdas(stats, np.asarray(context, dtype=np.int64), self.eos, t,
                                      t + 1, query[None])[0])
        self.steps += 1
        if lam < self.threshold:
            return None
        self.searches += 1
        return lam if self.cfg.gate_lambda else self.cfg.lmbda

    def stats(self) -> dict:
        return adaptive_stats(self.gate, self.cfg, self.threshold, self.steps, self.searches)
