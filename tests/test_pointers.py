"""RetoMaton pointers (eval-lm --knnlm --retomaton) against the plain kNN-LM and a loop
written from the method's definition."""
import json

import faiss
import numpy as np
import pytest

from knnlm.knn import index, sweep
from knnlm.knn.cache import RetrievalCache
from knnlm.cli import run as cli_run

from test_knn_eval import K, kcfg, run_eval


@pytest.fixture(scope="module")
def indexes(trained_dstore, tmp_path_factory):
    out = tmp_path_factory.mktemp("pointer_indexes")
    paths = {}
    for name, factory in (("flat", "Flat"), ("ivf", "IVF32,PQ8")):
        paths[name] = str(out / f"{name}.faiss")
        index.build_index(index.BuildIndexConfig(
            dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory=factory,
            faiss_index=paths[name], train_size=4000, quiet=True))
    return paths


def cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexfile, **kw):
    return kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexfile=indexfile,
                max_eval_tokens=600, lmbda=0.25, knn_temp=2.0, probe=4, **kw)


def test_searching_every_step_is_the_plain_knnlm(bpe_databin, trained_ckpt, trained_dstore,
                                                 indexes, tmp_path):
    # an exact index: the k best of (search ∪ pointers) are the search's own k
    plain = run_eval(cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexes["flat"],
                         save_knn_scores=str(tmp_path / "plain.npy")))
    walk = run_eval(cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexes["flat"],
                        retomaton=True, min_knns=K + 1, save_knn_scores=str(tmp_path / "walk.npy")))
    eff = walk["interpolated"]["efficiency"]
    assert eff["searches"] == eff["steps"] == 600 and eff["searches_saved"] == 0
    np.testing.assert_allclose(np.load(tmp_path / "walk.npy"), np.load(tmp_path / "plain.npy"),
                               rtol=1e-6, atol=1e-9)
    assert walk["interpolated"]["ppl"] == pytest.approx(plain["interpolated"]["ppl"], rel=1e-9)
    assert plain["interpolated"].get("efficiency") is None


def reference_walk(queries, targets, keys, vals, ivf, k, min_knns, cluster=None):
    """RetoMaton from its definition, one token at a time, in plain numpy (``cluster``:
    each entry's cluster; pointers are joined by their clusters' members)."""
    n = len(keys)
    pointers, searches, out = [], 0, []
    for q, y in zip(queries, targets):
        cand = list(pointers[:k])
        if cluster is not None and cand:
            ids, counts = np.unique(cluster[cand], return_counts=True)
            for c in ids[np.argsort(-counts, kind="stable")]:
                cand += [int(i) for i in np.flatnonzero(cluster == c) if int(i) not in cand]
            cand = cand[:k]
        if len(pointers) < min_knns:
            searches += 1
            _, found = ivf.search(q[None].astype(np.float32), k)
            merged = [int(i) for i in found[0] if i >= 0]
            cand = merged + [i for i in cand if i not in set(merged)]
        d = ((keys[cand].astype(np.float32) - q) ** 2).sum(1)
        order = np.argsort(d, kind="stable")[:k]
        cand, d = np.asarray(cand)[order], d[order]
        s = -d / 2.0                                              # T = 2
        w = np.exp(s - s.max())
        hit = vals[cand] == y
        out.append(np.log(w[hit].sum() / w.sum()) if hit.any() else -np.inf)
        pointers = [int(i) + 1 for i in cand[hit] if i < n - 1]
    return np.array(out), searches


def test_walk_equals_the_reference_loop(bpe_databin, trained_ckpt, trained_dstore, indexes,
                                        tmp_path):
    res = run_eval(cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexes["ivf"],
                       retomaton=True, min_knns=2, save_knn_scores=str(tmp_path / "knn.npy"),
                       save_queries=str(tmp_path / "q.npy"), save_tokens=str(tmp_path / "t.npy"),
                       save_retrieval=str(tmp_path / "cache")))
    ivf = faiss.read_index(indexes["ivf"])
    faiss.extract_index_ivf(ivf).nprobe = 4
    ref, searches = reference_walk(np.load(tmp_path / "q.npy"), np.load(tmp_path / "t.npy"),
                                   np.asarray(trained_dstore.keys("att")),
                                   np.asarray(trained_dstore.vals), ivf, K, 2)
    got = np.load(tmp_path / "knn.npy")
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-6)
    eff = res["interpolated"]["efficiency"]
    assert eff["searches"] == searches and 0 < searches < 600
    assert eff["searches_saved"] == pytest.approx(1 - searches / 600)
    # the cache holds the walk's neighbours: a sweep of it reproduces the evaluation
    cache = RetrievalCache(tmp_path / "cache")
    assert (cache.ids == -1).any()           # pointer steps hold fewer than k neighbours
    sums = sweep.sweep_sums(cache, "exact", K, [2.0], [0.25])
    assert sweep._ppl(sums["interp"][0, 0], 600) == pytest.approx(res["interpolated"]["ppl"],
                                                                  rel=1e-6)


def test_killed_walk_resumes_exactly(bpe_databin, trained_ckpt, trained_dstore, indexes, tmp_path,
                                     monkeypatch):
    from knnlm.knn import scorer

    def c(d):
        return cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexes["ivf"],
                   retomaton=True, min_knns=2, max_tokens=256, save_retrieval=str(d / "cache"),
                   save_knn_scores=str(d / "knn.npy"))
    ref = run_eval(c(tmp_path / "ref"))
    real, calls = scorer.KnnScorer.score, []

    def dies(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)
    monkeypatch.setattr(scorer.KnnScorer, "score", dies)
    with pytest.raises(KeyboardInterrupt):
        run_eval(c(tmp_path / "b"))
    monkeypatch.undo()
    side = json.loads((tmp_path / "b" / "cache" / "cache.json").read_text())
    assert side["progress"]["walk"]["steps"] > 0
    got = run_eval(c(tmp_path / "b"))
    assert got["interpolated"]["efficiency"] == ref["interpolated"]["efficiency"]
    assert (tmp_path / "b" / "knn.npy").read_bytes() == (tmp_path / "ref" / "knn.npy").read_bytes()


def test_cluster_members_widen_the_pointers(bpe_databin, trained_ckpt, trained_dstore, indexes,
                                            tmp_path):
    members = tmp_path / "members.npz"
    assert cli_run(["cluster-dstore", "--dstore-dir", str(trained_dstore.path), "--out",
                    str(members), "--num-clusters", "400", "--sample-size", "20000",
                    "--quiet"]) == 0
    z = np.load(members)
    cluster = z["cluster"]
    assert np.array_equal(np.sort(z["members"]), np.arange(trained_dstore.size))
    assert np.array_equal(cluster[z["members"]], np.sort(cluster))
    res = run_eval(cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, indexes["ivf"],
                       retomaton=True, min_knns=2, members=str(members),
                       save_knn_scores=str(tmp_path / "knn.npy"),
                       save_queries=str(tmp_path / "q.npy"), save_tokens=str(tmp_path / "t.npy")))
    ivf = faiss.read_index(indexes["ivf"])
    faiss.extract_index_ivf(ivf).nprobe = 4
    ref, searches = reference_walk(np.load(tmp_path / "q.npy"), np.load(tmp_path / "t.npy"),
                                   np.asarray(trained_dstore.keys("att")),
                                   np.asarray(trained_dstore.vals), ivf, K, 2, cluster)
    got = np.load(tmp_path / "knn.npy")
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-6)
    assert res["interpolated"]["efficiency"]["searches"] == searches
    assert res["interpolated"]["efficiency"]["members"] == str(members)


@pytest.mark.parametrize("extra, needle", [
    (["--exact-search"], "--exact-search"),
    (["--knn-sim-func", "do_not_recomp_l2"], "recompute"),
    (["--ignore-top"], "exclusive"),
    (["--min-knns", "-1"], "--min-knns"),
    (["--members", "m.npz"], "members"),
])
def test_bad_pointer_flags(bpe_databin, trained_ckpt, trained_dstore, extra, needle, capsys):
    rc = cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
                  "--dstore-filename", str(trained_dstore.path), "--retomaton", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
