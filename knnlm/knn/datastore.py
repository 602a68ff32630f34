"""The self-describing datastore: memmapped keys, values and positions plus a JSON sidecar.

Layout of a datastore directory:

- ``keys_<keytype>.npy``: (N, D) keys, fp16 (fp32 with ``--dstore-fp32``), one file per
  keytype (``att``, ``ffn``, ``layer:N`` is written as ``keys_layer3.npy``);
- ``vals.npy``: (N,) next-token ids, int32 (int64 only for vocabularies beyond int32);
- ``pos.npy``: (N,) position of each entry's target in the tokenized split;
- ``counts.npy`` (pruned datastores only, ``weighted`` in the sidecar): (N,) float32, how
  many original entries each entry stands for (its weight in the kNN softmax);
- ``datastore.json``: format version, N, D, dtypes, keytypes, split, blocking, model and
  tokenizer fingerprints, ``rows_written`` and ``complete``.

Files are allocated at full size before the first row; ``rows_written`` advances only
after the rows before it are flushed, so a killed dump resumes from there. Readers check
the sidecar against the files' sizes and refuse incomplete or truncated datastores.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..guard import other_configuration
from ..io import (grow_npy, open_npy, read_json, read_sidecar, refuse_nonfinite,
                  write_json_atomic)
from ..util import UserError

DSTORE_FORMAT = "knnlm-datastore"
DSTORE_VERSION = 1
KEYTYPE_ALIASES = {"last_ffn_input": "att", "last_linear_input": "ffn"}


def normalize_keytype(name: str) -> str:
    """``att``, ``ffn`` or ``layer:N``; the original code's names are accepted."""
    name = KEYTYPE_ALIASES.get(name.strip(), name.strip())
    if name in ("att", "ffn"):
        return name
    if name.startswith("layer:") and name[6:].lstrip("-").isdigit():
        return name
    raise UserError(f"unknown --knn-keytype {name!r}: use att (last_ffn_input), "
                    "ffn (last_linear_input) or layer:N")


def key_file(keytype: str) -> str:
    return f"keys_{keytype.replace(':', '')}.npy"


def value_dtype(vocab_size: int):
    return np.int32 if vocab_size <= np.iinfo(np.int32).max else np.int64


# fields of a sidecar outside a datastore's identity: progress, and the record of how it
# grew (Datastore.add; a grown datastore is the one a build of its data gives)
PROGRESS_FIELDS = ("rows_written", "complete", "grown")


def same_build(old: dict, new: dict) -> bool:
    """Whether two sidecars describe the same datastore (progress fields aside)."""
    return {k: old.get(k) for k in new if k not in PROGRESS_FIELDS} == \
        {k: v for k, v in new.items() if k not in PROGRESS_FIELDS}


def build_identity(meta: dict) -> dict:
    """What defines a datastore: its sidecar without the progress fields."""
    return {k: v for k, v in meta.items() if k not in PROGRESS_FIELDS}


def fingerprint(meta: dict) -> str:
    """Identity of a datastore: a hash of :func:`build_identity`."""
    return hashlib.sha256(json.dumps(build_identity(meta), sort_keys=True).encode()).hexdigest()[:16]


def is_built(path: str | Path, meta: dict) -> bool:
    """A complete datastore built with exactly this configuration is already there."""
    sidecar = Path(path) / "datastore.json"
    if not sidecar.is_file():
        return False
    old = read_json(sidecar, "datastore sidecar")
    return bool(old.get("complete")) and same_build(old, meta)


def subset_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted parent rows of the subset: the first round(fraction·n) of a seeded
    permutation of range(n)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    m = max(1, int(round(fraction * n)))
    return np.sort(np.random.default_rng([seed, n]).permutation(n)[:m])


def finite_rows(chunk: np.ndarray, start: int = 0, where=None, rows=None) -> np.ndarray:
    """Keys as float32 (contiguous, for FAISS and torch), refused in one line naming the
    file and the first bad entry when a key is NaN or infinite: the chunk holds entries
    ``start``… or, for a sample, the entries ``rows``. ``where`` defaults to the memmap's
    file."""
    where = where or getattr(chunk, "filename", None) or "the datastore's keys"
    x = np.ascontiguousarray(chunk, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        entry = int(rows[i]) if rows is not None else start + i
        raise UserError(f"{where}: the key of entry {entry:,} is not finite (NaN or inf); "
                        "the file is damaged or was written from bad data: rebuild it")
    return x


VERIFY_CHUNK = 1 << 20     # rows compared at once by verify_entries
VERIFY_KEY_SAMPLE = 4096   # rows whose keys verify_entries reads


def verify_entries(path: str | Path, vals, pos, counts=None) -> "Datastore":
    """Before a stage that wrote a datastore reports success: it opens as a complete
    datastore, every entry holds the value and position it should (``vals``, ``pos``:
    arrays, or callables of (start, end) giving them), the weights are ``counts`` (when
    given), and a sample of rows spread over every key file holds finite keys. A row a
    writer skipped or wrote twice shows as a wrong position. Otherwise one line naming the
    first bad entry, and the sidecar marked unfinished (a rerun writes it again)."""
    ds = Datastore(path)
    try:
        _verify(ds, vals, pos, counts)
    except UserError:
        # the stage's own output, under its lock: marked unfinished so nothing uses it
        # and the same command writes it again
        write_json_atomic(ds.path / "datastore.json", dict(ds.meta, rows_written=0,
                                                           complete=False))
        raise
    return ds


def _verify(ds: "Datastore", vals, pos, counts) -> None:
    def part(ref, s, e):
        return np.asarray(ref(s, e) if callable(ref) else ref[s:e])
    checks = [("value", ds.vals, vals), ("position", ds.pos, pos)]
    if counts is not None:
        if ds.counts is None:
            raise UserError(f"{ds.path}: the written datastore has no counts.npy")
        checks.append(("weight", ds.counts, counts))
    for s in range(0, ds.size, VERIFY_CHUNK):
        e = min(ds.size, s + VERIFY_CHUNK)
        for what, got, want in checks:
            g, w = np.asarray(got[s:e]), part(want, s, e)
            if g.shape != w.shape or not np.array_equal(g, w.astype(g.dtype)):
                bad = s + (int(np.argmax(g != w.astype(g.dtype))) if g.shape == w.shape else 0)
                raise UserError(f"{ds.path}: entry {bad:,} holds the wrong {what} after the "
                                "write; it is marked unfinished: run the stage again")
    rows = np.unique(np.linspace(0, ds.size - 1, min(ds.size, VERIFY_KEY_SAMPLE)).astype(np.int64))
    for kt in ds.keytypes:
        sample = np.asarray(ds.keys(kt)[rows], dtype=np.float32)
        bad = ~np.isfinite(sample).all(axis=1)
        if bad.any():
            raise UserError(f"{ds.path}: the {kt} key of entry {int(rows[np.argmax(bad)]):,} is "
                            "not finite after the write; it is marked unfinished: run the "
                            "stage again")


DATASTORE_FILES = ("datastore.json", "keys_*.npy", "vals.npy", "pos.npy", "counts.npy",
                   "projection.npz", "prune.json", "progress.rank*.json")


def remove_datastore_files(path: Path) -> None:
    """Remove the files of the datastore format from ``path`` (--overwrite), the sidecar
    first so that no reader takes what is left for a datastore; other files stay."""
    for pattern in DATASTORE_FILES:
        for f in sorted(path.glob(pattern)):
            f.unlink()


class DatastoreWriter:
    """Allocates (or reopens, to resume) the files of a datastore and fills rows in order."""

    def __init__(self, path: str | Path, meta: dict, overwrite: bool = False):
        self.path = Path(path)
        self.meta = meta
        n, d = meta["size"], meta["dim"]
        existing = self.path / "datastore.json"
        mode = "w+"
        if existing.is_file():
            old = read_json(existing, "datastore sidecar")
            if other_configuration(self.path, "datastore", build_identity(old),
                                   build_identity(meta), overwrite):
                remove_datastore_files(self.path)
            elif old.get("complete"):
                raise UserError(f"{self.path} already holds this complete datastore")
            else:
                meta["rows_written"] = old["rows_written"]
                if "grown" in old:
                    meta["grown"] = old["grown"]
                mode = "r+"
        self.path.mkdir(parents=True, exist_ok=True)
        if mode == "r+":      # a datastore being grown (Datastore.add): its files first
            for name in [key_file(kt) for kt in meta["keytypes"]] + ["vals.npy", "pos.npy"]:
                if (self.path / name).is_file():
                    grow_npy(self.path / name, n)
        open_ = np.lib.format.open_memmap
        try:
            self.keys = {kt: open_(self.path / key_file(kt), mode=mode, dtype=meta["key_dtype"],
                                   shape=(n, d)) for kt in meta["keytypes"]}
            self.vals = open_(self.path / "vals.npy", mode=mode, dtype=meta["val_dtype"], shape=(n,))
            self.pos = open_(self.path / "pos.npy", mode=mode, dtype=meta["pos_dtype"], shape=(n,))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot reopen the datastore files in {self.path} to resume ({exc})")
        if mode == "w+":
            write_json_atomic(existing, meta)

    @property
    def rows_written(self) -> int:
        return int(self.meta["rows_written"])

    def write(self, start: int, keys: dict[str, np.ndarray], vals: np.ndarray,
              pos: np.ndarray) -> None:
        """Rows ``[start, start + len(vals))``; a non-finite key is refused before anything
        of the batch is written (an inf or NaN key would be every query's nearest)."""
        end = start + len(vals)
        for kt, arr in keys.items():
            finite = np.isfinite(arr).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                hint = (" (fp16 keys overflow beyond ±65504: rebuild with --dstore-fp32)"
                        if arr.dtype == np.float16 else "")
                raise UserError(f"the {kt} key of datastore entry {row:,} is not finite{hint}; "
                                "nothing of its batch was written")
        for kt, arr in self.keys.items():
            arr[start:end] = keys[kt]
        self.vals[start:end] = vals
        self.pos[start:end] = pos

    def flush(self) -> None:
        for arr in (*self.keys.values(), self.vals, self.pos):
            arr.flush()

    def commit(self, rows: int) -> None:
        """Flush everything so far to disk, then record ``rows`` as written. The commit
        point is the sidecar's rename: rows past ``rows_written`` may be on disk after a
        kill, and a resumed dump writes them again, to the same bytes."""
        self.flush()
        self.meta["rows_written"] = rows
        self.meta["complete"] = rows == self.meta["size"]
        write_json_atomic(self.path / "datastore.json", self.meta)


class Datastore:
    """A complete datastore opened for reading (memmaps, or RAM with ``in_memory``)."""

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        self.meta = read_sidecar(self.path, "datastore.json", DSTORE_FORMAT, "datastore")
        if not self.meta.get("complete"):
            raise UserError(f"{self.path} is incomplete ({self.meta.get('rows_written', 0):,} of "
                            f"{self.meta['size']:,} rows); rerun build-dstore to finish it")
        self.size, self.dim = int(self.meta["size"]), int(self.meta["dim"])
        self.fingerprint = fingerprint(self.meta)
        self.keytypes = list(self.meta["keytypes"])
        self.vals = self._open("vals.npy", (self.size,), self.meta["val_dtype"], in_memory)
        self.pos = self._open("pos.npy", (self.size,), self.meta["pos_dtype"], in_memory)
        self._in_memory = in_memory
        self._keys: dict[str, np.ndarray] = {}
        self.counts = self._open("counts.npy", (self.size,), "float32", in_memory) \
            if self.meta.get("weighted") else None
        if self.counts is not None:      # weights: finite and positive (log counts are used)
            for s in range(0, self.size, VERIFY_CHUNK):
                c = np.asarray(self.counts[s:s + VERIFY_CHUNK])
                refuse_nonfinite(c, self.path / "counts.npy", "the count", s)
                if (c <= 0).any():
                    raise UserError(f"{self.path / 'counts.npy'}: the count of entry "
                                    f"{s + int(np.argmax(c <= 0)):,} is not positive")

    def _open(self, name: str, shape: tuple, dtype: str, in_memory: bool) -> np.ndarray:
        arr = open_npy(self.path / name, shape, dtype)
        return np.array(arr) if in_memory else arr

    @property
    def query_dim(self) -> int:
        """Dimension of the model's queries (a reduced datastore's keys have fewer)."""
        return int((self.meta.get("projection") or {}).get("input_dim", self.dim))

    def keys(self, keytype: str) -> np.ndarray:
        kt = normalize_keytype(keytype)
        if kt not in self.keytypes:
            raise UserError(f"{self.path} has no {kt} keys (it has: {', '.join(self.keytypes)})")
        if kt not in self._keys:
            self._keys[kt] = self._open(key_file(kt), (self.size, self.dim),
                                        self.meta["key_dtype"], self._in_memory)
        return self._keys[kt]

    def check_model(self, model_fingerprint: str, tokenizer_sha256: str | None = None) -> None:
        """Refuse use with another checkpoint or vocabulary than the one that built it."""
        if self.meta["model_fingerprint"] != model_fingerprint:
            raise UserError(f"{self.path} was built by another checkpoint (model fingerprint "
                            f"{self.meta['model_fingerprint']} != {model_fingerprint})")
        if tokenizer_sha256 and self.meta["tokenizer_sha256"] != tokenizer_sha256:
            raise UserError(f"{self.path} was built with another vocabulary")
