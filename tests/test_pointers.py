"""RetoMaton pointers (eval-lm --knnlm --retomaton) against the plain kNN-LM and a loop
written from the method's definition."""
import json

import faiss
import numpy as np
import pytest

from knnlm.knn import index, index_read, sweep
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


def reference_walk(queries, targets, keys, vals, ivf, k, min_knns, cluster=None, starts=(0,),
                   code_distances=None):
    """RetoMaton from its definition, one token at a time, in plain numpy (``cluster``:
    each entry's cluster; pointers are joined by their clusters' members). Each window
    (rows from each of ``starts``) is a walk of its own, from no pointers. Distances are
    exact from the keys, or with ``code_distances(q, ids)`` the search's own for searched
    entries and those for the pointers."""
    n = len(keys)
    pointers, searches, out = [], 0, []
    for t, (q, y) in enumerate(zip(queries, targets)):
        if t in starts:
            pointers = []
        cand = list(pointers[:k])
        if cluster is not None and cand:
            ids, counts = np.unique(cluster[cand], return_counts=True)
            for c in ids[np.argsort(-counts, kind="stable")]:
                cand += [int(i) for i in np.flatnonzero(cluster == c) if int(i) not in cand]
            cand = cand[:k]
        found_d = {}
        if len(pointers) < min_knns:
            searches += 1
            D, found = ivf.search(q[None].astype(np.float32), k)
            merged = [int(i) for i in found[0] if i >= 0]
            found_d = {int(i): float(d) for i, d in zip(found[0], D[0]) if i >= 0}
            cand = merged + [i for i in cand if i not in set(merged)]
        if code_distances is None:
            d = ((keys[cand].astype(np.float32) - q) ** 2).sum(1)
        else:
            d = np.array([found_d[i] if i in found_d else code_distances(q, i) for i in cand],
                         dtype=np.float32)
        order = np.argsort(d, kind="stable")[:k]
        cand, d = np.asarray(cand, dtype=np.int64)[order], d[order]
        s = -d / 2.0                                              # T = 2
        w = np.exp(s - s.max())
        hit = vals[cand] == y
        out.append(np.log(w[hit].sum() / w.sum()) if hit.any() else -np.inf)
        pointers = [int(i) + 1 for i in cand[hit] if i < n - 1]
    return np.array(out), searches


def window_starts(n=600, T=64, C=32):
    from knnlm.data.blocks import score_windows
    return {w.score_start for w in score_windows(n, T, C)}


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
                                   np.asarray(trained_dstore.vals), ivf, K, 2,
                                   starts=window_starts())
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
                                   np.asarray(trained_dstore.vals), ivf, K, 2, cluster,
                                   starts=window_starts())
    got = np.load(tmp_path / "knn.npy")
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-6)
    assert res["interpolated"]["efficiency"]["searches"] == searches
    assert res["interpolated"]["efficiency"]["members"] == str(members)


@pytest.mark.parametrize("extra, needle", [
    (["--exact-search"], "--exact-search"),
    (["--knn-sim-func", "do_not_recomp_l2", "--knn-backend", "torch"], "--knn-backend faiss"),
    (["--ignore-top"], "exclusive"),
    (["--min-knns", "-1"], "--min-knns"),
    (["--members", "m.npz"], "members"),
])
def test_bad_pointer_flags(bpe_databin, trained_ckpt, trained_dstore, extra, needle, capsys):
    rc = cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
                  "--dstore-filename", str(trained_dstore.path), "--retomaton", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def code_indexes(trained_dstore, tmp_path_factory):
    out = tmp_path_factory.mktemp("code_indexes")
    paths = {}
    for name, factory in (("pq", "IVF32,PQ8"), ("fs", "IVF32,PQ16x4fs"),
                          ("pcar", "PCAR16,IVF32,PQ8"), ("rflat", "IVF32,PQ8x4fs,RFlat")):
        paths[name] = str(out / f"{name}.faiss")
        index.build_index(index.BuildIndexConfig(
            dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory=factory,
            faiss_index=paths[name], train_size=8000, quiet=True))
    return paths


@pytest.mark.parametrize("name, tol", [("pq", 1e-5), ("pcar", 1e-5), ("rflat", 1e-5),
                                       ("fs", 5e-2)])
def test_pointer_scores_equal_the_searchs_distances(trained_dstore, code_indexes, name, tol):
    """Scored from the index's codes, an entry gets the distance the index's search
    returns for it: to float rounding (8-bit PQ, behind a PCA rotation too; a refine
    stage's exact codes), and up to the 8-bit rounding of fast-scan's lookup tables (here
    at most 2% of the largest distance, 0.3% on average)."""
    from knnlm.knn.codes import CodeDistances
    idx, _ = index_read.load_index(code_indexes[name], trained_dstore, "att", nprobe=8)
    xq = np.asarray(trained_dstore.keys("att")[::211][:64], dtype=np.float32) + 0.02
    D, I = idx.search(xq, 20)
    got = CodeDistances(idx, "l2")(xq, I)
    assert np.isinf(got[I < 0]).all()
    ok = I >= 0
    err = np.abs(got[ok] - D[ok]) / max(1.0, float(D[ok].max()))
    assert err.max() <= tol and err.mean() <= tol / 10


def test_walk_with_faiss_scores_equals_the_reference_loop(bpe_databin, trained_ckpt,
                                                          trained_dstore, code_indexes, tmp_path):
    """--knn-sim-func do_not_recomp_l2: searched neighbours keep the search's distances,
    pointers are scored from the index's codes, the keys are never read."""
    res = run_eval(cfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, code_indexes["pq"],
                       retomaton=True, min_knns=2, knn_sim_func="do_not_recomp_l2",
                       load_keys=False, save_knn_scores=str(tmp_path / "knn.npy"),
                       save_queries=str(tmp_path / "q.npy"), save_tokens=str(tmp_path / "t.npy")))
    ivf = faiss.read_index(code_indexes["pq"])
    faiss.extract_index_ivf(ivf).nprobe = 4
    faiss.extract_index_ivf(ivf).make_direct_map()
    ref, searches = reference_walk(
        np.load(tmp_path / "q.npy"), np.load(tmp_path / "t.npy"),
        np.asarray(trained_dstore.keys("att")), np.asarray(trained_dstore.vals), ivf, K, 2,
        starts=window_starts(),
        code_distances=lambda q, i: float(((ivf.reconstruct(i) - q) ** 2).sum()))
    got = np.load(tmp_path / "knn.npy")
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-4, atol=1e-5)
    eff = res["interpolated"]["efficiency"]
    assert eff["searches"] == searches and 0 < searches < 600
    assert res["interpolated"]["score_mode"]["name"] == "faiss-l2"


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "IVF32,PQ16x4fs", "IVF32,PQ16x4fsr",
                                     "IVF32,PQ8np"])
def test_code_table_reconstructs_as_faiss(trained_dstore, tmp_path, factory):
    """The id-ordered code table decodes every entry to FAISS's own reconstruction (8- and
    4-bit codes, fast-scan blocks, residuals or not), for the index as read from disk."""
    from knnlm.knn.codes import CodeTable
    out = tmp_path / "i.faiss"
    index.build_index(index.BuildIndexConfig(dstore_dir=str(trained_dstore.path),
                                             knn_keytype="att", index_factory=factory,
                                             faiss_index=str(out), train_size=8000, quiet=True))
    idx, _ = index_read.load_index(out, trained_dstore, "att")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
    table = CodeTable(ivf)
    ids = np.random.default_rng(0).integers(0, idx.ntotal, 500)
    ivf.make_direct_map()
    np.testing.assert_array_equal(table.reconstruct(ids), idx.reconstruct_batch(ids))
