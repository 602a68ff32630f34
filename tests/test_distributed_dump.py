"""torchrun build-dstore: 2 processes (gloo) write the same bytes as one; a killed rank
resumes its own range; ranks that disagree are refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import free_port
from knnlm import build_dstore
from knnlm.knn.datastore import Datastore

ROOT = Path(__file__).resolve().parents[1]
FILES = ("keys_att.npy", "keys_ffn.npy", "vals.npy", "pos.npy", "datastore.json")


def args(databin, ckpt, out):
    return ["build-dstore", str(databin.path), "--path", str(ckpt), "--dstore-dir", str(out),
            "--knn-keytype", "att,ffn", "--tokens-per-sample", "64", "--context-window", "16",
            "--max-tokens", "512", "--quiet", "--cpu"]


def torchrun(argv, port):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "knnlm", *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_single_process_bytes_and_resume(bpe_databin, trained_ckpt, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_dir=str(one),
        knn_keytype="att,ffn", tokens_per_sample=64, context_window=16, max_tokens=512,
        quiet=True, cpu=True))
    p = torchrun(args(bpe_databin, trained_ckpt, two), free_port())
    assert p.returncode == 0, p.stderr[-3000:]
    for f in FILES:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    assert not list(two.glob("progress.*"))

    # a kill: rank 1 stopped inside its range, rank 0 had finished its own
    meta = json.loads((two / "datastore.json").read_text())
    n = meta["size"]
    windows = build_dstore.make_windows(n, bpe_databin.split("train"), bpe_databin.eos, 64, 16, "none")
    r0 = build_dstore.rank_windows(windows, 512, 0, 2)
    r1 = build_dstore.rank_windows(windows, 512, 1, 2)
    starts = [b[0].score_start for b in build_dstore.batch_windows(r1, 512)]
    mid = starts[len(starts) // 2]        # progress is recorded at batch boundaries
    for rank, (s, e, done) in enumerate([(r0[0].score_start, r0[-1].end, r0[-1].end),
                                         (r1[0].score_start, r1[-1].end, mid)]):
        (two / f"progress.rank{rank}.json").write_text(json.dumps(
            dict(world_size=2, rank=rank, start=s, end=e, done=done)))
    keys = np.load(two / "keys_att.npy", mmap_mode="r+")
    keys[mid:] = 0
    keys[0] = 7.0           # inside rank 0's finished range: must be left alone
    keys.flush()
    del keys
    (two / "datastore.json").write_text(json.dumps(dict(meta, rows_written=0, complete=False)))
    p = torchrun(args(bpe_databin, trained_ckpt, two), free_port())
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = np.load(one / "keys_att.npy"), np.load(two / "keys_att.npy")
    assert np.all(b[0] == 7.0)                       # rank 0 did not redo its range
    assert np.array_equal(a[1:], b[1:])              # rank 1 finished its own
    assert Datastore(two).meta["complete"]


def two_ranks(argv_of, cwd_of, port):
    """Start ranks 0 and 1 by hand (as torchrun would on two nodes); their stderr."""
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "knnlm", *argv_of(rank)], env=env,
                                      cwd=cwd_of(rank), stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, e) for p, e in zip(procs, errs)]


def test_ranks_that_disagree_are_refused(bpe_databin, trained_ckpt, tmp_path):
    out = two_ranks(lambda r: args(bpe_databin, trained_ckpt, tmp_path / f"ds{r}"),
                    lambda r: tmp_path, free_port())
    for rc, err in out:
        assert rc == 2 and "disagree" in err and "Traceback" not in err, err
    assert not (tmp_path / "ds1").exists()


def test_a_dstore_dir_the_ranks_do_not_share_is_refused(bpe_databin, trained_ckpt, tmp_path):
    """Two nodes given the same --dstore-dir on their own disks (here: the same relative
    path from two working directories) would each fill half of their own files."""
    for d in ("node0", "node1"):
        (tmp_path / d).mkdir()
    out = two_ranks(lambda r: args(bpe_databin, trained_ckpt, "ds"),
                    lambda r: tmp_path / f"node{r}", free_port())
    for rc, err in out:
        assert rc == 2 and "not one directory for all ranks" in err, err
        assert "1 on" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "node1" / "ds").exists()
    assert not list((tmp_path / "node0" / "ds").glob("shared-check.*"))
    assert not json.loads((tmp_path / "node0" / "ds" / "datastore.json").read_text())["complete"]

    # the same state seen differently: node 0 already holds the complete datastore
    p = torchrun(args(bpe_databin, trained_ckpt, tmp_path / "node0" / "ds"), free_port())
    assert p.returncode == 0, p.stderr[-3000:]
    out = two_ranks(lambda r: args(bpe_databin, trained_ckpt, "ds"),
                    lambda r: tmp_path / f"node{r}", free_port())
    for rc, err in out:
        assert rc == 2 and "in another state" in err and "Traceback" not in err, err
    assert not (tmp_path / "node1" / "ds").exists()
