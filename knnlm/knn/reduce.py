"""`knnlm reduce-dstore`: dimension reduction of a datastore's keys by PCA (efficient-knnlm
reduced 1024 -> 512 dimensions at no loss in perplexity).

The principal components of a seeded sample of the keys (``--train-size``) are learned in
float64; every key is centred and projected onto the first ``--pca-dim`` of them, and the
projection (mean and components, ``projection.npz``) is recorded in the new datastore's
sidecar (``projection``). Every kNN command then projects its queries the same way
(:meth:`knnlm.knn.search.KnnSearch.project`) before searching and scoring, so search and
the exact distances both live in the reduced space. Values, positions and counts are the
parent's; index the result with `knnlm build-index` as usual.

At ``--pca-dim`` equal to the key dimension the projection is a rotation (and a shift):
every L2 distance, hence every result, is the parent's up to float error. FAISS's own
``PCAR<d>,...`` factory prefixes reduce inside the index instead (queries reduced by
FAISS, exact scores from the full keys): `build-index --index-factory PCAR64,IVF...`.

    knnlm reduce-dstore --dstore-dir runs/demo/dstore --out runs/demo/dstore_pca64 \\
        --pca-dim 64
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..guard import check_output, output_lock
from ..io import refuse_nonfinite
from ..util import UserError, flag
from .datastore import Datastore, DatastoreWriter, is_built, normalize_keytype, verify_entries

CHUNK = 1 << 18


@dataclass
class ReduceConfig:
    dstore_dir: str = flag(help="the datastore whose keys are reduced")
    out: str = flag(help="directory of the reduced datastore")
    pca_dim: int = flag(help="dimensions kept")
    knn_keytype: str = flag("att", "keytype reduced (the new datastore holds only it)")
    train_size: int = flag(1_000_000, "keys sampled to learn the components")
    dstore_fp32: bool = flag(False, "store the reduced keys in fp32 (default: the parent's dtype)")
    seed: int = flag(1, "seed of the sample")
    overwrite: bool = flag(False, "replace a datastore of another configuration at the "
                           "output")
    quiet: bool = flag(False, "no progress output")

    def __post_init__(self):
        self.knn_keytype = normalize_keytype(self.knn_keytype)
        if self.pca_dim <= 0 or self.train_size <= 0:
            raise UserError("--pca-dim and --train-size must be > 0")
        if Path(self.out).resolve() == Path(self.dstore_dir).resolve():
            raise UserError("--out must differ from --dstore-dir")
        check_output(self.out, "dir", "--out")


def learn_pca(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (D,), components (dim, D) orthonormal rows by decreasing variance, the
    variances (D,)) of a (n, D) sample, in float64."""
    x = np.asarray(sample, dtype=np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    var, vec = np.linalg.eigh(cov)
    order = np.argsort(var)[::-1]
    return mean, vec[:, order[:dim]].T.copy(), var[order]


def project(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, d) float32: (x − mean) W^T."""
    return ((np.asarray(x, dtype=np.float64) - mean) @ components.T).astype(np.float32)


def main(cfg: ReduceConfig) -> dict:
    ds = Datastore(cfg.dstore_dir)
    if cfg.knn_keytype not in ds.keytypes:
        raise UserError(f"{ds.path} has no {cfg.knn_keytype} keys")
    if cfg.pca_dim > ds.dim:
        raise UserError(f"--pca-dim {cfg.pca_dim} exceeds the key dimension {ds.dim}")
    if ds.meta.get("projection"):
        raise UserError(f"{ds.path} is reduced already; reduce its parent instead")
    with output_lock(cfg.out, "dir", "reduced datastore"):
        return _reduce(ds, cfg)


def _reduce(ds: Datastore, cfg: ReduceConfig) -> dict:
    keys = ds.keys(cfg.knn_keytype)
    n = min(ds.size, cfg.train_size)
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(ds.size)[:n])
    mean, comp, var = learn_pca(keys[rows], cfg.pca_dim)
    kept = float(var[:cfg.pca_dim].sum() / var.sum()) if var.sum() > 0 else 1.0
    info = dict(method="pca", input_dim=ds.dim, dim=cfg.pca_dim, keytype=cfg.knn_keytype,
                train_size=n, seed=cfg.seed, variance_kept=kept,
                parent=str(ds.path.resolve()), parent_fingerprint=ds.fingerprint)
    meta = {k: v for k, v in ds.meta.items() if k not in ("rows_written", "complete")}
    meta.update(dim=cfg.pca_dim, keytypes=[cfg.knn_keytype], rows_written=0, complete=False,
                key_dtype="float32" if cfg.dstore_fp32 else ds.meta["key_dtype"],
                projection=info)
    out = Path(cfg.out)
    if not is_built(out, meta):
        writer = DatastoreWriter(out, meta, cfg.overwrite)
        np.savez(out / "projection.npz", mean=mean, components=comp)
        if ds.counts is not None:
            np.save(out / "counts.npy", np.asarray(ds.counts, dtype=np.float32))
        for s in range(0, ds.size, CHUNK):
            e = min(ds.size, s + CHUNK)
            writer.write(s, {cfg.knn_keytype: project(keys[s:e], mean, comp)}, ds.vals[s:e],
                         ds.pos[s:e])
        writer.commit(ds.size)
    verify_entries(out, ds.vals, ds.pos, ds.counts)
    print(f"PCA {ds.dim} -> {cfg.pca_dim} dims ({kept:.1%} of the variance) over "
          f"{ds.size:,} keys -> {out}")
    return info


class Projection:
    """A reduced datastore's projection, applied to queries."""

    def __init__(self, ds: Datastore):
        try:
            with np.load(ds.path / "projection.npz", allow_pickle=False) as z:
                self.mean, self.components = z["mean"], z["components"]
            for name in ("mean", "components"):
                refuse_nonfinite(getattr(self, name), ds.path / "projection.npz",
                                 f"the projection's {name}")
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{ds.path}: unreadable projection.npz ({exc})")
        info = ds.meta["projection"]
        if self.components.shape != (info["dim"], info["input_dim"]):
            raise UserError(f"{ds.path}: projection.npz does not match its sidecar")
        self.input_dim = info["input_dim"]

    def __call__(self, q: np.ndarray) -> np.ndarray:
        if q.shape[-1] != self.input_dim:
            raise UserError(f"queries have {q.shape[-1]} dimensions; this reduced datastore "
                            f"projects {self.input_dim}")
        return project(q, self.mean, self.components)
