"""The files of centroids as an output layer (`knnlm centroids`, the fork's ``cluster/``):
``centroids.npy`` (C, D) float32 and P(w | c), a C × V sparse matrix in scipy's
``save_npz`` CSR layout (``centroid_dist.npz``, the fork's ``cluster_freq.npz``), read and
checked for eval-lm and train's ``--load-centroids`` / ``--load-centroid-distribution``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import read_json
from ..util import UserError


def save_csr(path: Path, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
             shape: tuple[int, int]) -> None:
    """A sparse matrix in scipy's ``save_npz`` CSR layout (no scipy needed)."""
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, data=vals.astype(np.float32), indices=cols.astype(np.int32),
             indptr=np.cumsum(indptr).astype(np.int64), format=np.array(b"csr"),
             shape=np.array(shape, dtype=np.int64))
    tmp.replace(path)


def load_csr(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(data, indices, indptr, shape) of a CSR ``.npz`` (ours or scipy's ``save_npz``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = z["format"].item()
            fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
            if fmt != "csr":
                raise UserError(f"{path} holds a {fmt} matrix; CSR is expected")
            return (z["data"].astype(np.float32), z["indices"].astype(np.int64),
                    z["indptr"].astype(np.int64), tuple(int(x) for x in z["shape"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path} is not a sparse-matrix .npz ({exc})")


def load_centroids(path: str, dist_path: str | None, vocab_size: int, dim: int
                   ) -> tuple[np.ndarray, tuple, dict]:
    """(centroids (C, D), the C × V distribution as CSR parts, the sidecar or {}), checked
    against the model's vocabulary and dimension. Without ``dist_path`` each centroid is
    one token's (C = V, the identity distribution), as the original's plain
    ``--load-centroids`` replacing the output embedding."""
    p = Path(path)
    try:
        cent = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--load-centroids {p}: not a readable .npy ({exc})")
    side = read_json(p.parent / "centroids.json", "centroids sidecar") \
        if (p.parent / "centroids.json").is_file() else {}
    if cent.ndim != 2 or cent.shape[1] != dim or not np.isfinite(cent).all():
        raise UserError(f"--load-centroids {p}: {cent.shape} {cent.dtype}; (C, {dim}) finite "
                        "values expected")
    if dist_path is None:
        if len(cent) != vocab_size:
            raise UserError(f"--load-centroids {p} has {len(cent):,} rows: without "
                            "--load-centroid-distribution it needs one per token "
                            f"({vocab_size:,})")
        eye = np.arange(vocab_size)
        return cent, (np.ones(vocab_size, np.float32), eye, np.arange(vocab_size + 1),
                      (vocab_size, vocab_size)), side
    return cent, load_distribution(dist_path, len(cent), vocab_size), side


def load_distribution(path: str, n_centroids: int, vocab_size: int) -> tuple:
    """The C × V distribution P(w | c) of ``--load-centroid-distribution`` as CSR parts
    (data, indices, indptr, shape), checked: its shape, token ids, finite values >= 0."""
    data, indices, indptr, shape = load_csr(path)
    if shape != (n_centroids, vocab_size) or len(indptr) != shape[0] + 1 or \
            indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any() or \
            (len(indices) and (indices.min() < 0 or indices.max() >= vocab_size)):
        raise UserError(f"--load-centroid-distribution {path} is {shape}; "
                        f"({n_centroids:,} centroids, {vocab_size:,} tokens) expected")
    if not (np.isfinite(data).all() and (data >= 0).all()):
        raise UserError(f"--load-centroid-distribution {path} holds probabilities that are "
                        "negative or not finite")
    return data, indices, indptr, shape


def distribution_coo(csr: tuple) -> tuple[np.ndarray, np.ndarray]:
    """CSR parts -> ((2, nnz) centroid/token index, (nnz,) probabilities)."""
    data, indices, indptr, shape = csr
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    return np.stack([rows, indices]), data
