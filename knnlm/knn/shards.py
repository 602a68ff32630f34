"""Sharded index builds (`knnlm build-index --shards S --workers W`).

The quantizers are trained once (``<index>.trained``); the datastore rows are cut into S
contiguous shards, each added to a copy of the trained index in its own process (W at a
time, `concurrent.futures` with spawned workers, FAISS threads split between them) and
written as ``<index>.shard<s>of<S>`` with a JSON marker; the shards are then merged in
order (FAISS ``merge_from``, ids offset by the rows before each shard). Every inverted
list holds its ids in datastore order, as in an unsharded build. FAISS assigns the keys
of one ``add`` with GEMMs over blocks of 4,096 rows from its first, and a key whose two
nearest centroids are equally far to float32 rounding can go either way depending on
where in its block it sits, so every ``add`` — sharded or not — starts at a multiple of
ADD_BLOCK rows (:func:`shard_ranges`, :func:`add_step`): with the same FAISS threads per
add, the merged index is the unsharded one, byte for byte. Other thread counts split the
GEMMs differently, and such a key (1 in 129k in the GPU check's rehearsal) may land in
the other list. A killed build keeps its trained index and finished shards and redoes
only the unfinished ones.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


from ..guard import temp_path
from ..io import read_json, write_json_atomic
from ..util import UserError


ADD_BLOCK = 4096   # FAISS's block of keys assigned at once (distance_compute_blas_query_bs)


def add_step(chunk: int) -> int:
    """Keys per ``index.add``: ``--num_keys_to_add_at_a_time`` rounded down to a multiple of
    ADD_BLOCK (at least one block), so that every add starts on a block boundary."""
    return max(ADD_BLOCK, chunk // ADD_BLOCK * ADD_BLOCK)


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """S contiguous [start, end) row ranges covering range(n), starting on multiples of
    ADD_BLOCK, as equal as that allows (a datastore of fewer than S blocks leaves some
    shards empty)."""
    bounds = [min(n, round(i * n / shards / ADD_BLOCK) * ADD_BLOCK) for i in range(shards)] + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def shard_path(out: Path, s: int, shards: int) -> Path:
    return Path(f"{out}.shard{s}of{shards}")


def _identity(meta: dict) -> dict:
    keys = ("factory", "metric", "keytype", "datastore_fingerprint", "train_size", "seed")
    return {k: meta[k] for k in keys}


def _done(path: Path, ident: dict, start: int, end: int) -> bool:
    side = Path(str(path) + ".json")
    if not (path.is_file() and side.is_file()):
        return False
    m = read_json(side, "shard marker")
    return m.get("identity") == ident and (m.get("start"), m.get("end")) == (start, end)


def add_shard(dstore_dir: str, keytype: str, trained: str, out: str, start: int, end: int,
              chunk: int, threads: int, ident: dict) -> int:
    """Add rows [start, end) to a copy of the trained index and write it (worker process).
    The commit point is the marker written after the shard file: a shard without its
    marker is built again."""
    import faiss
    from .datastore import Datastore, finite_rows
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    keys = Datastore(dstore_dir).keys(keytype)
    index = faiss.read_index(trained)
    step = add_step(chunk)
    for s in range(start, end, step):
        index.add(finite_rows(keys[s:min(end, s + step)], s))
    tmp = str(temp_path(out))
    faiss.write_index(index, tmp)
    os.replace(tmp, out)
    write_json_atomic(out + ".json", dict(identity=ident, start=start, end=end,
                                          ntotal=int(index.ntotal)))
    return int(index.ntotal)


def merge_shards(paths: list[Path], ranges: list[tuple[int, int]]):
    """One index from the shard files, in order; each shard's ids offset by its start."""
    import faiss
    index = None
    for path, (start, end) in zip(paths, ranges):
        if not path.is_file():
            raise UserError(f"shard {path} is missing at merge; rerun build-index to rebuild it")
        part = faiss.read_index(str(path))
        if part.ntotal != end - start:
            raise UserError(f"shard {path} holds {part.ntotal:,} keys, not {end - start:,}; "
                            "remove it and rerun build-index")
        if index is None:
            index = part
            continue
        _merge(index, part, start)
    return index


def _merge(index, part, offset: int) -> None:
    """Append ``part`` to ``index``: IVF lists get ids offset by ``offset``; flat codes are
    appended (their ids are implicit positions), and so are a refine stage's codes."""
    import faiss
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        index.merge_from(part, 0)
        return
    ivf.merge_from(faiss.extract_index_ivf(part), offset)
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):    # IVF-PQ + exact re-ranking codes
        faiss.downcast_index(outer.refine_index).merge_from(
            faiss.downcast_index(faiss.downcast_index(part).refine_index), 0)
    index.ntotal = ivf.ntotal   # a wrapper (pre-transform, refine) counts its inner rows


def _barrier() -> None:
    import torch.distributed as tdist
    tdist.barrier()


def build_sharded(cfg, ds, out: Path, meta: dict, train_fn, dist=None, merge: bool = True
                  ) -> tuple | None:
    """(merged index, timings, files to remove): train once (``train_fn`` returns a trained
    empty index), add the shards in parallel processes, merge. Under torchrun (``dist``)
    rank 0 trains, every rank adds its share of the shards (rank r: shards r, r + W, ...),
    and rank 0 merges (the other ranks return None); the output directory must be on a
    filesystem every rank sees."""
    import faiss
    ident = _identity(meta)
    trained = Path(f"{out}.trained")
    t0 = time.perf_counter()
    marker = Path(str(trained) + ".json")
    main = dist is None or dist.is_main
    if main and not (trained.is_file() and marker.is_file()
                     and read_json(marker, "trained index marker").get("identity") == ident):
        out.parent.mkdir(parents=True, exist_ok=True)
        index = train_fn()
        tmp = str(temp_path(trained))
        faiss.write_index(index, tmp)
        os.replace(tmp, trained)
        write_json_atomic(marker, dict(identity=ident))
    if dist is not None:
        _barrier()
        if not (marker.is_file() and read_json(marker, "trained index marker").get("identity") == ident):
            raise UserError(f"rank {dist.rank} does not see {trained}: under torchrun the index "
                            "must be written to a filesystem every rank mounts")
    timings = dict(train_s=time.perf_counter() - t0)
    ranges = shard_ranges(ds.size, cfg.shards)
    paths = [shard_path(out, s, cfg.shards) for s in range(cfg.shards)]
    done = [int(_done(paths[s], ident, a, b)) for s, (a, b) in enumerate(ranges)]
    if dist is not None:
        # Every rank must split the same list. A rank that looks after another has begun
        # adding would see more shards done and skip one; the all-reduce is collective, so
        # no rank adds before all have looked, and a shard counts as done only where every
        # rank sees it.
        done = [int(n == dist.world_size) for n in dist.all_reduce_sum(done)]
    todo = [s for s in range(cfg.shards) if not done[s]]
    if len(todo) < cfg.shards and main:
        print(f"{cfg.shards - len(todo)} of {cfg.shards} shards already built")
    if dist is not None:
        todo = todo[dist.rank::dist.world_size]
    workers = max(1, min(cfg.workers, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    jobs = [(str(ds.path), cfg.knn_keytype, str(trained), str(paths[s]), *ranges[s],
             cfg.num_keys_to_add_at_a_time, threads, ident) for s in todo]
    t1 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for s, n in zip(todo, pool.map(add_shard, *zip(*jobs))):
                print(f"shard {s + 1}/{cfg.shards}: {n:,} keys")
    else:
        for s, job in zip(todo, jobs):
            print(f"shard {s + 1}/{cfg.shards}: {add_shard(*job):,} keys")
    timings["add_s"] = time.perf_counter() - t1
    if dist is not None:
        _barrier()                              # every shard is on disk
        if not main:
            return None
    if not merge:                               # --keep-shards: the shards are the index
        return None, timings, [trained, marker]
    t2 = time.perf_counter()
    index = merge_shards(paths, ranges)
    timings["merge_s"] = time.perf_counter() - t2
    return index, timings, [trained, marker] + paths + [Path(str(p) + ".json") for p in paths]
