"""Seeded random subsets of a datastore (the paper's datastore-size analysis, §3.7).

A subset is a datastore directory of its own (same format, same model fingerprint, so
build-index and eval-lm use it unchanged) whose sidecar also records ``subset``: the
parent's fingerprint, the fraction, the seed and the row count. Rows keep the parent's
order. Subsets of one seed are nested: the rows of a 5% subset are among those of the
10% subset (both are prefixes of one seeded permutation).
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..knn.datastore import (Datastore, DatastoreWriter, is_built, normalize_keytype,
                             subset_rows)

COPY_CHUNK = 1 << 18


def subset_meta(parent: Datastore, keytype: str, fraction: float, seed: int, m: int) -> dict:
    meta = {k: v for k, v in parent.meta.items() if k not in ("rows_written", "complete")}
    meta.update(size=m, keytypes=[keytype], rows_written=0, complete=False,
                pos_dtype=parent.meta["pos_dtype"],
                subset=dict(parent_fingerprint=parent.fingerprint, parent=str(parent.path.resolve()),
                            fraction=fraction, seed=seed, rows=m))
    return meta


def write_subset(parent: Datastore, out: str | Path, keytype: str, fraction: float, seed: int,
                 quiet: bool = True) -> Datastore:
    """Write (or find already written) the subset of ``keytype`` keys; returns it opened."""
    keytype = normalize_keytype(keytype)
    rows = subset_rows(parent.size, fraction, seed)
    meta = subset_meta(parent, keytype, fraction, seed, len(rows))
    if not is_built(out, meta):
        writer = DatastoreWriter(out, meta)
        keys = parent.keys(keytype)
        start = writer.rows_written
        for s in tqdm(range(start, len(rows), COPY_CHUNK), disable=True if quiet else None,
                      desc=f"subset {fraction:g}", unit="chunk"):
            r = rows[s:s + COPY_CHUNK]
            writer.write(s, {keytype: keys[r]}, parent.vals[r], parent.pos[r])
            writer.commit(s + len(r))
        if not writer.meta["complete"]:
            writer.commit(len(rows))
    return Datastore(out)
