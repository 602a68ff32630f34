"""Datastore pruning: greedy merging against a hand-worked case; counts enter the kNN
softmax exactly as duplicated entries; pruning that keeps everything is the original."""
import numpy as np
import pytest
import torch

from knnlm.cli import run as cli_run
from knnlm.knn import index, math as knn_math, prune, sweep
from knnlm.knn.cache import RetrievalCache
from knnlm.knn.datastore import Datastore, DatastoreWriter

from test_knn_eval import ivf_index, kcfg, run_eval  # noqa: F401 (fixture)

N_EVAL = 500


def test_greedy_merge_by_hand():
    # entry: value; neighbours
    vals = np.array([5, 5, 7, 5, 7])
    nb = np.array([[1, 3], [0, 3], [4, 0], [1, 0], [2, -1]])
    kept, counts = prune.greedy_merge(nb, vals)
    # 0 absorbs 1 and 3 (same value); 2 absorbs 4; 1, 3, 4 are gone
    assert kept.tolist() == [0, 2] and counts.tolist() == [3, 2]
    kept, counts = prune.greedy_merge(nb, vals, np.array([1, 2, 1, 1, 4]))
    assert counts.tolist() == [4, 5]      # counts carry over


def test_greedy_merge_absorbs_only_untouched_entries():
    """efficient-knnlm's rule: an entry that has absorbed others is not absorbed in turn
    (no count moves two hops), whatever the order of the visits."""
    vals = np.array([5, 5, 5, 5])
    nb = np.array([[1, -1], [2, -1], [1, -1], [0, 1]])
    kept, counts = prune.greedy_merge(nb, vals, order=np.array([1, 0, 2, 3]))
    # 1 absorbs 2 first; 0 may not absorb 1 (grown); 3 absorbs 0 (untouched), not 1
    assert kept.tolist() == [1, 3] and counts.tolist() == [2, 2]
    kept, counts = prune.greedy_merge(nb, vals)  # by row: 0 absorbs 1; 3 may not take 0
    assert kept.tolist() == [0, 2, 3] and counts.tolist() == [2, 1, 1]
    assert counts.sum() == len(vals)


def test_counts_equal_duplicated_entries():
    g = torch.Generator().manual_seed(0)
    scores, vals = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6, 5), generator=g)
    counts = torch.randint(1, 4, (6, 5), generator=g)
    # the same neighbours written out count times each
    dup_s = [torch.repeat_interleave(scores[i], counts[i]) for i in range(6)]
    dup_v = [torch.repeat_interleave(vals[i], counts[i]) for i in range(6)]
    tgt = torch.tensor([0, 1, 2, 0, 1, 2])
    got = knn_math.knn_target_log_probs(scores, vals, tgt, 2.0, None, counts.double().log())
    temps = knn_math.knn_target_log_probs_temps(scores, vals, tgt, [0.5, 2.0], None,
                                                counts.double().log())
    full = knn_math.knn_full_log_probs(scores, vals, 3, 2.0, None, counts.double().log())
    for i in range(6):
        want = knn_math.knn_target_log_probs(dup_s[i][None], dup_v[i][None], tgt[i:i + 1], 2.0)
        assert got[i] == pytest.approx(float(want), abs=1e-12)
        assert temps[1, i] == pytest.approx(float(want), abs=1e-6)
        want_full = knn_math.knn_full_log_probs(dup_s[i][None], dup_v[i][None], 3, 2.0)[0]
        assert torch.allclose(full[i], want_full, atol=1e-12)


def write_like(ds: Datastore, out, rows, counts=None):
    meta = {k: v for k, v in ds.meta.items() if k not in ("rows_written", "complete")}
    meta.update(size=len(rows), keytypes=["att"], rows_written=0, complete=False)
    if counts is not None:
        meta["weighted"] = True
    w = DatastoreWriter(out, meta)
    w.write(0, {"att": ds.keys("att")[rows]}, ds.vals[rows], ds.pos[rows])
    if counts is not None:
        np.save(out / "counts.npy", counts.astype(np.float32))
    w.commit(len(rows))
    return Datastore(out)


def test_a_weighted_datastore_equals_its_entries_duplicated(bpe_databin, trained_ckpt,
                                                            trained_dstore, tmp_path):
    rows = np.arange(0, trained_dstore.size, 3)               # a third, to keep it small
    weighted = write_like(trained_dstore, tmp_path / "w", rows, np.full(len(rows), 2.0))
    doubled = write_like(trained_dstore, tmp_path / "d", np.repeat(rows, 2))
    ev = lambda ds, k: run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, k=k,  # noqa: E731
                                     exact_search=True, max_eval_tokens=N_EVAL, lmbda=0.4,
                                     knn_temp=2.0))
    a, b = ev(weighted, 8), ev(doubled, 16)
    assert a["knn"]["ppl"] == pytest.approx(b["knn"]["ppl"], rel=1e-6)
    assert a["interpolated"]["ppl"] == pytest.approx(b["interpolated"]["ppl"], rel=1e-6)


def test_pruning_that_keeps_everything_is_the_original(bpe_databin, trained_ckpt, trained_dstore,
                                                      tmp_path):
    prune.main(prune.PruneConfig(dstore_dir=str(trained_dstore.path), out=str(tmp_path / "all"),
                                 method="random", ratio=1.0, quiet=True))
    kept = Datastore(tmp_path / "all")
    assert kept.size == trained_dstore.size and (np.asarray(kept.counts) == 1).all()
    assert np.array_equal(np.asarray(kept.keys("att")), np.asarray(trained_dstore.keys("att")))
    ev = lambda ds: run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, exact_search=True,  # noqa: E731
                                  max_eval_tokens=N_EVAL, lmbda=0.4, knn_temp=2.0))
    assert ev(kept)["interpolated"]["ppl"] == ev(trained_dstore)["interpolated"]["ppl"]


def test_merge_and_kmeans_from_the_cli(bpe_databin, trained_ckpt, trained_dstore, ivf_index,  # noqa: F811
                                       tmp_path):
    out = tmp_path / "merged"
    assert cli_run(["prune-dstore", "--dstore-dir", str(trained_dstore.path), "--out", str(out),
                    "--method", "merge", "--merge-k", "8", "--probe", "8", "--quiet"]) == 0
    merged = Datastore(out)
    counts = np.asarray(merged.counts)
    assert merged.size < trained_dstore.size and counts.sum() == trained_dstore.size
    assert merged.meta["pruned"]["parent_fingerprint"] == trained_dstore.fingerprint
    # every kept entry is an entry of the parent, with its own key and value
    pos = np.asarray(merged.pos)
    np.testing.assert_array_equal(np.asarray(merged.vals), np.asarray(trained_dstore.vals)[pos])
    np.testing.assert_array_equal(np.asarray(merged.keys("att")),
                                  np.asarray(trained_dstore.keys("att"))[pos])
    index.build_index(index.BuildIndexConfig(dstore_dir=str(out), knn_keytype="att",
                                             index_factory="IVF16,PQ8", train_size=4000,
                                             quiet=True))
    res = run_eval(kcfg(bpe_databin, trained_ckpt, merged, tmp_path, max_eval_tokens=N_EVAL,
                        probe=8, lmbda=0.4, knn_temp=2.0, save_retrieval=str(tmp_path / "cache")))
    assert res["interpolated"]["datastore"]["pruned"]["method"] == "merge"
    cache = RetrievalCache(tmp_path / "cache")
    assert cache.log_counts is not None
    sums = sweep.sweep_sums(cache, cache.mode.cache_score, cache.k, [2.0], [0.4])
    assert sweep._ppl(sums["interp"][0, 0], N_EVAL) == pytest.approx(res["interpolated"]["ppl"],
                                                                      rel=1e-6)
    km = tmp_path / "km"
    assert cli_run(["prune-dstore", "--dstore-dir", str(trained_dstore.path), "--out", str(km),
                    "--method", "kmeans", "--clusters", "64", "--quiet"]) == 0
    k = Datastore(km)
    assert np.asarray(k.counts).sum() == trained_dstore.size and k.size < trained_dstore.size
    # no two entries share a (cluster, value): at most 64 entries per value
    assert np.bincount(np.asarray(k.vals)).max() <= 64


def test_bad_prune_input(trained_dstore, tmp_path, capsys):
    base = ["prune-dstore", "--dstore-dir", str(trained_dstore.path)]
    assert cli_run(base + ["--out", str(trained_dstore.path)]) == 2
    assert cli_run(base + ["--out", str(tmp_path / "x"), "--ratio", "0"]) == 2
    assert cli_run(base + ["--out", str(tmp_path / "x"), "--method", "kmeans",
                           "--clusters", str(10 ** 9)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("error" in e for e in err)
