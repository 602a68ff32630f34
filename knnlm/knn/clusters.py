"""`knnlm cluster-dstore`: k-means clusters of a datastore's keys, for RetoMaton's wider
pointers (``--retomaton --members FILE``): each step's pointers are joined by the other
members of their clusters, entries whose contexts resemble theirs (Alon et al. 2022).

The clusters are FAISS-style k-means (:mod:`knnlm.knn.kmeans`) trained on a seeded sample
of ``--sample-size`` keys, then every key is assigned to its nearest centroid. The file
(``.npz``, no pickles) holds ``cluster`` (N,) each entry's cluster, ``members`` (N,) the
entries ordered by cluster and ``indptr`` (C + 1,) where each cluster's members start;
its JSON sidecar names the datastore (fingerprint) and the parameters.

    knnlm cluster-dstore --dstore-dir runs/demo/dstore --num-clusters 50000 \\
        --out runs/demo/members_50000.npz
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..guard import check_output, other_configuration, output_lock
from ..io import read_json, save_atomic, write_json_atomic
from ..util import UserError, flag
from .datastore import Datastore, normalize_keytype
from .kmeans import cluster_keys


@dataclass
class ClusterConfig:
    dstore_dir: str = flag(help="the datastore whose keys are clustered")
    out: str = flag(help="the members file (.npz; a .json sidecar is written next to it)")
    num_clusters: int = flag(help="number of clusters")
    knn_keytype: str = flag("att", "keys clustered (those the kNN-LM searches)")
    sample_size: int = flag(1_000_000, "keys sampled to train the centroids")
    seed: int = flag(1, "seed of the sample and the initial centroids")
    overwrite: bool = flag(False, "replace a members file of another configuration")
    quiet: bool = flag(False, "no progress output")

    def __post_init__(self):
        self.knn_keytype = normalize_keytype(self.knn_keytype)
        if self.num_clusters <= 0 or self.sample_size <= 0:
            raise UserError("--num-clusters and --sample-size must be > 0")
        if not self.out.endswith(".npz"):
            raise UserError(f"--out must name a .npz file, got {self.out}")
        check_output(self.out, "file", "--out")


def main(cfg: ClusterConfig) -> dict:
    ds = Datastore(cfg.dstore_dir)
    keys = ds.keys(cfg.knn_keytype)
    if cfg.num_clusters > min(ds.size, cfg.sample_size):
        raise UserError(f"--num-clusters {cfg.num_clusters} exceeds the keys sampled "
                        f"({min(ds.size, cfg.sample_size):,})")
    n = min(ds.size, cfg.sample_size)
    meta = dict(format="knnlm-members", datastore_fingerprint=ds.fingerprint,
                keytype=cfg.knn_keytype, num_clusters=cfg.num_clusters,
                sample_size=n, seed=cfg.seed, size=ds.size)
    side = Path(cfg.out[:-4] + ".json")
    with output_lock(cfg.out, "file", "members file"):
        # the sidecar is the commit point: gone before the members change, written after
        # (members without one are an unfinished run's, computed again)
        if side.is_file() and not other_configuration(
                cfg.out, "members file", read_json(side, "members sidecar"), meta,
                cfg.overwrite) and Path(cfg.out).is_file():
            print(f"{cfg.out}: these clusters are already computed")
            return meta
        side.unlink(missing_ok=True)
        cent, cluster = cluster_keys(keys, cfg.num_clusters, n, cfg.seed)
        cluster = cluster.astype(np.int32)
        members = np.argsort(cluster, kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(cluster, minlength=len(cent)))])
        save_atomic(lambda fh: np.savez(fh, cluster=cluster, members=members, indptr=indptr),
                    cfg.out)
        write_json_atomic(side, meta)
    sizes = np.diff(indptr)
    print(f"{cfg.num_clusters:,} clusters of {ds.size:,} {cfg.knn_keytype} keys (sizes: median "
          f"{int(np.median(sizes))}, max {int(sizes.max())}) -> {cfg.out}")
    return meta


class Members:
    """A members file opened for a datastore: the other entries of a pointer's cluster."""

    def __init__(self, path: str | Path, ds: Datastore):
        self.path = path = Path(path)
        meta = read_json(path.with_suffix(".json"), "members sidecar")
        if meta.get("datastore_fingerprint") != ds.fingerprint:
            raise UserError(f"{path} clusters another datastore")
        try:
            with np.load(path, allow_pickle=False) as z:
                self.cluster, self.members, self.indptr = z["cluster"], z["members"], z["indptr"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: unreadable members file ({exc})")
        if len(self.cluster) != ds.size:
            raise UserError(f"{path} does not match the datastore's {ds.size:,} entries")

    def extend(self, pointers: np.ndarray, limit: int) -> np.ndarray:
        """The pointers, then the other members of their clusters (clusters holding more of
        the pointers first), without repeats, at most ``limit``."""
        if not len(pointers):
            return pointers
        cl, counts = np.unique(self.cluster[pointers], return_counts=True)
        cl = cl[np.argsort(-counts, kind="stable")]
        parts = [pointers] + [self.members[self.indptr[c]:self.indptr[c + 1]] for c in cl]
        ids = np.concatenate(parts)
        ids = ids[np.sort(np.unique(ids, return_index=True)[1])]
        return ids[:limit]
