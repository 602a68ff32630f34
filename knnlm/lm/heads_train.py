"""Setting up the parametric heads for training: start from a trained checkpoint, freeze
its body, set the new output rows as the original fork does, and allot extra embeddings
by token frequency or training loss (`knnlm allot-embeddings`).

Inputs of `allot-embeddings`: a data-bin (positional); with ``--by loss`` also the base
model's per-token scores of the training split (``eval-lm --gen-subset train
--save-scores``). Output: a JSON list of V extra-row counts for `knnlm train
--num-extra-embed-file`.

    knnlm allot-embeddings runs/demo/data-bin --total-ratio 3 --out runs/demo/extra_embed.json
    knnlm train runs/demo/data-bin --restore-file runs/demo/checkpoints/checkpoint_best.pt \\
        --num-extra-embed-file runs/demo/extra_embed.json --init-out-embed \\
        --finetune-out-embed --max-update 200 --save-dir runs/demo/ckpt_extra

Allotment (the fork's ``analysis/freq_analysis.py`` and ``total_loss_analysis.py``; the
paper used about 3V rows in all): every token keeps its own row and token w gets
floor(log_b c_w) extra rows (c_w: its count in the training split; 0 when unseen), or
floor(log_b (1 + L_w)) by loss (L_w: its summed training loss), the base b solved so
that the rows come closest to ``--total-ratio`` · V.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import DataBin
from ..guard import check_output
from ..io import open_npy, read_text, write_json_atomic
from ..util import UserError, flag
from .checkpoint import check_data_matches, load_checkpoint, model_from_checkpoint
from .transformer import ModelConfig, TransformerLM

# std of the noise added to copied rows, relative to the base rows' std: identical copies
# of a row get identical gradients forever, so the copies must differ a little
INIT_NOISE = 0.01
# trainable parameter groups of each --finetune-* flag (name prefixes), as in the fork:
# --finetune-out-embed the output rows only, --finetune-mos the mixture's projections and
# prior only (both flags: both)
FINETUNE_GROUPS = {
    "out_embed": ("output_projection.",),
    "mos": ("mos_proj.", "mos_prior."),
    "additional_linear": ("additional_linear.",),
}



def allot_extra_embeddings(values: np.ndarray, total_ratio: float, by: str = "frequency"
                           ) -> tuple[list[int], float]:
    """Extra rows per token by the original fork's rule, and the log base it used.

    ``by="frequency"`` (``values``: training counts c_w): e_w = floor(log_b c_w), 0 for an
    unseen token; ``by="loss"`` (``values``: each token's total training loss L_w, nats):
    e_w = floor(log_b (1 + L_w)). The base b is solved for, so that V + Σ e_w comes
    closest to ``total_ratio`` · V (the fork searched it by hand for 3V).
    """
    x = np.asarray(values, dtype=np.float64)
    if by == "loss":
        x = 1.0 + x
    elif by != "frequency":
        raise ValueError(f"by must be frequency or loss, got {by!r}")
    logs = np.log(np.where(x >= 1, x, 1.0))        # log x >= 0; 0 rows for x <= 1
    budget = int(round((total_ratio - 1.0) * len(x)))
    if budget <= 0 or logs.max() == 0:
        return [0] * len(x), math.inf

    def total(log_b: float) -> int:
        return int(np.floor(logs / log_b).sum())

    lo, hi = logs.max() / (budget + 1), logs.max() * 2     # total(lo) > budget >= total(hi)
    for _ in range(200):                           # smallest log base with total <= budget
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(mid) <= budget else (mid, hi)
    # the step just below may land closer to the budget
    log_b = lo if abs(total(lo) - budget) < abs(total(hi) - budget) else hi
    # the middle of the range of bases giving these counts: floor(log_b x) is the same for
    # every base near it (no count sits on the edge of a step)
    m = np.floor(logs / log_b)
    low = float((logs / (m + 1)).max())
    high = float((logs[m >= 1] / m[m >= 1]).min()) if (m >= 1).any() else 2 * log_b
    log_b = (low + high) / 2
    return np.floor(logs / log_b).astype(np.int64).tolist(), float(math.exp(log_b))


def read_extra_embed_file(path: str, vocab_size: int) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--num-extra-embed-file not found: {p}")
    try:
        counts = json.loads(read_text(p, "--num-extra-embed-file"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc.msg})")
    if not (isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise UserError(f"{p} must hold a JSON list of non-negative integers")
    if len(counts) != vocab_size:
        raise UserError(f"{p} lists {len(counts)} tokens; the vocabulary has {vocab_size}")
    return counts


def model_from_base(base_ckpt: dict, head: dict, seed: int, overrides: dict | None = None, *,
                    init_out_embed: bool = False, copy_out_embed: bool = False,
                    preserve_out_embed: bool = False, centroids: tuple | None = None
                    ) -> TransformerLM:
    """A model with the base checkpoint's body and a new head (``head``: ModelConfig head
    fields). The output rows, as the original fork sets them:

    - the base W_sm when the new matrix has its shape (one row per token), else random;
    - ``preserve_out_embed``: also with more rows, each token's first row is its base row;
    - ``copy_out_embed``: every row is its token's base row (extra rows plus a little
      noise, so copies can differ);
    - ``init_out_embed``: re-initialised at random, N(0, 1/D), whatever was loaded;
    - ``centroids`` ((C, D) rows or None, (2, nnz) centroid/token index, (nnz,) P(w | c)):
      a centroid head, its rows these centroids (None: the base's centroid rows) and its
      distribution this one. A base with a centroid head keeps it when nothing replaces it.
    """
    base_cfg = dict(base_ckpt["model_cfg"])
    if centroids is not None:
        rows = centroids[0] if centroids[0] is not None else \
            base_ckpt["model"]["output_projection.weight"]
        head = dict(head, centroid_rows=len(rows), centroid_nnz=centroids[2].numel())
    new_cfg = dict(base_cfg, **head, **(overrides or {}))
    try:
        model = TransformerLM(ModelConfig.from_dict(new_cfg))
    except ValueError as exc:
        raise UserError(str(exc))
    state = base_ckpt["model"]
    own = model.state_dict()
    for name, t in state.items():
        if name in own and not name.startswith(TransformerLM.HEAD_PARAMS) and own[name].shape == t.shape:
            own[name] = t.clone()
    if model.cfg.centroid_rows:
        if centroids is not None:
            own.update({"output_projection.weight": rows.float().clone(),
                        "centroid_index": centroids[1].long(),
                        "centroid_prob": centroids[2].float()})
        else:
            own["output_projection.weight"] = state["output_projection.weight"].clone()
        if init_out_embed:
            g = torch.Generator().manual_seed(seed)
            shape = own["output_projection.weight"].shape
            own["output_projection.weight"] = torch.randn(shape, generator=g) * shape[1] ** -0.5
    elif "output_projection.weight" in own:
        own["output_projection.weight"] = _output_rows(
            own["output_projection.weight"], state.get("output_projection.weight",
                                                       state["embed_tokens.weight"]),
            model.row_token, seed, init_out_embed, copy_out_embed, preserve_out_embed)
    model.load_state_dict(own)
    return model


def centroid_head(cfg, base_ckpt: dict, vocab_size: int) -> tuple | None:
    """The ``centroids`` argument of :func:`model_from_base` that train's
    ``--load-centroids`` / ``--load-centroid-distribution`` ask for (None: neither given),
    checked against the base model and the input the softmax reads."""
    if not (cfg.load_centroids or cfg.load_centroid_distribution):
        return None
    from ..data.centroid_files import distribution_coo, load_centroids, load_distribution
    base = base_ckpt["model_cfg"]
    if cfg.load_centroids:
        cent, csr, side = load_centroids(cfg.load_centroids, cfg.load_centroid_distribution,
                                         vocab_size, base["decoder_embed_dim"])
        keytype = side.get("keytype")
        if keytype and keytype != cfg.softmax_input:
            raise UserError(f"--load-centroids {cfg.load_centroids} holds {keytype} centroids "
                            f"but the softmax reads {cfg.softmax_input} (--softmax-input "
                            f"{keytype}{', or --use-last-ffn-input' if keytype == 'att' else ''})")
        rows = torch.from_numpy(cent)
    else:
        if not base.get("centroid_rows"):
            raise UserError(f"--load-centroid-distribution without --load-centroids: "
                            f"{cfg.restore_file} has no centroid head to give it to")
        csr = load_distribution(cfg.load_centroid_distribution, base["centroid_rows"],
                                vocab_size)
        rows = None
    index, prob = distribution_coo(csr)
    return rows, torch.from_numpy(index), torch.from_numpy(prob)


def _output_rows(rows: torch.Tensor, base_w: torch.Tensor, row_token: torch.Tensor, seed: int,
                 init: bool, copy: bool, preserve: bool) -> torch.Tensor:
    """The new (R, D) output rows from their random initialisation ``rows`` and the base's
    (V, D) W_sm (see :func:`model_from_base`)."""
    g = torch.Generator().manual_seed(seed)
    rows = rows.clone()
    first = _first_rows(row_token)
    if base_w.shape[0] == int(row_token.max()) + 1:       # the base has the same vocabulary
        if copy:
            rows = base_w[row_token].clone()
            extra = torch.ones(len(rows), dtype=torch.bool)
            extra[first] = False
            rows[extra] += INIT_NOISE * base_w.std() * torch.randn(rows[extra].shape, generator=g)
        elif rows.shape == base_w.shape:
            rows = base_w.clone()
        elif preserve:
            rows[first] = base_w
    if init:
        rows = torch.randn(rows.shape, generator=g) * rows.shape[1] ** -0.5
    return rows


def _first_rows(row_token: torch.Tensor) -> torch.Tensor:
    """(V,) the index of each token's first output row."""
    V = int(row_token.max()) + 1
    first = torch.full((V,), len(row_token), dtype=torch.long)
    return first.scatter_reduce(0, row_token, torch.arange(len(row_token)), "amin")


def freeze_for_finetune(model: TransformerLM, groups: list[str]) -> int:
    """Freeze every parameter outside the named FINETUNE_GROUPS; returns trainable count."""
    prefixes = tuple(p for g in groups for p in FINETUNE_GROUPS[g])
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise UserError(f"--finetune-{groups[0].replace('_', '-')}: the model has no such "
                        "parameters (add the matching head flag)")
    return n


def load_base(path: str, databin: DataBin, device) -> tuple[dict, TransformerLM]:
    """The --restore-file checkpoint and its frozen, eval-mode model."""
    ckpt = load_checkpoint(path)
    check_data_matches(ckpt, databin, path)
    base = model_from_checkpoint(ckpt).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return ckpt, base


@dataclass
class AllotConfig:
    data: str = flag(help="data-bin directory (token counts of its train split)", positional=True)
    out: str = flag(help="JSON file to write (a list of V extra-row counts)")
    total_ratio: float = flag(3.0, "output rows in total, as a multiple of the vocabulary size")
    by: str = flag("frequency", "allot by training frequency or by total training loss",
                   choices=("frequency", "loss"))
    scores: str | None = flag(None, "--by loss: the base model's per-token log-probs of the "
                              "train split (eval-lm --gen-subset train --save-scores)")

    def __post_init__(self):
        if not self.total_ratio >= 1:
            raise UserError(f"--total-ratio must be >= 1, got {self.total_ratio}")
        check_output(self.out, "file", "--out")
        if (self.by == "loss") != bool(self.scores):
            raise UserError("--by loss takes --scores FILE (and --scores only goes with it)")


def token_values(cfg: AllotConfig, databin: DataBin) -> np.ndarray:
    """(V,) training counts, or summed training losses (nats) per token."""
    tokens = np.asarray(databin.split("train"))
    if cfg.by == "frequency":
        return np.bincount(tokens, minlength=databin.vocab_size)
    scores = open_npy(cfg.scores, None, np.float32)
    if scores.shape != tokens.shape:
        raise UserError(f"{cfg.scores} holds {scores.shape[0]:,} scores; the train split of "
                        f"{databin.path} has {len(tokens):,} tokens")
    return np.bincount(tokens, weights=-np.asarray(scores, dtype=np.float64),
                       minlength=databin.vocab_size)


def main(cfg: AllotConfig) -> list[int]:
    databin = DataBin(cfg.data)
    extra, base = allot_extra_embeddings(token_values(cfg, databin), cfg.total_ratio, cfg.by)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.out, extra)
    print(f"wrote {cfg.out}: {sum(extra):,} extra rows for {len(extra):,} tokens by {cfg.by} "
          f"({(len(extra) + sum(extra)) / len(extra):.2f} rows per token, log base {base:.4g})")
    return extra

