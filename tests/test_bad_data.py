"""Nothing silent: damaged numbers, broken settings files, flags that would do nothing and
outputs of another configuration are each refused in one line, exit status 2, with no
file of the user's changed, added or left behind (tests/test_bad_inputs.py does the same
for bad flags and missing or truncated files)."""
import json
import shutil

import numpy as np
import pytest
import torch

from knnlm import evaluate, train_gate
from knnlm.cli import run
from knnlm.knn import clusters, index, prune, reduce
from conftest import refused
from test_bad_inputs import snapshot


@pytest.fixture(scope="module")
def world(bpe_databin, trained_ckpt, trained_dstore, tmp_path_factory):
    """A user's artifacts (datastore, index, cache, gate, members, pruned and reduced
    datastores), and damaged copies of them."""
    w = tmp_path_factory.mktemp("bad_data")
    shutil.copytree(bpe_databin.path, w / "db")
    shutil.copy(trained_ckpt, w / "ckpt.pt")
    shutil.copytree(trained_dstore.path, w / "ds", ignore=shutil.ignore_patterns("index_*"))
    ds = str(w / "ds")
    index.build_index(index.BuildIndexConfig(dstore_dir=ds, index_factory="IVF32,PQ8",
                                             train_size=4000, quiet=True))
    common = dict(data=str(w / "db"), path=str(w / "ckpt.pt"), gen_subset="valid",
                  tokens_per_sample=64, knnlm=True, dstore_filename=ds, k=16, probe=8,
                  lmbda=0.25, knn_temp=1.0, max_eval_tokens=500, quiet=True)
    evaluate.main(evaluate.EvalConfig(**common, save_retrieval=str(w / "cache")))
    evaluate.main(evaluate.EvalConfig(**common, save_retrieval=str(w / "cache_faiss"),
                                      knn_sim_func="do_not_recomp_l2"))
    train_gate.main(train_gate.TrainGateConfig(cache=str(w / "cache"), out=str(w / "gate"),
                                               epochs=1, quiet=True))
    clusters.main(clusters.ClusterConfig(dstore_dir=ds, out=str(w / "members.npz"),
                                         num_clusters=8, sample_size=4000, quiet=True))
    prune.main(prune.PruneConfig(dstore_dir=ds, out=str(w / "pruned"), method="random",
                                 ratio=0.5, quiet=True))
    reduce.main(reduce.ReduceConfig(dstore_dir=ds, out=str(w / "reduced"), pca_dim=8,
                                    train_size=4000, quiet=True))
    assert run(["centroids", "--dstore-dir", ds, "--out", str(w / "centroids"), "--mode",
                "per-word", "--ratio", "1", "--quiet"]) == 0
    (w / "good.txt").write_text("To be, or not to be\n" * 50)
    # damaged copies
    shutil.copytree(w / "ds", w / "ds_nan")
    keys = np.load(w / "ds_nan" / "keys_att.npy", mmap_mode="r+")
    keys[5, 2] = np.nan
    keys.flush()
    del keys
    shutil.copytree(w / "cache", w / "cache_nan")
    d = np.load(w / "cache_nan" / "exact_dists.npy")       # the column it scores with
    d[3, 1] = np.nan
    np.save(w / "cache_nan" / "exact_dists.npy", d)
    shutil.copytree(w / "ds", w / "ds_tuned")
    (w / "ds_tuned" / "index_att_l2.faiss.tuned.json").write_text("{garbage")
    shutil.copytree(w / "pruned", w / "pruned_nan")
    counts = np.load(w / "pruned_nan" / "counts.npy")
    counts[7] = np.inf
    np.save(w / "pruned_nan" / "counts.npy", counts)
    shutil.copytree(w / "reduced", w / "reduced_nan")
    with np.load(w / "reduced_nan" / "projection.npz") as z:
        mean, comp = z["mean"].copy(), z["components"]
    mean[1] = np.nan
    np.savez(w / "reduced_nan" / "projection.npz", mean=mean, components=comp)
    shutil.copytree(w / "gate", w / "gate_nan")
    state = torch.load(w / "gate_nan" / "gate.pt", weights_only=True)
    first = next(iter(state))
    state[first].view(-1)[0] = float("nan")
    torch.save(state, w / "gate_nan" / "gate.pt")
    shutil.copytree(w / "gate", w / "gate_evil")
    with open(w / "gate_evil" / "gate.pt", "wb") as fh:
        import os
        import pickle
        pickle.dump({"x": os.getcwd}, fh)
    lm = np.full(300, -2.0, dtype=np.float32)
    knn = np.full(300, -np.inf, dtype=np.float32)      # -inf: no neighbour (allowed)
    np.save(w / "lm.npy", lm)
    np.save(w / "knn.npy", knn)
    lm[10] = np.nan
    np.save(w / "lm_nan.npy", lm)
    knn[20] = np.inf
    np.save(w / "knn_inf.npy", knn)
    return w


def cases(w):
    db, ck, ds, new = str(w / "db"), str(w / "ckpt.pt"), str(w / "ds"), str(w / "new")
    ev = ["eval-lm", db, "--path", ck, "--gen-subset", "valid", "--quiet",
          "--tokens-per-sample", "64", "--max-eval-tokens", "200"]
    kn = ev + ["--knnlm", "--k", "8", "--probe", "4"]
    gate = ["--gate", str(w / "gate"), "--retrieval-fraction", "0.5"]
    return {
        # damaged numbers
        "NaN cache distances, train-gate": ["train-gate", "--cache", str(w / "cache_nan"),
                                            "--out", new, "--epochs", "1", "--quiet"],
        "NaN cache distances, sweep": ["sweep", "--cache", str(w / "cache_nan"), "--out", new,
                                       "--quiet"],
        "NaN key, cluster-dstore": ["cluster-dstore", "--dstore-dir", str(w / "ds_nan"),
                                    "--out", new + ".npz", "--num-clusters", "8", "--quiet"],
        "NaN key, exact search": kn + ["--dstore-filename", str(w / "ds_nan"),
                                       "--exact-search"],
        "NaN key, recomputed distance": kn + ["--dstore-filename", str(w / "ds_nan")],
        "NaN key, build-index": ["build-index", "--dstore-dir", str(w / "ds_nan"),
                                 "--faiss-index", new + ".faiss", "--index-factory",
                                 "IVF16,PQ8", "--train-size", "2000", "--quiet"],
        "NaN key, prune merge": ["prune-dstore", "--dstore-dir", str(w / "ds_nan"), "--out",
                                 new, "--method", "merge", "--quiet"],
        "inf count": kn + ["--dstore-filename", str(w / "pruned_nan"), "--exact-search"],
        "NaN projection": kn + ["--dstore-filename", str(w / "reduced_nan"), "--exact-search"],
        "NaN gate parameter": kn + ["--dstore-filename", ds, "--gate", str(w / "gate_nan"),
                                    "--retrieval-fraction", "0.5"],
        "pickle as gate.pt": kn + ["--dstore-filename", ds, "--gate", str(w / "gate_evil"),
                                   "--retrieval-fraction", "0.5"],
        "NaN LM score": ["loss-weights", db, "--scores", str(w / "lm_nan.npy"),
                         "--knn-scores", str(w / "knn.npy"), "--out", new + ".json"],
        "+inf kNN score": ["loss-weights", db, "--scores", str(w / "lm.npy"),
                           "--knn-scores", str(w / "knn_inf.npy"), "--out", new + ".json"],
        # broken settings
        "garbage tuned.json": kn[:-4] + ["--dstore-filename", str(w / "ds_tuned")],
        "garbage tuned.json, flags given": kn + ["--dstore-filename", str(w / "ds_tuned"),
                                                 "--lmbda", "0.3", "--knn-temp", "2"],
        # flags that would do nothing
        "--gate without --knnlm": ev + gate,
        "--probe without --knnlm": ev + ["--probe", "8"],
        "--retrieval-fraction without --gate": kn + ["--dstore-filename", ds,
                                                     "--retrieval-fraction", "0.5"],
        "--workers without --shards": ["build-index", "--dstore-dir", ds, "--workers", "2",
                                       "--faiss-index", new + ".faiss"],
        "--save-exact-dists without --save-retrieval": kn + ["--dstore-filename", ds,
                                                             "--save-exact-dists"],
        "sweep --score exact, no exact distances": ["sweep", "--cache",
                                                    str(w / "cache_faiss"), "--out", new,
                                                    "--score", "exact", "--quiet"],
        # outputs of another configuration
        "build-index, another factory": ["build-index", "--dstore-dir", ds, "--index-factory",
                                         "IVF16,PQ8", "--train-size", "4000", "--quiet"],
        "build-dstore, another datastore": ["build-dstore", db, "--path", ck, "--dstore-dir",
                                            ds, "--gen-subset", "valid",
                                            "--tokens-per-sample", "64", "--quiet"],
        "cache of another k": kn + ["--dstore-filename", ds, "--save-retrieval",
                                    str(w / "cache")],
        "tune onto another evaluation's cache": [
            "tune", db, "--path", ck, "--dstore-filename", ds, "--tokens-per-sample", "64",
            "--max-eval-tokens", "200", "--probe", "4", "--save-retrieval", str(w / "cache"),
            "--quiet"],
        "prune, another ratio": ["prune-dstore", "--dstore-dir", ds, "--out",
                                 str(w / "pruned"), "--method", "random", "--ratio", "0.4",
                                 "--quiet"],
        "reduce, another dimension": ["reduce-dstore", "--dstore-dir", ds, "--out",
                                      str(w / "reduced"), "--pca-dim", "4", "--quiet"],
        "cluster-dstore, other clusters": ["cluster-dstore", "--dstore-dir", ds, "--out",
                                           str(w / "members.npz"), "--num-clusters", "16",
                                           "--sample-size", "4000", "--quiet"],
        "train-gate, other epochs": ["train-gate", "--cache", str(w / "cache"), "--out",
                                     str(w / "gate"), "--epochs", "2", "--quiet"],
        "preprocess onto another data-bin": ["preprocess", "--destdir", db, "--trainpref",
                                             str(w / "good.txt"), "--vocab-size", "320",
                                             "--quiet"],
        "centroids, other ratio": ["centroids", "--dstore-dir", ds, "--out",
                                   str(w / "centroids"), "--mode", "per-word", "--ratio", "2",
                                   "--quiet"],
    }


EXPECT = {
    "NaN cache distances, train-gate": "exact_dists.npy: the distance of entry 3, column 1 is nan",
    "NaN cache distances, sweep": "exact_dists.npy: the distance of entry 3, column 1 is nan",
    "NaN key, cluster-dstore": "keys_att.npy: the key of entry 5 is not finite",
    "NaN key, exact search": "keys_att.npy: the key of entry 5 is not finite",
    "NaN key, recomputed distance": "keys_att.npy: the key of entry 5 is not finite",
    "NaN key, build-index": "keys_att.npy: the key of entry 5 is not finite",
    "NaN key, prune merge": "keys_att.npy: the key of entry 5 is not finite",
    "inf count": "counts.npy: the count of entry 7 is inf",
    "NaN projection": "projection.npz: the projection's mean of entry 1 is nan",
    "NaN gate parameter": "gate.pt: parameter",
    "pickle as gate.pt": "unreadable gate files",
    "NaN LM score": "lm_nan.npy: the LM log-prob of entry 10 is nan",
    "+inf kNN score": "knn_inf.npy: the kNN log-prob of entry 20 is inf",
    "garbage tuned.json": "index_att_l2.faiss.tuned.json is not valid JSON",
    "garbage tuned.json, flags given": "index_att_l2.faiss.tuned.json is not valid JSON",
    "--gate without --knnlm": "--gate does nothing without --knnlm",
    "--probe without --knnlm": "--probe does nothing without --knnlm",
    "--retrieval-fraction without --gate": "--gate-lambda need --gate DIR",
    "--workers without --shards": "--workers does nothing without --shards",
    "--save-exact-dists without --save-retrieval":
        "--save-exact-dists does nothing without --save-retrieval",
    "sweep --score exact, no exact distances": "holds no exact distances",
    "build-index, another factory": "(factory differ); give --overwrite",
    "build-dstore, another datastore": "datastore",
    "cache of another k": "--k",
    "tune onto another evaluation's cache": "another configuration",
    "prune, another ratio": "another configuration",
    "reduce, another dimension": "another configuration",
    "cluster-dstore, other clusters": "(num_clusters differ)",
    "train-gate, other epochs": "(epochs differ)",
    "preprocess onto another data-bin": "another configuration",
    "centroids, other ratio": "(ratio differ)",
}


def flag_cases(w) -> list[list[str]]:
    """Bad flags of the commands and features added after tests/test_bad_inputs.py:
    RetoMaton, the gate, weighted, pruned and reduced datastores, clustering."""
    db, ck, ds, new = str(w / "db"), str(w / "ckpt.pt"), str(w / "ds"), str(w / "new")
    kn = ["eval-lm", db, "--path", ck, "--gen-subset", "valid", "--quiet", "--tokens-per-sample",
          "64", "--max-eval-tokens", "200", "--knnlm", "--dstore-filename", ds, "--k", "8",
          "--probe", "4"]
    members, gate = str(w / "members.npz"), str(w / "gate")
    pr = ["prune-dstore", "--dstore-dir", ds, "--out", new, "--quiet"]
    rd = ["reduce-dstore", "--dstore-dir", ds, "--out", new, "--quiet"]
    cl = ["cluster-dstore", "--dstore-dir", ds, "--out", new + ".npz", "--quiet"]
    tg = ["train-gate", "--cache", str(w / "cache"), "--out", new, "--quiet"]
    return [
        kn + ["--retomaton", "--min-knns", "-1"],
        kn + ["--retomaton", "--max-knns", "0"],
        kn + ["--retomaton", "--exact-search"],
        kn + ["--retomaton", "--ignore-top"],
        kn + ["--members", members],
        kn + ["--retomaton", "--members", str(w / "missing.npz")],
        kn[:-6] + ["--dstore-filename", str(w / "pruned"), "--exact-search", "--retomaton",
                   "--members", members],
        kn + ["--gate", gate],
        kn + ["--gate", gate, "--retrieval-fraction", "1.5"],
        kn + ["--gate", gate, "--retrieval-fraction", "0.5", "--gate-threshold", "0.3"],
        kn + ["--gate", str(w / "nogate"), "--retrieval-fraction", "0.5"],
        kn + ["--gate", gate, "--retrieval-fraction", "0.5", "--retomaton"],
        kn[:-6] + ["--dstore-filename", str(w / "pruned"), "--exact-search", "--gate", gate,
                   "--retrieval-fraction", "0.5"],
        kn[:-6] + ["--dstore-filename", str(w / "reduced"), "--exact-search", "--knn-keytype",
                   "ffn"],
        pr + ["--method", "random", "--ratio", "0"],
        pr + ["--method", "random", "--ratio", "1.5"],
        pr + ["--method", "kmeans", "--clusters", "0"],
        pr + ["--method", "kmeans", "--clusters", "999999"],
        pr + ["--method", "merge", "--merge-k", "0"],
        pr + ["--method", "merge", "--indexfile", str(w / "missing.faiss")],
        pr + ["--method", "annealing"],
        ["prune-dstore", "--dstore-dir", str(w / "nods"), "--out", new],
        rd + ["--pca-dim", "0"],
        rd + ["--pca-dim", "999"],
        ["reduce-dstore", "--dstore-dir", str(w / "reduced"), "--out", new, "--pca-dim", "4"],
        rd + ["--pca-dim", "4", "--knn-keytype", "layer:7"],
        cl + ["--num-clusters", "0"],
        cl + ["--num-clusters", "999999"],
        ["cluster-dstore", "--dstore-dir", ds, "--out", new + ".txt", "--num-clusters", "4"],
        tg + ["--valid-fraction", "1.5"],
        tg + ["--epochs", "0"],
        tg + ["--lr", "nan"],
        ["train-gate", "--cache", str(w / "nocache"), "--out", new],
        ["train-gate", "--cache", ds, "--out", new],
        ["sweep", "--cache", str(w / "cache"), "--out", new, "--k", "0"],
        ["sweep", "--cache", str(w / "cache"), "--out", new, "--k", "99999"],
    ]


def test_bad_flags_of_the_newer_commands(world, capsys):
    before = snapshot(world)
    failures = [(argv[0], argv[-4:], bad) for argv in flag_cases(world)
                if (bad := refused(argv, capsys))]
    assert not failures, "\n".join(map(str, failures))
    assert snapshot(world) == before


def test_nothing_bad_passes_silently(world, capsys):
    before = snapshot(world)
    table = cases(world)
    assert set(table) == set(EXPECT)
    failures = []
    for name, argv in table.items():
        if bad := refused(argv, capsys, EXPECT[name]):
            failures.append((name, bad))
        after = snapshot(world)
        if after != before:
            changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
            failures.append((name, "changed or left", changed[:5]))
            before = after
    assert not failures, "\n".join(map(str, failures))


def test_overwrite_replaces_an_output_of_another_configuration(world, tmp_path, capsys):
    """--overwrite: the other datastore is replaced by a whole new one (no file of the old
    one left), with one warning line naming what differed."""
    out = tmp_path / "ds"
    shutil.copytree(world / "ds", out)
    argv = ["build-dstore", str(world / "db"), "--path", str(world / "ckpt.pt"), "--dstore-dir",
            str(out), "--gen-subset", "valid", "--tokens-per-sample", "64", "--quiet"]
    assert run(argv) == 2
    capsys.readouterr()
    assert run(argv + ["--overwrite"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"knnlm: warning: --overwrite: replacing "
                                               f"datastore {out}")
    meta = json.loads((out / "datastore.json").read_text())
    assert meta["split"] == "valid" and meta["keytypes"] == ["att"] and meta["complete"]
    assert not (out / "keys_ffn.npy").exists()          # the old datastore's other keys
    assert run(argv) == 0                               # the same configuration: reused
    assert "already built" in capsys.readouterr().out
