"""Output locks leave no trace, survive a killed holder, and sweep its temporaries."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from knnlm.guard import LOCK_SUFFIX, output_lock, temp_path
from knnlm.util import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_the_lock_file_is_gone_after_success_and_failure(tmp_path):
    out = tmp_path / "a" / "b" / "ds"
    with output_lock(out, "dir", "datastore"):
        assert (out / LOCK_SUFFIX).is_file()
        (out / "keys.npy").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["keys.npy"]

    # a failed stage: the directories the lock made are removed again, nothing is left
    fresh = tmp_path / "c" / "d" / "ds"
    with pytest.raises(RuntimeError):
        with output_lock(fresh, "dir", "datastore"):
            raise RuntimeError("the stage failed")
    assert not (tmp_path / "c").exists()

    # a file output: the lock beside it goes, a directory that was already there stays
    f = tmp_path / "a" / "index.faiss"
    with pytest.raises(KeyboardInterrupt):
        with output_lock(f, "file", "index"):
            assert f.with_name(f.name + LOCK_SUFFIX).is_file()
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "ds"
    with output_lock(out, "dir", "datastore"):
        with pytest.raises(UserError, match=f"datastore {out} is being written by process "
                                            f"{os.getpid()}"):
            with output_lock(out, "dir", "datastore"):
                pass
        assert (out / LOCK_SUFFIX).is_file()         # the refusal did not take it away
    assert not (out / LOCK_SUFFIX).exists()


def test_a_killed_holder_neither_blocks_nor_leaves_its_temporaries(tmp_path):
    out = tmp_path / "ds"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom knnlm.guard import output_lock, temp_path\n"
         f"with output_lock({str(out)!r}, 'dir', 'datastore'):\n"
         f"    open(temp_path({str(out / 'keys.npy')!r}), 'w').write('half')\n"
         "    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"process {holder.pid}"):
        with output_lock(out, "dir", "datastore"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_SUFFIX).exists() and any(p.name.endswith(".tmp") for p in out.iterdir())
    mine = temp_path(out / "vals.npy")
    mine.write_text("this process's own temporary is not swept")
    t0 = time.time()
    with output_lock(out, "dir", "datastore"):
        assert time.time() - t0 < 5
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_SUFFIX, mine.name])
    assert sorted(p.name for p in out.iterdir()) == [mine.name]
