"""Setting up the parametric heads for training: start from a trained checkpoint, freeze
its body, initialise new output rows from its W_sm, and allot extra embeddings by token
frequency (`knnlm allot-embeddings`).

Inputs of `allot-embeddings`: a data-bin (positional). Output: a JSON list of V extra-row
counts for `knnlm train --num-extra-embed-file`.

    knnlm allot-embeddings runs/demo/data-bin --total-ratio 3 --out runs/demo/extra_embed.json
    knnlm train runs/demo/data-bin --restore-file runs/demo/checkpoints/checkpoint_best.pt \\
        --num-extra-embed-file runs/demo/extra_embed.json --init-out-embed \\
        --finetune-out-embed --max-update 200 --save-dir runs/demo/ckpt_extra

Allotment (the paper allotted about 3V rows in total by log-frequency): every token keeps
its own row and token w gets e_w ≈ (total_ratio − 1)·V · log(1 + c_w) / Σ_u log(1 + c_u)
extra rows (c_w: its count in the training split), rounded so the sum is exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import DataBin
from ..io import write_json_atomic
from ..util import UserError, flag
from .checkpoint import check_data_matches, load_checkpoint, model_from_checkpoint
from .transformer import ModelConfig, TransformerLM

# std of the noise added to copied rows, relative to the base rows' std: identical copies
# of a row get identical gradients forever, so the copies must differ a little
INIT_NOISE = 0.01
# trainable parameter groups of each --finetune-* flag (name prefixes)
FINETUNE_GROUPS = {
    "out_embed": ("output_projection.", "mos_proj.", "mos_prior."),
    "mos": ("output_projection.", "mos_proj.", "mos_prior."),
    "additional_linear": ("additional_linear.",),
}


def allot_extra_embeddings(counts: np.ndarray, total_ratio: float) -> list[int]:
    """Extra rows per token, proportional to log(1 + count), summing to round((ratio-1)·V)."""
    V = len(counts)
    budget = int(round((total_ratio - 1.0) * V))
    weight = np.log1p(counts.astype(np.float64))
    if budget <= 0 or weight.sum() == 0:
        return [0] * V
    share = weight / weight.sum() * budget
    extra = np.floor(share).astype(np.int64)
    # largest remainders get the rows rounding left over (ties: lower token id first)
    left = budget - int(extra.sum())
    order = np.lexsort((np.arange(V), -(share - extra)))
    extra[order[:left]] += 1
    return extra.tolist()


def read_extra_embed_file(path: str, vocab_size: int) -> list[int]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--num-extra-embed-file not found: {p}")
    try:
        counts = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc.msg})")
    if not (isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise UserError(f"{p} must hold a JSON list of non-negative integers")
    if len(counts) != vocab_size:
        raise UserError(f"{p} lists {len(counts)} tokens; the vocabulary has {vocab_size}")
    return counts


def model_from_base(base_ckpt: dict, head: dict, init_out_embed: bool, seed: int,
                    overrides: dict | None = None) -> TransformerLM:
    """A model with the base checkpoint's body and a new head (``head``: ModelConfig head
    fields). The body is copied; the output rows are copied from the base W_sm (row r gets
    the base row of its token, plus a little noise on the extra rows) when
    ``init_out_embed``, for an additional-linear model (its main head *is* the base head)
    and when the head keeps the base's shape and input."""
    base_cfg = dict(base_ckpt["model_cfg"])
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
    same_input = new_cfg["softmax_input"] == base_cfg.get("softmax_input", "ffn")
    base_w = state.get("output_projection.weight", state["embed_tokens.weight"])
    if ("output_projection.weight" in own
            and (init_out_embed or new_cfg["additional_linear"] or same_input)
            and base_w.shape[0] == new_cfg["vocab_size"]):
        rows = base_w[model.row_token].clone()
        V = new_cfg["vocab_size"]
        if len(rows) > V:
            g = torch.Generator().manual_seed(seed)
            rows[V:] += INIT_NOISE * base_w.std() * torch.randn(rows[V:].shape, generator=g)
        own["output_projection.weight"] = rows
    # otherwise the new head keeps its random initialisation
    model.load_state_dict(own)
    return model


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

    def __post_init__(self):
        if self.total_ratio < 1:
            raise UserError(f"--total-ratio must be >= 1, got {self.total_ratio}")


def main(cfg: AllotConfig) -> list[int]:
    databin = DataBin(cfg.data)
    counts = np.bincount(np.asarray(databin.split("train")), minlength=databin.vocab_size)
    extra = allot_extra_embeddings(counts, cfg.total_ratio)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.out, extra)
    print(f"wrote {cfg.out}: {sum(extra):,} extra rows for {len(extra):,} tokens "
          f"({(len(extra) + sum(extra)) / len(extra):.2f} rows per token)")
    return extra
