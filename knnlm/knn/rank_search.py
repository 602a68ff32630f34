"""Every torchrun rank searching its shards of an index kept in shards, one query batch at
a time: the commands that search as they go (generate, neighbors, tune, eval-lm without a
retrieval cache; an HF processor in a script) run over an index larger than one machine.

- Rank 0 runs the command. Its :class:`~knnlm.knn.search.KnnSearch` searches through a
  :class:`RankedIndex`: each batch is announced in the rendezvous store, broadcast, searched
  by every rank in its own shards (rank 0 too), and the top-k lists are gathered on rank 0
  and merged (:func:`~knnlm.knn.exact.merge_topk`): the merged index's neighbours, ties
  aside.
- Ranks > 0 load only their shards and answer (:func:`serve`) until rank 0 is done.

Between batches the ranks wait on the store, where rank 0's heartbeat and a posted failure
stop them with one line (:class:`~knnlm.distributed.DistContext`); a batch's collectives
time out after ``--heartbeat-timeout`` seconds.

    torchrun --nproc_per_node 2 -m knnlm generate DATA_BIN --path CKPT --knnlm \\
        --dstore-filename D --indexfile D/kept.faiss --prompt "..."
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from ..distributed import DistContext, RankStopped, env_ranks, setup_distributed
from ..io import read_json
from ..util import UserError
from .datastore import Datastore, normalize_keytype
from .exact import merge_topk
from .index_read import ShardedIndex, default_index_path, load_index
from .torch_index import TorchIndex

STOP, SEARCH = "stop", "search"


def index_path(cfg) -> Path:
    """The index the kNN flags name (``--indexfile``, else the datastore's default)."""
    return Path(cfg.indexfile or default_index_path(
        cfg.dstore_filename, normalize_keytype(cfg.knn_keytype.split(",")[0]),
        cfg.faiss_metric_type))


def kept_in_shards(cfg) -> bool:
    """Whether the kNN flags search an index kept in shards (build-index --keep-shards)."""
    if cfg.exact_search or not cfg.dstore_filename:
        return False
    side = Path(str(index_path(cfg)) + ".json")
    return side.is_file() and read_json(side, "index sidecar").get("layout") == "shards"


@contextlib.contextmanager
def collective(dist: DistContext):
    """A batch's broadcast and gather: a rank lost in them stops this one with a line (the
    lost rank's own reason when it posted one)."""
    try:
        yield
    except RankStopped:
        raise
    except RuntimeError as exc:
        reason = dist.failure()
        who = "rank 0" if not dist.is_main else "a rank"
        raise RankStopped(f"stopped: {reason}" if reason else
                          f"stopped: {who} left the shared search ({_why(exc)})") from None


def _why(exc: Exception) -> str:
    """A collective's error in a few words (gloo's carry source paths and advice)."""
    text = str(exc).strip()
    for known in ("Connection reset by peer", "Connection closed by peer", "Timed out"):
        if known.lower() in text.lower():
            return known.lower()
    return re.sub(r"\[[^\]]*\]\s*", "", text.splitlines()[0] if text else repr(exc))[:160]


class Service:
    """Rank 0's side of the shared search: the batches it announces, in order."""

    def __init__(self, dist: DistContext):
        self.dist, self.sent, self.started = dist, 0, False

    def start(self) -> None:
        """Meet the ranks once they hold their shards (before the first batch)."""
        if not self.started:
            self.dist.wait("serve")
            self.started = True

    def announce(self, op: str) -> None:
        """Post the next batch (``search B D k``) or the stop. The keys stay in the store
        (about 40 bytes a batch): deleting them would cost a round trip each."""
        self.start()
        self.dist.store.set(f"knnlm/op/{self.sent}", op)
        self.sent += 1


_SERVICE: Service | None = None     # on rank 0 while a sharing command runs


def _gather(dist: DistContext, D: np.ndarray, I: np.ndarray) -> list[tuple] | None:
    """Every rank's (D, I) of a batch on rank 0, in one collective: each rank's lists
    packed as the bytes of its float32 distances then its int64 ids."""
    b, k = D.shape
    packed = np.concatenate([np.ascontiguousarray(D, np.float32).view(np.uint8).reshape(b, -1),
                             np.ascontiguousarray(I, np.int64).view(np.uint8).reshape(b, -1)], 1)
    t = torch.from_numpy(packed).to(dist.device)
    if not dist.is_main:
        tdist.gather(t, dst=0)
        return None
    got = [torch.empty_like(t) for _ in range(dist.world_size)]
    tdist.gather(t, got, dst=0)
    out = []
    for g in got:
        a = np.ascontiguousarray(g.cpu().numpy())
        out.append((a[:, :4 * k].copy().view(np.float32), a[:, 4 * k:].copy().view(np.int64)))
    return out


class RankedIndex(ShardedIndex):
    """Rank 0's shards plus every other rank's: a batch searched by all, merged here."""

    def __init__(self, local: ShardedIndex, service: Service):
        super().__init__(local.shards, local.metric, of=local.of)
        self.service = service

    def search(self, q, k: int):
        q = np.ascontiguousarray(q, dtype=np.float32)
        dist = self.service.dist
        self.service.announce(f"{SEARCH} {len(q)} {q.shape[1]} {k}")
        with collective(dist):
            tdist.broadcast(torch.from_numpy(q).to(dist.device), 0)
            parts = _gather(dist, *super().search(q, k))
        return merge_topk(parts, k, self.metric)


def ranked(index, backend: str) -> tuple[object, str]:
    """The index a KnnSearch searches: under a sharing command on rank 0, its shards and
    every other rank's (:class:`RankedIndex`); else ``index`` itself."""
    if _SERVICE is None or not isinstance(index, ShardedIndex):
        return index, backend
    _SERVICE.start()
    return RankedIndex(index, _SERVICE), f"{backend}, searched by {_SERVICE.dist.world_size} ranks"


def serve(local: ShardedIndex, dist: DistContext) -> int:
    """A rank > 0: search rank 0's batches in this rank's shards until it stops (returns
    the number of batches answered)."""
    n = 0
    while (op := dist.wait_key(f"knnlm/op/{n}", 0)) != STOP:
        b, d, k = (int(x) for x in op.split()[1:])
        with collective(dist):
            q = torch.empty((b, d), dtype=torch.float32, device=dist.device)
            tdist.broadcast(q, 0)
            _gather(dist, *local.search(q.cpu().numpy(), k))
        n += 1
    return n


def place_shards(index: ShardedIndex, cfg, device: torch.device) -> tuple[object, str]:
    """The shards this process searches: with FAISS on the CPU, or (``--knn-backend torch``,
    or ``--knnlm-gpu`` without faiss-gpu) the torch backend over each shard's data on this
    process's device (under torchrun with GPUs, the rank's own GPU)."""
    what = f"{len(index.shards)} of {index.of} shards, top-k merged"
    torch_backend = cfg.knn_backend == "torch" or (
        cfg.knnlm_gpu and cfg.knn_backend == "auto" and torch.cuda.is_available())
    if not torch_backend:
        if cfg.knnlm_gpu:
            raise UserError("an index kept in shards is searched by faiss-cpu or by the torch "
                            "backend: --knnlm-gpu needs --knn-backend torch (or auto) and a "
                            "CUDA device")
        return index, f"faiss-cpu ({what})"
    if cfg.knnlm_gpu:
        if not torch.cuda.is_available():
            raise UserError("--knn-backend torch --knnlm-gpu: no CUDA device is visible")
        dev = device if device.type == "cuda" else torch.device("cuda", 0)
    else:
        dev = torch.device("cpu")
    placed = [(TorchIndex.from_faiss(shard, dev), first) for shard, first in index.shards]
    return ShardedIndex(placed, index.metric, of=index.of), f"torch ({dev}; {what})"


def own_shards(cfg, dist: DistContext) -> ShardedIndex:
    """This rank's shards of the index the kNN flags name, placed as rank 0 places its own."""
    ds = Datastore(cfg.dstore_filename)
    index, _ = load_index(index_path(cfg), ds, normalize_keytype(cfg.knn_keytype),
                          cfg.faiss_metric_type, cfg.probe, mmap=cfg.index_mmap,
                          k_factor=cfg.k_factor, part=(dist.rank, dist.world_size))
    return place_shards(index, cfg, dist.device)[0]


@contextlib.contextmanager
def sharing(cfg, command: str):
    """Run a searching command under torchrun over an index kept in shards: yields True on
    the rank that runs it (rank 0; in one process, always), False on the ranks that served
    its batches (they have nothing else to do). ``cfg``: the kNN flags
    (:class:`~knnlm.knn.options.KnnOptions` or a command's config); a script driving an HF
    model passes the options its :class:`~knnlm.hf_generate.KNNLogitsProcessor` gets."""
    global _SERVICE
    if env_ranks()[1] <= 1:
        yield True
        return
    if not (cfg.knnlm and kept_in_shards(cfg)):
        raise UserError(f"under torchrun {command} shares out the search of an index kept in "
                        "shards (build-index --keep-shards): give --knnlm and such an index")
    dist = setup_distributed(getattr(cfg, "cpu", False), cfg.heartbeat_timeout,
                             collective_timeout=cfg.heartbeat_timeout)
    try:
        with dist.guard():
            if dist.is_main:
                _SERVICE = Service(dist)
                try:
                    yield True
                    _SERVICE.announce(STOP)       # the ranks are done too
                finally:
                    _SERVICE = None
            else:
                local = own_shards(cfg, dist)
                dist.wait("serve")
                serve(local, dist)
                yield False
    finally:
        dist.close()
