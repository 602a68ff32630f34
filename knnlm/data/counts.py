"""Training-frequency buckets of tokens: where the kNN-LM's gain is grouped by how often
the target occurs in the training data (``analyze --parts tokens``, the explorer)."""
from __future__ import annotations

import math

FREQ_EDGES = (0, 1, 10, 100, 1_000, 10_000, 100_000)   # training counts of the target


def bucket_names() -> list[str]:
    """One label per bucket: "0", "1–9", ..., "≥100,000"."""
    edges = list(FREQ_EDGES) + [math.inf]
    return [f"{lo:,}" if lo == 0 else f"{lo:,}–{hi - 1:,}" if math.isfinite(hi) else f"≥{lo:,}"
            for lo, hi in zip(edges, edges[1:])]


def bucket_of(count: int) -> int:
    """The bucket of a training count (0: never seen)."""
    edges = list(FREQ_EDGES) + [math.inf]
    if count == 0:
        return 0
    return next(i for i, (lo, hi) in enumerate(zip(edges, edges[1:])) if lo <= count < hi)
