"""`knnlm generate`: continue prompts with the LM or the kNN-LM.

Inputs: a data-bin (positional: its vocabulary encodes the prompts), ``--path`` or
``--hf-model``, ``--prompt TEXT`` or ``--prompts-file FILE`` (one prompt per line), and with
``--knnlm`` the datastore and index flags of eval-lm. Output: each prompt and its
continuation on stdout; ``--results-path`` writes them with token ids and speed as JSON.

    knnlm generate runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --prompt "To be, or not to be" --max-new-tokens 40 \\
        --knnlm --dstore-filename runs/demo/dstore --probe 8 --lmbda 0.25 --knn-temp 4

At every step the next-token distribution over the whole vocabulary is
log((1 − λ)·p_LM + λ·p_kNN), p_kNN scattered from the retrieved neighbours
(:func:`knnlm.knn.math.knn_full_log_probs`); decoding is greedy, or sampling (``--sampling``)
with ``--temperature``, ``--sampling-topk`` and ``--sampling-topp``. The model keeps a
key/value cache, so each new token costs one single-token forward and one retrieval. With
``--lmbda 0`` the output equals plain generation token for token.

With ``--hf-model`` decoding is HF's ``model.generate()`` with the kNN-LM inside the model
(:class:`knnlm.hf_generate.KNNLogitsProcessor`): prompts go in left-padded batches of
``--batch-size``, ``--beam N`` runs beam search, and generation stops at the model's
end-of-sequence token. The model's generation config (its repetition penalty, banned
words, ...) applies on top, to the kNN-LM's distribution; the settings it adds are printed
and written to the results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.preprocess import DataBin
from .guard import check_output
from .io import ENCODING_ERRORS, read_text, write_json_atomic
from .knn import math as knn_math
from .knn.options import KnnOptions
from .knn.rank_search import sharing
from .knn.gate import Gate, StepGate
from .knn.pointers import PointerWalk
from .knn.search import KnnSearch
from .lm.checkpoint import check_model_source, load_lm
from .lm.device import resolve_device
from .util import UserError, config_dict, flag


@dataclass
class GenerateConfig(KnnOptions):
    data: str = flag(help="data-bin directory (its vocabulary encodes the prompts)",
                     positional=True)
    path: str | None = flag(None, "checkpoint")
    hf_model: str | None = flag(None, "instead of --path: an HF causal LM (name or directory)")
    hf_dtype: str | None = flag(None, "--hf-model: load its weights as fp32, bf16 or fp16 "
                                "(default fp32; datastores match across dtypes)",
                                choices=("fp32", "bf16", "fp16"))
    prompt: str | None = flag(None, "the prompt text")
    prompts_file: str | None = flag(None, "a file of prompts, one per line")
    max_new_tokens: int = flag(50, "tokens to generate per prompt")
    sampling: bool = flag(False, "sample instead of greedy decoding")
    temperature: float = flag(1.0, "--sampling: softmax temperature of the final distribution")
    sampling_topk: int = flag(-1, "--sampling: sample among the k most likely tokens (-1: all)")
    sampling_topp: float = flag(-1.0, "--sampling: sample within top-p probability mass (-1: off)")
    seed: int = flag(1, "random seed of the sampling")
    encoding: str = flag("utf-8", "--prompts-file: its encoding")
    errors: str = flag("strict", "--prompts-file: undecodable bytes are refused (strict) or "
                       "replaced / dropped", choices=ENCODING_ERRORS)
    batch_size: int = flag(8, "--hf-model: prompts per model.generate() call (left-padded)")
    beam: int = flag(1, "--hf-model: beam search with this many beams (1: greedy or sampling)")
    results_path: str | None = flag(None, "write prompts, continuations and speed as JSON")
    cpu: bool = flag(False, "run on the CPU even if a GPU is present")
    device: str | None = flag(None, "torch device (default: cuda if available, else cpu)")

    def __post_init__(self):
        check_model_source(self.path, self.hf_model)
        check_output(self.results_path, "file", "--results-path")
        if bool(self.prompt is not None) == bool(self.prompts_file):
            raise UserError("give exactly one of --prompt TEXT and --prompts-file FILE")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.sampling_topp != -1.0 and not 0 < self.sampling_topp <= 1:
            raise UserError(f"--sampling-topp must be in (0, 1], got {self.sampling_topp}")
        if self.sampling_topk == 0 or self.sampling_topk < -1:
            raise UserError(f"--sampling-topk must be > 0 (or -1), got {self.sampling_topk}")
        if self.batch_size <= 0 or self.beam <= 0:
            raise UserError("--batch-size and --beam must be > 0")
        if self.beam > 1 and not self.hf_model:
            raise UserError("--beam needs --hf-model (beam search is HF's model.generate())")
        if self.knnlm:
            self.check_knn()
        if (self.retomaton or self.gate) and self.hf_model:
            raise UserError("--retomaton and --gate follow one sequence's tokens: they are not "
                            "available inside model.generate() (--hf-model)")

    def prompts(self) -> list[str]:
        if self.prompt is not None:
            return [self.prompt]
        p = Path(self.prompts_file)
        if not p.is_file():
            raise UserError(f"--prompts-file not found: {p}")
        lines = read_text(p, "--prompts-file", self.encoding, self.errors).splitlines()
        if not any(lines):
            raise UserError(f"{p} holds no prompt")
        return [line for line in lines if line]


class Stepper:
    """One model behind one call: feed tokens, get the last position's logits and query;
    the key/value cache (ours or HF's) carries the prefix between calls."""

    def __init__(self, model, keytype: str | None):
        self.model, self.keytype = model, keytype
        self.hf = hasattr(model, "hf")
        self.state = None if self.hf else model.new_cache()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        want = (self.keytype,) if self.keytype else ()
        if self.hf:
            feats, hid = self.model(tokens, return_hidden=want, past=self.state, use_cache=True)
            self.state = hid.pop("past")
        else:
            feats, hid = self.model(tokens, return_hidden=want, cache=self.state)
        logits = self.model.output_layer(feats[:, -1]).float()[0]
        return logits, (hid[self.keytype][0, -1].float() if self.keytype else None)


def choose(log_probs: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p filtering."""
    if not cfg.sampling:
        return int(torch.argmax(log_probs))
    lp = log_probs.double() / cfg.temperature
    if cfg.sampling_topk > 0:
        kth = torch.topk(lp, min(cfg.sampling_topk, len(lp))).values[-1]
        lp = lp.masked_fill(lp < kth, -math.inf)
    if cfg.sampling_topp > 0:
        order = torch.argsort(lp, descending=True)
        probs = torch.softmax(lp[order], 0)
        # keep the smallest prefix whose mass reaches p (the token crossing p included)
        drop = (torch.cumsum(probs, 0) - probs) >= cfg.sampling_topp
        lp[order[drop]] = -math.inf
    probs = torch.softmax(lp, 0)
    return int(torch.multinomial(probs.float().cpu(), 1, generator=gen))


def next_log_probs(logits: torch.Tensor, query, search, cfg: GenerateConfig,
                   walk=None, gate=None, context=None) -> tuple[torch.Tensor, dict | None]:
    """(V,) log p of the next token: the LM's, or interpolated with p_kNN over all of V
    (the LM's alone when the search found no neighbour: p_kNN is then undefined, or when
    ``gate`` (:class:`knnlm.knn.gate.StepGate`, given the tokens so far in ``context``)
    skips the search); and the neighbours (found by ``walk``, the RetoMaton pointers)."""
    lm = torch.log_softmax(logits.double().cpu(), -1)
    if search is None:
        return lm, None
    q = query.float().cpu().numpy()
    lmbda = cfg.lmbda
    if gate is not None:
        lmbda = gate.decide(lm, context, q)
        if lmbda is None:
            return lm, None
    r = walk.step(q) if walk is not None else search.search(q[None])
    if not r["mask"].any():
        return lm, r
    counts = r.get("log_counts")
    tokens, knn_lp = knn_math.knn_sparse_log_probs(
        r["scores"][0], torch.from_numpy(r["vals"][0]), len(lm), cfg.knn_temp, r["mask"][0],
        None if counts is None else counts[0])
    return knn_math.interpolate_sparse(lm, tokens, knn_lp, lmbda), r


def generate_one(model, prompt_ids: np.ndarray, start: int, cfg: GenerateConfig, search,
                 gen: torch.Generator, device, walk=None, gate=None) -> tuple[list[int], float]:
    """New token ids for one prompt, and the seconds spent after the prompt's forward.
    ``walk``: RetoMaton pointers (reset for the prompt, advanced by each chosen token);
    ``gate``: adaptive retrieval (:class:`knnlm.knn.gate.StepGate`)."""
    ids = [start] + [int(i) for i in prompt_ids]
    limit = model.cfg.max_target_positions
    if len(ids) + cfg.max_new_tokens - 1 > limit:
        raise UserError(f"prompt ({len(ids) - 1} tokens) + --max-new-tokens "
                        f"{cfg.max_new_tokens} exceed the model's {limit} positions")
    step = Stepper(model, search.keytype if search is not None else None)
    logits, q = step(torch.tensor([ids], device=device))
    out, t0 = [], time.perf_counter()
    if walk is not None:
        walk.reset()
    for i in range(cfg.max_new_tokens):
        lp, r = next_log_probs(logits, q, search, cfg, walk, gate, ids[1:] + out)
        tok = choose(lp, cfg, gen)
        if walk is not None:
            walk.advance(r["I"][0], r["vals"][0], tok)
        out.append(tok)
        if i + 1 < cfg.max_new_tokens:
            logits, q = step(torch.tensor([[tok]], device=device))
    return out, time.perf_counter() - t0


# generation-config fields that change the next-token distribution or the search, other
# than those `knnlm generate` sets itself
INHERITED = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty",
             "bad_words_ids", "min_length", "min_new_tokens", "sequence_bias",
             "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
             "forced_eos_token_id", "length_penalty", "diversity_penalty", "typical_p",
             "epsilon_cutoff", "eta_cutoff", "min_p", "renormalize_logits")


def inherited_settings(generation_config) -> dict:
    """The settings of an HF model's generation config (generation_config.json) that
    ``model.generate()`` applies on top of knnlm's flags: those not at their defaults."""
    from transformers import GenerationConfig
    default = GenerationConfig()
    return {k: getattr(generation_config, k) for k in INHERITED
            if getattr(generation_config, k, None) != getattr(default, k, None)}


def generate_hf(model, prompts: list[np.ndarray], start: int, pad: int, cfg: GenerateConfig,
                processor, device) -> tuple[list[list[int]], float]:
    """HF ``model.generate()`` over batches of left-padded prompts, with the kNN-LM as a
    logits processor (:class:`knnlm.hf_generate.KNNLogitsProcessor`); it stops at the
    model's end-of-sequence token, as HF does. (new ids per prompt, seconds)."""
    torch.manual_seed(cfg.seed)
    inherited = inherited_settings(model.hf.generation_config)
    if inherited:       # they act on the kNN-LM's distribution, as on the LM's
        print("the model's generation config also applies: " +
              ", ".join(f"{k} {v}" for k, v in inherited.items()))
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.sampling, num_beams=cfg.beam,
              pad_token_id=pad, logits_processor=[processor] if processor is not None else None)
    if cfg.sampling:
        kw.update(temperature=cfg.temperature, top_k=max(cfg.sampling_topk, 0),
                  top_p=cfg.sampling_topp if cfg.sampling_topp > 0 else 1.0)
    out, t0 = [], time.perf_counter()
    for b in range(0, len(prompts), cfg.batch_size):
        batch = [[start, *map(int, p)] for p in prompts[b:b + cfg.batch_size]]
        width = max(map(len, batch))
        if width + cfg.max_new_tokens > model.cfg.max_target_positions:
            raise UserError(f"a prompt ({width - 1} tokens) + --max-new-tokens "
                            f"{cfg.max_new_tokens} exceed the model's "
                            f"{model.cfg.max_target_positions} positions")
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        with torch.no_grad():
            seq = model.hf.generate(input_ids=ids, attention_mask=mask, **kw)
        eos = model.hf.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        for row in seq[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            out.append(row[:ends[0] + 1] if ends else row)   # up to the first EOS (kept)
    return out, time.perf_counter() - t0


def main(cfg: GenerateConfig) -> dict | None:
    # under torchrun over an index kept in shards, ranks > 0 answer rank 0's searches
    with sharing(cfg, "generate") as leader:
        return _main(cfg) if leader else None


def _main(cfg: GenerateConfig) -> dict:
    databin = DataBin(cfg.data)
    device = resolve_device(cfg.device, cfg.cpu)
    model, fingerprint = load_lm(cfg.path, cfg.hf_model, databin, device, cfg.hf_dtype)
    model.eval()
    search = processor = None
    if cfg.knnlm and cfg.hf_model:
        from .hf_generate import KNNLogitsProcessor
        processor = KNNLogitsProcessor(
            model.hf, cfg.dstore_filename, indexfile=cfg.indexfile, k=cfg.k, lmbda=cfg.lmbda,
            knn_temp=cfg.knn_temp, probe=cfg.probe, knn_keytype=cfg.knn_keytype,
            knn_sim_func=cfg.knn_sim_func, faiss_metric_type=cfg.faiss_metric_type,
            exact_search=cfg.exact_search, knn_backend=cfg.knn_backend,
            knnlm_gpu=cfg.knnlm_gpu, fingerprint=fingerprint)
        search, o = processor.search, processor.opts
        cfg.k, cfg.lmbda, cfg.knn_temp, cfg.knn_sim_func = o.k, o.lmbda, o.knn_temp, o.knn_sim_func
    elif cfg.knnlm:
        search = KnnSearch(cfg, fingerprint, databin, device)
    walk = PointerWalk(search, cfg.min_knns, cfg.max_knns, cfg.members) \
        if cfg.retomaton and search else None
    gate = None
    if cfg.gate and search is not None:
        g = Gate(cfg.gate)
        g.check(search.ds, fingerprint, cfg.knn_keytype)
        gate = StepGate(g, cfg, databin.eos)
    vocab, gen = databin.vocab, torch.Generator().manual_seed(cfg.seed)
    prompts = cfg.prompts()
    encoded = [vocab.encode_text(p) for p in prompts]
    if cfg.hf_model:
        try:
            news, seconds = generate_hf(model, encoded, databin.eos, databin.pad, cfg, processor,
                                        device)
        finally:
            if processor is not None:
                processor.close()
    else:
        news, seconds = [], 0.0
        for ids in encoded:
            new, sec = generate_one(model, ids, databin.eos, cfg, search, gen, device, walk, gate)
            news.append(new)
            seconds += sec
    results = []
    for prompt, ids, new in zip(prompts, encoded, news):
        text = vocab.decode(new)
        print(f"{prompt}{text if text.startswith((' ', chr(10))) else ' ' + text}")
        results.append(dict(prompt=prompt, prompt_ids=[int(i) for i in ids], ids=new,
                            continuation=text))
    n_new = sum(map(len, news))
    speed = n_new / seconds if seconds > 0 else float("nan")
    mode = search.mode.to_dict() if search is not None else None
    print(f"{n_new:,} tokens, {speed:,.1f} tok/s" + (f" with kNN (k {cfg.k}, λ {cfg.lmbda}, "
                                                     f"T {cfg.knn_temp}, {mode['name']})" if cfg.knnlm else ""))
    out = dict(results=results, tokens=n_new, tokens_per_second=speed, score_mode=mode,
               search_backend=search.backend if search is not None else None,
               knn_settings=search.settings if search is not None else None,
               knn_searches=processor.searches if processor is not None else None,
               generation_config=inherited_settings(model.hf.generation_config)
               if cfg.hf_model else None,
               efficiency=walk.stats() if walk is not None else
               gate.stats() if gate is not None else None,
               config=config_dict(cfg))
    if cfg.results_path:
        write_json_atomic(cfg.results_path, out)
    return out
