"""Plumbing every command shares: the user error, and dataclass configs as command lines.

:class:`UserError` is an error the user can fix; the CLI prints it as one line on stderr
and exits with status 2. Each command declares one dataclass whose fields carry their flag
help in ``field(metadata=...)`` (use :func:`flag`). :func:`build_parser` turns it into an
argparse parser, :func:`parse_config` back into the dataclass, whose ``__post_init__``
validates values and raises :class:`UserError` naming the flag; :func:`command_line`
renders a config as the ``knnlm`` command that gives it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import types
import typing
from typing import Any


class UserError(Exception):
    """An error the user can fix (bad flag, missing or mismatched file).

    The CLI prints it as one line on stderr and exits with status 2.
    """


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def warn(message: str) -> None:
    """A warning the user must see (also under ``--quiet``): one line on stderr."""
    sys.stderr.write(f"knnlm: warning: {message}\n")


def flag(default: Any = dataclasses.MISSING, help: str = "", *, aliases: tuple = (),
         choices: tuple | None = None, positional: bool = False, metavar: str | None = None,
         negative: tuple = (), const: Any = None) -> Any:
    """A dataclass field that knows its command-line form.

    ``aliases`` are extra spellings (the original code's names); ``negative`` are flags
    that set a positive boolean to False (``--no-load-keys`` for ``load_keys``); ``const``
    is the value of the flag given without one (fairseq's ``nargs='?'``).
    """
    meta = dict(help=help, aliases=tuple(aliases), choices=choices, positional=positional,
                metavar=metavar, negative=tuple(negative), const=const)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(kw_only=True)
class FairseqTaskFlags:
    """fairseq flags of the fork's command lines that ask for what knnlm always does;
    accepted so that those lines run as written."""
    task: str = flag("language_modeling", "fairseq's task (language_modeling: the only one)",
                     choices=("language_modeling",))


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, never NaN or infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """A command's docstring as written (its examples stay on their lines), and each
    option's default unless its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def build_parser(cls, prog: str, description: str | None = None,
                 parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of the dataclass ``cls``."""
    p = parser or _Parser(prog=prog, description=description,
                          formatter_class=_HelpFormatter)
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
            kw["type"] = finite_float if tp is float else tp
            if meta["choices"]:
                kw["choices"] = meta["choices"]
            if meta.get("const") is not None:
                kw["nargs"], kw["const"] = "?", meta["const"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        p.add_argument(*names, **kw)
    return p


def parse_config(cls, argv: list[str] | None, prog: str, description: str | None = None):
    args = build_parser(cls, prog, description).parse_args(argv)
    cfg = cls(**vars(args))
    check_requirements(cls, cfg, _given_flags(cls, argv))
    return cfg


def _given_flags(cls, argv: list[str] | None) -> set[str]:
    """The fields the command line set explicitly (not left at their defaults)."""
    p = build_parser(cls, "")
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(p.parse_args(argv)))


# a help text that starts "--other: ..." (or has "; [command] --other: ..." for another
# use) describes a flag that only acts with --other
_NEEDS = re.compile(r"(?:^|; )(?:[a-z][a-z-]* )?--([a-z0-9][a-z0-9-]*):")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def check_requirements(cls, cfg, given: set[str]) -> None:
    """Refuse a flag given without the flag it acts under (its help's ``--other:``
    prefix): it would be accepted and do nothing. ``--other`` counts as given when the
    config holds a value other than its default (set by a flag, or implied)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(given):
        f = fields.get(name)
        if f is None:
            continue
        needs = [n.replace("-", "_") for n in _NEEDS.findall(f.metadata.get("help", ""))]
        needs = [n for n in needs if n in fields and n != name]
        if needs and not any(getattr(cfg, n) != _default(fields[n]) for n in needs):
            raise UserError(f"{_flag_name(name)} does nothing without "
                            + " or ".join(_flag_name(n) for n in needs))


def config_dict(cfg) -> dict:
    """A dataclass config as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


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
