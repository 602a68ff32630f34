"""Outputs that are safe to write: checked before any work starts, locked against a second
writer, written through uniquely named temporaries.

- :func:`check_output`: the path can be written as a file or a directory (not the other
  kind already, a writable parent, a name the filesystem accepts), and optionally has the
  free space a stage needs; a one-line :class:`UserError` naming the path otherwise.
- :func:`output_lock`: an exclusive lock (``filelock``) on an output for the duration of a
  stage. A second writer is refused at once, naming the process that holds it; the lock
  dies with its process, so a killed run never leaves a stale one.
- :func:`temp_path`: a temporary sibling unique to this process, so two processes never
  share a half-written file.
- :func:`describe_os_error`: a filesystem error (disk full, read-only, name too long) as
  one line naming the path, for the CLI.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from .util import UserError

LOCK_SUFFIX = ".knnlm-lock"


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A temporary sibling of ``path`` that no other process uses (renamed over ``path``
    once complete); ``suffix`` for writers that insist on one (``np.save``: ``.npy``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | os.PathLike | None, kind: str, flag: str = "",
                 need_bytes: int = 0) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written as ``kind``
    (``file`` or ``dir``); with ``need_bytes``, one whose filesystem lacks that space."""
    if path is None:
        return
    path, name = Path(path), f"{flag} {path}".strip()
    if kind == "file" and path.is_dir():
        raise UserError(f"{name} is a directory; a file is expected")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{name} is a file; a directory is expected")
    for part in path.parts:
        if len(part.encode()) > 255:
            raise UserError(f"{name}: a path component is longer than 255 bytes")
    base = _existing_ancestor(path.parent if kind == "file" else path)
    if not base.is_dir():
        raise UserError(f"{name}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{name}: {base} is not writable")
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{name} is not writable")
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise UserError(f"{name} needs {need_bytes / 2**30:,.2f} GiB; {base} has "
                            f"{free / 2**30:,.2f} GiB free")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, kind: str, what: str = "output"):
    """Hold an exclusive lock on the output ``path`` of ``kind`` ``dir`` (a lock file
    inside it; the directory is created) or ``file`` (``<file>.knnlm-lock`` beside it).
    Refuses at once when another process holds it, naming that process."""
    from filelock import FileLock, Timeout
    path = Path(path)
    lock_path = path / LOCK_SUFFIX if kind == "dir" else path.with_name(path.name + LOCK_SUFFIX)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(lock_path.with_name(lock_path.name + ".holder").read_text())
            who = (f"process {holder['pid']} on {holder['host']}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}: "
                   f"{holder['command']}")
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise UserError(f"{what} {path} is being written by {who}")
    info = lock_path.with_name(lock_path.name + ".holder")
    try:
        info.write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                        since=time.time(), command=" ".join(sys.argv)[:300])))
        yield
    finally:
        with contextlib.suppress(OSError):
            info.unlink()
        lock.release()


def describe_os_error(exc: OSError) -> str:
    """One line for a filesystem error: what happened and the path it happened to."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only filesystem",
            errno.EACCES: "permission denied", errno.ENAMETOOLONG: "file name too long",
            errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory",
            errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename is not None else ""
    return f"{what}: {where}" if where else what
