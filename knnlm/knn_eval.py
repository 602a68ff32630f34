"""The kNN-LM side of `eval-lm --knnlm`: retrieval for each scored block, p_kNN of the
targets, the interpolation, and the optional per-token outputs (retrieval cache, kNN
scores, queries). The math is in :mod:`knnlm.knn`; retrieval in :mod:`knnlm.retrieval`.

Score modes (the paper's analyses), chosen by flags of the original code:

- ``--knn-sim-func do_not_recomp_l2``: FAISS neighbours, FAISS (quantised) distances;
- default: FAISS neighbours, exact L2 recomputed from the stored keys;
- ``--knn-sim-func dot``: FAISS neighbours, exact inner products from the stored keys;
- ``--exact-search``: exact neighbours by brute force (the paper's "real mask"), exact scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import knn
from .cache import CacheWriter
from .util import UserError, config_dict
from .datastore import Datastore, normalize_keytype
from .index import gpu_available, load_index
from .retrieval import Retriever

QUERY_CHUNK = 256        # queries per search call (bounds the (B, k, D) neighbour keys)
EXACT_QUERY_CHUNK = 4096  # brute force reads every key per call: larger query batches
SIM_FUNCS = (None, "l2", "do_not_recomp_l2", "dot")


def default_index_path(dstore_dir: str | Path, keytype: str, metric: str) -> Path:
    return Path(dstore_dir) / f"index_{keytype.replace(':', '')}_{metric}.faiss"


def score_setup(sim_func: str | None, faiss_metric: str, exact_search: bool) -> tuple[str, str, bool]:
    """(metric neighbours are searched with, metric of the scores, recompute from keys?).

    FAISS search uses the index's metric; scores are its distances with
    ``do_not_recomp_l2``, else exact L2 (default) or inner products (``dot``) recomputed
    from the stored keys. Exact search already yields exact distances, in the metric the
    flags name (``dot`` -> IP, ``l2`` -> L2, default -> the ``--faiss-metric-type``).
    """
    if exact_search:
        metric = {"dot": "ip", "l2": "l2"}.get(sim_func or "", faiss_metric)
        return metric, metric, False
    if sim_func == "do_not_recomp_l2":
        return faiss_metric, faiss_metric, False
    return faiss_metric, "ip" if sim_func == "dot" else "l2", True


def index_to_gpus(index, n_gpus: int, shard: bool):
    """The index cloned to (or sharded across) the first ``n_gpus`` GPUs (0: all) with
    fp16 lookup tables; the CPU index, with a note, when FAISS has no GPU support."""
    import faiss
    have = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    if n_gpus > max(have, torch.cuda.device_count()):
        raise UserError(f"--knnlm-gpus {n_gpus} but {max(have, torch.cuda.device_count())} "
                        "GPU(s) are visible")
    if not gpu_available():
        print("--knnlm-gpu: this FAISS build has no GPU support; searching on the CPU")
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.shard = shard
    co.useFloat16 = True          # fp16 lookup tables (IVF-PQ) / storage (flat)
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n_gpus or have)


class KnnSearch:
    """The datastore, index and score mode the kNN flags describe: the neighbours of a batch
    of queries and their scores (shared by eval-lm, generate and neighbors)."""

    def __init__(self, cfg, model_fingerprint: str, databin, device: torch.device,
                 need_exact: bool = False):
        self.cfg = cfg
        self.keytype = normalize_keytype(cfg.knn_keytype)
        ds = Datastore(cfg.dstore_filename, in_memory=cfg.move_dstore_to_mem)
        ds.check_model(model_fingerprint, databin.tokenizer_sha256)
        self.ds = ds
        index, self.index_meta = None, None
        if not cfg.exact_search:
            path = cfg.indexfile or default_index_path(ds.path, self.keytype, cfg.faiss_metric_type)
            index, self.index_meta = load_index(path, ds, self.keytype, cfg.faiss_metric_type,
                                                cfg.probe)
            if cfg.knnlm_gpu:
                index = index_to_gpus(index, cfg.knnlm_gpus, cfg.gpu_shard)
        self.search_metric, self.score_metric, self.recompute = score_setup(
            cfg.knn_sim_func, cfg.faiss_metric_type, cfg.exact_search)
        if self.recompute and not cfg.load_keys:
            raise UserError("--no-load-keys needs --knn-sim-func do_not_recomp_l2 "
                            "(the default recomputes distances from the keys)")
        self.need_exact = need_exact
        self.k_search = cfg.k + (1 if cfg.ignore_top else 0)
        bf_device = device if cfg.knnlm_gpu else torch.device("cpu")
        self.retriever = Retriever(ds, self.keytype, self.k_search, self.search_metric, index,
                                   cfg.exact_search, cfg.load_keys or need_exact, bf_device)

    def search(self, q: np.ndarray) -> dict:
        """(B, D) float32 queries -> D, I (B, k) as searched (minus the self-hit with
        --ignore-top), their values, exact distances (when recomputed or asked for), and
        ``scores`` (B, k) float64 in the configured score mode, ``mask`` of real neighbours."""
        D, I = self.retriever.search(q)
        if self.cfg.ignore_top:   # scoring the datastore's own text: drop the self-hit
            D, I = D[:, 1:], I[:, 1:]
        vals = self.retriever.values(I)
        exact = None
        if self.recompute or self.need_exact:
            exact = self.retriever.recompute(q, I, self.score_metric)
        dist, metric = (exact, self.score_metric) if self.recompute else (D, self.search_metric)
        scores = knn.scores_from_distances(torch.from_numpy(dist).double(), metric)
        return dict(D=D, I=I, vals=vals, exact=exact, scores=scores, mask=torch.from_numpy(I >= 0))


class KnnScorer:
    """Retrieves neighbours for a batch of queries and scores the targets."""

    def __init__(self, cfg, model_fingerprint: str, databin, device: torch.device, n_tokens: int):
        self.cfg = cfg
        self.knn = KnnSearch(cfg, model_fingerprint, databin, device, cfg.save_exact_dists)
        self.keytype, ds = self.knn.keytype, self.knn.ds
        self.recompute = self.knn.recompute
        self.cache = None
        if cfg.save_retrieval:
            meta = dict(config=config_dict(cfg), metric=self.knn.score_metric,
                        faiss_metric=self.knn.search_metric, datastore_fingerprint=ds.fingerprint,
                        index=self.knn.index_meta and {k: self.knn.index_meta[k] for k in
                                                       ("factory", "metric", "nprobe",
                                                        "datastore_fingerprint")},
                        nprobe=cfg.probe, exact_search=cfg.exact_search, ignore_top=cfg.ignore_top)
            self.cache = CacheWriter(cfg.save_retrieval, n_tokens, cfg.k,
                                     cfg.save_exact_dists, meta, ds.size)
        self.progress = self.cache.progress if self.cache is not None else None
        mode = "r+" if self.progress else "w+"   # resuming: keep the rows already written
        self.knn_scores = self.queries = None
        if cfg.save_knn_scores:
            self.knn_scores = np.lib.format.open_memmap(cfg.save_knn_scores, mode=mode,
                                                        dtype=np.float32, shape=(n_tokens,))
        if cfg.save_queries:
            self.queries = np.lib.format.open_memmap(cfg.save_queries, mode=mode, dtype=np.float32,
                                                     shape=(n_tokens, ds.dim))

    def commit(self, progress: dict) -> None:
        """After a batch: flush every per-token output, then record the running state in the
        cache sidecar (what a killed evaluation resumes from)."""
        if self.cache is None:
            return
        for arr in (self.knn_scores, self.queries):
            if arr is not None:
                arr.flush()
        self.cache.commit(progress)

    def score(self, start: int, q: torch.Tensor, targets: np.ndarray, lm_lp: np.ndarray,
              words: np.ndarray) -> np.ndarray:
        """log p_kNN of each target, (M,) float64; writes the per-token outputs."""
        q = q.float().cpu().numpy()
        out = np.empty(len(q), dtype=np.float64)
        step = QUERY_CHUNK if (self.recompute or self.cfg.save_exact_dists) or \
            not self.cfg.exact_search else EXACT_QUERY_CHUNK
        for s in range(0, len(q), step):
            e = min(len(q), s + step)
            out[s:e] = self._score_chunk(start + s, q[s:e], targets[s:e], lm_lp[s:e], words[s:e])
        if self.queries is not None:
            self.queries[start:start + len(q)] = q
        if self.knn_scores is not None:
            self.knn_scores[start:start + len(q)] = out
        return out

    def _score_chunk(self, start, q, targets, lm_lp, words) -> np.ndarray:
        r = self.knn.search(q)
        lp = knn.knn_target_log_probs(r["scores"], torch.from_numpy(r["vals"]),
                                      torch.from_numpy(targets), self.cfg.knn_temp, r["mask"])
        if self.cache is not None:
            self.cache.write(start, targets=targets, words=words, lm_logprobs=lm_lp, ids=r["I"],
                             vals=r["vals"], faiss_dists=r["D"], exact_dists=r["exact"])
        return lp.numpy()

    def close(self, summary: dict) -> None:
        for arr in (self.knn_scores, self.queries):
            if arr is not None:
                arr.flush()
        if self.cache is not None:
            self.cache.close(summary)
