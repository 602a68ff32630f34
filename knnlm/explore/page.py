"""The explorer page: one self-contained HTML file (no network; its data embedded as one
JSON payload) showing what the kNN-LM retrieved for a text.

The payload holds, per position of the text: the actual token, p_LM of it and of the
candidate tokens (the LM's top ones and every neighbour's value), the neighbours (their
score in the score mode, log count, value, and the datastore text around them), and the
target's training-frequency bucket. The page's script recomputes p_kNN, the mix and the
colours from those scores for any λ and T (the same formulas as ``knnlm.knn.math``), so the
sliders need no server. Every string is data: the payload is JSON inside a
``<script type="application/json">`` element with ``<``, ``>`` and ``&`` escaped, and the
script writes text with ``textContent`` only — a corpus holding ``<script>`` shows as text.
"""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch

from ..data.counts import bucket_names, bucket_of

TOP_LM = 8          # the LM's top predictions shown (and kept as candidates) per position


def payload(rows: list[dict], lm_log_probs: torch.Tensor, vocab, train_counts: np.ndarray,
            settings: dict, title: str) -> dict:
    """The page's data from ``knnlm neighbors``' rows (with their texts), the LM's
    (N, V) log-probs at each position, and the training counts of the tokens."""
    positions = []
    for row in rows:
        lp = lm_log_probs[row["position"]]
        top = torch.topk(lp, min(TOP_LM, len(lp)))
        cand = {int(t): float(lp[t].exp()) for t in top.indices}
        for nb in row["neighbors"]:
            cand.setdefault(nb["value"], float(lp[nb["value"]].exp()))
        cand.setdefault(row["target"], row["lm_prob"])
        positions.append(dict(
            text=row["target_text"], target=row["target"], lm=row["lm_prob"],
            knn=row["knn_prob"], bucket=bucket_of(int(train_counts[row["target"]])),
            searched=row.get("searched", True),
            cand=[[t, vocab.decode([t]), p] for t, p in cand.items()],
            nb=[dict(score=nb["score"], logc=nb.get("log_count", 0.0), value=nb["value"],
                     distance=nb["distance"], id=nb["id"], before=nb["source_context"],
                     after=nb.get("source_after", ""), value_text=nb["value_text"])
                for nb in row["neighbors"]]))
    return dict(title=title, settings=settings, buckets=bucket_names(), positions=positions)


def render(data: dict) -> str:
    """The HTML page of a payload (the template's placeholder replaced by its JSON)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    template = resources.files("knnlm.explore").joinpath("assets/page.html").read_text(
        encoding="utf-8")
    return template.replace("/*PAYLOAD*/", text, 1)
