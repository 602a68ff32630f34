"""`knnlm build-index`: a FAISS index over one keytype of a datastore (read back by
:mod:`knnlm.knn.index_read`).

Inputs: a datastore directory (``--dstore-dir``) and ``--knn-keytype``. Output: the
index (``--faiss-index``, default ``<dstore>/index_<keytype>_<metric>.faiss``) and its
sidecar ``<index>.json`` (factory, metric, training sample, datastore fingerprint, rows).

    knnlm build-index --dstore-dir runs/demo/dstore --knn-keytype att --metric l2 \\
        --index-factory 'IVF1024,PQ32'

Training uses a seeded random sample of keys (``--train-size``, default min(N, 1M)); keys
are then added in chunks read from the memmap (peak memory: the index plus one chunk). A
killed build resumes from the last saved partial index (``<index>.partial``), and the
result is byte-identical to an uninterrupted build. Without a factory one is chosen from
N and D. Training runs on GPU when FAISS has GPU support and a GPU is present.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..distributed import setup_distributed
from ..guard import check_output, other_configuration, output_lock, temp_path
from ..io import read_json, write_json_atomic
from ..util import UserError, config_dict, flag
from .datastore import Datastore, finite_rows, normalize_keytype
from .kmeans import train_ivf
from .shards import add_step, build_sharded, shard_path, shard_ranges

INDEX_FORMAT = "knnlm-index"
INDEX_VERSION = 1
METRICS = ("l2", "ip")
FLAT_BELOW = 10_000          # stores smaller than this get an exact Flat index
MAX_LISTS = 4096             # the paper's IVF4096
MIN_POINTS_PER_LIST = 39     # FAISS k-means wants at least this many training points per list
DEFAULT_TRAIN_SIZE = 1_000_000
FASTSCAN_MAX_M = 128         # 4-bit sub-quantizers of the automatic factory (64 bytes a key)


def faiss_module():
    import faiss  # imported lazily: only the index stages need it
    return faiss


def faiss_metric(metric: str):
    faiss = faiss_module()
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def auto_factory(n: int, d: int) -> str:
    """A sensible factory for N keys of D dims: Flat for small stores, else IVF with about
    4·sqrt(N) lists (a power of two, at most 4096) and fast-scan PQ: M = min(128, D/2)
    sub-quantizers of 4 bits (M/2 bytes a key; D = 128: ``PQ64x4fs``, the 32 bytes of
    ``PQ32`` searched several times faster, README "Fast retrieval")."""
    if n < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = max(16, min(MAX_LISTS, nlist, 2 ** int(math.log2(n // MIN_POINTS_PER_LIST))))
    m = min(FASTSCAN_MAX_M, d // 2)
    while m >= 2 and (d % m or m % 2):      # fast-scan wants an even M that divides D
        m -= 1
    return f"IVF{nlist},PQ{m}x4fs" if m >= 2 else f"IVF{nlist},Flat"


@dataclass
class BuildIndexConfig:
    dstore_dir: str = flag(help="datastore directory", aliases=("--dstore_mmap",))
    knn_keytype: str = flag("att", "which keys to index (att, ffn, layer:N)")
    metric: str = flag("l2", "l2 | ip", choices=METRICS)
    index_factory: str | None = flag(None, "FAISS factory string, e.g. 'IVF4096,PQ64x4fs' "
                                     "(4-bit fast-scan), 'IVF4096,PQ64', 'OPQ64,IVF4096,PQ64'; "
                                     "a suffix ',RFlat' or ',Refine(SQfp16)' adds exact "
                                     "re-ranking (default: chosen from N and D)")
    faiss_index: str | None = flag(None, "output path (default: <dstore>/index_<keytype>_<metric>.faiss)",
                                   aliases=("--faiss_index", "--indexfile"))
    ncentroids: int | None = flag(None, "IVF lists, when no factory is given (original flag)")
    code_size: int | None = flag(None, "PQ bytes per key, when no factory is given (original flag)",
                                 aliases=("--code_size",))
    probe: int = flag(8, "nprobe recorded as the index's default")
    train_size: int = flag(DEFAULT_TRAIN_SIZE, "keys sampled to train the quantizers")
    seed: int = flag(1, "seed of the training sample")
    num_keys_to_add_at_a_time: int = flag(500_000, "keys added per chunk (rounded down to a "
                                          "multiple of 4,096: sharded builds then equal it)",
                                          aliases=("--num_keys_to_add_at_a_time",))
    starting_point: int | None = flag(None, "row to start adding at (original flag; a resumed "
                                      "build must hold exactly this many rows)",
                                      aliases=("--starting_point",))
    save_interval_seconds: float = flag(300.0, "save the partial index at most this often "
                                        "(0: after every chunk)")
    gpu: str = flag("auto", "train on GPU: auto | yes | no", choices=("auto", "yes", "no"))
    train_backend: str = flag("auto", "k-means of FAISS, or in torch (knnlm/knn/kmeans.py: "
                              "GPU training without faiss-gpu); auto: FAISS, or torch on the "
                              "GPU when FAISS has no GPU support", choices=("auto", "faiss", "torch"))
    shards: int = flag(1, "add the keys in S contiguous shards, then merge (same index)")
    workers: int = flag(1, "--shards: shards added in parallel processes")
    keep_shards: bool = flag(False, "--shards: keep the S shard files (one quantizer, "
                             "contiguous key ranges) instead of merging them; the sidecar "
                             "lists them, and searches merge the shards' top-k")
    dstore_size: int | None = flag(None, "accepted for compatibility; checked against the datastore",
                                   aliases=("--dstore_size",))
    dimension: int | None = flag(None, "accepted for compatibility; checked against the datastore")
    dstore_fp16: bool = flag(False, "accepted for compatibility: the key dtype is read from the "
                             "datastore", aliases=("--dstore_fp16",))
    overwrite: bool = flag(False, "replace an index built with another configuration (factory, "
                           "metric, datastore, training sample)")
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        self.knn_keytype = normalize_keytype(self.knn_keytype)
        for name in ("probe", "train_size", "num_keys_to_add_at_a_time"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.index_factory and (self.ncentroids or self.code_size):
            raise UserError("give either --index-factory or --ncentroids/--code_size, not both")
        if self.save_interval_seconds < 0:
            raise UserError("--save-interval-seconds must be >= 0")
        if self.shards < 1 or self.workers < 1:
            raise UserError("--shards and --workers must be >= 1")
        if self.shards > 1 and self.starting_point is not None:
            raise UserError("--starting_point does not apply to a sharded build")
        check_output(self.index_path(), "file", "--faiss-index")

    def factory(self, n: int, d: int) -> str:
        if self.index_factory:
            return self.index_factory
        if self.ncentroids or self.code_size:
            return f"IVF{self.ncentroids or MAX_LISTS},PQ{self.code_size or 64}"
        return auto_factory(n, d)

    def index_path(self) -> Path:
        if self.faiss_index:
            return Path(self.faiss_index)
        return Path(self.dstore_dir) / f"index_{self.knn_keytype.replace(':', '')}_{self.metric}.faiss"


def check_factory(factory: str, n: int, d: int, n_train: int) -> None:
    """Refuse, before training, a factory the keys cannot train: more IVF lists or PQ
    centroids than training keys (FAISS would fail after loading everything)."""
    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"(?<!O)PQ(\d+)(?:x(\d+))?", factory)
    need = max(int(ivf.group(1)) if ivf else 0, 2 ** int(pq.group(2) or 8) if pq else 0)
    if need > n_train:
        hint = auto_factory(n, d)
        raise UserError(f"--index-factory {factory} needs at least {need:,} training keys; "
                        f"{n_train:,} are used (--train-size, datastore of {n:,}): try "
                        f"--index-factory {hint}")
    if pq and d % int(pq.group(1)):
        raise UserError(f"--index-factory {factory}: PQ{pq.group(1)} does not divide the "
                        f"{d} dimensions of the keys")


def gpu_available() -> bool:
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def training_backend(cfg: BuildIndexConfig) -> str:
    """Who trains the index: ``faiss-cpu``, ``faiss-gpu`` or ``torch (<device>)``."""
    import torch
    has_cuda = torch.cuda.is_available()
    want_gpu = cfg.gpu == "yes" or (cfg.gpu == "auto" and (gpu_available() or has_cuda))
    if cfg.gpu == "yes" and not (gpu_available() or has_cuda):
        raise UserError("--gpu yes: no GPU is visible")
    backend = cfg.train_backend
    if backend == "auto":
        backend = "faiss" if (gpu_available() or not want_gpu) else "torch"
    if backend == "faiss":
        if want_gpu and not gpu_available():
            if cfg.gpu == "yes":
                raise UserError("--gpu yes --train-backend faiss: this FAISS build has no GPU "
                                "support (--train-backend torch trains on the GPU without it)")
            return "faiss-cpu"
        return "faiss-gpu" if want_gpu else "faiss-cpu"
    return f"torch ({'cuda' if want_gpu else 'cpu'})"


def train_index(index, xt: np.ndarray, use_gpu: bool) -> None:
    """Train ``index`` on ``xt``; IVF k-means runs on all GPUs when asked.

    The factory turns on polysemous training for PQ codes; kNN-LM search never uses
    polysemous (Hamming) filtering, and that training costs ~15x the PQ training itself,
    so it is turned off (as in the original code, which built ``IndexIVFPQ`` directly).
    """
    faiss = faiss_module()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    for sub in (ivf, _downcast(index)):
        if sub is not None and hasattr(sub, "do_polysemous_training"):
            sub.do_polysemous_training = False
    if use_gpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(clustering_index(ivf))
    index.train(xt)


def clustering_index(ivf):
    """The flat index the coarse k-means assigns with: the quantizer's own metric (an IP
    index clusters by inner product, as FAISS's CPU training does)."""
    faiss = faiss_module()
    if ivf.metric_type == faiss.METRIC_INNER_PRODUCT:
        return faiss.IndexFlatIP(ivf.d)
    return faiss.IndexFlatL2(ivf.d)


def _downcast(index):
    faiss = faiss_module()
    if isinstance(index, faiss.IndexPreTransform):
        index = index.index
    return faiss.downcast_index(index)


def training_sample(keys: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, fp32 keys) of a seeded sample without replacement, rows in order."""
    n = len(keys)
    rows = np.arange(n) if size >= n else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return rows, finite_rows(keys[rows], where=getattr(keys, "filename", None), rows=rows)


def sidecar_for(cfg: BuildIndexConfig, ds: Datastore, factory: str, n_train: int) -> dict:
    return dict(format=INDEX_FORMAT, version=INDEX_VERSION, factory=factory, metric=cfg.metric,
                keytype=cfg.knn_keytype, dim=ds.dim, datastore=str(Path(ds.path).resolve()),
                datastore_fingerprint=ds.fingerprint, datastore_size=ds.size,
                train_size=n_train, seed=cfg.seed, nprobe=cfg.probe,
                rows_added=0, complete=False, config=config_dict(cfg),
                **({"layout": "shards"} if cfg.keep_shards else {}))


IDENTITY = ("factory", "metric", "keytype", "datastore_fingerprint", "train_size", "seed",
            "layout")


def _identity(meta: dict) -> dict:
    """The settings that define an index (its sidecar's others are progress and timings)."""
    return {k: meta.get(k) for k in IDENTITY}


def _same(old: dict, new: dict) -> bool:
    return _identity(old) == _identity(new)


def build_index(cfg: BuildIndexConfig, dist=None) -> dict:
    faiss = faiss_module()
    ds = Datastore(cfg.dstore_dir)
    keys = ds.keys(cfg.knn_keytype)
    n, d = ds.size, ds.dim
    if n == 0:
        raise UserError(f"{ds.path} holds no entries: nothing to index")
    if cfg.dstore_size is not None and cfg.dstore_size != n:
        raise UserError(f"--dstore_size {cfg.dstore_size} but the datastore holds {n:,} keys")
    if cfg.dimension is not None and cfg.dimension != d:
        raise UserError(f"--dimension {cfg.dimension} but the keys have {d} dimensions")
    trainer = training_backend(cfg)
    factory = cfg.factory(n, d)
    check_factory(factory, n, d, min(cfg.train_size, n))
    out = cfg.index_path()
    partial, side_path = Path(str(out) + ".partial"), Path(str(out) + ".json")
    meta = dict(sidecar_for(cfg, ds, factory, min(cfg.train_size, n)), train_backend=trainer)
    old = read_json(side_path, "index sidecar") if side_path.is_file() else {}
    if (old or out.is_file()) and (dist is None or dist.is_main) and other_configuration(
            out, "index", _identity(old), _identity(meta), cfg.overwrite):
        partial.unlink(missing_ok=True)       # an index of the new configuration starts
        old = {}
    kept = old.get("layout") == "shards"           # --keep-shards: no merged file
    if (out.is_file() or kept) and old.get("complete") and _same(old, meta):
        print(f"{out}: this index is already built")
        return old
    try:
        index = faiss.index_factory(d, factory, faiss_metric(cfg.metric))
    except RuntimeError as exc:
        raise UserError(f"FAISS rejects --index-factory {factory!r} for d={d} "
                        f"({str(exc).strip().splitlines()[-1][:160]})")
    if dist is None or dist.is_main:
        chosen = "" if cfg.index_factory or cfg.ncentroids or cfg.code_size else " (chosen from N and D)"
        print(f"index {factory} ({cfg.metric}) over {n:,} x {d} {cfg.knn_keytype} keys{chosen}"
              + (f" in {cfg.shards} shards" if cfg.shards > 1 else ""))
    t0 = time.perf_counter()

    def trained():
        if not index.is_trained:
            rows, xt = training_sample(keys, cfg.train_size, cfg.seed)
            print(f"training on {len(xt):,} keys with {trainer}")
            if trainer.startswith("torch"):
                train_ivf(index, xt, trainer[len("torch ("):-1], seed=cfg.seed)
            else:
                train_index(index, xt, trainer == "faiss-gpu")
        return index

    if cfg.shards > 1:
        built = build_sharded(cfg, ds, out, meta, trained, dist, merge=not cfg.keep_shards)
        if built is None:                       # a torchrun rank other than 0: done
            return dict(meta, rank_only=True)
        index, timings, leftovers = built
        if cfg.keep_shards:
            return _finish_shards(cfg, ds, out, side_path, meta, timings, t0, leftovers)
        meta["shards"] = cfg.shards
        return _finish(index, out, side_path, meta, timings, t0, leftovers)
    start = 0
    if partial.is_file() and old and _same(old, meta) and not old.get("complete"):
        index = faiss.read_index(str(partial))
        # the commit point is the partial index itself: it holds the rows added so far
        # (the sidecar's rows_added, written after it, may lag behind by one chunk)
        start = int(index.ntotal)
        print(f"resuming {out} at row {start:,} of {n:,}")
    if cfg.starting_point is not None and cfg.starting_point != start:
        raise UserError(f"--starting_point {cfg.starting_point} but the saved partial index "
                        f"holds {start:,} rows")
    timings = {}
    if start == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        trained()
        timings["train_s"] = time.perf_counter() - t0
        _save_partial(index, partial, side_path, meta, 0)  # never train twice
    t1 = time.perf_counter()
    last_save = time.perf_counter()
    step = add_step(cfg.num_keys_to_add_at_a_time)    # every add on a FAISS block boundary
    bar = tqdm(total=n, initial=start, unit="key", desc="add", disable=True if cfg.quiet else None)
    for s in range(start, n, step):
        e = min(n, s + step)
        index.add(finite_rows(keys[s:e], s))
        bar.update(e - s)
        if e < n and time.perf_counter() - last_save >= cfg.save_interval_seconds:
            _save_partial(index, partial, side_path, meta, e)
            last_save = time.perf_counter()
    bar.close()
    timings["add_s"] = time.perf_counter() - t1
    return _finish(index, out, side_path, meta, timings, t0, [partial])


def verify_index(index, n: int, path) -> None:
    """Before a build reports success: the index holds the datastore's N rows, and an IVF
    index's inverted lists hold the ids 0..N-1 once each."""
    faiss = faiss_module()
    if index.ntotal != n:
        raise UserError(f"{path}: the built index holds {index.ntotal:,} keys, the datastore "
                        f"{n:,}; remove {path} and its .partial and rebuild")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return               # flat codes: ids are positions
    seen = np.zeros(n, dtype=np.uint16)
    inv = ivf.invlists
    for lno in range(ivf.nlist):
        size = inv.list_size(lno)
        if size:
            ids = faiss.rev_swig_ptr(inv.get_ids(lno), size)
            if ids.min() < 0 or ids.max() >= n:
                raise UserError(f"{path}: inverted list {lno} holds an id outside 0..{n - 1:,}")
            np.add.at(seen, ids, 1)
    if (seen != 1).any():
        bad = int(np.argmax(seen != 1))
        raise UserError(f"{path}: entry {bad:,} is held {int(seen[bad])} times by the index's "
                        "lists; remove it and rebuild")


def _finish(index, out: Path, side_path: Path, meta: dict, timings: dict, t0: float,
            leftovers: list[Path]) -> dict:
    """Verify the index, write it and its complete sidecar, then remove the intermediate
    files."""
    faiss = faiss_module()
    verify_index(index, int(meta["datastore_size"]), out)
    tmp = temp_path(out)
    faiss.write_index(index, str(tmp))
    # an index file is never without the sidecar naming its configuration (unfinished
    # until the complete one replaces it)
    write_json_atomic(side_path, dict(meta, complete=False))
    os.replace(tmp, out)
    meta.update(rows_added=int(index.ntotal), complete=True, ntotal=int(index.ntotal), **timings)
    write_json_atomic(side_path, meta)
    for path in leftovers:
        path.unlink(missing_ok=True)
    print(f"wrote {out}: {index.ntotal:,} keys, {out.stat().st_size / 2**20:,.1f} MiB, "
          f"{time.perf_counter() - t0:.1f}s")
    return meta


def _finish_shards(cfg: BuildIndexConfig, ds: Datastore, out: Path, side_path: Path, meta: dict,
                   timings: dict, t0: float, leftovers: list[Path]) -> dict:
    """--keep-shards: verify each shard (its key range, its ids), then the complete
    sidecar listing them is the commit point (no merged index file)."""
    faiss = faiss_module()
    shards = []
    for s, (a, b) in enumerate(shard_ranges(ds.size, cfg.shards)):
        path = shard_path(out, s, cfg.shards)
        verify_index(faiss.read_index(str(path)), b - a, path)
        shards.append(dict(file=path.name, start=a, end=b))
    out.unlink(missing_ok=True)            # a merged index of an earlier build: not this one
    meta.update(rows_added=ds.size, complete=True, ntotal=ds.size, shards=shards, **timings)
    write_json_atomic(side_path, meta)
    for path in leftovers:
        path.unlink(missing_ok=True)
    print(f"wrote {side_path}: {cfg.shards} shards of {ds.size:,} keys "
          f"({sum(shard_path(out, s, cfg.shards).stat().st_size for s in range(cfg.shards)) / 2**20:,.1f} "
          f"MiB), {time.perf_counter() - t0:.1f}s")
    return meta


def _save_partial(index, partial: Path, side_path: Path, meta: dict, rows: int) -> None:
    faiss = faiss_module()
    tmp = temp_path(partial)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, partial)
    write_json_atomic(side_path, dict(meta, rows_added=rows, complete=False))


def _build_files(cfg: BuildIndexConfig) -> list[Path]:
    """The files a build writes beside its index, as they exist now."""
    out = cfg.index_path()
    return [p for p in out.parent.glob(glob.escape(out.name) + ".*")
            if p.name[len(out.name):] in (".partial", ".json", ".trained", ".trained.json")
            or p.name[len(out.name):].startswith(".shard")]


def main(cfg: BuildIndexConfig) -> dict:
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun: the ranks add the shards
        if cfg.shards < 2:
            raise UserError("under torchrun build-index adds shards in the ranks: give "
                            "--shards S (S >= the number of ranks)")
        dist = setup_distributed(cpu=True)
    main_rank = dist is None or dist.is_main
    lock = output_lock(cfg.index_path(), "file", "index") if main_rank \
        else contextlib.nullcontext()
    before = set(_build_files(cfg))
    try:
        with lock:
            return build_index(cfg, dist)
    except UserError:
        # refused for its data: what this run began goes (a resume would meet the same
        # data); a killed run keeps it, to resume
        if main_rank:
            for path in set(_build_files(cfg)) - before:
                path.unlink(missing_ok=True)
        raise
    finally:
        if dist is not None:
            dist.close()
