"""Search over a datastore: FAISS (or torch-backend) search, exact brute-force search
(:mod:`knnlm.knn.exact`), exact distances recomputed from the stored keys
(:class:`Retriever`), and the score mode the kNN flags describe on top of them
(:class:`KnnSearch`, shared by eval-lm, generate and neighbors).

The score modes (which neighbours, which scores) are :mod:`knnlm.knn.mode`'s.

Distances follow FAISS's conventions everywhere (:func:`knnlm.knn.math.scores_from_distances`
turns them into scores): L2 -> squared Euclidean distance, smaller is closer; IP -> inner
product, larger is closer. Missing neighbours (FAISS returns id -1 when the probed lists
hold fewer than k keys) come back with id -1 and are masked out downstream.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..distributed import env_ranks
from ..util import UserError
from . import math as knn_math
from .datastore import Datastore, finite_rows, normalize_keytype
from .exact import brute_force_search, stream_search
from .index import gpu_available
from .index_read import (ShardedIndex, default_index_path, is_fast_scan, load_index,
                         refine_stage, returns_exact_distances)
from .rank_search import place_shards, ranked
from .torch_index import ShardedTorchIndex, TorchIndex
from .tuned import identity, resolve_settings, tuned_path

RECOMPUTE_CHUNK = 8    # queries per gather in exact_distances: their (8, k, D) neighbour
                       # keys stay in cache; buffers are reused across chunks
RAM_BUDGET = 1 << 30   # values and counts are read into RAM up to this many bytes each

MIX_CHUNK = 512     # positions mixed at once (each a float64 row over the vocabulary)


def key_table(keys) -> torch.Tensor:
    """A zero-copy torch view of stored keys (a read-only memmap too: it is only read)."""
    if isinstance(keys, torch.Tensor):
        return keys
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(keys))


def exact_distances(q: np.ndarray, keys, ids: np.ndarray, metric: str) -> np.ndarray:
    """FAISS-style distances of (B, D) queries to their (B, k) neighbours, recomputed in
    float32 from the stored keys (squared L2 as a sum of squared differences); -1 ids get
    +inf (L2) or -inf (IP).

    The cost is the gather of B·k random rows (memory latency: ~90 ns a row here), so the
    loop is over chunks of RECOMPUTE_CHUNK queries into buffers allocated once per call:
    the gathered keys are converted and reduced in cache, with no allocation per chunk."""
    B, k = ids.shape
    if not B * k:
        return np.empty((B, k), dtype=np.float32)
    table = key_table(keys)
    missing = ids < 0
    has_missing = bool(missing.any())
    safe = torch.from_numpy(np.where(missing, 0, ids) if has_missing else ids).to(torch.int64)
    qq = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    out = torch.empty((B, k), dtype=torch.float32)
    c = min(RECOMPUTE_CHUNK, max(B, 1))
    rows = torch.empty((c * k, table.shape[1]), dtype=table.dtype)
    f32 = rows if table.dtype == torch.float32 else torch.empty(rows.shape, dtype=torch.float32)
    for s in range(0, B, c):
        e = min(B, s + c)
        n = (e - s) * k
        torch.index_select(table, 0, safe[s:e].reshape(-1), out=rows[:n])
        nk = f32[:n]
        if nk is not rows:
            nk.copy_(rows[:n])
        nk = nk.view(e - s, k, -1)
        if metric == "l2":
            torch.sum(nk.sub_(qq[s:e, None, :]).square_(), -1, out=out[s:e])
        else:
            torch.sum(nk.mul_(qq[s:e, None, :]), -1, out=out[s:e])
    d = out.numpy()
    bad = ~np.isfinite(d)
    if bad.any():
        _refuse_distance(bad & ~missing, q, keys, ids)
    if has_missing:
        d[missing] = np.inf if metric == "l2" else -np.inf
    return d


def _refuse_distance(bad: np.ndarray, q: np.ndarray, keys, ids: np.ndarray) -> None:
    """A recomputed distance that is not finite: the query's fault or the key's, in one
    line (the key's names its entry)."""
    if not bad.any():
        return
    b, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
    if not np.isfinite(np.asarray(q[b], dtype=np.float32)).all():
        raise UserError(f"query {b:,} of the batch is not finite (NaN or inf): the model's "
                        "hidden state overflowed")
    finite_rows(np.asarray(keys[[int(ids[b, j])]]), where=getattr(keys, "filename", None),
                rows=ids[b, j:j + 1])
    raise UserError("a recomputed distance overflowed float32 (keys or queries too large)")


def in_ram(arr: np.ndarray, budget: int = RAM_BUDGET) -> np.ndarray:
    """``arr`` read into RAM when it needs at most ``budget`` bytes (else the memmap as is):
    the per-neighbour gathers of values and counts then touch no page cache."""
    return np.array(arr) if isinstance(arr, np.memmap) and arr.nbytes <= budget else arr


class Retriever:
    """Finds the k nearest datastore entries of a batch of queries."""

    def __init__(self, ds: Datastore, keytype: str, k: int, metric: str = "l2", index=None,
                 exact_search: bool = False, load_keys: bool = True,
                 device: torch.device | None = None):
        if metric not in knn_math.METRICS:
            raise UserError(f"metric must be one of {', '.join(knn_math.METRICS)}, got {metric!r}")
        if k > ds.size:
            raise UserError(f"--k {k} exceeds the datastore size {ds.size:,}")
        if index is None and not exact_search:
            raise UserError("an index is needed unless --exact-search is given")
        self.ds, self.k, self.metric, self.index = ds, k, metric, index
        self.exact_search = exact_search
        self.keys = ds.keys(keytype) if (load_keys or exact_search) else None
        self.vals = in_ram(ds.vals)
        # a pruned datastore's log counts, computed once (float32, like the scores)
        self.log_count_table = None if ds.counts is None else \
            np.log(in_ram(ds.counts).astype(np.float32))
        self.device = device or torch.device("cpu")
        self._device_keys = None   # keys kept on the GPU for brute-force search

    def _search_keys(self):
        """The keys brute force scans: on a GPU, one fp16 copy made once (if it fits)."""
        if self.device.type != "cuda":
            return self.keys
        if self._device_keys is None:
            need = self.keys.shape[0] * self.keys.shape[1] * 2
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.8 * free:
                return self.keys   # stream the chunks from host memory instead
            host = np.array(self.keys, dtype=np.float16)  # a writable copy for torch
            self._device_keys = torch.from_numpy(host).to(self.device)
        return self._device_keys

    def search(self, q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 queries -> (D (B, k), I (B, k)), FAISS conventions."""
        k = k or self.k
        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.exact_search:
            return brute_force_search(torch.from_numpy(q).to(self.device), self._search_keys(),
                                      k, self.metric)
        D, I = self.index.search(q, k)
        return D, I

    def values(self, ids: np.ndarray) -> np.ndarray:
        """(B, k) neighbour values; -1 where the neighbour is missing."""
        missing = ids < 0
        if not missing.any():
            return self.vals[ids]
        out = self.vals[np.where(missing, 0, ids)]
        out[missing] = -1
        return out

    def log_counts(self, ids: np.ndarray) -> torch.Tensor | None:
        """(B, k) float32 log counts of a pruned datastore's entries (0 where missing);
        None for an ordinary datastore (every entry counts once)."""
        if self.log_count_table is None:
            return None
        out = self.log_count_table[np.where(ids >= 0, ids, 0)]
        out[ids < 0] = 0.0
        return torch.from_numpy(out)

    def recompute(self, q: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
        if self.keys is None:
            raise UserError("exact distances need the stored keys (drop --no-load-keys)")
        return exact_distances(q, self.keys, ids, metric)


def place_index(index, cfg, device: torch.device) -> tuple[object, str]:
    """The index where the kNN flags want it searched, and which backend that is.

    ``--knn-backend faiss``: FAISS; with ``--knnlm-gpu`` cloned to (or, ``--gpu-shard``,
    sharded across) the GPUs with fp16 lookup tables when FAISS has GPU support, else on
    the CPU. ``--knn-backend torch``: the torch backend over the index's data
    (:mod:`knnlm.knn.torch_index`), its inverted lists split over the GPUs with
    ``--knnlm-gpu``, on the CPU otherwise. ``auto``: FAISS, except that ``--knnlm-gpu``
    without faiss-gpu uses the torch backend on the GPUs when there are any.
    """
    import faiss
    if isinstance(index, ShardedIndex):
        if cfg.retomaton:
            raise UserError("--retomaton reads the codes of one index; build it unsharded")
        return place_shards(index, cfg, device)
    visible = max(faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0,
                  torch.cuda.device_count())
    if cfg.knnlm_gpus > visible and cfg.knnlm_gpu:
        raise UserError(f"--knnlm-gpus {cfg.knnlm_gpus} but {visible} GPU(s) are visible")
    backend = cfg.knn_backend
    if backend == "auto":
        backend = "torch" if cfg.knnlm_gpu and not gpu_available() and \
            torch.cuda.is_available() else "faiss"
    if backend == "faiss":
        if not cfg.knnlm_gpu:
            return index, "faiss-cpu"
        if not gpu_available():
            print("--knnlm-gpu: no FAISS GPU support and no CUDA device; searching on the CPU "
                  "with FAISS")
            return index, "faiss-cpu"
        if is_fast_scan(index) or refine_stage(index) is not None:
            raise UserError("--knnlm-gpu: faiss-gpu searches neither fast-scan (x4fs) nor "
                            "refine indexes; search them on the CPU (drop --knnlm-gpu)")
        n = cfg.knnlm_gpus or faiss.get_num_gpus()
        co = faiss.GpuMultipleClonerOptions()
        co.shard = cfg.gpu_shard
        co.useFloat16 = True          # fp16 lookup tables (IVF-PQ) / storage (flat)
        how = "sharded across" if cfg.gpu_shard else "cloned to"
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n), f"faiss-gpu ({how} {n} GPU(s))"
    if not cfg.knnlm_gpu:
        return TorchIndex.from_faiss(index, "cpu"), "torch (cpu)"
    if not torch.cuda.is_available():
        raise UserError("--knn-backend torch --knnlm-gpu: no CUDA device is visible")
    n = cfg.knnlm_gpus or torch.cuda.device_count()
    devices = [torch.device("cuda", i) for i in range(n)] if device.type != "cuda" or n > 1 \
        else [device]
    if len(devices) == 1 or faiss.try_extract_index_ivf(index) is None:
        return TorchIndex.from_faiss(index, devices[0]), f"torch ({devices[0]})"
    return ShardedTorchIndex(index, devices), f"torch (lists sharded across {n} GPUs)"


class KnnSearch:
    """The datastore, index and score mode the kNN flags describe: the neighbours of a batch
    of queries and their scores (shared by eval-lm, generate and neighbors)."""

    def __init__(self, cfg, model_fingerprint: str, databin, device: torch.device,
                 need_exact: bool = False, log=print):
        """``cfg``: the kNN flags (:class:`knnlm.knn.options.KnnOptions`); ``need_exact``:
        recompute exact distances (in the mode's metric) even when the mode does not;
        ``log``: where the backend and the settings used are reported."""
        self.cfg = cfg
        self.model_fingerprint = model_fingerprint
        self.keytype = normalize_keytype(cfg.knn_keytype)
        ds = Datastore(cfg.dstore_filename, in_memory=cfg.move_dstore_to_mem)
        ds.check_model(model_fingerprint, databin.tokenizer_sha256)
        self.ds = ds
        self.projection = None
        if ds.meta.get("projection"):     # a reduced datastore: queries are projected first
            from .reduce import Projection
            self.projection = Projection(ds)
            log(f"queries projected: PCA {ds.query_dim} -> {ds.dim} dims ({ds.path})")
        index, self.index_meta, path = None, None, None
        index_exact = False          # a refine stage returns the keys' exact distances
        self.backend = f"brute force ({device if cfg.knnlm_gpu else 'cpu'})"
        if not cfg.exact_search:
            path = cfg.indexfile or default_index_path(ds.path, self.keytype, cfg.faiss_metric_type)
            index, self.index_meta = load_index(path, ds, self.keytype, cfg.faiss_metric_type,
                                                cfg.probe, mmap=cfg.index_mmap,
                                                k_factor=cfg.k_factor, part=env_ranks())
            index_exact = returns_exact_distances(index, ds.meta["key_dtype"])
            index, self.backend = place_index(index, cfg, device)
            # under torchrun (generate, neighbors, tune, eval-lm): every rank's shards
            index, self.backend = ranked(index, self.backend)
            log(f"kNN search: {self.backend}")
        # λ, T, k and the score mode: flags, else the index's tuned settings, else defaults
        self.settings = resolve_settings(
            cfg, tuned_path(ds.path, self.keytype, cfg.faiss_metric_type, path),
            identity(ds, self.keytype, self.index_meta, model_fingerprint, cfg.exact_search,
                     cfg.faiss_metric_type), log)
        self.mode = cfg.score_mode()
        # exact distances in the mode's metric: the index's own (refine stage) or recomputed
        self.exact_from_index = index_exact and self.mode.metric == self.mode.search_metric
        if self.mode.recompute and not cfg.load_keys and not self.exact_from_index:
            raise UserError(f"--no-load-keys: the score mode ({self.mode.describe()}) needs the "
                            "keys; --knn-sim-func do_not_recomp_l2 scores with FAISS distances")
        self.need_exact = need_exact
        self.k_search = cfg.k + (1 if cfg.ignore_top else 0)
        bf_device = device if cfg.knnlm_gpu else torch.device("cpu")
        self.retriever = Retriever(ds, self.keytype, self.k_search, self.mode.search_metric, index,
                                   cfg.exact_search, cfg.load_keys or need_exact, bf_device)
        self._device_vals = self._device_log_counts = None   # scores_on_device's copies

    def project(self, q: np.ndarray) -> np.ndarray:
        """The model's (B, D) queries in the datastore's key space (a reduced datastore's
        projection; else unchanged)."""
        return q if self.projection is None else self.projection(q)

    def search(self, q: np.ndarray, found: tuple | None = None) -> dict:
        """(B, D) float32 queries -> D, I (B, k) as searched (minus the self-hit with
        --ignore-top), their values, exact distances (when recomputed or asked for), and
        ``scores`` (B, k) float32 in the configured score mode, ``mask`` of real neighbours,
        ``log_counts`` (B, k) of a pruned datastore's entries (else None).
        ``found``: the (D, I) of these queries, already searched (:meth:`search_all`)."""
        q = self.project(q)
        D, I = found if found is not None else self.retriever.search(q)
        dropped = None
        if self.cfg.ignore_top:   # scoring the datastore's own text: drop the self-hit
            D, I, dropped = D[:, 1:], I[:, 1:], I[:, 0]
        vals = self.retriever.values(I)
        exact, mode = None, self.mode
        if mode.recompute or self.need_exact:
            exact = D if self.exact_from_index else self.retriever.recompute(q, I, mode.metric)
        dist = exact if mode.recompute else D
        scores = knn_math.scores_from_distances(torch.from_numpy(dist), mode.metric)
        return dict(D=D, I=I, vals=vals, exact=exact, scores=scores, mask=torch.from_numpy(I >= 0),
                    log_counts=self.retriever.log_counts(I), dropped=dropped)

    def mix(self, logits: torch.Tensor, queries) -> tuple[torch.Tensor, int]:
        """(N, V) LM logits and their (N, D) queries -> ((N, V) float64 kNN-LM log-probs
        log((1 − λ) p_LM + λ p_kNN) on the logits' device, the queries searched). Rows
        without a neighbour keep the LM's log-softmax; identical queries (beams copied
        from one prompt) are searched once."""
        q = np.ascontiguousarray(torch.as_tensor(queries).detach().float().cpu().numpy())
        uniq, inverse = np.unique(q, axis=0, return_inverse=True)
        if self.on_device:     # the torch backend: scored where the neighbours are
            r = self.scores_on_device(uniq)
            vals = torch.where(r["mask"], r["vals"], 0)
        else:
            r = self.search(uniq)
            vals = torch.from_numpy(np.where(r["I"] >= 0, r["vals"], 0)).long()
        dev = vals.device
        knn = knn_math.knn_full_log_probs(r["scores"], vals, logits.shape[-1], self.cfg.knn_temp,
                                          r["mask"], r.get("log_counts"))
        pick = torch.from_numpy(inverse.reshape(-1)).to(dev)
        knn, found = knn[pick], r["mask"].any(1)[pick]
        lm = torch.log_softmax(logits.to(dev).double(), -1)
        mixed = knn_math.interpolate(lm, knn, self.cfg.lmbda)
        return torch.where(found[:, None], mixed, lm).to(logits.device), len(uniq)

    def mix_targets(self, logits: torch.Tensor, queries, targets: torch.Tensor) -> torch.Tensor:
        """(N,) float64 kNN-LM log-probs of the targets: :meth:`mix`'s values there, by
        the target-only kNN math of eval-lm (no (N, V) distribution)."""
        q = np.ascontiguousarray(torch.as_tensor(queries).detach().float().cpu().numpy())
        lm = torch.cat([logits[s:s + MIX_CHUNK].float().gather(1, targets[s:s + MIX_CHUNK, None].to(
            logits.device))[:, 0] - torch.logsumexp(logits[s:s + MIX_CHUNK].float(), -1)
            for s in range(0, len(logits), MIX_CHUNK)]).double().cpu()
        out = lm.clone()
        for s in range(0, len(q), MIX_CHUNK * 8):
            e = s + MIX_CHUNK * 8
            r = self.search(q[s:e])
            knn = knn_math.knn_target_log_probs_fast(
                r["scores"], torch.from_numpy(np.where(r["I"] >= 0, r["vals"], -1)).long(),
                targets[s:e].cpu(), self.cfg.knn_temp, r["mask"], r.get("log_counts"))
            mixed = knn_math.interpolate(lm[s:e], knn, self.cfg.lmbda)
            out[s:e] = torch.where(r["mask"].any(1), mixed, lm[s:e])
        return out.to(logits.device)

    @property
    def on_device(self) -> bool:
        """Whether :meth:`scores_on_device` applies: the torch backend searches, and the
        score mode scores with the distances it returns (nothing recomputed)."""
        return isinstance(self.retriever.index, (TorchIndex, ShardedTorchIndex)) and \
            not self.mode.recompute and not self.need_exact

    def scores_on_device(self, q: np.ndarray) -> dict:
        """:meth:`search`'s ``scores``, ``vals``, ``mask`` and ``log_counts``, as tensors on
        the torch backend's device: a GPU evaluation scores the neighbours where it found
        them (the values and counts are copied there once)."""
        index = self.retriever.index
        dev = index.device
        D, I = index.search_tensors(torch.from_numpy(np.ascontiguousarray(self.project(q),
                                                                          dtype=np.float32)),
                                    self.k_search)
        if self.cfg.ignore_top:
            D, I = D[:, 1:], I[:, 1:]
        if self._device_vals is None:
            self._device_vals = torch.from_numpy(np.array(self.retriever.vals,
                                                          dtype=np.int32)).to(dev)
            table = self.retriever.log_count_table
            self._device_log_counts = None if table is None else torch.from_numpy(table).to(dev)
        mask = I >= 0
        safe = torch.where(mask, I, 0)
        log_counts = None if self._device_log_counts is None else \
            torch.where(mask, self._device_log_counts[safe], 0.0)
        return dict(scores=knn_math.scores_from_distances(D, self.mode.metric),
                    vals=torch.where(mask, self._device_vals[safe].long(), -1), mask=mask,
                    log_counts=log_counts)

    def search_all(self, queries, state_dir=None, quiet: bool = True,
                   part: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of every query in ONE pass over the keys (:func:`stream_search`),
        resumable in ``state_dir``: what eval-lm --exact-search runs on a whole split.
        ``part`` (r, w): only the r-th of w contiguous shares of the keys (torchrun)."""
        if isinstance(self.retriever.index, ShardedIndex) and not self.cfg.exact_search:
            return self._search_shards(queries, state_dir, quiet)
        if not self.cfg.exact_search:
            raise ValueError("search_all is the exact search; this mode searches an index")
        r, w = part
        n = self.ds.size
        if self.projection is not None:
            queries = np.concatenate([self.project(np.asarray(queries[s:s + 65536]))
                                      for s in range(0, len(queries), 65536)])
        ident = dict(datastore=self.ds.fingerprint, keytype=self.keytype)
        return stream_search(queries, self.retriever._search_keys(), self.k_search,
                             self.mode.search_metric, device=self.retriever.device,
                             key_range=(n * r // w, n * (r + 1) // w), state_dir=state_dir,
                             identity=ident, quiet=quiet)

    def _search_shards(self, queries, state_dir, quiet: bool) -> tuple[np.ndarray, np.ndarray]:
        """Every query against this process's shards of an index kept in shards (under
        torchrun, the rank's: the ranks' (D, I) are merged by the caller), resumable in
        ``state_dir``."""
        ident = dict(datastore=self.ds.fingerprint, keytype=self.keytype,
                     index=self.index_meta, nprobe=self.cfg.probe, k_factor=self.cfg.k_factor,
                     shards=[first for _, first in self.retriever.index.shards])
        return self.retriever.index.search_every(queries, self.k_search, self.project,
                                                 state_dir, ident, quiet=quiet)

