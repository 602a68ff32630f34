"""Text from HF ``datasets`` (an optional extra) or any Python iterable, as the text files
a data-bin is made of.

A dataset is named as ``datasets`` names it: a directory written by ``save_to_disk``, local
data files or a directory of them (json, jsonl, csv, parquet, txt), or a hub name found in
the local cache (offline, unless ``HF_DATASETS_OFFLINE=0``). Its rows are streamed: a
dataset larger than memory goes to disk row by row, with a progress bar. Every row must
hold a string in the text column; a row that does not is refused, by number.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from ..guard import temp_path
from ..util import UserError, first_line

# the split names of datasets -> a data-bin's
SPLIT_NAMES = {"validation": "valid", "dev": "valid"}


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise UserError("--hf-dataset needs the datasets package: pip install -e '.[datasets]'")
    return datasets


def load_dataset(name: str, split: str):
    """The ``split`` of the dataset ``name`` (see the module's docstring), streamed where
    ``datasets`` can stream it."""
    ds = datasets_module()
    p = Path(name)
    try:
        if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json",
                                                            "dataset_dict.json")):
            data = ds.load_from_disk(str(p))
            if isinstance(data, ds.DatasetDict):
                if split not in data:
                    raise UserError(f"{name} has no split {split!r} (has: {', '.join(data)})")
                data = data[split]
            return data
        if p.is_file():
            kind = {".jsonl": "json", ".txt": "text"}.get(p.suffix, p.suffix.lstrip("."))
            return ds.load_dataset(kind, data_files={split: str(p)}, split=split, streaming=True)
        if os.environ.get("HF_DATASETS_OFFLINE") is None and not p.exists():
            os.environ["HF_DATASETS_OFFLINE"] = "1"    # the cache only, unless allowed
        return ds.load_dataset(name, split=split, streaming=True)
    except UserError:
        raise
    except Exception as exc:      # datasets raises many kinds: one line whatever it was
        raise UserError(f"cannot load the dataset {name!r} split {split!r} offline "
                        f"({first_line(exc)})")


def iter_texts(items, text_column: str = "text") -> tuple[Iterator[str], int | None]:
    """(the texts, how many when known) of a list or iterable of strings, or of rows
    (dicts, a ``datasets.Dataset`` / ``IterableDataset``) holding ``text_column``."""
    total = None
    try:
        total = len(items)
    except TypeError:
        pass
    features = getattr(items, "column_names", None)
    if features is not None and text_column not in features:
        raise UserError(f"the dataset has no column {text_column!r} (has: "
                        f"{', '.join(features)})")
    if isinstance(items, str):
        raise UserError("give a list of texts (or a dataset), not one string")

    def texts() -> Iterator[str]:
        for i, row in enumerate(items):
            text = row.get(text_column) if isinstance(row, dict) else row
            if not isinstance(text, str):
                where = f"column {text_column!r} of row {i}" if isinstance(row, dict) else \
                    f"item {i}"
                raise UserError(f"{where} is not text ({type(text).__name__})")
            yield text
    return texts(), total


def write_texts(items: Iterable, path: str | Path, text_column: str = "text",
                quiet: bool = False) -> dict:
    """Write the texts of ``items`` to ``path``, each followed by a newline (written to a
    temporary file, then renamed); {"texts": n, "bytes": size}."""
    texts, total = iter_texts(items, text_column)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for text in tqdm(texts, total=total, unit="text", desc="texts",
                             disable=True if quiet else None):
                fh.write(text + "\n")
                n += 1
        if n == 0:
            raise UserError("no texts to build from")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return dict(texts=n, bytes=path.stat().st_size)
