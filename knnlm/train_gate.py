"""`knnlm train-gate`: train the adaptive-retrieval gate (:mod:`knnlm.knn.gate`) on a
held-out split's retrieval cache.

Input: a complete retrieval cache (``eval-lm --knnlm --save-retrieval``, or the one
`knnlm tune` leaves next to the index); the model, data and datastore are the ones its
evaluation used (read from the cache's sidecar). The LM is run once more over the cached
tokens for its entropy and max log-prob; p_kNN comes from the cache at the cache's T
(``--knn-temp`` overrides). The first ``1 - --valid-fraction`` of the tokens train the
MLP, the rest measure it: the perplexity against the share of tokens searched, for the
gate (fixed λ and per-token λ̂) and for a random choice of the same share.

    knnlm train-gate --cache runs/demo/dstore/index_att_l2.faiss.tune-valid \\
        --out runs/demo/gate
    knnlm eval-lm ... --knnlm --gate runs/demo/gate --retrieval-fraction 0.5
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.preprocess import DataBin
from .guard import check_output, other_configuration, output_lock
from .io import read_json, save_atomic, write_json_atomic
from .knn import math as knn_math
from .knn.cache import RetrievalCache
from .knn.datastore import Datastore, normalize_keytype
from .knn.gate import FEATURES, GateNet, count_ngrams, features, mixture_nll
from .knn.search import default_index_path
from .knn.sweep import token_log_probs
from .knn.tuned import read_tuned, tuned_path
from .lm.checkpoint import load_lm
from .lm.device import resolve_device
from .lm.scoring import iter_scored, make_windows, resolve_window
from .util import UserError, command_line, config_dict, flag, warn

FRACTIONS = [round(0.05 * i, 2) for i in range(21)]


@dataclass
class TrainGateConfig:
    cache: str = flag(help="retrieval cache of a held-out split (complete)")
    out: str = flag(help="directory for gate.pt, ngrams.npz and gate.json")
    knn_temp: float | None = flag(None, "temperature of p_kNN (default: the index's tuned "
                                  "settings, else the cache's)")
    lmbda: float | None = flag(None, "the fixed λ of the curves (default: the index's tuned "
                               "settings, else the cache's)")
    gate_query: bool = flag(True, "feed the query vector to the gate (efficient-knnlm's ctxt "
                            "feature, in its 'all' set)", negative=("--no-gate-query",))
    valid_fraction: float = flag(0.2, "last share of the tokens held out to measure the gate")
    epochs: int = flag(30, "passes over the training tokens (the best held-out epoch is kept)")
    lr: float = flag(1e-3, "Adam learning rate")
    batch_size: int = flag(512, "tokens per update")
    seed: int = flag(1, "seed of the initialisation, the batches and the random baseline")
    cpu: bool = flag(False, "run the LM on the CPU even if a GPU is present")
    overwrite: bool = flag(False, "replace a gate trained with another configuration")
    quiet: bool = flag(False, "no progress bars")

    def __post_init__(self):
        if self.knn_temp is not None and self.knn_temp <= 0:
            raise UserError(f"--knn-temp must be > 0, got {self.knn_temp}")
        if self.lmbda is not None and not 0 < self.lmbda < 1:
            raise UserError(f"--lmbda must be in (0, 1), got {self.lmbda}")
        if not 0 < self.valid_fraction < 1:
            raise UserError(f"--valid-fraction must be in (0, 1), got {self.valid_fraction}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise UserError("--epochs, --batch-size and --lr must be > 0")
        check_output(self.out, "dir", "--out")


def lm_features(ecfg: dict, cache: RetrievalCache, databin: DataBin, ds: Datastore,
                tables: dict, use_query: bool, device, quiet: bool) -> np.ndarray:
    """(N, F) gate features of the cached tokens, from one more LM pass over them."""
    model, fingerprint = load_lm(ecfg.get("path"), ecfg.get("hf_model"), databin, device,
                                 ecfg.get("hf_dtype"))
    ds.check_model(fingerprint, databin.tokenizer_sha256)
    tokens = databin.split(ecfg["gen_subset"])[:cache.size]
    if len(tokens) != cache.size or not np.array_equal(tokens, np.asarray(cache.targets)):
        raise UserError(f"{cache.path}: its targets are not the first {cache.size:,} tokens of "
                        f"the {ecfg['gen_subset']} split of {databin.path}")
    T, C = resolve_window(model, ecfg.get("tokens_per_sample"), ecfg.get("context_window"))
    windows = make_windows(len(tokens), tokens, databin.eos, T, C,
                           ecfg.get("sample_break_mode", "none"))
    keytype = normalize_keytype(ecfg["knn_keytype"])
    out = None
    bar = tqdm(total=len(tokens), unit="tok", desc="LM features", disable=True if quiet else None)
    for sb in iter_scored(model, tokens, windows, eos=databin.eos, pad=databin.pad,
                          max_tokens=ecfg.get("max_tokens", 8192), softmax_batch=4096,
                          device=device, return_hidden=(keytype,) if use_query else (),
                          lm_stats=True):
        q = sb.hidden[keytype].float().cpu().numpy() if use_query else None
        x = features(sb.stats.cpu().numpy(), tokens, databin.eos, sb.start, sb.end, tables, q)
        if out is None:
            out = np.empty((len(tokens), x.shape[1]), dtype=np.float32)
        out[sb.start:sb.end] = x
        bar.update(sb.end - sb.start)
    bar.close()
    return out, fingerprint


def train_net(x: np.ndarray, lm: np.ndarray, knn: np.ndarray, n_train: int,
              cfg: TrainGateConfig) -> tuple[GateNet, list[dict]]:
    """The MLP with the best held-out mixture NLL over ``cfg.epochs`` epochs."""
    torch.manual_seed(cfg.seed)
    xt, lmt, knnt = (torch.from_numpy(np.ascontiguousarray(a)) for a in
                     (x.astype(np.float32), lm.astype(np.float32), knn.astype(np.float32)))
    net = GateNet(x.shape[1])
    net.mean.copy_(xt[:n_train].mean(0))
    net.std.copy_(xt[:n_train].std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, log = math.inf, None, []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.randperm(n_train, generator=gen)
        total = 0.0
        for s in range(0, n_train, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = mixture_nll(net(xt[idx]), lmt[idx], knnt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        with torch.no_grad():
            held = float(mixture_nll(net(xt[n_train:]), lmt[n_train:], knnt[n_train:]))
        log.append(dict(epoch=epoch, train_nll=total / n_train, valid_nll=held))
        if held < best:
            best, best_state = held, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    return net, log


def curves(lam_hat: np.ndarray, lm: np.ndarray, knn: np.ndarray, lmbda: float,
           seed: int) -> list[dict]:
    """Held-out perplexity against the share of tokens searched: the gate's top tokens with
    the fixed λ and with λ̂, and a seeded random choice of as many tokens."""
    n = len(lm)
    rank = np.argsort(-lam_hat, kind="stable")
    rand = np.random.default_rng(seed).permutation(n)
    fixed = knn_math.interpolate(torch.from_numpy(lm), torch.from_numpy(knn), lmbda).numpy()
    own = np.logaddexp(np.log1p(-lam_hat) + lm, np.log(np.maximum(lam_hat, 1e-300)) + knn)
    rows = []
    for f in FRACTIONS:
        m = int(round(f * n))
        pick, rpick = np.zeros(n, bool), np.zeros(n, bool)
        pick[rank[:m]], rpick[rand[:m]] = True, True
        ppl = lambda mixed, chosen: float(np.exp(-np.where(chosen, mixed, lm).mean()))  # noqa: E731
        rows.append(dict(fraction=f, gate_ppl=ppl(fixed, pick), gate_lambda_ppl=ppl(own, pick),
                         random_ppl=ppl(fixed, rpick)))
    return rows


def tuned_settings(ecfg: dict, ds: Datastore) -> dict:
    """λ and T of the index's tuned.json (`knnlm tune`) when it tunes this datastore;
    the cache `knnlm tune` leaves behind was evaluated at the defaults. A broken
    file is an error; one of another datastore is ignored, with a warning."""
    keytype, metric = normalize_keytype(ecfg["knn_keytype"]), ecfg.get("faiss_metric_type", "l2")
    exact = bool(ecfg.get("exact_search"))
    index = None if exact else (ecfg.get("indexfile") or default_index_path(ds.path, keytype, metric))
    path = tuned_path(ds.path, keytype, metric, index)
    data, why = read_tuned(path, dict(datastore_fingerprint=ds.fingerprint, keytype=keytype,
                                      faiss_metric_type=metric, exact_search=exact))
    if data is None:
        if why.startswith("ignoring"):
            warn(why)
        return {}
    return dict(data["settings"], path=str(path))


def _first(*values):
    """The first value given (0.0 is a value)."""
    return next(v for v in values if v is not None)


def main(cfg: TrainGateConfig) -> dict:
    cache = RetrievalCache(cfg.cache)
    ecfg = cache.meta.get("config") or {}
    if not ecfg.get("dstore_filename") or not ecfg.get("gen_subset"):
        raise UserError(f"{cache.path}: its sidecar does not name the evaluation's data and "
                        "datastore")
    if ecfg.get("retomaton") or ecfg.get("gate"):
        raise UserError(f"{cache.path} was written with a search-saving method; train the gate "
                        "on a plain kNN-LM cache")
    databin, ds = DataBin(ecfg["data"]), Datastore(ecfg["dstore_filename"])
    cache.check_datastore(ds.fingerprint)
    temp, lmbda = cfg.knn_temp, cfg.lmbda
    if temp is None or lmbda is None:
        tuned = tuned_settings(ecfg, ds)
        temp = _first(temp, tuned.get("knn_temp"), ecfg.get("knn_temp"), 1.0)
        lmbda = _first(lmbda, tuned.get("lmbda"), ecfg.get("lmbda"), 0.25)
        print(f"gate trained at T {temp:g}, λ {lmbda:g}: " + (
            f"the index's tuned settings ({tuned['path']})" if tuned else "the cache's"))
    with output_lock(cfg.out, "dir", "gate directory"):
        return _train(cfg, cache, ecfg, databin, ds, temp, lmbda)


def gate_identity(cfg: TrainGateConfig, cache, ds, temp: float, lmbda: float) -> dict:
    """What defines a trained gate: its flags (less where it goes and what is printed), the
    settings it was trained at, and the cache and datastore it learnt from."""
    flags = {k: v for k, v in config_dict(cfg).items() if k not in ("out", "quiet", "cpu",
                                                                    "overwrite")}
    return dict(flags, knn_temp=temp, lmbda=lmbda, datastore_fingerprint=ds.fingerprint,
                cache_summary=cache.meta.get("summary"))


def _train(cfg, cache, ecfg, databin, ds, temp, lmbda) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ident = gate_identity(cfg, cache, ds, temp, lmbda)
    side = out / "gate.json"
    if side.is_file():       # the output rule: reused, or refused unless --overwrite
        old = read_json(side, "gate sidecar")
        if not other_configuration(out, "gate", old.get("identity") or {}, ident,
                                   cfg.overwrite) and old.get("complete"):
            print(f"{out}: this gate is already trained")
            return old
        side.unlink()        # the sidecar is the commit point: gone while the files change
    t0 = time.perf_counter()
    # the cache's numbers first (checked as they are read), before anything is written
    lm, knn, _ = token_log_probs(cache, cache.mode.cache_score, cache.k, temp, lmbda)
    stream = np.asarray(databin.split(ds.meta["split"]))[:int(np.asarray(ds.pos).max()) + 1]
    tables = count_ngrams(stream, databin.eos)
    save_atomic(lambda f: np.savez(f, **tables), out / "ngrams.npz")
    device = resolve_device(None, cfg.cpu)
    x, fingerprint = lm_features(ecfg, cache, databin, ds, tables, cfg.gate_query, device,
                                 cfg.quiet)
    n_train = int(round(len(lm) * (1 - cfg.valid_fraction)))
    net, log = train_net(x, lm, knn, n_train, cfg)
    lam_all = net.lambdas(x)
    rows = curves(lam_all[n_train:], lm[n_train:], knn[n_train:], lmbda, cfg.seed)
    save_atomic(lambda f: torch.save(net.state_dict(), f), out / "gate.pt")
    names = list(FEATURES) + ([f"query_{i}" for i in range(ds.query_dim)] if cfg.gate_query else [])
    meta = dict(format="knnlm-gate", version=1, complete=True, features=names,
                n_features=x.shape[1], use_query=cfg.gate_query, keytype=ecfg["knn_keytype"],
                datastore_fingerprint=ds.fingerprint, model_fingerprint=fingerprint,
                cache=str(cache.path), knn_temp=temp, lmbda=lmbda,
                score_mode=cache.mode.to_dict(), train_tokens=n_train,
                valid_tokens=len(lm) - n_train,
                quantiles=np.quantile(lam_all[:n_train], np.linspace(0, 1, 1001)).tolist(),
                epochs=log, curves=rows, seconds=time.perf_counter() - t0,
                config=config_dict(cfg), command=command_line("train-gate", cfg),
                identity=ident)
    write_json_atomic(out / "gate.json", meta)
    print("held-out tokens: share searched -> ppl (gate, fixed λ | gate, λ̂ | random)")
    for r in rows[::2]:
        print(f"  {r['fraction']:4.2f}  {r['gate_ppl']:9.2f}  {r['gate_lambda_ppl']:9.2f}  "
              f"{r['random_ppl']:9.2f}")
    print(f"wrote {out}/gate.pt, gate.json, ngrams.npz")
    return meta
