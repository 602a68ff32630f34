"""`knnlm plan`: the disk, memory and time a datastore and its index will need, before
anything is built.

Inputs: the datastore's size and dimension (``--dstore-size``, ``--dimension``; or an
existing ``--dstore-dir``), the keytypes, the index factory (default: the one build-index
would choose), nprobe and k. Sizes are exact byte counts of knnlm's formats; times are
projected from per-key costs measured by ``benchmarks/scale.py`` (one CPU process; pass
its JSON with ``--costs`` to use this machine's, else the costs measured on a 2-core
machine are used) and this machine's GEMM rate.

    knnlm plan --dstore-size 103225485 --dimension 1024 --index-factory IVF4096,PQ64
    knnlm plan --dstore-dir runs/demo/dstore --probe 8

With ``--nodes M`` and ``--gpus-per-node G`` (or ``--ranks-per-node R`` of CPU ranks) it
also lays the index out in shards for a torchrun search (``build-index --shards S
--keep-shards``): how much of the index each rank holds against its share of a node's RAM
(``--ram-per-node``) or its GPU's memory (``--gpu-memory``), the fewest nodes that hold it,
and the predicted time per query: a rank's search of its shards, the merge of the W top-k
lists (measured here; each rank merges 1/W of the queries) and their trip through the
shared filesystem (``--fs-gbps``).

    knnlm plan --dstore-size 1000000000 --dimension 4096 --index-factory IVF65536,PQ64 \\
        --nodes 8 --gpus-per-node 8
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..util import UserError, flag
from .datastore import Datastore
from .index import auto_factory

GIB = 2 ** 30
# per-key costs measured by benchmarks/scale.py at 256 dims, IVF1024,PQ32, 2 CPU cores
# (10M keys: add 211.4 s; search 5.4 / 47.7 ms per query at 1M / 10M, nprobe 32, k 1024;
# training 29.2 s on 200k keys)
MEASURED = dict(dim=256, nlist=1024, m=32, add_s_per_key=211.4 / 10_000_000,
                search_ms_fixed=0.7, search_ms_per_probed_code=(47.7 - 5.4) / (312_500 - 31_250),
                train_s=29.2, train_keys=200_000)
KMEANS_ITERS = (10, 25)       # FAISS's coarse and PQ k-means rounds
# fast-scan search, measured by benchmarks/efficient.py's indexes on one thread (1.74M x 128
# keys, k 1024): a fixed cost per query (lookup tables, the k-best reservoir) and a cost per
# probed code of 32 bytes; a refine stage reads k x k_factor random keys (~90 ns each)
FASTSCAN = dict(search_ms_fixed=0.065, search_ms_per_probed_code=4.5e-6, code_bytes=32,
                refine_ms_per_candidate=9e-5)


@dataclass
class PlanConfig:
    dstore_size: int | None = flag(None, "datastore entries N (or --dstore-dir)")
    dimension: int | None = flag(None, "key dimension D (or --dstore-dir)")
    dstore_dir: str | None = flag(None, "an existing datastore: N and D from its sidecar")
    keytypes: int = flag(1, "keytypes stored (att, ffn, ...: one key file each)")
    dstore_fp32: bool = flag(False, "fp32 keys (default fp16)")
    index_factory: str | None = flag(None, "FAISS factory (default: build-index's choice)")
    train_size: int = flag(1_000_000, "keys sampled to train the index")
    probe: int = flag(32, "IVF lists probed per query")
    k: int = flag(1024, "neighbours per query")
    queries: int = flag(250_000, "queries of the split (exact search cost)")
    costs: str | None = flag(None, "benchmarks/scale.py JSON with this machine's per-key costs")
    nodes: int = flag(1, "nodes sharing the search (torchrun --nnodes): plan the shards")
    gpus_per_node: int = flag(0, "GPUs per node: a rank per GPU, its shards in GPU memory "
                              "(torch backend); 0: CPU ranks")
    ranks_per_node: int = flag(1, "CPU ranks per node (with --gpus-per-node 0)")
    ram_per_node: float | None = flag(None, "GiB of RAM per node (default: this machine's)")
    gpu_memory: float = flag(80.0, "GiB of memory per GPU")
    gpu_gbps: float = flag(2000.0, "GB/s a GPU reads its probed codes at (its memory "
                           "bandwidth: the GPU time is a bound, not a measurement)")
    fs_gbps: float = flag(1.0, "GB/s of the shared filesystem the ranks' top-k lists pass "
                          "through")

    def __post_init__(self):
        if self.dstore_dir is None and (self.dstore_size is None or self.dimension is None):
            raise UserError("give --dstore-size and --dimension, or --dstore-dir")
        for name in ("keytypes", "train_size", "probe", "k", "queries", "dstore_size",
                     "dimension", "nodes", "ranks_per_node"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        if self.gpus_per_node < 0:
            raise UserError("--gpus-per-node must be >= 0")
        for name in ("ram_per_node", "gpu_memory", "gpu_gbps", "fs_gbps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")

    @property
    def sharded(self) -> bool:
        return self.nodes > 1 or self.gpus_per_node > 0 or self.ranks_per_node > 1


def parse_factory(factory: str, d: int) -> tuple[int, int, bool, int]:
    """(nlist, code bytes per key, fast-scan, refine bytes per key) of 'IVF<n>,PQ<m>',
    'IVF<n>,PQ<m>x4fs', 'IVF<n>,Flat' or 'Flat' (nlist 0), optionally followed by a refine
    stage ',RFlat' / ',Refine(Flat)' (4·D bytes) or ',Refine(SQfp16)' (2·D bytes)."""
    m = re.fullmatch(r"(?:OPQ\d+(?:_\d+)?,)?(?:IVF(\d+),)?(PQ(\d+)(x8|x4fsr?)?|Flat)"
                     r"(?:,(RFlat|Refine\((?:Flat|SQfp16)\)))?", factory)
    if not m:
        raise UserError(f"plan reads IVF<n>,PQ<m>[x4fs], IVF<n>,Flat and Flat factories, "
                        f"optionally with ,RFlat or ,Refine(SQfp16), not {factory!r}")
    nlist = int(m.group(1) or 0)
    fast = bool(m.group(4)) and m.group(4).startswith("x4")
    code = (int(m.group(3)) // (2 if fast else 1)) if m.group(3) else 4 * d
    refine = {None: 0, "RFlat": 4 * d, "Refine(Flat)": 4 * d, "Refine(SQfp16)": 2 * d}[m.group(5)]
    return nlist, code, fast, refine


def gemm_gflops() -> float:
    """This machine's float32 GEMM rate (a short measurement)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024 * 1024 * 4096 / (time.perf_counter() - t0) / 1e9


def search_ms(n: int, d: int, factory: str, cfg: PlanConfig, costs: dict,
              gflops: float) -> float:
    """Projected ms per query of one CPU process searching an IVF index of ``n`` keys."""
    nlist, code, fast, refine = parse_factory(factory, d)
    probed = cfg.probe * n / nlist
    coarse = 2e3 * nlist * d / (gflops * 1e9)
    if fast:
        f = FASTSCAN
        ms = (f["search_ms_fixed"] * cfg.k / 1024 + coarse
              + f["search_ms_per_probed_code"] * probed * code / f["code_bytes"])
    else:
        ms = (costs["search_ms_fixed"] + coarse
              + costs["search_ms_per_probed_code"] * probed * code / costs["m"])
    if refine:
        ms += FASTSCAN["refine_ms_per_candidate"] * cfg.k
    return ms


def plan(n: int, d: int, factory: str, cfg: PlanConfig, costs: dict, gflops: float) -> dict:
    nlist, code, fast, refine = parse_factory(factory, d)
    key_bytes = 4 if cfg.dstore_fp32 else 2
    out = dict(keys=n, dim=d, factory=factory,
               keys_gib=n * d * key_bytes * cfg.keytypes / GIB,
               vals_pos_gib=n * (4 + (4 if n < 2 ** 31 else 8)) / GIB,
               index_gib=(n * (code + refine + (8 if nlist else 0)) + nlist * d * 4
                          + ((16 if fast else 256) * d * 4 if code < 4 * d else 0)) / GIB)
    out["build_ram_gib"] = min(cfg.train_size, n) * d * 4 / GIB + out["index_gib"]
    ref = costs["dim"] * (costs["nlist"] + 256)
    # adding a key: its coarse assignment (nlist x d) and PQ encoding (256 x d)
    out["add_hours"] = costs["add_s_per_key"] * n * (max(nlist, 1) + 256) * d / ref / 3600
    train = min(cfg.train_size, n)
    work = KMEANS_ITERS[0] * train * nlist * d + KMEANS_ITERS[1] * min(train, 65536) * 256 * d
    ref_work = (KMEANS_ITERS[0] * costs["train_keys"] * costs["nlist"] * costs["dim"]
                + KMEANS_ITERS[1] * 65536 * 256 * costs["dim"])
    out["train_hours"] = costs["train_s"] * work / ref_work / 3600
    if nlist:
        out["search_ms_per_query"] = search_ms(n, d, factory, cfg, costs, gflops)
    # exact search: every query against every key, 2 flops per multiply-add
    out["exact_search_hours"] = 2 * cfg.queries * n * d / (gflops * 1e9) / 3600
    out["gemm_gflops"] = gflops
    return out


RESERVE = 0.8   # of a rank's memory for its shards; the rest: the LM, values, buffers
LIST_BYTES = 12  # a neighbour in a rank's top-k list: float32 distance + int64 id


def ram_gib() -> float:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def merge_ms(w: int, k: int) -> float:
    """Measured here: ms per query to merge ``w`` ranks' top-k lists (:func:`merge_topk`)."""
    from .exact import merge_topk
    q = max(16, min(1024, 2 ** 24 // (w * k)))
    rng = np.random.default_rng(0)
    parts = [(np.sort(rng.random((q, k), dtype=np.float32), 1),
              rng.integers(0, 2 ** 40, (q, k))) for _ in range(w)]
    merge_topk(parts, k, "l2")
    t0 = time.perf_counter()
    for _ in range(3):
        merge_topk(parts, k, "l2")
    return (time.perf_counter() - t0) / 3 / q * 1e3


def layout(n: int, d: int, factory: str, cfg: PlanConfig, costs: dict, gflops: float) -> dict:
    """The shards of a torchrun search over ``cfg.nodes`` nodes: one per rank (rank r
    loads shards r, r + W, ...), what a rank holds against its memory, and the time per
    query (a rank's search of its keys, its share of merging the W lists, the lists' trip
    through the shared filesystem)."""
    nlist, code, fast, refine = parse_factory(factory, d)
    gpu = cfg.gpus_per_node > 0
    if gpu and (fast or refine):
        raise UserError(f"GPU ranks search with the torch backend, which reads IVF-PQ "
                        f"(8-bit), IVF-Flat and Flat indexes, not {factory}: plan with "
                        f"--index-factory IVF{nlist},PQ{code} (the same bytes a key)")
    per_node = cfg.gpus_per_node or cfg.ranks_per_node
    w = cfg.nodes * per_node
    per_key = code + refine + (8 if nlist else 0)
    shared = nlist * d * 4 + ((16 if fast else 256) * d * 4 if code < 4 * d else 0)
    n_rank = -(-n // w)
    memory = cfg.gpu_memory if gpu else (cfg.ram_per_node or ram_gib()) / per_node
    budget = memory * GIB * RESERVE
    out = dict(nodes=cfg.nodes, ranks=w, ranks_per_node=per_node, shards=w,
               device="gpu" if gpu else "cpu", rank_gib=(n_rank * per_key + shared) / GIB,
               rank_budget_gib=budget / GIB, rank_memory_gib=memory)
    out["fits"] = out["rank_gib"] <= out["rank_budget_gib"]
    need = -(-n * per_key // max(int(budget - shared), 1))
    out["min_nodes"] = max(1, -(-need // per_node))
    if gpu:     # a bound: the probed codes read once at the GPU's memory bandwidth
        scanned = (cfg.probe * n_rank / nlist if nlist else n_rank) * code
        out["rank_ms"] = scanned / (cfg.gpu_gbps * 1e9) * 1e3
    elif nlist:  # the node's cores shared by its ranks (the costs: one process a machine)
        out["rank_ms"] = search_ms(n_rank, d, factory, cfg, costs, gflops) * per_node
    else:
        out["rank_ms"] = 2 * n_rank * d / (gflops * 1e9) * 1e3 * per_node
    # the ranks merge a slice of the queries each (W lists a query, W slices at once); the
    # filesystem carries every rank's lists, read once, and the merged slices, written and
    # read once (its bandwidth taken as shared by all ranks)
    out["merge_ms"] = merge_ms(w, cfg.k) / w if w > 1 else 0.0
    out["transfer_ms"] = (w + 2) * cfg.k * LIST_BYTES / (cfg.fs_gbps * 1e9) * 1e3 if w > 1 else 0.0
    out["search_ms_per_query"] = out["rank_ms"] + out["merge_ms"] + out["transfer_ms"]
    return out


def print_layout(lay: dict, factory: str, cfg: PlanConfig, single_ms: float | None) -> None:
    w, per_node = lay["ranks"], lay["ranks_per_node"]
    unit = "GPU" if lay["device"] == "gpu" else "CPU rank"
    print(f"shards: {cfg.nodes} node(s) x {per_node} {unit}(s) = {w} rank(s): build-index "
          f"--index-factory {factory} --shards {w} --keep-shards (rank r loads shard r; any "
          f"multiple of {w} shards also spreads evenly)")
    where = f"{lay['rank_memory_gib']:,.1f} GiB GPU memory" if lay["device"] == "gpu" else         f"{lay['rank_memory_gib']:,.1f} GiB, its share of the node's RAM"
    verdict = "fits" if lay["fits"] else (
        f"does NOT fit: {lay['min_nodes']:,} node(s) of {per_node} hold it"
        + ("" if lay["device"] == "gpu" else ", or --index-mmap pages the codes from disk"))
    print(f"each rank holds {lay['rank_gib']:,.2f} GiB of index (its keys' codes and ids and "
          f"its copy of the quantizer) of {lay['rank_budget_gib']:,.1f} usable "
          f"({RESERVE:.0%} of {where}): {verdict}")
    how = (f"bound: its probed codes read at {cfg.gpu_gbps:g} GB/s" if lay["device"] == "gpu"
           else f"{per_node} rank(s) sharing a node's cores")
    print(f"search ~{lay['search_ms_per_query']:.3g} ms/query at nprobe {cfg.probe}, k {cfg.k}: "
          f"a rank's shards {lay['rank_ms']:.3g} ({how}) + merging {w} lists, a slice of the "
          f"queries a rank, {lay['merge_ms']:.3g} (measured here) + the lists through the "
          f"shared filesystem "
          f"{lay['transfer_ms']:.3g} ({cfg.fs_gbps:g} GB/s)"
          + (f"; one CPU process, whole index: ~{single_ms:,.1f}" if single_ms else ""))
    gpu = " --knn-backend torch --knnlm-gpu" if lay["device"] == "gpu" else ""
    print(f"run: torchrun --nnodes {cfg.nodes} --nproc_per_node {per_node} --rdzv-backend c10d "
          f"--rdzv-endpoint HOST:29500 -m knnlm eval-lm DATA_BIN --path CKPT --knnlm "
          f"--dstore-filename DSTORE --indexfile INDEX --save-retrieval /shared/cache{gpu}")


def main(cfg: PlanConfig) -> dict:
    n, d = cfg.dstore_size, cfg.dimension
    if cfg.dstore_dir:
        ds = Datastore(cfg.dstore_dir)
        n, d = ds.size, ds.dim
    costs = dict(MEASURED)
    if cfg.costs:
        try:
            measured = json.loads(Path(cfg.costs).read_text())
            costs.update(measured["per_key"], dim=measured["dim"],
                         train_s=measured["runs"][str(measured["per_key_at"])]["index"].get(
                             "train_s", costs["train_s"]))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--costs {cfg.costs} is not a benchmarks/scale.py result ({exc})")
    factory = cfg.index_factory or auto_factory(n, d)
    out = plan(n, d, factory, cfg, costs, gemm_gflops())
    print(f"datastore {n:,} x {d} ({cfg.keytypes} keytype(s), "
          f"{'fp32' if cfg.dstore_fp32 else 'fp16'}): keys {out['keys_gib']:,.1f} GiB + values "
          f"and positions {out['vals_pos_gib']:,.1f} GiB on disk")
    print(f"index {factory}: {out['index_gib']:,.2f} GiB (in RAM when searched; --index-mmap "
          f"maps it); building needs ~{out['build_ram_gib']:,.1f} GiB of RAM")
    print(f"one CPU process: train ~{out['train_hours']:,.2f} h, add ~{out['add_hours']:,.2f} h "
          "(build-index --shards S --workers W, or torchrun, divides the adding)")
    if "search_ms_per_query" in out:
        print(f"search ~{out['search_ms_per_query']:,.1f} ms/query at nprobe {cfg.probe}, k {cfg.k}")
    print(f"exact search of {cfg.queries:,} queries: ~{out['exact_search_hours']:,.2f} h at this "
          f"machine's {out['gemm_gflops']:,.0f} GFLOP/s (one pass over the keys)")
    if cfg.sharded:
        out["layout"] = layout(n, d, factory, cfg, costs, out["gemm_gflops"])
        print_layout(out["layout"], factory, cfg, out.get("search_ms_per_query"))
    return out
