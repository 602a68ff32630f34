"""Every resumable writer, killed between any two of its writes and run again, ends
byte-identical to a run that was never killed (tests/killpoints.py): the dump, the index
build (whole and in shards), the retrieval cache, the exact search's state, tune, the
gate, and the derived datastores."""
import shutil

import pytest

from killpoints import check_every_kill_point
from knnlm import evaluate
from knnlm.knn import index


@pytest.fixture(scope="module")
def world(bpe_databin, trained_ckpt, trained_dstore, tmp_path_factory):
    """A datastore with an IVF index and a complete retrieval cache of 600 valid tokens."""
    w = tmp_path_factory.mktemp("kills")
    shutil.copytree(trained_dstore.path, w / "ds", ignore=shutil.ignore_patterns("index_*"))
    index.build_index(index.BuildIndexConfig(dstore_dir=str(w / "ds"), knn_keytype="att",
                                             index_factory="IVF32,PQ8", train_size=4000,
                                             quiet=True))
    evaluate.main(evaluate.EvalConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid",
        tokens_per_sample=64, context_window=32, knnlm=True, dstore_filename=str(w / "ds"),
        k=16, probe=8, lmbda=0.25, knn_temp=1.0, save_retrieval=str(w / "cache"),
        max_eval_tokens=600, quiet=True))
    return w


def lm_flags(bpe_databin, trained_ckpt):
    return [str(bpe_databin.path), "--path", str(trained_ckpt), "--tokens-per-sample", "64",
            "--context-window", "32", "--quiet"]


def test_build_dstore(bpe_databin, trained_ckpt, tmp_path):
    out = tmp_path / "ds"
    n = check_every_kill_point(
        ["build-dstore", *lm_flags(bpe_databin, trained_ckpt), "--dstore-dir", str(out),
         "--knn-keytype", "att,ffn", "--max-tokens", "1024", "--max-dstore-tokens", "3000"],
        [out])
    assert n >= 10          # several blocks, each committed


@pytest.mark.parametrize("shards", [1, 3])
def test_build_index(world, shards):
    out = world / "ds" / "kill.faiss"
    n = check_every_kill_point(
        ["build-index", "--dstore-dir", str(world / "ds"), "--index-factory", "IVF16,PQ8",
         "--faiss-index", str(out), "--train-size", "3000", "--num-keys-to-add-at-a-time",
         "4096", "--save-interval-seconds", "0", "--shards", str(shards), "--quiet"],
        [out, out.with_name(out.name + ".json"), out.with_name(out.name + ".partial"),
         out.with_name(out.name + ".shards")])
    assert n >= 4


def test_eval_lm_retrieval_cache(bpe_databin, trained_ckpt, world, tmp_path):
    out = tmp_path / "cache"
    n = check_every_kill_point(
        ["eval-lm", *lm_flags(bpe_databin, trained_ckpt), "--gen-subset", "valid",
         "--knnlm", "--dstore-filename", str(world / "ds"), "--k", "16", "--probe", "8",
         "--lmbda", "0.25", "--max-eval-tokens", "900", "--max-tokens", "256",
         "--save-retrieval", str(out), "--save-exact-dists"], [out])
    assert n >= 6


def test_eval_lm_exact_search(bpe_databin, trained_ckpt, world, tmp_path, monkeypatch):
    """The exact search's passes (LM, key scan, scoring) with its state saved per chunk."""
    import functools
    from knnlm.knn import exact, search
    monkeypatch.setitem(exact.STREAM_BLOCKS, "cpu", (512, 4096))      # four key chunks,
    monkeypatch.setattr(search, "stream_search",                      # each one saved
                        functools.partial(exact.stream_search, save_interval_s=0))
    monkeypatch.setattr(evaluate, "EXACT_BLOCK", 256)                 # three scoring blocks
    out = tmp_path / "cache"
    n = check_every_kill_point(
        ["eval-lm", *lm_flags(bpe_databin, trained_ckpt), "--gen-subset", "valid",
         "--knnlm", "--dstore-filename", str(world / "ds"), "--k", "16", "--exact-search",
         "--lmbda", "0.25", "--max-eval-tokens", "600", "--save-retrieval", str(out)], [out])
    assert n >= 4


def test_tune(bpe_databin, trained_ckpt, world):
    ds = world / "ds"
    n = check_every_kill_point(
        ["tune", *lm_flags(bpe_databin, trained_ckpt), "--knnlm", "--dstore-filename", str(ds),
         "--k", "4,16", "--lmbda", "0:1:0.25", "--knn-temp", "1,2", "--probe", "8",
         "--max-eval-tokens", "600"],
        [ds / "index_att_l2.faiss.tuned.json", ds / "index_att_l2.faiss.tune-valid"])
    assert n >= 4


def test_train_gate(world, tmp_path):
    out = tmp_path / "gate"
    n = check_every_kill_point(["train-gate", "--cache", str(world / "cache"), "--out", str(out),
                                "--epochs", "3", "--quiet"], [out])
    assert n >= 2


@pytest.mark.parametrize("method", ["merge", "random", "kmeans"])
def test_prune_dstore(world, tmp_path, method):
    out = tmp_path / "pruned"
    n = check_every_kill_point(["prune-dstore", "--dstore-dir", str(world / "ds"), "--out",
                                str(out), "--method", method, "--merge-k", "4", "--clusters",
                                "100", "--probe", "4", "--quiet"], [out])
    assert n >= 3


def test_reduce_dstore(world, tmp_path):
    out = tmp_path / "reduced"
    n = check_every_kill_point(["reduce-dstore", "--dstore-dir", str(world / "ds"), "--out",
                                str(out), "--pca-dim", "16", "--train-size", "4000",
                                "--quiet"], [out])
    assert n >= 3


def test_cluster_dstore(world, tmp_path):
    out = tmp_path / "members.npz"
    n = check_every_kill_point(["cluster-dstore", "--dstore-dir", str(world / "ds"), "--out",
                                str(out), "--num-clusters", "64", "--sample-size", "4000",
                                "--quiet"], [out, tmp_path / "members.json"])
    assert n >= 2


@pytest.mark.parametrize("command", ["build-dstore", "prune-dstore", "reduce-dstore"])
def test_a_lost_batch_is_caught_before_success(bpe_databin, trained_ckpt, world, tmp_path,
                                               monkeypatch, capsys, command):
    """A writer that loses a batch (here: its second write never lands) is caught by the
    verification at the end: one line naming the entry, exit 2, the datastore marked
    unfinished; the same command then writes it whole."""
    import json

    from knnlm.cli import run
    from knnlm.knn import datastore
    out = tmp_path / "out"
    argv = {"build-dstore": ["build-dstore", *lm_flags(bpe_databin, trained_ckpt),
                             "--dstore-dir", str(out), "--max-tokens", "1024",
                             "--max-dstore-tokens", "3000"],
            "prune-dstore": ["prune-dstore", "--dstore-dir", str(world / "ds"), "--out",
                             str(out), "--method", "random", "--ratio", "0.9", "--quiet"],
            "reduce-dstore": ["reduce-dstore", "--dstore-dir", str(world / "ds"), "--out",
                              str(out), "--pca-dim", "8", "--quiet"]}[command]
    monkeypatch.setattr("knnlm.knn.prune.COPY_CHUNK", 2000)       # several writes each
    monkeypatch.setattr("knnlm.knn.reduce.CHUNK", 2000)
    monkeypatch.setattr(datastore, "VERIFY_CHUNK", 1000)
    real, calls = datastore.DatastoreWriter.write, []

    def loses_the_second(self, start, keys, vals, pos):
        calls.append(start)
        if len(calls) != 2:
            real(self, start, keys, vals, pos)
    monkeypatch.setattr(datastore.DatastoreWriter, "write", loses_the_second)
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"entry {calls[1]:,} holds the wrong" in err[0], err
    assert not json.loads((out / "datastore.json").read_text())["complete"]
    monkeypatch.setattr(datastore.DatastoreWriter, "write", real)
    assert run(argv) == 0
    assert json.loads((out / "datastore.json").read_text())["complete"]
