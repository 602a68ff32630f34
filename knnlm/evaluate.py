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

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .build_dstore import BuildDstoreConfig
from .build_dstore import main as build_dstore_main
from .data.blocks import BREAK_MODES
from .data.preprocess import DataBin
from .data.tokenizer import word_mask
from .io import open_token_memmap, write_json_atomic
from .knn import math as knn_math
from .knn.options import KnnOptions
from .knn.scorer import KnnScorer
from .lm.checkpoint import check_model_source, load_lm
from .lm.device import resolve_device
from .lm.scoring import iter_scored, make_windows, resolve_window
from .util import UserError, config_dict, flag

LN2 = math.log(2)


@dataclass
class EvalConfig(KnnOptions):
    data: str = flag(help="data-bin directory", positional=True)
    path: str | None = flag(None, "checkpoint to evaluate")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    gen_subset: str = flag("test", "split to score (train, valid, test)")
    tokens_per_sample: int | None = flag(None, "longest model input, context included "
                                         "(default: the model's max positions)")
    context_window: int = flag(0, "tokens of extra left context before each scored block")
    max_eval_tokens: int = flag(0, "score only the first N tokens of the split (0: all)")
    sample_break_mode: str = flag("none", "blocks ignore lines (none), hold whole lines "
                                  "(complete) or one line each (eos)", choices=BREAK_MODES)
    max_tokens: int = flag(8192, "padded tokens per batch")
    softmax_batch: int = flag(4096, "positions per output-softmax chunk (bounds memory)")
    remove_bpe: str | None = flag(None, "dictionary data: BPE continuation marker to join "
                                  "words for per-word perplexity (e.g. '@@ ')")
    save_scores: str | None = flag(None, "write per-token target log-probs (.npy, natural log)")
    save_tokens: str | None = flag(None, "write the scored target tokens (.npy)")
    results_path: str | None = flag(None, "write the results as JSON")
    save_retrieval: str | None = flag(None, "--knnlm: write a retrieval cache to this directory "
                                      "(for `knnlm sweep`)")
    save_exact_dists: bool = flag(False, "--save-retrieval: also store exact distances")
    save_knn_scores: str | None = flag(None, "--knnlm: write per-token log p_kNN (.npy)")
    save_queries: str | None = flag(None, "--knnlm: write the query vectors (.npy, fp32)")
    save_knnlm_dstore: bool = flag(False, "instead of evaluating, save a datastore of the "
                                   "split (same as `knnlm build-dstore`)")
    dstore_mmap: str | None = flag(None, "--save-knnlm-dstore: datastore directory")
    dstore_fp32: bool = flag(False, "--save-knnlm-dstore: fp32 keys (default fp16)")
    dstore_fp16: bool = flag(False, "--save-knnlm-dstore: fp16 keys, the default (original "
                             "flag; with --knnlm the datastore records its key dtype)")
    dstore_size: int | None = flag(None, "--save-knnlm-dstore: expected entries (checked)")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")
    fp16: bool = flag(False, "half-precision forward (GPU)")
    bf16: bool = flag(False, "bfloat16 forward (GPU)")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        check_model_source(self.path, self.hf_model)
        if self.tokens_per_sample is not None and self.tokens_per_sample <= 0:
            raise UserError(f"--tokens-per-sample must be > 0, got {self.tokens_per_sample}")
        if self.max_eval_tokens < 0:
            raise UserError(f"--max-eval-tokens must be >= 0, got {self.max_eval_tokens}")
        if self.context_window < 0:
            raise UserError(f"--context-window must be >= 0, got {self.context_window}")
        if self.tokens_per_sample is not None and self.context_window >= self.tokens_per_sample:
            raise UserError(f"--context-window ({self.context_window}) must be smaller than "
                            f"--tokens-per-sample ({self.tokens_per_sample})")
        if self.context_window and self.sample_break_mode != "none":
            raise UserError("--context-window needs --sample-break-mode none")
        for name in ("max_tokens", "softmax_batch"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.fp16 and self.bf16:
            raise UserError("--fp16 and --bf16 are exclusive")
        if self.dstore_fp16 and self.dstore_fp32:
            raise UserError("--dstore-fp16 and --dstore-fp32 are exclusive")
        if self.save_knnlm_dstore and not self.dstore_mmap:
            raise UserError("--save-knnlm-dstore needs --dstore-mmap DIR")
        if self.knnlm and self.save_knnlm_dstore:
            raise UserError("--knnlm and --save-knnlm-dstore are exclusive")
        if self.knnlm:
            self.check_knn()
            if self.sample_break_mode != "none":
                raise UserError("--knnlm needs --sample-break-mode none")

    def to_build_dstore(self):
        """The equivalent `knnlm build-dstore` config (the original --save-knnlm-dstore)."""
        return BuildDstoreConfig(
            data=self.data, path=self.path, hf_model=self.hf_model, dstore_dir=self.dstore_mmap, gen_subset=self.gen_subset,
            knn_keytype=self.knn_keytype, tokens_per_sample=self.tokens_per_sample,
            context_window=self.context_window, max_tokens=self.max_tokens,
            dstore_fp32=self.dstore_fp32, dstore_size=self.dstore_size, cpu=self.cpu,
            device=self.device, quiet=self.quiet)


def perplexities(nll_sum: float, n_tokens: int, n_words: int) -> dict:
    """Loss (base 2) and perplexity per token and per word from a summed NLL (nats)."""
    out = dict(tokens=n_tokens, words=n_words, nll_sum=nll_sum)
    out["loss"] = nll_sum / max(1, n_tokens) / LN2
    out["ppl"] = 2 ** out["loss"]
    out["word_ppl"] = math.exp(nll_sum / n_words) if n_words else float("nan")
    return out


def eval_lm(model, databin: DataBin, cfg: EvalConfig, device: torch.device,
            model_fingerprint: str | None = None) -> dict:
    """Score the split ``cfg.gen_subset`` of ``databin`` (with ``--knnlm``, also p_kNN and
    the interpolation; ``model_fingerprint`` binds the datastore to the model)."""
    tokens = databin.split(cfg.gen_subset)
    if cfg.max_eval_tokens:  # a prefix: its tokens score exactly as in the full run
        tokens = tokens[:cfg.max_eval_tokens]
    knn_scorer = None
    if cfg.knnlm:
        knn_scorer = KnnScorer(cfg, model_fingerprint, databin, device, len(tokens))
    return eval_tokens(model, tokens, databin, cfg, device, knn_scorer)


def eval_tokens(model, tokens: np.ndarray, databin: DataBin, cfg: EvalConfig,
                device: torch.device, knn_scorer=None) -> dict:
    """Score a token stream with the vocabulary and specials of ``databin``."""
    n = len(tokens)
    T = resolve_window(model, cfg.tokens_per_sample, cfg.context_window)
    windows = make_windows(n, tokens, databin.eos, T, cfg.context_window, cfg.sample_break_mode)
    vocab = databin.vocab
    flags = vocab.word_flags(cfg.remove_bpe.rstrip() if cfg.remove_bpe else None)
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
    amp = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
    t0 = time.perf_counter()
    hidden = (knn_scorer.keytype,) if knn_scorer is not None else ()
    bar = tqdm(total=n, initial=st["done"], unit="tok", desc=f"eval {cfg.gen_subset}",
               disable=True if cfg.quiet else None)
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=cfg.max_tokens, softmax_batch=cfg.softmax_batch,
                          device=device, amp_dtype=amp, return_hidden=hidden):
        lp = sb.logprobs.double().cpu().numpy()
        st["nll_sum"] -= float(lp.sum())
        words = word_mask(sb.targets, sb.prev, vocab, flags)
        st["n_words"] += int(words.sum())
        if scores is not None:
            scores[sb.start:sb.end] = lp
        if saved_tokens is not None:
            saved_tokens[sb.start:sb.end] = sb.targets
        if knn_scorer is not None:
            klp = knn_scorer.score(sb.start, sb.hidden[knn_scorer.keytype], sb.targets,
                                   lp.astype(np.float32), words)
            st["knn_nll"] -= float(klp.sum())
            st["no_match"] += int(np.isinf(klp).sum())
            mix = knn_math.interpolate(torch.from_numpy(lp), torch.from_numpy(klp), cfg.lmbda)
            st["interp_nll"] -= float(mix.sum())
            for arr in (scores, saved_tokens):
                if arr is not None:
                    arr.flush()
            knn_scorer.commit(dict(st, done=sb.end))
        bar.update(sb.end - sb.start)
    bar.close()
    for arr in (scores, saved_tokens):
        if arr is not None:
            arr.flush()
    nll_sum, n_words, knn_nll = st["nll_sum"], st["n_words"], st["knn_nll"]
    interp_nll, no_match = st["interp_nll"], st["no_match"]
    res = perplexities(nll_sum, n, n_words)
    res.update(seconds=time.perf_counter() - t0, subset=cfg.gen_subset, tokens_per_sample=T,
               context_window=cfg.context_window)
    res["tokens_per_second"] = n / max(res["seconds"], 1e-9)
    if knn_scorer is not None:
        res["knn"] = dict(perplexities(knn_nll, n, n_words), no_match_tokens=no_match)
        res["interpolated"] = dict(perplexities(interp_nll, n, n_words), lmbda=cfg.lmbda,
                                   knn_temp=cfg.knn_temp, k=cfg.k,
                                   score_mode=knn_scorer.mode.to_dict(),
                                   search_backend=knn_scorer.knn.backend)
        knn_scorer.close(dict(lm=res["ppl"], knn=res["knn"]["ppl"],
                              interpolated=res["interpolated"]["ppl"]))
    return res


def format_results(res: dict) -> str:
    line = (f"{res['subset']}: {res['tokens']:,} tokens, {res['words']:,} words | "
            f"loss (base 2) {res['loss']:.4f} | ppl {res['ppl']:.2f} per token, "
            f"{res['word_ppl']:.2f} per word | {res['tokens_per_second']:,.0f} tok/s")
    if "knn" not in res:
        return line
    k, m = res["knn"], res["interpolated"]
    return "\n".join([
        f"{res['subset']}: {res['tokens']:,} tokens, {res['words']:,} words, "
        f"{res['tokens_per_second']:,.0f} tok/s",
        f"  LM only        ppl {res['ppl']:10.2f} per token {res['word_ppl']:12.2f} per word",
        f"  kNN only       ppl {k['ppl']:10.2f} per token {k['word_ppl']:12.2f} per word"
        + (f"  ({k['no_match_tokens']:,} tokens without a matching neighbour)"
           if k["no_match_tokens"] else ""),
        f"  kNN-LM         ppl {m['ppl']:10.2f} per token {m['word_ppl']:12.2f} per word"
        f"  (lambda {m['lmbda']}, T {m['knn_temp']}, k {m['k']})",
        f"  score mode     {m['score_mode']['name']}: {m['score_mode']['description']}"])


def main(cfg: EvalConfig) -> dict:
    if cfg.save_knnlm_dstore:
        return build_dstore_main(cfg.to_build_dstore())
    databin = DataBin(cfg.data)
    device = resolve_device(cfg.device, cfg.cpu)
    half = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
    # HF weights load directly in half precision on a GPU (a 7B model needs no fp32 copy)
    model, fingerprint = load_lm(cfg.path, cfg.hf_model, databin, device,
                                 half if device.type == "cuda" else None)
    res = eval_lm(model, databin, cfg, device, fingerprint)
    print(format_results(res))
    if cfg.results_path:
        write_json_atomic(cfg.results_path, dict(results=res, config=config_dict(cfg)))
    return res
