"""A built index read back for searching (:func:`load_index`: checked against its
datastore, nprobe and k_factor set) and what kind of index it is (fast-scan, a refine
stage, whether its distances are the keys' exact ones).

    index, meta = load_index("runs/demo/dstore/index_att_l2.faiss", ds, "att", "l2", nprobe=8)
"""
from __future__ import annotations

from pathlib import Path

from ..io import read_json
from ..util import UserError
from .datastore import Datastore, normalize_keytype
from .index import INDEX_FORMAT, faiss_module


def load_index(path: str | Path, ds: Datastore, keytype: str, metric: str | None = None,
               nprobe: int | None = None, mmap: bool = False, k_factor: float | None = None):
    """Read an index, check it was built on ``ds``'s ``keytype`` keys, set nprobe.
    ``mmap``: map its codes from the file (FAISS's mmap I/O) instead of reading them into
    RAM, so an index larger than the memory can be searched (pages come in as probed).
    ``k_factor``: a refine index's candidates per neighbour (its base index is searched
    for k·k_factor, re-ranked by the refine codes)."""
    faiss = faiss_module()
    path = Path(path)
    meta = read_json(Path(str(path) + ".json"), "index sidecar")
    if meta.get("format") != INDEX_FORMAT or not meta.get("complete"):
        raise UserError(f"{path} is not a complete knnlm index (see its .json)")
    if meta["datastore_fingerprint"] != ds.fingerprint:
        raise UserError(f"{path} was built on another datastore than {ds.path}")
    if meta["keytype"] != normalize_keytype(keytype):
        raise UserError(f"{path} indexes {meta['keytype']} keys, not {keytype}")
    if metric is not None and meta["metric"] != metric:
        raise UserError(f"{path} uses metric {meta['metric']}, not {metric}")
    if not path.is_file():
        raise UserError(f"index not found: {path}")
    try:
        # IVF indexes map their inverted lists; flat ones their code array
        flags = 0 if not mmap else faiss.IO_FLAG_MMAP if "IVF" in meta["factory"] \
            else faiss.IO_FLAG_MMAP_IFC
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise UserError(f"cannot read {path} ({str(exc).strip().splitlines()[-1][:160]})")
    if index.ntotal != ds.size:
        raise UserError(f"{path} holds {index.ntotal:,} keys, the datastore {ds.size:,}")
    _restore_fine_quantizer(index)
    set_nprobe(index, nprobe or meta["nprobe"])
    if k_factor is not None:
        refine = refine_stage(index)
        if refine is None:
            raise UserError(f"--k-factor re-ranks candidates of a refine index; {path} "
                            f"({meta['factory']}) has no refine stage")
        faiss.downcast_index(index).k_factor = float(k_factor)
    return index, meta


def _restore_fine_quantizer(index) -> None:
    """FAISS 1.15 reads an IVF fast-scan index without the pointer to its PQ that decoding
    uses, so ``reconstruct`` would crash (RetoMaton scores pointers from reconstructions);
    point it back at the index's own PQ."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(inner, faiss.IndexIVFPQFastScan) and inner.fine_quantizer is None:
        inner.fine_quantizer = inner.pq


def refine_stage(index):
    """The exact re-ranking stage of an index (FAISS ``IndexRefine``: factory suffix
    ``RFlat`` or ``Refine(...)``), or None."""
    faiss = faiss_module()
    outer = faiss.downcast_index(index)
    return faiss.downcast_index(outer.refine_index) if isinstance(outer, faiss.IndexRefine) \
        else None


def returns_exact_distances(index, key_dtype: str) -> bool:
    """Whether the distances ``index`` returns are the exact ones of the stored keys: a
    refine stage that holds them losslessly (flat float32 codes, or float16 codes of
    float16 keys). Recomputing them from the keys would give the same numbers (to float
    summation order), so the score modes that recompute take them as they are."""
    faiss = faiss_module()
    refine = refine_stage(index)
    if isinstance(refine, faiss.IndexFlat):
        return True
    return isinstance(refine, faiss.IndexScalarQuantizer) and key_dtype == "float16" and \
        refine.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def is_fast_scan(index) -> bool:
    """Whether the index scans 4-bit fast-scan PQ codes (``PQ<M>x4fs``)."""
    faiss = faiss_module()
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    return isinstance(inner, faiss.IndexIVFFastScan) or \
        isinstance(faiss.downcast_index(index), faiss.IndexFastScan)


def set_nprobe(index, nprobe: int) -> None:
    faiss = faiss_module()
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index: nothing to probe
