"""Files and sidecars: JSON written atomically, sidecars and .npy files read with checks,
per-token output memmaps, file fingerprints. Every failure a user can cause becomes a one-line :class:`UserError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .guard import other_configuration, temp_path
from .util import UserError


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_atomic(write, path: str | os.PathLike) -> None:
    """``write(fh)`` into a temporary sibling of ``path``, then one rename: readers see the
    old file or the whole new one (np.savez, torch.save, ...)."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON sidecar, turning every failure into a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})")
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return obj


def rewrite_output(side: str | os.PathLike, what: str, flags: dict, overwrite: bool) -> None:
    """Before an output whose sidecar ``side`` (its ``config``: the flags that made it) is
    its commit point is written again: the output rule on the flags (where it goes and
    what is printed aside), then the sidecar removed, so that no reader takes the files
    for a complete output while they change."""
    side = Path(side)
    if not side.is_file():
        return
    mine = lambda f: {k: v for k, v in f.items() if k not in ("quiet", "overwrite")}  # noqa: E731
    old = read_json(side, f"{what} sidecar").get("config") or {}
    other_configuration(side.parent, what, mine(old), mine(flags), overwrite)
    side.unlink()


def read_sidecar(directory: str | os.PathLike, name: str, fmt: str, what: str) -> dict:
    """The JSON sidecar ``name`` of a stage's output directory, checked to be of ``fmt``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{what} not found: {directory}")
    meta = read_json(directory / name, f"{what} sidecar")
    if meta.get("format") != fmt:
        raise UserError(f"{directory / name} is not a knnlm {what} sidecar")
    return meta


def open_npy(path: str | os.PathLike, shape: tuple | None, dtype) -> np.ndarray:
    """A .npy file as a read-only memmap, checked against the shape and dtype its sidecar
    records (``shape`` None: only the dtype)."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is missing or truncated ({exc})")
    if (shape is not None and arr.shape != tuple(shape)) or arr.dtype != np.dtype(dtype):
        raise UserError(f"{path} is {arr.shape} {arr.dtype}; its sidecar says "
                        f"{tuple(shape) if shape is not None else arr.shape} {np.dtype(dtype)}")
    return arr


def grow_npy(path: str | os.PathLike, rows: int) -> None:
    """Make the .npy file at ``path`` hold ``rows`` rows (its first axis), the rows it has
    kept as they are and the new ones zero: the file is extended first, then its header
    rewritten in place (numpy leaves room in the header for the shape to grow), so a kill
    in between leaves the old array readable. Nothing to do when it is that long."""
    path = Path(path)
    fmt = np.lib.format
    with open(path, "r+b") as fh:
        version = fmt.read_magic(fh)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
        if fortran or not shape:
            raise UserError(f"{path}: a C-ordered array with rows was expected")
        if shape[0] >= rows:
            return
        new_shape = (rows, *shape[1:])
        header = io.BytesIO()
        (fmt.write_array_header_1_0 if version == (1, 0) else fmt.write_array_header_2_0)(
            header, dict(descr=fmt.dtype_to_descr(dtype), fortran_order=False, shape=new_shape))
        if header.tell() != offset:
            raise UserError(f"{path}: its header has no room for {rows:,} rows")
        fh.truncate(offset + int(np.prod(new_shape)) * dtype.itemsize)
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(0)
        fh.write(header.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def refuse_nonfinite(values, path: str | os.PathLike, what: str, start: int = 0,
                     allowed=None) -> None:
    """The one rule for numbers read from a file: NaN or ±inf is refused in one line naming
    the file and the first bad entry (row ``start`` + i; its column for 2-D arrays), except
    where ``allowed`` (a boolean mask of the same shape) says the format has them (FAISS's
    padding for a missing neighbour, say)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if allowed is not None:
        bad &= ~np.asarray(allowed, dtype=bool)
    if not bad.any():
        return
    pos = np.unravel_index(int(np.argmax(bad)), bad.shape)
    where = f"entry {start + int(pos[0]):,}" + (f", column {int(pos[1])}" if len(pos) > 1 else "")
    raise UserError(f"{path}: {what} of {where} is {float(arr[pos])}, not a finite number "
                    "(the file is damaged or was written from bad data: rebuild it)")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def open_token_memmap(path: str | os.PathLike, n: int | tuple, dtype,
                      resume: bool = False) -> np.ndarray:
    """A per-token output .npy of ``n`` rows (or shape ``n``): new, or (``resume``) the one
    a killed run left, rows already written kept."""
    path = Path(path)
    shape = (n,) if isinstance(n, int) else tuple(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        try:
            return np.lib.format.open_memmap(path, mode="r+", dtype=dtype, shape=shape)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot resume: {path} is missing or damaged ({exc}); remove "
                            "the retrieval cache to evaluate from the start")
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


ENCODING_ERRORS = ("strict", "replace", "ignore")


def read_text(path: str | os.PathLike, what: str, encoding: str = "utf-8",
              errors: str = "strict") -> str:
    """A text file, decoded. Binary garbage (NUL bytes) and, with ``errors`` strict, bytes
    that are not ``encoding`` are refused naming the file and the byte offset; ``errors``
    replace / ignore opt in to lossy decoding."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror})")
    nul = data.find(b"\0")
    if errors == "strict" and nul >= 0:
        raise UserError(f"{what} {path} is binary, not text (a NUL byte at offset {nul:,})")
    try:
        return data.decode(encoding, errors)
    except LookupError:
        raise UserError(f"unknown --encoding {encoding!r}")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not {encoding} text (byte offset {exc.start:,}: "
                        f"{data[exc.start:exc.start + 4]!r}); give its --encoding, or "
                        "--errors replace to decode it lossily")
