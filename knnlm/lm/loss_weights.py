"""`knnlm loss-weights`: per-token loss weights from where kNN helps on the training set,
for `knnlm train --weighted-loss` (the original's analysis/loss_weighting.py and its
``--weighted-loss`` criterion).

Inputs: the LM's and the kNN's per-token log-probs of the train split (one eval-lm run:
``--gen-subset train --knnlm --ignore-top --save-scores LM.npy --save-knn-scores KNN.npy``,
``--ignore-top`` dropping each token's own datastore entry; ``--max-eval-tokens`` scores a
prefix). Output: a JSON list of V shares, the fraction of each token type's occurrences
where p_kNN > p_LM. ``train --weighted-loss FILE`` weights each target's loss by 1 + its
share (the original read the fixed path ``analysis/train_knn_helped.json``; here the flag
takes the file).

    knnlm loss-weights runs/small/data-bin --scores lm_train.npy --knn-scores knn_train.npy \
        --out runs/small/heads/knn_helped.json
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.preprocess import DataBin
from ..guard import check_output
from ..io import open_npy, read_text, refuse_nonfinite, write_json_atomic
from ..util import UserError, flag


def read_loss_weights(path: str, vocab_size: int) -> torch.Tensor:
    """(V,) float32 per-token weights from a JSON list (``knnlm loss-weights``)."""
    try:
        w = json.loads(read_text(path, "--weighted-loss"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})")
    if not (isinstance(w, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                        and math.isfinite(x) and x >= 0 for x in w)):
        raise UserError(f"{path} must hold a JSON list of finite non-negative numbers")
    if len(w) != vocab_size:
        raise UserError(f"{path} lists {len(w)} tokens; the vocabulary has {vocab_size}")
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class LossWeightsConfig:
    data: str = flag(help="data-bin directory (the train split the scores are of)",
                     positional=True)
    scores: str = flag(help="the LM's per-token log-probs of the train split (eval-lm "
                            "--gen-subset train --save-scores; a prefix with --max-eval-tokens)")
    knn_scores: str = flag(help="the kNN's per-token log-probs of the same tokens (eval-lm "
                                "--knnlm --ignore-top --save-knn-scores)")
    out: str = flag(help="JSON file to write (a list of V shares, for train --weighted-loss)")

    def __post_init__(self):
        check_output(self.out, "file", "--out")


def knn_helped_share(tokens: np.ndarray, lm: np.ndarray, knn: np.ndarray, vocab_size: int
                     ) -> np.ndarray:
    """(V,) for each token type, the share of its occurrences where log p_kNN > log p_LM
    (0 for types never seen): the original's train_knn_helped."""
    counts = np.bincount(tokens, minlength=vocab_size)
    helped = np.bincount(tokens, weights=(knn > lm).astype(np.float64), minlength=vocab_size)
    return np.divide(helped, counts, out=np.zeros(vocab_size), where=counts > 0)


def main(cfg: LossWeightsConfig) -> list[float]:
    databin = DataBin(cfg.data)
    lm = open_npy(cfg.scores, None, np.float32)
    knn = open_npy(cfg.knn_scores, None, np.float32)
    tokens = np.asarray(databin.split("train"))
    if lm.ndim != 1 or lm.shape != knn.shape or not 0 < len(lm) <= len(tokens):
        raise UserError(f"{cfg.scores} {lm.shape} and {cfg.knn_scores} {knn.shape} must score "
                        f"the same first tokens of the train split ({len(tokens):,} tokens)")
    lm, knn = np.asarray(lm), np.asarray(knn)
    refuse_nonfinite(lm, cfg.scores, "the LM log-prob")
    # log p_kNN is -inf where no neighbour holds the token (the format allows it); NaN and
    # +inf are damage
    refuse_nonfinite(knn, cfg.knn_scores, "the kNN log-prob", allowed=np.isneginf(knn))
    share = knn_helped_share(tokens[:len(lm)], lm, knn, databin.vocab_size)
    write_json_atomic(cfg.out, [float(x) for x in share])
    seen = share[np.bincount(tokens[:len(lm)], minlength=databin.vocab_size) > 0]
    print(f"wrote {cfg.out}: kNN beat the LM on {float((knn > lm).mean()):.1%} of {len(lm):,} "
          f"training tokens; per type, mean share {seen.mean():.3f} over {len(seen):,} types")
    return share.tolist()
