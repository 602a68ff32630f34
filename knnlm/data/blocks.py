"""fairseq-style blocking of a token stream, for training and for scoring.

A split is one stream of N tokens (each line's ids followed by ``</s>``). Token i is
predicted from everything before it; the model input at position i is the previous token,
with ``</s>`` standing before the first token, so every one of the N tokens is a target:

    inputs  = [</s>, t0, t1, ..., t_{N-2}]
    targets = [t0,   t1, t2, ..., t_{N-1}]

Scoring (eval-lm, datastore dumps): with ``tokens_per_sample`` T and ``context_window`` C,
the targets are cut into consecutive blocks of T - C tokens; each block is fed with up to C
preceding tokens as extra left context, which is not scored. Every target is scored exactly
once, and no input is longer than T. (fairseq eval-lm does the same: it shrinks the
blocks by the context window and prepends the previous C tokens.)

With ``--sample-break-mode complete`` (or ``eos``) the blocks hold whole lines, packed up
to T - C tokens (one line each for ``eos``); a longer line is a block of its own, whole up
to T tokens, and each block gets the min(C, T - its length) tokens before it as context —
fairseq's TokenBlockDataset and LMContextWindowDataset, which the kNN-LM papers' WikiText
evaluation uses (``--sample-break-mode complete --context-window 2560`` on a 3072-token
model). One departure: a line longer than T is cut into blocks of T (fairseq would feed the
model more positions than it has).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

BREAK_MODES = ("none", "complete", "eos")


@dataclass(frozen=True)
class Window:
    """Model input ``inputs[ctx_start:end]``; targets ``[score_start, end)`` are scored."""
    ctx_start: int
    score_start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.ctx_start

    @property
    def n_scored(self) -> int:
        return self.end - self.score_start


def shifted_inputs(tokens: np.ndarray, eos: int, start: int, end: int) -> np.ndarray:
    """``inputs[start:end]`` of the stream without materialising the whole shifted copy."""
    if start > 0:
        return np.asarray(tokens[start - 1:end - 1], dtype=np.int64)
    head = np.asarray(tokens[0:max(0, end - 1)], dtype=np.int64)
    return np.concatenate([np.array([eos], dtype=np.int64), head])


def score_windows(n_tokens: int, tokens_per_sample: int, context_window: int = 0,
                  start: int = 0, end: int | None = None) -> list[Window]:
    """Windows covering targets ``[start, end)`` (default all) exactly once, in order."""
    if not 0 <= context_window < tokens_per_sample:
        raise ValueError("need 0 <= context_window < tokens_per_sample")
    end = n_tokens if end is None else end
    step = tokens_per_sample - context_window
    out = []
    for s in range(start, end, step):
        e = min(s + step, end)
        out.append(Window(max(0, s - context_window), s, e))
    return out


def line_bounds(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Start offsets of the lines of a stream, with N appended (lines end with ``</s>``)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos) + 1
    bounds = np.concatenate([[0], ends])
    if bounds[-1] != len(tokens):
        bounds = np.concatenate([bounds, [len(tokens)]])
    return bounds.astype(np.int64)


def train_blocks(tokens: np.ndarray, eos: int, tokens_per_sample: int,
                 mode: str = "none", longest: int | None = None) -> np.ndarray:
    """(B, 2) array of [start, end) target ranges (training samples; scored blocks).

    ``none``: consecutive blocks of ``tokens_per_sample`` tokens, ignoring lines.
    ``complete``: as many whole lines as fit; a line longer than a block is a block of its
    own, cut into pieces of ``longest`` (default: the block size) when longer still.
    ``eos``: one line per block (cut as ``complete`` cuts).
    """
    n = len(tokens)
    T = tokens_per_sample
    cut = longest or T
    if mode == "none":
        starts = np.arange(0, n, T, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + T, n)], axis=1)
    bounds = line_bounds(tokens, eos)
    out: list[tuple[int, int]] = []
    cur = None
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if mode == "complete" and cur is not None and e - cur[0] <= T:
            cur = (cur[0], e)
            continue
        if cur is not None:
            out.append(cur)
            cur = None
        while e - s > cut:  # overlong line: cut it
            out.append((s, s + cut))
            s += cut
        cur = (s, e)
        if mode == "eos":
            out.append(cur)
            cur = None
    if cur is not None:
        out.append(cur)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def line_windows(tokens: np.ndarray, eos: int, tokens_per_sample: int, context_window: int,
                 mode: str) -> list[Window]:
    """Scoring windows of whole lines (``complete`` / ``eos``): blocks packed up to
    T - C tokens, each with min(C, T - block length) tokens of left context (module
    docstring)."""
    T, C = tokens_per_sample, context_window
    if not 0 <= C < T:
        raise ValueError("need 0 <= context_window < tokens_per_sample")
    blocks = train_blocks(tokens, eos, T - C, mode, longest=T)
    return [Window(int(s - min(C, s, T - (e - s))), int(s), int(e)) for s, e in blocks]


def batch_windows(windows: list[Window], max_tokens: int | None,
                  max_sentences: int | None = None) -> Iterator[list[Window]]:
    """Group consecutive windows into batches of at most ``max_tokens`` padded tokens."""
    batch: list[Window] = []
    longest = 0
    for w in windows:
        longest_if = max(longest, w.length)
        full = (max_tokens is not None and batch and longest_if * (len(batch) + 1) > max_tokens) \
            or (max_sentences is not None and len(batch) >= max_sentences)
        if full:
            yield batch
            batch, longest_if = [], w.length
        batch.append(w)
        longest = longest_if
    if batch:
        yield batch
