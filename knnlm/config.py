"""Shared plumbing for every stage: user errors, dataclass configs turned into argparse
parsers, JSON sidecars written atomically, and file fingerprints.

Each command declares one dataclass whose fields carry their flag help in
``field(metadata=...)`` (use :func:`flag`). :func:`build_parser` turns it into an
argparse parser, :func:`parse_config` back into the dataclass, whose ``__post_init__``
validates values and raises :class:`UserError` naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error the user can fix (bad flag, missing or mismatched file).

    The CLI prints it as one line on stderr and exits with status 2.
    """


def flag(default: Any = dataclasses.MISSING, help: str = "", *, aliases: tuple = (),
         choices: tuple | None = None, positional: bool = False, metavar: str | None = None,
         negative: tuple = ()) -> Any:
    """A dataclass field that knows its command-line form.

    ``aliases`` are extra spellings (the original code's names); ``negative`` are flags
    that set a positive boolean to False (``--no-load-keys`` for ``load_keys``).
    """
    meta = dict(help=help, aliases=tuple(aliases), choices=choices, positional=positional,
                metavar=metavar, negative=tuple(negative))
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """(python type, is_optional) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(cls, prog: str, description: str | None = None,
                 parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass ``cls``."""
    p = parser or _Parser(prog=prog, description=description,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = dict(dest=f.name, help=meta["help"] or " ")
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        if meta.get("positional"):
            kw.pop("dest")
            names = [f.name]
            kw["metavar"] = f.name.upper()
            if "default" in kw:
                kw["nargs"] = "?"
        else:
            names = [_flag_name(f.name), *meta["aliases"]]
            if "default" not in kw:
                kw["required"] = True
        if tp is bool:
            kw["action"] = "store_true"
            if meta["negative"]:
                p.add_argument(*meta["negative"], dest=f.name, action="store_false",
                               help=f"opposite of {names[0]}")
        elif typing.get_origin(tp) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = tp
            if meta["choices"]:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        p.add_argument(*names, **kw)
    return p


def parse_config(cls, argv: list[str] | None, prog: str, description: str | None = None):
    args = build_parser(cls, prog, description).parse_args(argv)
    return cls(**vars(args))


def config_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---------------------------------------------------------------- files and sidecars

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
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


def read_sidecar(directory: str | os.PathLike, name: str, fmt: str, what: str) -> dict:
    """The JSON sidecar ``name`` of a stage's output directory, checked to be of ``fmt``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{what} not found: {directory}")
    meta = read_json(directory / name, f"{what} sidecar")
    if meta.get("format") != fmt:
        raise UserError(f"{directory / name} is not a knnlm {what} sidecar")
    return meta


def open_npy(path: str | os.PathLike, shape: tuple | None, dtype) -> "np.ndarray":
    """A .npy file as a read-only memmap, checked against the shape and dtype its sidecar
    records (``shape`` None: only the dtype)."""
    import numpy as np
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is missing or truncated ({exc})")
    if (shape is not None and arr.shape != tuple(shape)) or arr.dtype != np.dtype(dtype):
        raise UserError(f"{path} is {arr.shape} {arr.dtype}; its sidecar says "
                        f"{tuple(shape) if shape is not None else arr.shape} {np.dtype(dtype)}")
    return arr


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def check_positive(value, name: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def command_line(command: str, cfg) -> str:
    """The `knnlm` command line that gives ``cfg`` (fields left at their default omitted),
    so every result can be printed next to the exact command that reproduces it."""
    import shlex
    words = ["knnlm", command]
    for f in dataclasses.fields(cfg):
        meta = f.metadata
        if "help" not in meta:
            continue
        value = getattr(cfg, f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING
                                         else f.default_factory())
        if meta.get("positional"):
            words.append(str(value))
            continue
        if value is None or (not required and value == default):
            continue
        name = _flag_name(f.name)
        if isinstance(value, bool):
            if value:
                words.append(name)
            elif meta["negative"]:
                words.append(meta["negative"][0])
        elif isinstance(value, list):
            words += [name, *map(str, value)]
        else:
            words += [name, str(value)]
    return " ".join(shlex.quote(w) for w in words)
