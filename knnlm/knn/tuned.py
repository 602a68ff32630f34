"""Tuned settings: the best λ, T, k and score mode of one index, found by `knnlm tune` on a
held-out split, and read back by every kNN command that is not told them.

The file sits next to what it tunes: ``<index>.tuned.json`` for a FAISS index (for the
default index, ``<dstore>/index_att_l2.faiss.tuned.json``), and
``<dstore>/exact_<keytype>_<metric>.tuned.json`` for exact search. It names the index,
datastore and model fingerprints it belongs to; a file of another index, datastore or
model is ignored with a message on stderr (also under ``--quiet``); a file that does not
parse, or holds settings no run can use, is an error naming it.

Resolution (:func:`resolve_settings`), for ``eval-lm --knnlm``, ``generate`` and
``neighbors``:

- flags given explicitly always win;
- with neither ``--lmbda`` nor ``--knn-temp`` given, a matching tuned file supplies λ and
  T, and k and the score mode (``--knn-sim-func``) unless those flags are given;
- otherwise the defaults: λ 0.25 (the paper's WikiText-103 value; the original code's 0.0
  would turn retrieval off), T 1 and k 1024 (the original code's), the metric's default
  score mode; a run at T 1 without a tuned file prints a one-line hint to run `knnlm tune`.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..io import read_json
from ..util import UserError, warn

TUNED_FORMAT = "knnlm-tuned"
TUNED_VERSION = 1
# T 1 and k 1024 are the original code's defaults; λ 0.25 is the value the kNN-LM paper
# uses on WikiText-103 — the original code's --lmbda defaults to 0.0, which turns retrieval
# off, so a kNN-LM run given no λ would silently be the LM (a deliberate departure)
DEFAULTS = dict(lmbda=0.25, knn_temp=1.0, k=1024)


def index_fingerprint(index_meta: dict | None) -> str | None:
    """Identity of a built index: a hash of its complete sidecar (None: exact search)."""
    if index_meta is None:
        return None
    return hashlib.sha256(json.dumps(index_meta, sort_keys=True).encode()).hexdigest()[:16]


def tuned_path(dstore_dir: str | Path, keytype: str, metric: str, index_path: str | Path | None
               ) -> Path:
    """Where the tuned settings of this index (``index_path`` None: exact search) live."""
    if index_path is not None:
        return Path(str(index_path) + ".tuned.json")
    return Path(dstore_dir) / f"exact_{keytype.replace(':', '')}_{metric}.tuned.json"


def identity(ds, keytype: str, index_meta: dict | None, model_fingerprint: str,
             exact_search: bool, metric: str) -> dict:
    """What a tuned file belongs to: checked field by field before it is used."""
    return dict(datastore_fingerprint=ds.fingerprint, keytype=keytype,
                index_fingerprint=index_fingerprint(index_meta),
                model_fingerprint=model_fingerprint, exact_search=exact_search,
                faiss_metric_type=metric)


def read_tuned(path: Path, ident: dict) -> tuple[dict | None, str]:
    """(the tuned file's settings or None, why not). A file that does not parse, is not a
    tuned-settings file or holds settings no run can use is an error naming it (it is
    never silently skipped); one tuned for another index, datastore or model is ignored,
    and the reason returned for the caller to say."""
    if not path.is_file():
        return None, f"no {path.name}"
    data = read_json(path, "tuned settings")
    if data.get("format") != TUNED_FORMAT or not isinstance(data.get("identity"), dict):
        raise UserError(f"{path} is not a knnlm tuned-settings file; rerun knnlm tune or "
                        "remove it")
    if not isinstance(data.get("version"), int) or data["version"] > TUNED_VERSION:
        raise UserError(f"{path} is tuned-settings version {data.get('version')!r}; this "
                        f"knnlm reads up to {TUNED_VERSION}")
    names = dict(index_fingerprint="index", datastore_fingerprint="datastore",
                 model_fingerprint="model", keytype="keytype", exact_search="search kind",
                 faiss_metric_type="metric")
    for key, what in names.items():       # the fields ``ident`` gives are checked
        if key in ident and data["identity"].get(key) != ident[key]:
            return None, f"ignoring {path}: it was tuned for another {what}"
    check_settings(data.get("settings"), path)
    return data, ""


def check_settings(settings, path: Path) -> None:
    """Refuse, naming the file, tuned settings no run could use: λ outside [0, 1], a
    temperature that is not a positive number, k not a positive integer, an unknown score
    function (NaN included: the file is JSON from `knnlm tune`, or edited by hand)."""
    from .mode import SIM_FUNCS
    if not isinstance(settings, dict):
        raise UserError(f"{path} holds no settings; rerun knnlm tune or remove it")
    lam, temp, k = settings.get("lmbda"), settings.get("knn_temp"), settings.get("k")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not (number(lam) and 0.0 <= lam <= 1.0):
        bad = f"λ {lam!r} is not in [0, 1]"
    elif not (number(temp) and math.isfinite(temp) and temp > 0):
        bad = f"the temperature {temp!r} is not a positive number"
    elif not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
        bad = f"k {k!r} is not a positive integer"
    elif settings.get("knn_sim_func") not in SIM_FUNCS:
        bad = f"the score function {settings.get('knn_sim_func')!r} is not one of {SIM_FUNCS}"
    else:
        return
    raise UserError(f"{path}: {bad}; rerun knnlm tune or remove the file")


def resolve_settings(cfg, path: Path, ident: dict, log=None) -> dict:
    """Fill the kNN flags left unset (None) in ``cfg`` (:class:`KnnOptions`) from the tuned
    file at ``path`` or the defaults; print what was used and where it came from. Returns
    the provenance recorded with the results."""
    log = log or print
    given = {name: getattr(cfg, name) is not None for name in ("lmbda", "knn_temp", "k",
                                                                "knn_sim_func")}
    tuned, why = read_tuned(path, ident)       # a broken file is an error, used or not
    if given["lmbda"] or given["knn_temp"]:
        tuned = None
    elif tuned is None and why.startswith("ignoring"):
        warn(why)
    source = {}
    for name in ("lmbda", "knn_temp", "k", "knn_sim_func"):
        if given[name]:
            source[name] = "flag"
        elif tuned is not None:
            setattr(cfg, name, tuned["settings"][name])
            source[name] = "tuned"
        elif name in DEFAULTS:
            setattr(cfg, name, DEFAULTS[name])
            source[name] = "default"
        else:
            source[name] = "default"
    cfg.check_knn()
    mode = cfg.score_mode()
    used = f"k {cfg.k}, λ {cfg.lmbda:g}, T {cfg.knn_temp:g}, score mode {mode.name}"
    if tuned is not None:
        h = tuned["heldout"]
        flags = [n for n, s in source.items() if s == "flag"]
        grown = tuned.get("grown_since")
        log(f"kNN settings {used}: from {path} (tuned on {h['subset']}: ppl {h['ppl']:.2f}, "
            f"LM {h['lm_ppl']:.2f}" + (f"; tuned when the datastore held "
                                      f"{grown['datastore_size']:,} entries: `knnlm tune` "
                                      f"refits them" if grown else "") + ")"
            + (f"; {', '.join(flags)} from flags" if flags else ""))
    else:
        log(f"kNN settings {used}: " + ("flags" if all(given.values()) else
                                        "flags and the defaults"))
        if source["knn_temp"] == "default" and not path.is_file():
            log(f"hint: T 1 is rarely the best temperature; `knnlm tune` finds λ, T and k on a "
                f"held-out split and writes {path.name}, which this command then uses")
    return dict(source=source, tuned_file=str(path) if tuned is not None else None,
                tuned_heldout=tuned["heldout"] if tuned is not None else None)
