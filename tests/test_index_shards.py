"""Sharded index builds: same search results as the unsharded build; a killed build redoes
only its unfinished shards; a shard missing at merge is reported."""
import json
import shutil

import numpy as np
import pytest

from conftest import free_port
from knnlm.knn import index, index_read
from knnlm.cli import run as cli_run
from knnlm.util import UserError
from knnlm.knn.shards import merge_shards, shard_path, shard_ranges


def build(ds, out, **kw):
    return index.build_index(index.BuildIndexConfig(
        dstore_dir=str(ds.path), knn_keytype="att", faiss_index=str(out), train_size=4000,
        quiet=True, **kw))


def search(path, ds, xq, nprobe=4):
    idx, _ = index_read.load_index(path, ds, "att", nprobe=nprobe)
    return idx.search(xq, 10)


def inverted_lists(path):
    """Every inverted list's ids and codes, as bytes (the whole index for a flat one)."""
    import faiss
    idx = faiss.read_index(str(path))
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is None:
        return faiss.serialize_index(idx).tobytes()
    inv = ivf.invlists
    return [(faiss.rev_swig_ptr(inv.get_ids(l), inv.list_size(l)).tobytes(),
             faiss.rev_swig_ptr(inv.get_codes(l), inv.list_size(l) * inv.code_size).tobytes())
            for l in range(ivf.nlist)]


def test_shards_and_adds_start_on_faiss_blocks():
    """FAISS assigns the keys of one add in 4,096-row blocks from its first: every shard and
    every add chunk starts on a multiple of that, so each key meets the same block."""
    from knnlm.knn.shards import ADD_BLOCK, add_step
    for n, s in [(13_000, 3), (13_000, 4), (1_000_000, 7), (100, 2), (8192, 2)]:
        r = shard_ranges(n, s)
        assert len(r) == s and r[0][0] == 0 and r[-1][1] == n
        assert all(a % ADD_BLOCK == 0 and a <= b for a, b in r)
        assert all(r[i][1] == r[i + 1][0] for i in range(s - 1))
        if n >= s * ADD_BLOCK:          # as equal as whole blocks allow
            assert all(abs((b - a) - n / s) <= ADD_BLOCK for a, b in r)
    assert add_step(500_000) == 499_712 and add_step(10) == ADD_BLOCK


@pytest.mark.parametrize("factory,metric,workers", [
    ("IVF32,PQ8", "l2", 2), ("PCAR16,IVF32,PQ8", "l2", 1), ("IVF16,Flat", "ip", 1), ("Flat", "l2", 1)])
def test_sharded_equals_unsharded(trained_dstore, tmp_path, factory, metric, workers):
    ds = trained_dstore
    xq = np.asarray(ds.keys("att")[::997], dtype=np.float32) + 0.01
    build(ds, tmp_path / "one.faiss", index_factory=factory, metric=metric)
    meta = build(ds, tmp_path / "sharded.faiss", index_factory=factory, metric=metric,
                 shards=3, workers=workers)
    assert meta["shards"] == 3 and meta["ntotal"] == ds.size
    D1, I1 = search(tmp_path / "one.faiss", ds, xq)
    D2, I2 = search(tmp_path / "sharded.faiss", ds, xq)
    assert np.array_equal(I1, I2) and np.array_equal(D1, D2)
    if workers == 1:        # the adds ran with the same FAISS threads: the same lists
        assert inverted_lists(tmp_path / "one.faiss") == inverted_lists(tmp_path / "sharded.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.faiss", "one.faiss.json", "sharded.faiss", "sharded.faiss.json"]


def test_killed_sharded_build_redoes_only_unfinished_shards(trained_dstore, tmp_path, capsys,
                                                           monkeypatch):
    from knnlm.knn import shards
    ds, out = trained_dstore, tmp_path / "s.faiss"
    build(ds, out, index_factory="IVF32,PQ8", shards=3)
    ref = out.read_bytes()
    out.unlink()
    side = json.loads((tmp_path / "s.faiss.json").read_text())
    (tmp_path / "s.faiss.json").write_text(json.dumps(dict(side, complete=False)))

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "merge_shards", killed)     # killed before the merge
    with pytest.raises(KeyboardInterrupt):
        build(ds, out, index_factory="IVF32,PQ8", shards=3)
    monkeypatch.undo()
    shard_path(out, 1, 3).unlink()                                   # and shard 2 was lost
    capsys.readouterr()
    build(ds, out, index_factory="IVF32,PQ8", shards=3)
    printed = capsys.readouterr().out
    assert "2 of 3 shards already built" in printed and "shard 2/3" in printed
    assert "shard 1/3" not in printed and "shard 3/3" not in printed
    assert out.read_bytes() == ref


def test_missing_shard_at_merge_and_bad_flags(trained_dstore, tmp_path):
    ranges = shard_ranges(trained_dstore.size, 2)
    assert ranges[0][0] == 0 and ranges[-1][1] == trained_dstore.size
    with pytest.raises(UserError, match="missing"):
        merge_shards([tmp_path / "a", tmp_path / "b"], ranges)
    base = ["build-index", "--dstore-dir", str(trained_dstore.path), "--faiss-index",
            str(tmp_path / "x.faiss")]
    assert cli_run(base + ["--shards", "0"]) == 2
    assert cli_run(base + ["--shards", "2", "--starting-point", "0"]) == 2


def test_torchrun_ranks_add_the_shards_to_the_same_index(trained_dstore, tmp_path):
    """2 processes (gloo): rank 0 trains, each rank adds every other shard, rank 0 merges;
    the index file is the single-process sharded build's, byte for byte."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    one, two = tmp_path / "one.faiss", tmp_path / "two.faiss"
    argv = ["build-index", "--dstore-dir", str(trained_dstore.path), "--index-factory",
            "IVF32,PQ8", "--train-size", "4000", "--shards", "4", "--quiet"]
    assert cli_run(argv + ["--faiss-index", str(one)]) == 0
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "knnlm", *argv, "--faiss-index", str(two)],
                       env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()
    assert not list(tmp_path.glob("two.faiss.shard*")) and not (tmp_path / "two.faiss.trained").exists()


class OtherRankSees:
    """Rank 1 of 2 under torchrun, where rank 0 looked at the shards before this rank did
    and saw the ones in ``done`` (what the all-reduce adds to this rank's view)."""
    rank, world_size, is_main = 1, 2, False

    def __init__(self, done):
        self.done = done

    def all_reduce_sum(self, values):
        return [v + int(s in self.done) for s, v in enumerate(values)]


@pytest.mark.parametrize("rank0_done,built", [((), (2, 4)), ((0,), (3,))])
def test_torchrun_ranks_split_the_same_shards(trained_dstore, tmp_path, capsys, monkeypatch,
                                             rank0_done, built):
    """The ranks split the shards still to build from one shared view: a shard this rank
    sees finished but rank 0 did not (rank 0 looked first) is built again, not skipped by
    both. Rank 1 takes every other shard of the agreed list."""
    from knnlm.knn import shards
    ds, out = trained_dstore, tmp_path / "s.faiss"

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "merge_shards", killed)     # leave trained index and shards
    with pytest.raises(KeyboardInterrupt):
        build(ds, out, index_factory="IVF32,PQ8", shards=4)
    for s in (1, 2, 3):
        shard_path(out, s, 4).unlink()
    monkeypatch.setattr(shards, "_barrier", lambda: None)
    capsys.readouterr()
    meta = index.build_index(index.BuildIndexConfig(
        dstore_dir=str(ds.path), knn_keytype="att", faiss_index=str(out), train_size=4000,
        quiet=True, index_factory="IVF32,PQ8", shards=4), OtherRankSees(rank0_done))
    assert meta["rank_only"]
    printed = capsys.readouterr().out
    assert sorted(int(line.split()[1].split("/")[0]) for line in printed.splitlines()
                  if line.startswith("shard ")) == list(built)


def test_torchrun_build_index_needs_shards(trained_dstore, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_run(["build-index", "--dstore-dir", str(trained_dstore.path),
                    "--faiss-index", str(tmp_path / "x.faiss")]) == 2
    assert "--shards" in capsys.readouterr().err


@pytest.mark.parametrize("factory,metric", [("IVF32,PQ8", "l2"), ("IVF16,Flat", "ip")])
def test_kept_shards_search_as_the_merged_index(trained_dstore, bpe_databin, trained_ckpt,
                                                 tmp_path, factory, metric):
    """--keep-shards: S shard files and a sidecar listing them, no merged file; searching
    them (each shard, top-k merged, ids as datastore rows) gives the merged index's
    neighbours, and an evaluation with them the merged index's perplexity."""
    from knnlm import evaluate
    ds = trained_dstore
    xq = np.asarray(ds.keys("att")[::997], dtype=np.float32) + 0.01
    build(ds, tmp_path / "one.faiss", index_factory=factory, metric=metric)
    meta = build(ds, tmp_path / "kept.faiss", index_factory=factory, metric=metric, shards=3,
                 keep_shards=True)
    assert [s["file"] for s in meta["shards"]] == [f"kept.faiss.shard{s}of3" for s in range(3)]
    assert not (tmp_path / "kept.faiss").exists() and meta["complete"]
    idx, _ = index_read.load_index(tmp_path / "kept.faiss", ds, "att", nprobe=4)
    assert isinstance(idx, index_read.ShardedIndex) and idx.ntotal == ds.size
    D1, I1 = search(tmp_path / "one.faiss", ds, xq)
    D2, I2 = search(tmp_path / "kept.faiss", ds, xq)
    assert (I1 == I2).mean() > 0.99 and np.allclose(D1, D2, rtol=1e-5, atol=1e-4)
    # --index-mmap: each shard's codes mapped from its file, the same results
    mapped, _ = index_read.load_index(tmp_path / "kept.faiss", ds, "att", nprobe=4, mmap=True)
    D3, I3 = mapped.search(xq, 10)
    assert np.array_equal(D3, D2) and np.array_equal(I3, I2)
    again = build(ds, tmp_path / "kept.faiss", index_factory=factory, metric=metric, shards=3,
                  keep_shards=True)
    assert again["shards"] == meta["shards"]          # already built: reused
    res = {name: evaluate.main(evaluate.EvalConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid", knnlm=True,
        dstore_filename=str(ds.path), indexfile=str(tmp_path / f"{name}.faiss"), k=16,
        lmbda=0.25, knn_temp=1.0, probe=4, faiss_metric_type=metric,
        knn_sim_func="do_not_recomp_l2", tokens_per_sample=64, max_eval_tokens=400,
        quiet=True))["interpolated"]["ppl"] for name in ("one", "kept")}
    assert res["kept"] == pytest.approx(res["one"], rel=1e-4)
    (tmp_path / "kept.faiss.shard1of3").unlink()
    with pytest.raises(UserError, match="kept.faiss.shard1of3 is missing"):
        index_read.load_index(tmp_path / "kept.faiss", ds, "att")
    # a torchrun rank reads only its own shards: rank 0 of 2 (shards 0 and 2) still loads
    idx, _ = index_read.load_index(tmp_path / "kept.faiss", ds, "att", part=(0, 2))
    assert [first for _, first in idx.shards] == [meta["shards"][0]["start"],
                                                   meta["shards"][2]["start"]]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torchrun_ranks_search_their_own_shards(bpe_databin, trained_ckpt, trained_dstore,
                                                tmp_path, metric):
    """2 processes (gloo), an index kept in 3 shards: rank 0 loads shards 0 and 2, rank 1
    shard 1; both search every query of the split, rank 0 merges the top-k lists and
    scores: the neighbours and perplexity of one process with the merged index."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from knnlm.knn.cache import RetrievalCache
    ds = trained_dstore
    build(ds, tmp_path / "one.faiss", index_factory="IVF16,Flat", metric=metric)
    build(ds, tmp_path / "kept.faiss", index_factory="IVF16,Flat", metric=metric, shards=3,
          keep_shards=True)
    argv = ["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset",
            "valid", "--tokens-per-sample", "64", "--knnlm", "--k", "16", "--probe", "4",
            "--dstore-filename", str(ds.path), "--faiss-metric-type", metric, "--lmbda", "0.25",
            "--knn-temp", "1", "--knn-sim-func", "do_not_recomp_l2", "--cpu", "--quiet"]
    assert cli_run(argv + ["--indexfile", str(tmp_path / "one.faiss"), "--save-retrieval",
                           str(tmp_path / "c1"), "--results-path", str(tmp_path / "one.json")]) == 0
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "knnlm", *argv,
                        "--indexfile", str(tmp_path / "kept.faiss"), "--save-retrieval",
                        str(tmp_path / "c2"), "--results-path", str(tmp_path / "two.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 of 3 shards" in p.stdout + p.stderr or "2 of 3 shards" in p.stdout + p.stderr
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    a, b = RetrievalCache(tmp_path / "c1"), RetrievalCache(tmp_path / "c2")
    # the same distances everywhere; equal distances (duplicate keys) may come in another
    # order, and a tie at the k-th neighbour may let another entry in: ties aside
    assert np.array_equal(np.asarray(a.faiss_dists), np.asarray(b.faiss_dists))
    assert np.mean(np.asarray(a.ids) == np.asarray(b.ids)) > 0.99
    assert two["interpolated"]["ppl"] == pytest.approx(one["interpolated"]["ppl"], rel=1e-3)
