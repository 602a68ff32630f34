"""Outputs that are safe to write: checked before any work starts, locked against a second
writer, written through uniquely named temporaries.

- :func:`check_output`: the path can be written as a file or a directory (not the other
  kind already, a writable parent, a name the filesystem accepts), and optionally has the
  free space a stage needs; a one-line :class:`UserError` naming the path otherwise.
- :func:`output_lock`: an exclusive lock (``flock``) on an output for the duration of a
  stage. A second writer is refused at once, naming the process that holds it; the lock
  dies with its process, so a killed run never leaves a stale one, and its file is removed
  when the stage ends.
- :func:`temp_path`: a temporary sibling unique to this process, so two processes never
  share a half-written file.
- :func:`other_configuration`: the output rule — an existing output of the same
  configuration is resumed or reused, one of another is refused unless ``--overwrite``.
- :func:`describe_os_error`: a filesystem error (disk full, read-only, name too long) as
  one line naming the path, for the CLI.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from .util import UserError, warn

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, name: str | None = None) -> None:
    """Remove the temporaries (:func:`temp_path`) that killed processes left in
    ``directory`` (only those of the output ``name``, when given); called under the
    output's lock, so no live writer of that output owns one."""
    pattern = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = pattern.match(entry.name)
            if not m or (name is not None and m["name"] != name):
                continue
            if int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)


def _holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
        return (f"process {holder['pid']} on {holder['host']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}: "
                f"{holder['command']}")
    except (OSError, ValueError, KeyError):
        return "another process"


def _acquire(lock_path: Path, path: Path, what: str) -> int:
    """An exclusive ``flock`` on ``lock_path``, or a UserError naming the holder. The lock
    file is removed on release, so the descriptor is checked to still be the file at the
    path (a releaser may have unlinked the one this process opened)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{what} {path} is being written by {_holder(lock_path)}")
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, kind: str, what: str = "output"):
    """Hold an exclusive lock on the output ``path`` of ``kind`` ``dir`` (a lock file
    inside it; the directory is created) or ``file`` (``<file>.knnlm-lock`` beside it).
    Refuses at once when another process holds it, naming that process. The lock dies
    with its process (a killed run never leaves a stale one) and its file is removed when
    the stage ends, however it ends; a directory the lock created for a stage that failed
    is removed again when nothing else was written to it. Temporaries that killed writers
    of the output left are removed once the lock is held."""
    path = Path(path)
    lock_path = path / LOCK_SUFFIX if kind == "dir" else path.with_name(path.name + LOCK_SUFFIX)
    created = _make_dirs(lock_path.parent)
    try:
        fd = _acquire(lock_path, path, what)
    except BaseException:
        _remove_empty(created)
        raise
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                     since=time.time(),
                                     command=" ".join(sys.argv)[:300])).encode())
        if kind == "dir":
            remove_stale_temps(path)
        remove_stale_temps(path.parent, path.name)
        yield
        ok = True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)             # closing the descriptor releases the flock
        if not ok:
            _remove_empty(created)


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p``, returning the directories it created (outermost first)."""
    missing = []
    p = directory
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_empty(created: list[Path]) -> None:
    """Remove again the directories :func:`_make_dirs` created, innermost first, where
    they are still empty (a failed stage leaves no trace)."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def other_configuration(path: str | os.PathLike, what: str, old: dict, new: dict,
                        overwrite: bool) -> bool:
    """The output rule every writer follows. An output at ``path`` made by the same
    configuration (``old`` and ``new``, the settings that define it, agree) is resumed or
    reused: False. One made by another configuration is refused
    in one line naming the settings that differ, unless ``overwrite`` (``--overwrite``):
    then True, a line on stderr, and the caller replaces it (its readers refuse it until
    the new one is committed)."""
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not differ:
        return False
    named = ", ".join(differ[:5]) + (", ..." if len(differ) > 5 else "")
    if not overwrite:
        raise UserError(f"{what} {path} was made with another configuration ({named} "
                        "differ); give --overwrite to replace it, or choose another path")
    warn(f"--overwrite: replacing {what} {path} ({named} differ)")
    return True


def describe_os_error(exc: OSError) -> str:
    """One line for a filesystem error: what happened and the path it happened to."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only filesystem",
            errno.EACCES: "permission denied", errno.ENAMETOOLONG: "file name too long",
            errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory",
            errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
    where = exc.filename if exc.filename is not None else ""
    return f"{what}: {where}" if where else what
