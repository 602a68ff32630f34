"""Output layers ("heads"): the parametric alternatives to a datastore (paper notes §3.3, §3.8).

The standard head is p(w) = softmax(W_sm · ffn), W_sm being V × D. The alternatives the
paper compares the kNN-LM with change one part of that formula each:

- more rows than tokens, laid out as the original fork does: ``pseudo_vocab_ratio`` K gives
  the special symbols one row each, then K consecutive rows per other token
  (R = S + K·(V − S)); ``num_extra_embed`` gives every token its own row (rows 0..V-1) and
  then token w's e_w extra rows, tokens in order. A softmax runs over all R rows and the
  probability of a token is the summed mass of its rows:
  log p(w) = logsumexp_{r: token(r) = w} log_softmax(s)_r;
- a mixture of K softmaxes (``k_mos``), the fork's: h_k = P_k h + b_k (no activation),
  π = softmax(W_π h + b_π), p(w) = Σ_k π_k softmax(W h_k)_w;
- the input: ``att`` (the last FFN's input, the kNN-LM key) instead of ``ffn``;
- the similarity: ``use_l2`` scores a row by −‖h − w_r‖² instead of h·w_r; ``norm_l2``
  L2-normalises h first;
- ``additional_linear``: a second V × D matrix on ``att`` whose logits are added to the
  main head's logits (zero-initialised, so training starts from the base model).

This module holds the pure math (tested against loops); :class:`TransformerLM` owns the
parameters. Shapes: M positions, R rows, V vocabulary, D dimensions, K components.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def row_token_map(vocab_size: int, pseudo_vocab_ratio: int = 1,
                  num_extra_embed: list[int] | None = None, num_specials: int = 0,
                  tiled: bool = False) -> torch.Tensor:
    """(R,) int64: the token each output row belongs to.

    ``num_extra_embed``: rows 0..V-1 are tokens 0..V-1, token w's extra rows follow in
    token order. ``pseudo_vocab_ratio`` K: the ``num_specials`` first tokens one row each,
    then K consecutive rows per token; ``tiled`` (heads written by knnlm 0.1): K·V rows,
    row r belongs to token r mod V."""
    base = torch.arange(vocab_size)
    if num_extra_embed is not None:
        if len(num_extra_embed) != vocab_size:
            raise ValueError(f"num_extra_embed lists {len(num_extra_embed)} tokens, the "
                             f"vocabulary has {vocab_size}")
        if min(num_extra_embed, default=0) < 0:
            raise ValueError("num_extra_embed counts must be >= 0")
        extra = torch.repeat_interleave(base, torch.tensor(num_extra_embed, dtype=torch.long))
        return torch.cat([base, extra])
    if pseudo_vocab_ratio < 1:
        raise ValueError(f"pseudo_vocab_ratio must be >= 1, got {pseudo_vocab_ratio}")
    if tiled:
        return base.repeat(pseudo_vocab_ratio)
    s = min(num_specials, vocab_size)
    return torch.cat([base[:s], torch.repeat_interleave(base[s:], pseudo_vocab_ratio)])


def similarity_logits(h: torch.Tensor, W: torch.Tensor, use_l2: bool = False,
                      norm_l2: bool = False) -> torch.Tensor:
    """(M, D) x (R, D) -> (M, R) row scores: h·w, or −‖h − w‖² with ``use_l2``."""
    if norm_l2:
        h = F.normalize(h, dim=-1)
    dots = F.linear(h, W)
    if not use_l2:
        return dots
    return 2 * dots - (h * h).sum(-1, keepdim=True) - (W * W).sum(-1)[None]


def aggregate_rows(row_log_probs: torch.Tensor, row_token: torch.Tensor, vocab_size: int
                   ) -> torch.Tensor:
    """(M, R) log-probabilities of rows -> (M, V) log-probabilities of tokens (log of the
    summed mass of each token's rows). Exact in log space: per-token maximum first."""
    M, R = row_log_probs.shape
    if R == vocab_size:
        return row_log_probs
    if R % vocab_size == 0 and torch.equal(row_token, torch.arange(vocab_size, device=row_token.device)
                                           .repeat(R // vocab_size)):
        return row_log_probs.view(M, R // vocab_size, vocab_size).logsumexp(1)
    blocks = _blocked(row_token, vocab_size)
    if blocks is not None:            # S single rows, then K consecutive rows per token
        s, k = blocks
        rest = row_log_probs[:, s:].reshape(M, vocab_size - s, k).logsumexp(-1)
        return torch.cat([row_log_probs[:, :s], rest], dim=1)
    idx = row_token[None].expand(M, R)
    mx = torch.full((M, vocab_size), float("-inf"), dtype=row_log_probs.dtype,
                    device=row_log_probs.device)
    mx = mx.scatter_reduce(1, idx, row_log_probs, "amax")
    mass = torch.zeros_like(mx).scatter_add(1, idx, torch.exp(row_log_probs - mx.gather(1, idx)))
    return mx + torch.log(mass)


def _blocked(row_token: torch.Tensor, vocab_size: int) -> tuple[int, int] | None:
    """(S, K) when ``row_token`` is the pseudo-vocabulary layout (S single rows, then K
    consecutive rows per token), else None."""
    k = int((row_token == vocab_size - 1).sum())
    if k < 2 or (k * vocab_size - len(row_token)) % (k - 1):
        return None
    s = (k * vocab_size - len(row_token)) // (k - 1)
    if not 0 <= s < vocab_size:
        return None
    return (s, k) if torch.equal(row_token, row_token_map(vocab_size, k, num_specials=s)
                                 .to(row_token.device)) else None


def mixture_log_probs(prior_logits: torch.Tensor, comp_log_probs: torch.Tensor) -> torch.Tensor:
    """Mixture of softmaxes: (M, K) prior logits, (M, K, V) component log-probs -> (M, V)
    log Σ_k π_k p_k(w). With K = 1 this is the component itself."""
    log_prior = torch.log_softmax(prior_logits, dim=-1)
    return torch.logsumexp(log_prior[..., None] + comp_log_probs, dim=1)


def head_log_probs(h: torch.Tensor, W: torch.Tensor, row_token: torch.Tensor, vocab_size: int,
                   use_l2: bool = False, norm_l2: bool = False) -> torch.Tensor:
    """(M, D) inputs -> (M, V) token log-probs of one (possibly multi-row) softmax."""
    row_lp = torch.log_softmax(similarity_logits(h, W, use_l2, norm_l2).float(), dim=-1)
    return aggregate_rows(row_lp, row_token, vocab_size)


def centroid_dist_t(index: torch.Tensor, prob: torch.Tensor, shape: tuple[int, int]
                    ) -> torch.Tensor:
    """The (V, C) transpose of a C × V distribution P(w | c) given as COO ``index`` (2, nnz:
    centroid, token) and ``prob`` (nnz,), in CSR: its product with dense matrices is ~50x
    faster than COO's on CPU."""
    dist = torch.sparse_coo_tensor(index, prob.float(), size=shape, check_invariants=True)
    with warnings.catch_warnings():   # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return dist.t().coalesce().to_sparse_csr()


def centroid_log_probs(h: torch.Tensor, centroids: torch.Tensor, dist_t: torch.Tensor,
                       scale: float = 1.0, use_l2: bool = False, norm_l2: bool = False
                       ) -> torch.Tensor:
    """(M, D) inputs -> (M, V) log p(w | h) = log Σ_c P(w | c) softmax_c(scale · s(h, μ_c)),
    s the dot product or −‖h − μ‖² (``use_l2``), ``dist_t`` the (V, C) CSR transpose of
    P(w | c); floored at 1e-9 as the original fork did (its agg_softmax and scorer)."""
    logits = similarity_logits(h.float(), centroids.float(), use_l2, norm_l2)
    p_c = torch.softmax(scale * logits, -1)
    p_w = (dist_t @ p_c.t().contiguous()).t()                 # (M, V)
    return torch.log(p_w.clamp_min(1e-9))


class CentroidOutput(torch.nn.Module):
    """An LM whose output layer is a softmax over centroids of datastore keys, mapped to
    tokens by a distribution P(w | c) (the original's ``--load-centroids``,
    ``--load-centroid-distribution``, ``--centroid-scale``; :mod:`knnlm.knn.centroids`):

        p(w | h) = Σ_c P(w | c) · softmax_c(scale · h·μ_c)

    ``h`` is the ``keytype`` representation the centroids were made of (``ffn``: the
    model's own output-layer input). The original's variants: ``use_l2`` scores
    −scale·‖h − μ_c‖² instead of the dot product, ``norm_l2`` L2-normalises h first.
    ``output_layer`` returns log p, floored at 1e-9 as the original did and renormalised,
    so the scorer's log-softmax leaves it as it is."""

    def __init__(self, base, centroids: torch.Tensor, dist: torch.Tensor, scale: float,
                 keytype: str = "ffn", use_l2: bool = False, norm_l2: bool = False):
        super().__init__()
        self.base, self.keytype, self.scale = base, keytype, float(scale)
        self.use_l2, self.norm_l2 = use_l2, norm_l2
        self.cfg = base.cfg
        self.register_buffer("centroids", centroids.float())        # (C, D)
        dist = dist.coalesce()
        self.register_buffer("dist_t", centroid_dist_t(dist.indices(), dist.values(),
                                                       tuple(dist.shape)))

    def forward(self, tokens, return_hidden: tuple[str, ...] = (), **kw):
        want = tuple(dict.fromkeys((*return_hidden, self.keytype)))
        feats, hidden = self.base(tokens, return_hidden=want, **kw)
        return hidden[self.keytype], {k: v for k, v in hidden.items() if k in return_hidden}

    def output_layer(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        out = centroid_log_probs(h.reshape(-1, h.shape[-1]), self.centroids, self.dist_t,
                                 self.scale, self.use_l2, self.norm_l2)
        return out.reshape(*lead, -1)
