"""build-index: Flat equals brute force, IVF-PQ recall on real keys, resumable builds,
sidecar checks."""
import json

import faiss
import numpy as np
import pytest

from knnlm.knn import index, index_read
from knnlm.util import UserError
from knnlm.knn.datastore import Datastore


def icfg(ds, **kw):
    base = dict(dstore_dir=str(ds.path), knn_keytype="att", quiet=True)
    base.update(kw)
    return index.BuildIndexConfig(**base)


def brute_force(xb, xq, k, metric):
    if metric == "l2":
        d = (xq ** 2).sum(1)[:, None] - 2 * xq @ xb.T + (xb ** 2).sum(1)[None]
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = xq @ xb.T
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_index_equals_brute_force(trained_dstore, tmp_path, metric):
    ds = trained_dstore
    out = tmp_path / "flat.faiss"
    index.build_index(icfg(ds, metric=metric, index_factory="Flat", faiss_index=str(out),
                           num_keys_to_add_at_a_time=3000))
    idx, meta = index_read.load_index(out, ds, "att", metric)
    xb = np.asarray(ds.keys("att"), dtype=np.float64)
    xq = xb[np.random.default_rng(0).choice(len(xb), 50, replace=False)] + 0.01
    D, I = idx.search(xq.astype(np.float32), 8)
    Dref, Iref = brute_force(xb, xq, 8, metric)
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-3)
    # ids agree wherever distances are not tied
    untied = np.abs(np.diff(Dref, axis=1)).min(axis=1) > 1e-3
    assert untied.sum() > 25
    assert np.array_equal(I[untied], Iref[untied])
    assert meta["factory"] == "Flat" and meta["metric"] == metric


def test_ivfpq_recall_at_nprobe_nlist(trained_dstore, tmp_path):
    ds = trained_dstore
    out = tmp_path / "ivf.faiss"
    index.build_index(icfg(ds, index_factory="IVF32,PQ16", faiss_index=str(out), train_size=8000))
    idx, _ = index_read.load_index(out, ds, "att", nprobe=32)
    xb = np.asarray(ds.keys("att"), dtype=np.float64)
    rows = np.random.default_rng(1).choice(len(xb), 200, replace=False)
    xq = xb[rows] + np.random.default_rng(2).normal(0, 0.05, (200, xb.shape[1]))
    _, I = idx.search(xq.astype(np.float32), 1)
    Dref, _ = brute_force(xb, xq, 1, "l2")
    got = ((xb[I[:, 0]] - xq) ** 2).sum(1)
    recall = np.mean(got <= Dref[:, 0] + 1e-6)   # a tie with the nearest counts as a hit
    assert recall >= 0.9, recall


class Crash(Exception):
    pass


def test_killed_build_resumes_to_identical_index(trained_dstore, tmp_path, monkeypatch):
    ds = trained_dstore
    kw = dict(index_factory="OPQ8,IVF16,PQ8", train_size=3000, num_keys_to_add_at_a_time=2000,
              save_interval_seconds=0)
    ref = tmp_path / "ref.faiss"
    index.build_index(icfg(ds, faiss_index=str(ref), **kw))

    out = tmp_path / "res.faiss"
    calls = {"n": 0}
    real_save = index._save_partial

    def crashing_save(*a):
        real_save(*a)
        calls["n"] += 1
        if calls["n"] == 3:  # trained + 2 chunks saved
            raise Crash()
    monkeypatch.setattr(index, "_save_partial", crashing_save)
    with pytest.raises(Crash):
        index.build_index(icfg(ds, faiss_index=str(out), **kw))
    monkeypatch.setattr(index, "_save_partial", real_save)
    side = json.loads((tmp_path / "res.faiss.json").read_text())
    assert side["rows_added"] == 8192 and not side["complete"]   # chunks: 2000 -> 4096 rows
    with pytest.raises(UserError, match="not a complete"):
        index_read.load_index(out, ds, "att")
    meta = index.build_index(icfg(ds, faiss_index=str(out), **kw))
    assert meta["complete"] and not (tmp_path / "res.faiss.partial").exists()
    a = faiss.serialize_index(faiss.read_index(str(ref)))
    b = faiss.serialize_index(faiss.read_index(str(out)))
    assert np.array_equal(a, b)


def test_index_refuses_another_datastore_or_keytype(trained_dstore, tmp_path):
    ds = trained_dstore
    out = tmp_path / "f.faiss"
    index.build_index(icfg(ds, index_factory="Flat", faiss_index=str(out)))
    with pytest.raises(UserError, match="indexes att keys"):
        index_read.load_index(out, ds, "ffn")
    side = json.loads((tmp_path / "f.faiss.json").read_text())
    side["datastore_fingerprint"] = "0" * 16
    (tmp_path / "f.faiss.json").write_text(json.dumps(side))
    with pytest.raises(UserError, match="another datastore"):
        index_read.load_index(out, ds, "att")


def test_bad_factory_is_one_line_exit_2(trained_dstore, tmp_path, capsys):
    from knnlm.cli import run
    rc = run(["build-index", "--dstore-dir", str(trained_dstore.path), "--index-factory",
              "IVF16,PQ7", "--faiss-index", str(tmp_path / "x.faiss")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "PQ7 does not divide" in err
    assert not (tmp_path / "x.faiss").exists()


def test_gpu_coarse_training_clusters_in_the_index_metric():
    """The flat index that k-means assigns with on the GPU has the quantizer's metric."""
    for metric, flat in ((faiss.METRIC_L2, faiss.IndexFlatL2), (faiss.METRIC_INNER_PRODUCT,
                                                                faiss.IndexFlatIP)):
        full = faiss.index_factory(8, "IVF4,Flat", metric)
        got = index.clustering_index(faiss.extract_index_ivf(full))
        assert isinstance(got, flat) and got.metric_type == metric and got.d == 8


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_torch_kmeans_training_matches_faiss_recall(metric):
    """IVF-Flat and IVF-PQ trained by the torch k-means (what GPU training without faiss-gpu
    runs) reach FAISS CPU training's recall@10 on held-out queries, within 1% (two seeds)."""
    from knnlm.knn.kmeans import train_ivf
    rng = np.random.default_rng(0)
    d = 32
    centres = rng.standard_normal((200, d)).astype(np.float32) * 2

    def sample(n):
        return (centres[rng.integers(0, 200, n)] + rng.standard_normal((n, d))).astype(np.float32)
    xb, xq = sample(40000), sample(1000)
    exact = faiss.IndexFlat(d, metric)
    exact.add(xb)
    truth = exact.search(xq, 10)[1]
    for factory in ("IVF64,Flat", "IVF64,PQ8"):
        recall = {}
        for how in ("faiss", "torch"):
            got = []
            for seed in (1, 2):
                idx = faiss.index_factory(d, factory, metric)
                if how == "faiss":
                    ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
                    ivf.cp.seed = seed
                    if hasattr(ivf, "pq"):
                        ivf.pq.cp.seed = seed
                    index.train_index(idx, xb[:15000], use_gpu=False)
                else:
                    train_ivf(idx, xb[:15000], "cpu", seed=seed)
                assert idx.is_trained
                idx.add(xb)
                faiss.extract_index_ivf(idx).nprobe = 4
                I = idx.search(xq, 10)[1]
                got.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, truth)]))
            recall[how] = np.mean(got)
        assert recall["torch"] >= recall["faiss"] - 0.01, (factory, recall)


def test_build_index_with_torch_training_writes_a_faiss_index(trained_dstore, tmp_path):
    out = tmp_path / "t.faiss"
    meta = index.build_index(index.BuildIndexConfig(
        dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory="IVF16,PQ8",
        train_size=4000, faiss_index=str(out), train_backend="torch", gpu="no", quiet=True))
    assert meta["train_backend"] == "torch (cpu)"
    loaded, _ = index_read.load_index(out, trained_dstore, "att", "l2", 16)
    assert loaded.ntotal == trained_dstore.size and loaded.is_trained
    xq = np.asarray(trained_dstore.keys("att")[:50], dtype=np.float32)
    I = loaded.search(xq, 5)[1]
    assert np.mean(I[:, 0] == np.arange(50)) > 0.8        # a key finds itself (duplicates aside)
    with pytest.raises(UserError, match="pre-transforms"):
        index.build_index(index.BuildIndexConfig(
            dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory="OPQ8,IVF16,PQ8",
            train_size=4000, faiss_index=str(tmp_path / "o.faiss"), train_backend="torch",
            gpu="no", quiet=True))


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "Flat"])
def test_a_memory_mapped_index_searches_like_the_loaded_one(trained_dstore, tmp_path, factory):
    out = tmp_path / "m.faiss"
    index.build_index(index.BuildIndexConfig(
        dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory=factory,
        train_size=4000, faiss_index=str(out), quiet=True))
    xq = np.asarray(trained_dstore.keys("att")[100:150], dtype=np.float32)
    ram, _ = index_read.load_index(out, trained_dstore, "att", "l2", 8)
    mapped, _ = index_read.load_index(out, trained_dstore, "att", "l2", 8, mmap=True)
    for a, b in zip(ram.search(xq, 10), mapped.search(xq, 10)):
        np.testing.assert_array_equal(a, b)


def test_kill_between_the_partial_index_and_its_sidecar_resumes_exactly(trained_dstore, tmp_path,
                                                                        monkeypatch):
    """The partial index is the commit point: killed after a chunk's partial index is
    written but before its sidecar is, the build resumes from the rows the partial index
    holds (no chunk added twice) and ends byte-identical to an uninterrupted build."""
    ds = trained_dstore
    kw = dict(index_factory="IVF16,PQ8", train_size=3000, num_keys_to_add_at_a_time=4096,
              save_interval_seconds=0)
    ref = tmp_path / "ref.faiss"
    index.build_index(icfg(ds, faiss_index=str(ref), **kw))
    for kill_at in (2, 3, 4):         # the sidecar writes after the trained index, chunk 1, 2
        out = tmp_path / f"k{kill_at}.faiss"
        calls, real = {"n": 0}, index.write_json_atomic

        def dies(*a, **k):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Crash()
            return real(*a, **k)
        monkeypatch.setattr(index, "write_json_atomic", dies)
        with pytest.raises(Crash):
            index.build_index(icfg(ds, faiss_index=str(out), **kw))
        monkeypatch.setattr(index, "write_json_atomic", real)
        meta = index.build_index(icfg(ds, faiss_index=str(out), **kw))
        assert meta["ntotal"] == ds.size
        assert np.array_equal(faiss.serialize_index(faiss.read_index(str(ref))),
                              faiss.serialize_index(faiss.read_index(str(out))))


def test_verify_index_refuses_missing_or_repeated_entries(trained_dstore, tmp_path):
    ds = trained_dstore
    xb = np.asarray(ds.keys("att")[:5000], dtype=np.float32)
    idx = faiss.index_factory(xb.shape[1], "IVF8,Flat")
    idx.train(xb)
    idx.add(xb)
    index.verify_index(idx, 5000, "x")
    with pytest.raises(UserError, match="holds 5,000 keys, the datastore 5,001"):
        index.verify_index(idx, 5001, "x")
    dup = faiss.index_factory(xb.shape[1], "IVF8,Flat")
    dup.train(xb)
    dup.add_with_ids(xb[:10], np.arange(10))
    dup.add_with_ids(xb[10:20], np.arange(10))          # ids 0..9 twice, 10..19 never
    with pytest.raises(UserError, match="entry 0 is held 2 times"):
        index.verify_index(dup, 20, "x")


def test_nan_keys_are_refused_in_one_line(trained_dstore, tmp_path, capsys):
    import shutil
    from knnlm.cli import run
    ds_dir = tmp_path / "nan"
    shutil.copytree(trained_dstore.path, ds_dir, ignore=shutil.ignore_patterns("index_*"))
    keys = np.load(ds_dir / "keys_att.npy", mmap_mode="r+")
    keys[20000, 3] = np.nan
    keys.flush()
    del keys
    for train_size in ("30000", "4000"):     # the bad key in the training sample, or only added
        rc = run(["build-index", "--dstore-dir", str(ds_dir), "--index-factory", "IVF16,PQ8",
                  "--train-size", train_size, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "entry 20,000 is not finite" in err
        assert not (ds_dir / "index_att_l2.faiss").exists()
