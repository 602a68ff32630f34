"""`knnlm eval-lm`: perplexity of a checkpoint on a data-bin split, fairseq semantics.

Inputs: ``--path`` checkpoint, a data-bin directory (positional, as in fairseq) and
``--gen-subset``. Outputs: loss (base 2) and perplexity per token and per word on stdout;
optionally ``--save-scores`` / ``--save-tokens`` (per-token .npy arrays, streamed to disk)
and ``--results-path`` (JSON).

    knnlm eval-lm runs/demo/data-bin --path runs/demo/ckpt/checkpoint_best.pt \\
        --gen-subset valid --tokens-per-sample 512 --context-window 256

Blocking: see :mod:`knnlm.data.blocks`; every token of the split is scored exactly once.
Memory does not grow with the split: blocks are streamed and per-token outputs go to
memmaps.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .build_dstore import main as build_dstore_main
from .data.preprocess import DataBin
from .data.tokenizer import word_mask
from .eval_config import EvalConfig  # noqa: F401  (the command's config)
from .eval_results import datastore_record, format_results, perplexities
from .distributed import env_ranks, setup_distributed
from .guard import output_lock, temp_path
from .io import open_npy, open_token_memmap, read_json, write_json_atomic
from .knn import math as knn_math
from .data.centroid_files import distribution_coo, load_centroids, load_distribution
from .knn.exact import merge_topk
from .knn.rank_search import kept_in_shards, sharing
from .knn.scorer import KnnScorer
from .knn.search import KnnSearch
from .lm.checkpoint import load_lm
from .lm.heads import CentroidOutput
from .lm.device import resolve_device
from .lm.scoring import iter_scored, make_windows, resolve_window
from .util import UserError, config_dict

@dataclass
class Batch:
    """Targets ``[start, end)`` of the split, scored: what the accumulation loop consumes."""
    start: int
    end: int
    targets: np.ndarray           # (M,) int64
    logprobs: np.ndarray          # (M,) float64, log p_LM(target)
    words: np.ndarray             # (M,) bool: the token ends a word
    query: torch.Tensor | None    # (M, D) kNN queries (with --knnlm)
    found: tuple | None = None    # their (D, I), when already searched (--exact-search)
    stats: torch.Tensor | None = None   # (M, 2) the LM's entropy and max log-prob (--gate)
    starts: np.ndarray | None = None    # where each scored window begins (--retomaton)


def centroid_model(model, cfg: EvalConfig, databin: DataBin, device: torch.device):
    """``model`` with the centroid output layer of ``--load-centroids`` (its sidecar names
    the keytype clustered; a bare .npy is taken as ``ffn`` centroids, as the original)."""
    keytype = "ffn"
    side = Path(cfg.load_centroids).parent / "centroids.json"
    if side.is_file():
        keytype = read_json(side, "centroids sidecar").get("keytype", "ffn")
    wanted = getattr(cfg, "centroid_input", None)      # --model-overrides use_last_ffn_input
    if wanted and wanted != keytype:
        raise UserError(f"--model-overrides use_last_ffn_input: the softmax reads att, but "
                        f"{cfg.load_centroids} holds {keytype} centroids")
    cent, csr, _ = load_centroids(cfg.load_centroids, cfg.load_centroid_distribution,
                                  databin.vocab_size, model.cfg.decoder_embed_dim)
    index, prob = distribution_coo(csr)
    dist = torch.sparse_coo_tensor(torch.from_numpy(index), torch.from_numpy(prob),
                                   size=csr[3], check_invariants=True)
    print(f"output layer: {len(cent):,} {keytype} centroids from {cfg.load_centroids}, "
          f"scale {cfg.centroid_scale:g}")
    return CentroidOutput(model, torch.from_numpy(cent), dist, cfg.centroid_scale,
                          keytype, cfg.use_l2, cfg.norm_l2).to(device)


def check_head_flags(model, cfg: EvalConfig, databin: DataBin) -> None:
    """fairseq's model arguments on eval_lm's command line (--pseudo-vocab-ratio, --k-mos,
    --num-extra-embed-file, the use_last_ffn_input override) set up the model's head; here
    the head is the checkpoint's, so each one given must describe it."""
    from .lm.heads_train import read_extra_embed_file
    head = getattr(model, "cfg", None)

    def check(flag: str, name: str, value, shown=None) -> None:
        own = getattr(head, name, None)
        if value is not None and own != value:
            raise UserError(f"{flag} {shown or value}: the checkpoint's head has "
                            f"{flag} {own if own is not None else 'unset (an HF model)'}")
    check("--pseudo-vocab-ratio", "pseudo_vocab_ratio", cfg.pseudo_vocab_ratio)
    check("--k-mos", "k_mos", cfg.k_mos)
    if cfg.num_extra_embed_file:
        extra = read_extra_embed_file(cfg.num_extra_embed_file, databin.vocab_size)
        if getattr(head, "num_extra_embed", None) != extra:
            raise UserError(f"--num-extra-embed-file {cfg.num_extra_embed_file}: the "
                            "checkpoint's head has other extra rows (or none)")
    if cfg.centroid_input and not cfg.load_centroids:
        check("--model-overrides use_last_ffn_input: softmax input", "softmax_input",
              cfg.centroid_input)


def set_centroid_distribution(model, path: str, vocab_size: int) -> None:
    """The fork's ``--load-centroid-distribution`` alone: the P(w | c) a checkpoint with a
    centroid head (train --load-centroids) is scored with, in place of its own."""
    rows = getattr(getattr(model, "cfg", None), "centroid_rows", 0)
    if not rows:
        raise UserError("--load-centroid-distribution without --load-centroids: the "
                        "checkpoint has no centroid head (train --load-centroids)")
    index, prob = distribution_coo(load_distribution(path, rows, vocab_size))
    model.centroid_index = torch.from_numpy(index).to(model.centroid_index.device)
    model.centroid_prob = torch.from_numpy(prob).to(model.centroid_prob.device)


def eval_lm(model, databin: DataBin, cfg: EvalConfig, device: torch.device,
            model_fingerprint: str | None = None, dist=None) -> dict | None:
    """Score the split ``cfg.gen_subset`` of ``databin`` (with ``--knnlm``, also p_kNN and
    the interpolation; ``model_fingerprint`` binds the datastore to the model). ``dist``:
    torchrun ranks sharing the exact search; only rank 0 returns results."""
    tokens = databin.split(cfg.gen_subset)
    if cfg.max_eval_tokens:  # a prefix: its tokens score exactly as in the full run
        tokens = tokens[:cfg.max_eval_tokens]
    if not len(tokens):
        raise UserError(f"the {cfg.gen_subset} split of {databin.path} is empty: nothing to score")
    if dist is not None and not dist.is_main:
        search_rank(cfg, model_fingerprint, databin, device, dist)
        return None
    knn_scorer = None
    if cfg.knnlm:
        knn_scorer = KnnScorer(cfg, model_fingerprint, databin, device, len(tokens), tokens)
    return eval_tokens(model, tokens, databin, cfg, device, knn_scorer, dist)


def lm_batches(model, tokens: np.ndarray, windows: list, databin: DataBin, cfg: EvalConfig,
               device: torch.device, keytype: str | None, flags) -> Iterator[Batch]:
    """The LM's scores of ``windows`` batch by batch (with ``keytype``, the kNN queries;
    with ``--gate``, the LM's entropy and max log-prob)."""
    amp = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
    hidden = (keytype,) if keytype else ()
    gated = bool(keytype and cfg.gate)
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=cfg.max_tokens, softmax_batch=cfg.softmax_batch,
                          device=device, amp_dtype=amp, return_hidden=hidden, lm_stats=gated):
        yield Batch(sb.start, sb.end, sb.targets, sb.logprobs.double().cpu().numpy(),
                    word_mask(sb.targets, sb.prev, databin.vocab, flags),
                    sb.hidden[keytype] if keytype else None, stats=sb.stats, starts=sb.starts)


EXACT_BLOCK = 4096   # tokens scored at once after the exact-search pass


def exact_neighbours(knn, queries, work: Path, dist, quiet: bool):
    """(D, I) of every query: this process's share of the keys, merged with the other
    ranks' shares under torchrun (on rank 0; the others get None).

    The ranks merge in parallel: once every rank's lists are on disk, rank r merges the
    r-th slice of the queries across all of them, and rank 0 joins the merged slices (so
    no rank merges more than 1/W of the split, and rank 0 reads Q·k entries, not W·Q·k)."""
    r, w = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    part = work / "search" / f"rank{r}"
    D, I = knn.search_all(queries, part, quiet, part=(r, w))
    if w == 1:
        return D, I
    _publish(part, "", D, I)
    dist.wait("shares")                         # every rank's lists are on disk
    n = len(D)
    lo, hi = n * r // w, n * (r + 1) // w
    lists = [(D, I) if i == r else tuple(np.load(work / "search" / f"rank{i}" / f"{x}.npy",
                                                 mmap_mode="r") for x in ("D", "I"))
             for i in range(w)]
    # rank 0 merges its slice into the split's arrays, the others into their own
    mD, mI = (np.empty_like(D), np.empty_like(I)) if r == 0 else \
        (np.empty((hi - lo, D.shape[1]), D.dtype), np.empty((hi - lo, I.shape[1]), I.dtype))
    at = 0 if r == 0 else lo
    for s in range(lo, hi, EXACT_BLOCK):
        e = min(hi, s + EXACT_BLOCK)
        mD[s - at:e - at], mI[s - at:e - at] = merge_topk(
            [(np.asarray(d[s:e]), np.asarray(i[s:e])) for d, i in lists], knn.k_search,
            knn.mode.search_metric)
    if r != 0:
        _publish(part, "merged_", mD, mI)
    dist.wait("merged")                         # every slice is merged
    if r != 0:
        return None
    for i in range(1, w):
        a, b = n * i // w, n * (i + 1) // w
        for name, out in (("D", mD), ("I", mI)):
            out[a:b] = np.load(work / "search" / f"rank{i}" / f"merged_{name}.npy",
                               mmap_mode="r")
    return mD, mI


def _publish(part: Path, prefix: str, D: np.ndarray, I: np.ndarray) -> None:
    """A rank's lists, where the other ranks read them (each file made visible whole)."""
    part.mkdir(parents=True, exist_ok=True)
    for name, a in (("D", D), ("I", I)):
        tmp = temp_path(part / f"{prefix}{name}.npy", ".npy")
        np.save(tmp, a)
        os.replace(tmp, part / f"{prefix}{name}.npy")


def search_rank(cfg: EvalConfig, fingerprint: str, databin: DataBin, device, dist) -> None:
    """A torchrun rank other than 0 in eval-lm: once rank 0 has the split's queries,
    search this rank's share of the keys (--exact-search) or of an index's shards."""
    knn = KnnSearch(cfg, fingerprint, databin, device)
    work = Path(cfg.save_retrieval) / "exact_search"
    dist.wait("queries")
    exact_neighbours(knn, open_npy(work / "queries.npy", None, np.float32), work, dist, cfg.quiet)


def exact_batches(model, tokens: np.ndarray, windows: list, done: int, databin: DataBin,
                  cfg: EvalConfig, device: torch.device, knn_scorer, flags,
                  dist=None) -> Iterator[Batch]:
    """eval-lm --exact-search in three passes, so the datastore is read once per split:

    1. the LM over the split, its queries, scores and word flags kept on disk;
    2. every query against every key in one streaming pass (:meth:`KnnSearch.search_all`);
    3. the tokens from ``done`` on, with their neighbours found.

    Each pass resumes after a kill (in the retrieval cache's work directory). Under
    torchrun the ranks split the keys of pass 2 (:func:`search_rank`)."""
    n, work = len(tokens), knn_scorer.work_dir
    cols = dict(queries=(np.float32, (n, knn_scorer.knn.ds.query_dim)), lm=(np.float32, (n,)),
                targets=(np.int64, (n,)), words=(np.bool_, (n,)))
    side = work / "lm_pass.json"
    old = read_json(side, "LM pass progress") if side.is_file() else {}
    lm_done = int(old.get("done", 0)) if old.get("n") == n else 0
    arr = {name: open_token_memmap(work / f"{name}.npy", shape, dt, resume=lm_done > 0)
           for name, (dt, shape) in cols.items()}
    if lm_done < n:
        rest = [w for w in windows if w.score_start >= lm_done]
        for b in lm_batches(model, tokens, rest, databin, cfg, device, knn_scorer.keytype, flags):
            arr["queries"][b.start:b.end] = b.query.float().cpu().numpy()
            arr["lm"][b.start:b.end] = b.logprobs
            arr["targets"][b.start:b.end] = b.targets
            arr["words"][b.start:b.end] = b.words
            for a in arr.values():
                a.flush()
            write_json_atomic(side, dict(n=n, done=b.end))
    if dist is not None:
        dist.wait("queries")                    # the other ranks wait for the queries
    D, I = exact_neighbours(knn_scorer.knn, arr["queries"], work, dist, cfg.quiet)
    for s in range(done, n, EXACT_BLOCK):
        e = min(n, s + EXACT_BLOCK)
        yield Batch(s, e, np.asarray(arr["targets"][s:e]), arr["lm"][s:e].astype(np.float64),
                    np.asarray(arr["words"][s:e]), torch.from_numpy(np.array(arr["queries"][s:e])),
                    (D[s:e], I[s:e]))


def eval_tokens(model, tokens: np.ndarray, databin: DataBin, cfg: EvalConfig,
                device: torch.device, knn_scorer=None, dist=None) -> dict:
    """Score a token stream with the vocabulary and specials of ``databin``."""
    n = len(tokens)
    T, C = resolve_window(model, cfg.tokens_per_sample, cfg.context_window)
    windows = make_windows(n, tokens, databin.eos, T, C, cfg.sample_break_mode)
    flags = databin.vocab.word_flags(cfg.remove_bpe.rstrip() if cfg.remove_bpe else None)
    # running sums; with a retrieval cache they are committed after every batch, and an
    # evaluation killed and rerun resumes from the last commit (same batches, same sums)
    st = dict(done=0, nll_sum=0.0, n_words=0, knn_nll=0.0, interp_nll=0.0, no_match=0)
    resume = knn_scorer is not None and knn_scorer.progress
    if resume:
        st.update(knn_scorer.progress)
        print(f"resuming the evaluation of {cfg.gen_subset} at token {st['done']:,} of {n:,}")
        windows = [w for w in windows if w.score_start >= st["done"]]
    scores = open_token_memmap(cfg.save_scores, n, np.float32, resume) if cfg.save_scores else None
    saved_tokens = open_token_memmap(cfg.save_tokens, n, np.int32, resume) if cfg.save_tokens else None
    t0 = time.perf_counter()
    if knn_scorer is not None and (cfg.exact_search or dist is not None):
        # one pass over the keys for the split (or, under torchrun, over each rank's shards)
        batches = exact_batches(model, tokens, windows, st["done"], databin, cfg, device,
                                knn_scorer, flags, dist)
    else:
        batches = lm_batches(model, tokens, windows, databin, cfg, device,
                             knn_scorer.keytype if knn_scorer is not None else None, flags)
    bar = tqdm(total=n, initial=st["done"], unit="tok", desc=f"eval {cfg.gen_subset}",
               disable=True if cfg.quiet else None)
    for b in batches:
        lp = b.logprobs
        st["nll_sum"] -= float(lp.sum())
        st["n_words"] += int(b.words.sum())
        if scores is not None:
            scores[b.start:b.end] = lp
        if saved_tokens is not None:
            saved_tokens[b.start:b.end] = b.targets
        if knn_scorer is not None:
            klp = knn_scorer.score(b.start, b.query, b.targets, lp.astype(np.float32), b.words,
                                   b.found, b.stats, b.starts)
            st["knn_nll"] -= float(klp.sum())
            st["no_match"] += int(np.isinf(klp).sum())
            if knn_scorer.batch_lambdas is not None:   # --gate: a λ per token, 0 if skipped
                mix = knn_math.interpolate_each(torch.from_numpy(lp), torch.from_numpy(klp),
                                                torch.from_numpy(knn_scorer.batch_lambdas))
            else:
                mix = knn_math.interpolate(torch.from_numpy(lp), torch.from_numpy(klp), cfg.lmbda)
            st["interp_nll"] -= float(mix.sum())
            for arr in (scores, saved_tokens):
                if arr is not None:
                    arr.flush()
            knn_scorer.commit(dict(st, done=b.end))
        bar.update(b.end - b.start)
    bar.close()
    for arr in (scores, saved_tokens):
        if arr is not None:
            arr.flush()
    nll_sum, n_words, knn_nll = st["nll_sum"], st["n_words"], st["knn_nll"]
    interp_nll, no_match = st["interp_nll"], st["no_match"]
    res = perplexities(nll_sum, n, n_words)
    res.update(seconds=time.perf_counter() - t0, subset=cfg.gen_subset, tokens_per_sample=T,
               context_window=C)
    res["tokens_per_second"] = n / max(res["seconds"], 1e-9)
    if knn_scorer is not None:
        res["knn"] = dict(perplexities(knn_nll, n, n_words), no_match_tokens=no_match)
        res["interpolated"] = dict(perplexities(interp_nll, n, n_words), lmbda=cfg.lmbda,
                                   knn_temp=cfg.knn_temp, k=cfg.k,
                                   score_mode=knn_scorer.mode.to_dict(),
                                   search_backend=knn_scorer.knn.backend,
                                   settings=knn_scorer.knn.settings,
                                   efficiency=knn_scorer.efficiency(),
                                   ignore_top=knn_scorer.ignore_top_report(),
                                   datastore=datastore_record(knn_scorer.knn.ds))
        knn_scorer.close(dict(lm=res["ppl"], knn=res["knn"]["ppl"],
                              interpolated=res["interpolated"]["ppl"]))
    return res


def main(cfg: EvalConfig) -> dict | None:
    if cfg.save_knnlm_dstore:
        return build_dstore_main(cfg.to_build_dstore())
    dist = None
    if env_ranks()[1] > 1:
        sharded = cfg.knnlm and kept_in_shards(cfg)
        if sharded and not cfg.save_retrieval:
            # the ranks answer rank 0's batches as it scores them
            with sharing(cfg, "eval-lm") as leader:
                return _report(cfg, _evaluate(cfg, None)) if leader else None
        if not (cfg.knnlm and cfg.save_retrieval and (cfg.exact_search or sharded)):
            raise UserError("under torchrun eval-lm shares out the search: give --knnlm and "
                            "an index kept in shards (build-index --keep-shards), or --knnlm "
                            "--exact-search --save-retrieval DIR (a directory every rank sees)")
        # with a retrieval cache: one search of the whole split by every rank
        dist = setup_distributed(cfg.cpu, cfg.heartbeat_timeout)
    try:
        with dist.guard() if dist is not None else contextlib.nullcontext():
            res = _evaluate(cfg, dist)
    finally:
        if dist is not None:
            dist.close()
    return _report(cfg, res)


def _report(cfg: EvalConfig, res: dict | None) -> dict | None:
    if res is None:
        return None
    print(format_results(res))
    if cfg.results_path:
        write_json_atomic(cfg.results_path, dict(results=res, config=config_dict(cfg)))
    return res


def _evaluate(cfg: EvalConfig, dist) -> dict | None:
    """Load the data and model and score (under torchrun, this rank's part)."""
    databin = DataBin(cfg.data)
    device = dist.device if dist is not None else resolve_device(cfg.device, cfg.cpu)
    half = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
    # HF weights load directly in half precision on a GPU (a 7B model needs no fp32 copy)
    model, fingerprint = load_lm(cfg.path, cfg.hf_model, databin, device,
                                 cfg.hf_dtype or (half if device.type == "cuda" else None))
    check_head_flags(model, cfg, databin)
    if cfg.load_centroids:
        model = centroid_model(model, cfg, databin, device)
    elif cfg.load_centroid_distribution:
        set_centroid_distribution(model, cfg.load_centroid_distribution, databin.vocab_size)
    # one writer per retrieval cache (under torchrun, rank 0 holds it for the ranks)
    lock = output_lock(cfg.save_retrieval, "dir", "retrieval cache") \
        if cfg.save_retrieval and (dist is None or dist.is_main) else contextlib.nullcontext()
    with lock:
        return eval_lm(model, databin, cfg, device, fingerprint, dist)
