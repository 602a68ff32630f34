"""A built index read back for searching (:func:`load_index`: checked against its
datastore, nprobe and k_factor set) and what kind of index it is (fast-scan, a refine
stage, whether its distances are the keys' exact ones).

    index, meta = load_index("runs/demo/dstore/index_att_l2.faiss", ds, "att", "l2", nprobe=8)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import read_json
from ..util import UserError
from .datastore import Datastore, normalize_keytype
from .index import INDEX_FORMAT, faiss_module


def default_index_path(dstore_dir: str | Path, keytype: str, metric: str) -> Path:
    """Where build-index writes a datastore's index of ``keytype`` keys by default."""
    return Path(dstore_dir) / f"index_{keytype.replace(':', '')}_{metric}.faiss"


def load_index(path: str | Path, ds: Datastore, keytype: str, metric: str | None = None,
               nprobe: int | None = None, mmap: bool = False, k_factor: float | None = None,
               part: tuple[int, int] = (0, 1)):
    """Read an index, check it was built on ``ds``'s ``keytype`` keys, set nprobe.
    ``mmap``: map its codes from the file (FAISS's mmap I/O) instead of reading them into
    RAM, so an index larger than the memory can be searched (pages come in as probed).
    ``k_factor``: a refine index's candidates per neighbour (its base index is searched
    for k·k_factor, re-ranked by the refine codes). ``part`` (r, w): of an index kept in
    shards, only shards r, r + w, ... (a torchrun rank's)."""
    faiss = faiss_module()
    path = Path(path)
    meta = read_json(Path(str(path) + ".json"), "index sidecar")
    if meta.get("format") != INDEX_FORMAT or not meta.get("complete"):
        raise UserError(f"{path} is not a complete knnlm index (see its .json)")
    if meta["datastore_fingerprint"] != ds.fingerprint:
        raise UserError(f"{path} was built on another datastore than {ds.path}")
    if meta["keytype"] != normalize_keytype(keytype):
        raise UserError(f"{path} indexes {meta['keytype']} keys, not {keytype}")
    if metric is not None and meta["metric"] != metric:
        raise UserError(f"{path} uses metric {meta['metric']}, not {metric}")
    if meta.get("layout") == "shards":
        return _load_shards(path, meta, ds, nprobe, mmap, k_factor, part), meta
    if not path.is_file():
        raise UserError(f"index not found: {path}")
    try:
        # IVF indexes map their inverted lists; flat ones their code array
        flags = 0 if not mmap else faiss.IO_FLAG_MMAP if "IVF" in meta["factory"] \
            else faiss.IO_FLAG_MMAP_IFC
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise UserError(f"cannot read {path} ({str(exc).strip().splitlines()[-1][:160]})")
    if index.ntotal != ds.size:
        raise UserError(f"{path} holds {index.ntotal:,} keys, the datastore {ds.size:,}")
    _restore_fine_quantizer(index)
    set_nprobe(index, nprobe or meta["nprobe"])
    if k_factor is not None:
        refine = refine_stage(index)
        if refine is None:
            raise UserError(f"--k-factor re-ranks candidates of a refine index; {path} "
                            f"({meta['factory']}) has no refine stage")
        faiss.downcast_index(index).k_factor = float(k_factor)
    return index, meta


class ShardedIndex:
    """The shards of an index (``build-index --shards S --keep-shards``: one trained
    quantizer, contiguous key ranges) searched one after another, their top-k merged
    (:func:`knnlm.knn.exact.merge_topk`) with ids as datastore rows: the neighbours of the
    merged index, ties aside."""

    def __init__(self, shards: list[tuple], metric: str, of: int | None = None):
        self.shards, self.metric = shards, metric       # [(faiss index, first row)]
        self.ntotal = sum(int(index.ntotal) for index, _ in shards)
        self.of = of if of is not None else len(shards)   # the shards of the whole index

    def search(self, q, k: int):
        from .exact import merge_topk
        if not self.shards:            # a rank holding no shard: nothing found
            empty = np.full((len(q), k), np.inf if self.metric == "l2" else -np.inf, np.float32)
            return empty, np.full((len(q), k), -1, np.int64)
        parts = []
        for index, first in self.shards:
            D, I = index.search(q, k)
            parts.append((D, np.where(I >= 0, I + first, -1)))
        return merge_topk(parts, k, self.metric)

    def search_every(self, queries, k: int, project=lambda q: q, state_dir=None,
                     identity: dict | None = None, block: int = 4096,
                     quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of every query (a split's, in blocks of ``block``; ``project`` maps
        them into the key space). With ``state_dir`` the results so far are kept there
        (``shards_{D,I}.npy``, committed by ``shards_state.json`` after each block), and a
        rerun with the same ``identity`` and queries continues after the last block."""
        from tqdm import tqdm
        from ..io import open_token_memmap, write_json_atomic
        from .exact import queries_fingerprint
        n = len(queries)
        ident = json.loads(json.dumps(dict(identity or {}, k=k, block=block,
                                           queries=queries_fingerprint(queries))))
        done, state = 0, None
        if state_dir is not None:
            state = Path(state_dir) / "shards_state.json"
            old = read_json(state, "shard search progress") if state.is_file() else {}
            done = int(old.get("done", 0)) if old.get("identity") == ident else 0
            if done:
                print(f"resuming the search of the shards at query {done:,} of {n:,}")
            D = open_token_memmap(Path(state_dir) / "shards_D.npy", (n, k), np.float32, done > 0)
            I = open_token_memmap(Path(state_dir) / "shards_I.npy", (n, k), np.int64, done > 0)
        else:
            D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        bar = tqdm(total=n, initial=done, unit="query", desc=f"search {len(self.shards)} of "
                   f"{self.of} shards", disable=True if quiet else None)
        for s in range(done, n, block):
            q = np.ascontiguousarray(project(np.asarray(queries[s:s + block], np.float32)))
            D[s:s + len(q)], I[s:s + len(q)] = self.search(q, k)
            if state is not None:
                D.flush()
                I.flush()
                write_json_atomic(state, dict(identity=ident, done=s + len(q)))
            bar.update(len(q))
        bar.close()
        return np.asarray(D), np.asarray(I)


def _load_shards(path: Path, meta: dict, ds: Datastore, nprobe, mmap: bool, k_factor,
                 part: tuple[int, int] = (0, 1)):
    """A --keep-shards index: each shard of ``part`` read (checked against its range)."""
    faiss = faiss_module()
    flags = 0 if not mmap else faiss.IO_FLAG_MMAP if "IVF" in meta["factory"] \
        else faiss.IO_FLAG_MMAP_IFC
    shards, row = [], 0
    r, w = part
    for s, entry in enumerate(meta["shards"]):
        file = path.parent / entry["file"]
        if entry["start"] != row:
            raise UserError(f"{path}: shard {file.name} is out of order")
        row = entry["end"]
        if s % w != r:
            continue                   # another rank's: this node need not have it
        if not file.is_file():
            raise UserError(f"{path}: shard {file.name} is missing"
                            + (f" (rank {r} of {w} searches it)" if w > 1 else ""))
        try:
            index = faiss.read_index(str(file), flags)
        except RuntimeError as exc:
            raise UserError(f"cannot read {file} ({str(exc).strip().splitlines()[-1][:160]})")
        if index.ntotal != entry["end"] - entry["start"]:
            raise UserError(f"{file} holds {index.ntotal:,} keys, its range "
                            f"{entry['end'] - entry['start']:,}")
        _restore_fine_quantizer(index)
        set_nprobe(index, nprobe or meta["nprobe"])
        if k_factor is not None:
            if refine_stage(index) is None:
                raise UserError(f"--k-factor re-ranks candidates of a refine index; {path} "
                                f"({meta['factory']}) has no refine stage")
            faiss.downcast_index(index).k_factor = float(k_factor)
        shards.append((index, entry["start"]))
    if row != ds.size:
        raise UserError(f"{path}: its shards hold {row:,} keys, the datastore {ds.size:,}")
    return ShardedIndex(shards, meta["metric"], of=len(meta["shards"]))


def _one(index):
    """A shard of a sharded index (every shard has the structure of the others)."""
    return index.shards[0][0] if isinstance(index, ShardedIndex) and index.shards else index


def _restore_fine_quantizer(index) -> None:
    """FAISS 1.15 reads an IVF fast-scan index without the pointer to its PQ that decoding
    uses, so ``reconstruct`` would crash (RetoMaton scores pointers from reconstructions);
    point it back at the index's own PQ."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(inner, faiss.IndexIVFPQFastScan) and inner.fine_quantizer is None:
        inner.fine_quantizer = inner.pq


def refine_stage(index):
    """The exact re-ranking stage of an index (FAISS ``IndexRefine``: factory suffix
    ``RFlat`` or ``Refine(...)``), or None."""
    faiss = faiss_module()
    outer = faiss.downcast_index(_one(index))
    return faiss.downcast_index(outer.refine_index) if isinstance(outer, faiss.IndexRefine) \
        else None


def returns_exact_distances(index, key_dtype: str) -> bool:
    """Whether the distances ``index`` returns are the exact ones of the stored keys: a
    refine stage that holds them losslessly (flat float32 codes, or float16 codes of
    float16 keys). Recomputing them from the keys would give the same numbers (to float
    summation order), so the score modes that recompute take them as they are."""
    faiss = faiss_module()
    refine = refine_stage(index)
    if isinstance(refine, faiss.IndexFlat):
        return True
    return isinstance(refine, faiss.IndexScalarQuantizer) and key_dtype == "float16" and \
        refine.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def is_fast_scan(index) -> bool:
    """Whether the index scans 4-bit fast-scan PQ codes (``PQ<M>x4fs``)."""
    faiss = faiss_module()
    index = _one(index)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    return isinstance(inner, faiss.IndexIVFFastScan) or \
        isinstance(faiss.downcast_index(index), faiss.IndexFastScan)


def set_nprobe(index, nprobe: int) -> None:
    faiss = faiss_module()
    if isinstance(index, ShardedIndex):
        for shard, _ in index.shards:
            set_nprobe(shard, nprobe)
        return
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index: nothing to probe
