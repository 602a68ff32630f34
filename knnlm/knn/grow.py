"""A datastore that grows (``knnlm.Datastore.add``): its indexes take the new keys without
retraining, and its tuned settings follow it, marked as tuned on the smaller datastore.

An index built on the datastore's first N entries gets entries N..N'−1 added to its
trained quantizer and codes (FAISS ``add``: ids continue from N), exactly as the build
added its keys; its sidecar then names the grown datastore (fingerprint and size) and
records the growth under ``grown``. The index file is the commit point: it is written
whole (temporary file, rename) before its sidecar, and an index that already holds N'
keys after a kill only needs its sidecar.
"""
from __future__ import annotations

import os
from pathlib import Path

from tqdm import tqdm

from ..guard import temp_path
from ..io import read_json, write_json_atomic
from ..util import UserError
from .datastore import Datastore, finite_rows
from .index import INDEX_FORMAT, faiss_module, verify_index
from .shards import add_step
from .tuned import TUNED_FORMAT, index_fingerprint, tuned_path


def extend_index(path: str | Path, ds: Datastore, old_fingerprint: str,
                 quiet: bool = False) -> dict:
    """Add the keys an index of ``ds`` (before it grew: ``old_fingerprint``) lacks; its
    updated sidecar."""
    faiss = faiss_module()
    path = Path(path)
    side_path = Path(str(path) + ".json")
    meta = read_json(side_path, "index sidecar")
    if meta.get("format") != INDEX_FORMAT or not meta.get("complete"):
        raise UserError(f"{path} is not a complete knnlm index (see its .json)")
    if meta["datastore_fingerprint"] == ds.fingerprint:
        return meta                                   # already extended
    if meta["datastore_fingerprint"] != old_fingerprint:
        raise UserError(f"{path} was built on another datastore than {ds.path}")
    index = faiss.read_index(str(path))
    start, n = int(index.ntotal), ds.size
    if start > n:
        raise UserError(f"{path} holds {start:,} keys, more than the datastore's {n:,}")
    keys = ds.keys(meta["keytype"])
    step = add_step(meta.get("config", {}).get("num_keys_to_add_at_a_time", 1_000_000))
    bar = tqdm(total=n - start, unit="key", desc=f"add to {path.name}",
               disable=True if quiet else None)
    for s in range(start, n, step):
        e = min(n, s + step)
        index.add(finite_rows(keys[s:e], s))
        bar.update(e - s)
    bar.close()
    verify_index(index, n, path)
    if start < n:
        tmp = temp_path(path)
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)          # the commit point: the sidecar follows it
    grown = [*meta.get("grown", []), dict(from_size=int(meta["datastore_size"]), to_size=n,
                                          from_fingerprint=old_fingerprint)]
    meta.update(datastore_fingerprint=ds.fingerprint, datastore_size=n, rows_added=n,
                ntotal=n, grown=grown)
    write_json_atomic(side_path, meta)
    return meta


def carry_tuned(ds: Datastore, keytype: str, metric: str, index_path: Path | None,
                old_index_fingerprint: str | None, new_index_meta: dict | None,
                old_fingerprint: str, old_size: int) -> Path | None:
    """The tuned settings of an index (``index_path`` None: of exact search) of the
    datastore before it grew, now naming the grown one, with ``grown_since`` (the size
    they were tuned at) so that the runs using them say so. None when there are none."""
    path = tuned_path(ds.path, keytype, metric, index_path)
    if not path.is_file():
        return None
    data = read_json(path, "tuned settings")
    ident = data.get("identity") if data.get("format") == TUNED_FORMAT else None
    if not isinstance(ident, dict) or ident.get("datastore_fingerprint") != old_fingerprint \
            or ident.get("index_fingerprint") != old_index_fingerprint:
        return None                    # not this datastore's: left as it is
    data["identity"] = dict(ident, datastore_fingerprint=ds.fingerprint,
                            index_fingerprint=index_fingerprint(new_index_meta))
    data.setdefault("grown_since", dict(datastore_size=int(old_size)))
    write_json_atomic(path, data)
    return path
