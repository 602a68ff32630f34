"""Kill a command before its n-th write, for every n, and check that running it again gives
the bytes of an uninterrupted run.

A "write" is any call that makes data durable or visible: a rename (the commit of every
atomic write), ``np.save``/``np.savez``, a memmap flush, ``faiss.write_index``,
``torch.save``. Killing before the n-th one, for n = 1, 2, … until a run finishes with no
kill, visits every state a SIGKILL between two writes can leave (a kill inside a write is
a kill before its rename). Once killed, the process writes nothing more: later writes (in
``finally`` blocks, say) are killed too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import torch

from knnlm.cli import run

TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp")


TIMINGS = ("seconds", "train_s", "add_s", "merge_s")   # JSON keys that time a run


class Killed(BaseException):
    """Not an Exception: no handler of the code under test can catch it."""


_WRITES = [(os, "replace"), (os, "rename"), (np, "save"), (np, "savez"),
           (np.memmap, "flush"), (faiss, "write_index"), (torch, "save")]


@contextlib.contextmanager
def kill_before_write(n: int):
    """Raise :class:`Killed` at the n-th write and at every write after it; yields a dict
    whose ``writes`` is the number of writes seen and ``killed`` whether the kill came."""
    state = dict(writes=0, killed=False)
    saved = [(obj, name, getattr(obj, name)) for obj, name in _WRITES]

    def wrap(fn):
        def write(*a, **k):
            state["writes"] += 1
            if state["writes"] >= n:
                state["killed"] = True
                raise Killed(f"killed before write {n}")
            return fn(*a, **k)
        return write
    for obj, name, fn in saved:
        setattr(obj, name, wrap(fn))
    try:
        yield state
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def snapshot(paths: list[Path]) -> dict[str, str]:
    """Hash of every file under ``paths`` (files or directories), temporaries of killed
    writers aside (the next run's lock sweeps them)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if not TEMP.match(p.name):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _diff(got: str | None, want: str | None) -> str:
    """The keys two normalised JSON files differ in (or which side lacks the file)."""
    if got is None or want is None:
        return "only after the kill" if want is None else "missing after the kill"
    try:
        a, b = json.loads(got), json.loads(want)
    except ValueError:
        return "bytes differ"
    return "keys " + ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def check_every_kill_point(argv: list[str], outputs: list[Path], max_kills: int = 200,
                           volatile: tuple[str, ...] = TIMINGS) -> int:
    """Run ``knnlm argv`` once whole; then for n = 1, 2, …: from the same starting state,
    kill it before its n-th write and run it again, asserting the outputs equal the whole
    run's byte for byte (JSON files compared without their ``volatile`` keys). Returns the
    number of kill points visited."""
    def clean_run():
        rc = run(argv)
        assert rc == 0, f"knnlm {' '.join(argv)} exited {rc}"

    def norm(snap):
        out = {}
        for path, digest in snap.items():
            if path.endswith(".json"):
                obj = json.loads(Path(path).read_text())
                for key in volatile:
                    obj.pop(key, None)
                digest = json.dumps(obj, sort_keys=True)
            out[path] = digest
        return out

    remove(outputs)
    clean_run()
    want = norm(snapshot(outputs))
    for n in range(1, max_kills + 1):
        remove(outputs)
        with kill_before_write(n) as st:
            try:
                run(argv)
            except Killed:
                pass
        if not st["killed"]:
            assert norm(snapshot(outputs)) == want
            return n - 1
        clean_run()
        got = norm(snapshot(outputs))
        assert got == want, f"killed before write {n}: " + ", ".join(
            f"{k}: {_diff(got.get(k), want.get(k))}"
            for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
    raise AssertionError(f"more than {max_kills} writes")
