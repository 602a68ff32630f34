"""`knnlm neighbors`: what the kNN-LM retrieves, position by position, as readable text.

Inputs: a data-bin (positional: its vocabulary encodes the text), ``--path`` or
``--hf-model``, ``--dstore-filename`` (+ ``--indexfile`` or ``--exact-search``) and the
text (``--text`` or ``--file``). For each position: the text so far, the actual next
token, its LM and kNN probabilities, and the k neighbours — distance, kNN weight, value
token, and the datastore context the neighbour came from (decoded from the datastore's
positions and its own data-bin). ``--json`` prints the same as JSON: the score mode, k,
T, and ``positions``, one object per position.

    knnlm neighbors runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-filename runs/demo/dstore --probe 8 --k 4 --text "To be, or not to be"
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.blocks import shifted_inputs
from .data.preprocess import DataBin
from .guard import check_output
from .io import ENCODING_ERRORS, read_text
from .knn import math as knn_math
from .knn.options import KnnOptions
from .knn.rank_search import sharing
from .knn.gate import Gate
from .knn.pointers import PointerWalk
from .knn.search import KnnSearch
from .lm.checkpoint import check_model_source, load_lm
from .lm.device import resolve_device
from .util import UserError, flag


@dataclass(kw_only=True)
class NeighborsConfig(KnnOptions):
    data: str = flag(help="data-bin directory (its vocabulary encodes the text)", positional=True)
    path: str | None = flag(None, "checkpoint")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    hf_dtype: str | None = flag(None, "--hf-model: load its weights as fp32, bf16 or fp16 "
                                "(default fp32; datastores match across dtypes)",
                                choices=("fp32", "bf16", "fp16"))
    text: str | None = flag(None, "the text to inspect")
    file: str | None = flag(None, "a text file to inspect (lines end with the line token)")
    context_tokens: int = flag(12, "datastore tokens shown before each neighbour's value")
    json: bool = flag(False, "print JSON instead of text")
    html: str | None = flag(None, "also write the explorer page to this file: one "
                            "self-contained HTML (tokens coloured by the kNN-LM's gain, the "
                            "neighbours of a clicked token, λ and T sliders)")
    encoding: str = flag("utf-8", "--file: its encoding")
    errors: str = flag("strict", "--file: undecodable bytes are refused (strict) or replaced / "
                       "dropped", choices=ENCODING_ERRORS)
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")

    def __post_init__(self):
        self.knnlm = True
        check_model_source(self.path, self.hf_model)
        if bool(self.text is not None) == bool(self.file):
            raise UserError("give exactly one of --text TEXT and --file FILE")
        if self.context_tokens < 0:
            raise UserError("--context-tokens must be >= 0")
        check_output(self.html, "file", "--html")
        self.check_knn()

    def token_ids(self, vocab) -> np.ndarray:
        if self.text is not None:
            ids = vocab.encode_text(self.text)
        else:
            p = Path(self.file)
            if not p.is_file():
                raise UserError(f"--file not found: {p}")
            lines = read_text(p, "--file", self.encoding, self.errors).splitlines()
            ids = np.concatenate(vocab.encode_lines(lines)) if lines else np.zeros(0, np.int64)
        if len(ids) == 0:
            raise UserError("the text encodes to no tokens")
        return ids


def neighbours(model, ids: np.ndarray, start: int, search, temp: float, device,
               lm_out: list | None = None) -> list[dict]:
    """Per position of ``ids``: the next token, p_LM, p_kNN and the neighbours (id,
    distance, score, weight, value, log count), in search order. ``lm_out``: a list that
    gets the LM's (N, V) log-probs."""
    if len(ids) > model.cfg.max_target_positions:
        raise UserError(f"the text has {len(ids)} tokens; the model reads at most "
                        f"{model.cfg.max_target_positions}")
    inp = torch.from_numpy(shifted_inputs(ids, start, 0, len(ids)).astype(np.int64))[None]
    with torch.no_grad():
        feats, hid = model(inp.to(device), return_hidden=(search.keytype,))
        lm = torch.log_softmax(model.output_layer(feats[0]).double(), -1).cpu()
    q = hid[search.keytype][0].float().cpu().numpy()
    if lm_out is not None:
        lm_out.append(lm)
    o = search.cfg
    walk = PointerWalk(search, o.min_knns, o.max_knns, o.members) \
        if search.cfg.retomaton else None
    r = walk.search_stream(q, ids) if walk is not None else search.search(q)
    counts = r.get("log_counts")
    weights = torch.exp(knn_math.log_weights(r["scores"].masked_fill(~r["mask"], -math.inf), temp,
                                             counts))
    tgt = torch.from_numpy(ids.astype(np.int64))
    p_knn = knn_math.knn_target_log_probs(r["scores"], torch.from_numpy(r["vals"]), tgt, temp,
                                          r["mask"], counts).exp()
    searched = r["searched"] if walk is not None else np.ones(len(ids), dtype=bool)
    gate = Gate(o.gate) if o.gate else None
    lam_hat = gate_lambdas(gate, search, lm, ids, start, q) if gate is not None else None
    if lam_hat is not None:   # positions the gate skips: no neighbours, p_kNN := p_LM
        searched = lam_hat >= gate.threshold(o.retrieval_fraction, o.gate_threshold)
        p_knn = torch.where(torch.from_numpy(searched), p_knn,
                            lm.gather(1, tgt[:, None])[:, 0].exp())
    out = []
    for i in range(len(ids)):
        nb = [dict(id=int(r["I"][i, j]), distance=float(r["D"][i, j]),
                   score=float(r["scores"][i, j]), weight=float(weights[i, j]),
                   value=int(r["vals"][i, j]),
                   log_count=0.0 if counts is None else float(counts[i, j]))
              for j in range(r["I"].shape[1]) if r["I"][i, j] >= 0]
        out.append(dict(position=i, target=int(ids[i]), lm_prob=float(lm[i, ids[i]].exp()),
                        knn_prob=float(p_knn[i]),
                        neighbors=nb if searched[i] or lam_hat is None else [],
                        searched=bool(searched[i])))
        if lam_hat is not None:
            out[-1]["gate_lambda"] = float(lam_hat[i])
    return out


def gate_lambdas(gate: Gate, search, lm: torch.Tensor, ids: np.ndarray, start: int,
                 q: np.ndarray) -> np.ndarray:
    """The gate's λ̂ at every position of the text (``lm``: the LM's log-probs there)."""
    gate.check(search.ds, search.model_fingerprint, search.cfg.knn_keytype)
    stats = torch.stack([-(lm.exp() * lm).sum(-1), lm.max(-1).values], 1).float().numpy()
    return gate.lambdas(stats, ids, start, 0, len(ids), q)


def describe(rows: list[dict], ids: np.ndarray, vocab, ds, ds_vocab, ds_tokens, n_ctx: int) -> list[dict]:
    """Add readable text: each position's context and target, each neighbour's source."""
    pos = ds.pos
    for row in rows:
        i = row["position"]
        row["context"] = vocab.decode(ids[max(0, i - n_ctx):i])
        row["target_text"] = vocab.decode(ids[i:i + 1])
        for nb in row["neighbors"]:
            p = int(pos[nb["id"]])
            nb["source_position"] = p
            nb["source_context"] = ds_vocab.decode(ds_tokens[max(0, p - n_ctx):p])
            nb["value_text"] = ds_vocab.decode([nb["value"]])
            nb["source_after"] = ds_vocab.decode(ds_tokens[p + 1:p + 1 + max(1, n_ctx // 3)])
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        lines.append(f"[{row['position']}] …{row['context']!r} → {row['target_text']!r}   "
                     f"p_LM {row['lm_prob']:.4f}  p_kNN {row['knn_prob']:.4f}"
                     + ("" if row.get("searched", True) else
                        "  (gate: no search)" if "gate_lambda" in row else
                        "  (pointers, no search)"))
        for j, nb in enumerate(row["neighbors"], 1):
            mark = "*" if nb["value"] == row["target"] else " "
            lines.append(f"   {j:2d}.{mark} d {nb['distance']:9.3f}  w {nb['weight']:.3f}  "
                         f"…{nb['source_context']!r} → {nb['value_text']!r}  "
                         f"(entry {nb['id']:,}, token {nb['source_position']:,})")
    return "\n".join(lines)


class Inspector:
    """The model, the search and the datastore's text, loaded once: :meth:`rows` of any
    token ids (``knnlm neighbors``; the explorer's server for every text it is sent)."""

    def __init__(self, cfg: NeighborsConfig, log=print):
        self.cfg = cfg
        self.databin = DataBin(cfg.data)
        self.device = resolve_device(cfg.device, cfg.cpu)
        self.model, fingerprint = load_lm(cfg.path, cfg.hf_model, self.databin, self.device,
                                          cfg.hf_dtype)
        self.model.eval()
        self.search = KnnSearch(cfg, fingerprint, self.databin, self.device, log=log)
        ds = self.ds = self.search.ds
        src = Path(ds.meta.get("data_dir", ""))
        if (ds.path / "data-bin" / "data.json").is_file():   # its own (Datastore.build)
            src = ds.path / "data-bin"
        self.ds_bin = DataBin(src) if (src / "data.json").is_file() else self.databin
        if self.ds_bin.tokenizer_sha256 != ds.meta["tokenizer_sha256"]:
            raise UserError(f"the datastore's data-bin {src} is gone or changed; cannot show "
                            "neighbour texts")
        self.ds_tokens = self.ds_bin.split(ds.meta["split"])
        self._counts = None

    def rows(self, ids: np.ndarray) -> tuple[list[dict], torch.Tensor]:
        """(the rows of :func:`neighbours` with their texts, the LM's (N, V) log-probs)."""
        lm = []
        rows = neighbours(self.model, ids, self.databin.eos, self.search, self.cfg.knn_temp,
                          self.device, lm)
        return describe(rows, ids, self.databin.vocab, self.ds, self.ds_bin.vocab,
                        self.ds_tokens, self.cfg.context_tokens), lm[0]

    def page(self, ids: np.ndarray) -> tuple[str, list[dict]]:
        """The explorer page of ``ids`` (:mod:`knnlm.explore.page`) and its rows."""
        from .explore.page import payload, render
        if self._counts is None:
            t = np.asarray(self.ds_tokens)
            self._counts = np.bincount(t, minlength=max(self.ds_bin.vocab_size,
                                                        int(t.max()) + 1 if len(t) else 0))
        rows, lm = self.rows(ids)
        c = self.cfg
        settings = dict(lmbda=c.lmbda, knn_temp=c.knn_temp, k=c.k,
                        score_mode=self.search.mode.name, datastore=str(self.ds.path),
                        entries=self.ds.size)
        title = (f"knnlm explorer — {len(rows):,} tokens, datastore {self.ds.path.name} "
                 f"({self.ds.size:,} entries)")
        return render(payload(rows, lm, self.databin.vocab, self._counts, settings, title)), rows


def main(cfg: NeighborsConfig) -> list[dict] | None:
    # under torchrun over an index kept in shards, ranks > 0 answer rank 0's searches
    with sharing(cfg, "neighbors") as leader:
        return _main(cfg) if leader else None


def _main(cfg: NeighborsConfig) -> list[dict]:
    # with --json, stdout is the JSON alone: the search's reports go to stderr
    insp = Inspector(cfg, log=(lambda msg: print(msg, file=sys.stderr)) if cfg.json else print)
    ids = cfg.token_ids(insp.databin.vocab)
    if cfg.html:
        from .io import save_atomic
        html, rows = insp.page(ids)
        save_atomic(lambda fh: fh.write(html.encode("utf-8")), cfg.html)
        print(f"wrote {cfg.html}", file=sys.stderr if cfg.json else sys.stdout)
    else:
        rows, _ = insp.rows(ids)
    mode = insp.search.mode
    if cfg.json:
        print(json.dumps(dict(score_mode=mode.to_dict(), search_backend=insp.search.backend,
                              k=cfg.k, knn_temp=cfg.knn_temp, settings=insp.search.settings,
                              positions=rows), indent=1))
    else:
        print(f"score mode {mode.name}: {mode.describe()}; k {cfg.k}, T {cfg.knn_temp}")
        print(format_rows(rows))
    return rows
