"""Blocked forward passes, shared by eval-lm, build-dstore, validation during training and
the kNN-LM: the token stream cut into fairseq windows (:mod:`knnlm.data.blocks`), batched,
run through the model, and each batch's scored positions returned as target log-probs
and the requested representations (``att``, ``ffn``, ``layer:N``) in split order.

    for sb in iter_scored(model, tokens, make_windows(len(tokens), tokens, eos, 512, 256, "none"),
                          eos=eos, pad=pad, max_tokens=8192, softmax_batch=4096,
                          device=device, return_hidden=("att",)):
        sb.logprobs   # (M,) log p(target) of tokens [sb.start, sb.end)
        sb.hidden["att"]   # (M, D)

Every token of the split is scored exactly once; the output softmax is taken in chunks so
the (M, V) logits never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..data.blocks import Window, batch_windows, line_windows, score_windows, shifted_inputs
from ..util import UserError
from .device import autocast_context


@dataclass
class ScoredBatch:
    """Targets ``[start, end)`` of the split, scored in one batch."""
    start: int
    end: int
    targets: np.ndarray          # (M,) int64
    prev: np.ndarray             # (M,) int64, the input token at each position
    logprobs: torch.Tensor | None  # (M,) float32, log p_LM(target), natural log
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (M, D)
    stats: torch.Tensor | None = None  # (M, 2): entropy and max log-prob of p_LM (lm_stats)
    starts: np.ndarray | None = None   # where each window's scored positions begin (split)


def target_logprobs(model, features: torch.Tensor, targets: torch.Tensor,
                    softmax_batch: int, stats: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) for (M, D) features, the output softmax taken ``softmax_batch`` rows
    at a time so the (M, V) logits never exist at once. ``stats`` (M, 2), when given, is
    filled with each row's entropy and max log-prob."""
    out = torch.empty(len(targets), dtype=torch.float32, device=features.device)
    for s in range(0, len(targets), softmax_batch):
        logits = model.output_layer(features[s:s + softmax_batch]).float()
        t = targets[s:s + softmax_batch, None]
        lse = torch.logsumexp(logits, 1, True)
        out[s:s + softmax_batch] = (logits.gather(1, t) - lse)[:, 0]
        if stats is not None:
            lm_stats(logits, lse, stats[s:s + softmax_batch])
    return out


STATS_ROWS = 128   # rows per block of lm_stats: its (rows, V) temporaries stay in cache


def lm_stats(logits: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """(B, 2) entropy and max log-prob of softmax(``logits``) into ``out``, ``lse`` (B, 1)
    the logits' logsumexp: H = −Σ p·log p as one exp and one dot over the vocabulary, in
    blocks of rows whose temporaries stay in cache."""
    rows = min(STATS_ROWS, len(logits))
    lp = torch.empty((rows, logits.shape[1]), dtype=logits.dtype, device=logits.device)
    p = torch.empty_like(lp)
    for s in range(0, len(logits), STATS_ROWS):
        x = logits[s:s + STATS_ROWS]
        n = len(x)
        torch.sub(x, lse[s:s + STATS_ROWS], out=lp[:n])
        torch.exp(lp[:n], out=p[:n])
        out[s:s + n, 0] = -torch.linalg.vecdot(p[:n], lp[:n])
        out[s:s + n, 1] = lp[:n].amax(1)


def resolve_window(model, tokens_per_sample: int | None, context_window: int | None
                   ) -> tuple[int, int]:
    """The input length T and left context C, checked against the model.

    Defaults: T = the model's max positions (fairseq's), but at most 2,048 for an HF model
    (``cfg.default_window``: Llama 3.1 has 131,072 positions), and C = 0, or T / 2 when T
    is that HF default, so every scored token sees at least T / 2 tokens of context. The
    defaults an HF model gets are printed."""
    limit = model.cfg.max_target_positions
    hf = hasattr(model.cfg, "default_window")
    T = tokens_per_sample or (model.cfg.default_window if hf else limit)
    if T > limit:
        raise UserError(f"--tokens-per-sample {T} exceeds the model's max positions {limit}")
    if context_window is not None:
        C = context_window
    else:
        C = T // 2 if hf and tokens_per_sample is None else 0
    if C >= T:
        raise UserError(f"--context-window ({C}) must be smaller than --tokens-per-sample ({T})")
    if hf and tokens_per_sample is None:
        how = lambda flag: "default" if flag is None else "flag"  # noqa: E731
        print(f"window: {T:,} tokens per input ({how(tokens_per_sample)}; the model has "
              f"{limit:,} positions), {C:,} of them left context ({how(context_window)}); "
              "--tokens-per-sample and --context-window set them")
    return T, C


def make_windows(n_tokens: int, tokens: np.ndarray, eos: int, tokens_per_sample: int,
                 context_window: int, mode: str) -> list[Window]:
    if mode == "none":
        return score_windows(n_tokens, tokens_per_sample, context_window)
    return line_windows(tokens[:n_tokens], eos, tokens_per_sample, context_window, mode)


@torch.no_grad()
def iter_scored(model, tokens: np.ndarray, windows: list[Window], *, eos: int, pad: int,
                max_tokens: int, softmax_batch: int, device: torch.device,
                return_hidden: tuple[str, ...] = (), amp_dtype=None,
                logprobs: bool = True, lm_stats: bool = False,
                features: bool = False) -> Iterator[ScoredBatch]:
    """Run the model over consecutive windows, yielding target log-probs (unless
    ``logprobs`` is False: no output layer at all), the ``return_hidden`` states of each
    batch's scored positions (with ``features``, also the output layer's input, under
    ``"features"``), and with ``lm_stats`` each position's entropy and max log-prob, in
    order."""
    if any(a.end != b.score_start for a, b in zip(windows, windows[1:])):
        raise ValueError("iter_scored needs consecutive windows")
    model.eval()
    for batch in batch_windows(windows, max_tokens):
        B, L = len(batch), max(w.length for w in batch)
        inp = np.full((B, L), pad, dtype=np.int64)
        flat_idx = []
        for b, w in enumerate(batch):
            inp[b, :w.length] = shifted_inputs(tokens, eos, w.ctx_start, w.end)
            flat_idx.append(np.arange(w.score_start - w.ctx_start, w.length) + b * L)
        start, end = batch[0].score_start, batch[-1].end
        targets = np.asarray(tokens[start:end], dtype=np.int64)
        prev = shifted_inputs(tokens, eos, start, end)
        x = torch.from_numpy(inp).to(device)
        idx = torch.from_numpy(np.concatenate(flat_idx)).to(device)
        lp = None
        stats = torch.empty(len(targets), 2, device=device) if lm_stats else None
        with autocast_context(device, amp_dtype):
            feats, hidden = model(x, return_hidden=return_hidden)
            if logprobs:
                lp = target_logprobs(model, feats.reshape(B * L, -1)[idx],
                                     torch.from_numpy(targets).to(device), softmax_batch, stats)
        if features:
            hidden = dict(hidden, features=feats)
        hidden = {k: v.reshape(B * L, -1)[idx] for k, v in hidden.items()}
        yield ScoredBatch(start, end, targets, prev, lp, hidden, stats,
                          np.array([w.score_start for w in batch], dtype=np.int64))
