"""Dimension reduction: PCA at full dimension is a rotation (results equal the parent's);
reduced datastores project every query the same way."""
import numpy as np
import pytest

from knnlm import neighbors
from knnlm.cli import run as cli_run
from knnlm.knn import index, reduce
from knnlm.knn.datastore import Datastore

from test_knn_eval import kcfg, run_eval

N_EVAL = 500


def test_learn_pca():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)) * np.array([5, 1, 3, 0.5, 2, 0.1]) + 7
    mean, comp, var = reduce.learn_pca(x, 6)
    np.testing.assert_allclose(comp @ comp.T, np.eye(6), atol=1e-10)
    assert np.all(np.diff(var) <= 0)
    y = reduce.project(x, mean, comp).astype(np.float64)
    np.testing.assert_allclose(y @ comp + mean, x, atol=1e-4)          # a rotation
    np.testing.assert_allclose(y.var(0, ddof=1), var, rtol=1e-4)       # variances, in order
    assert np.argmax(np.abs(comp[0])) == 0                             # the widest axis first


def ev(bpe_databin, trained_ckpt, ds, tmp_path, **kw):
    return run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, max_eval_tokens=N_EVAL,
                         lmbda=0.4, knn_temp=2.0, **kw))


def test_full_dimension_pca_equals_no_pca(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    out = tmp_path / "rot"
    reduce.main(reduce.ReduceConfig(dstore_dir=str(trained_dstore.path), out=str(out),
                                    pca_dim=trained_dstore.dim, dstore_fp32=True, quiet=True))
    rot = Datastore(out)
    assert rot.meta["projection"]["variance_kept"] == pytest.approx(1.0)
    a = ev(bpe_databin, trained_ckpt, trained_dstore, tmp_path, exact_search=True)
    b = ev(bpe_databin, trained_ckpt, rot, tmp_path, exact_search=True,
           save_queries=str(tmp_path / "q.npy"))
    assert b["interpolated"]["ppl"] == pytest.approx(a["interpolated"]["ppl"], rel=1e-5)
    assert b["knn"]["ppl"] == pytest.approx(a["knn"]["ppl"], rel=1e-5)
    assert np.load(tmp_path / "q.npy").shape == (N_EVAL, trained_dstore.dim)   # raw queries


def test_a_reduced_datastore_is_searched_in_its_space(bpe_databin, trained_ckpt, trained_dstore,
                                                     tmp_path, capsys):
    out = tmp_path / "pca8"
    assert cli_run(["reduce-dstore", "--dstore-dir", str(trained_dstore.path), "--out", str(out),
                    "--pca-dim", "8", "--quiet"]) == 0
    small = Datastore(out)
    assert small.dim == 8 and small.query_dim == trained_dstore.dim
    index.build_index(index.BuildIndexConfig(dstore_dir=str(out), knn_keytype="att",
                                             index_factory="IVF16,Flat", train_size=4000,
                                             quiet=True))
    res = ev(bpe_databin, trained_ckpt, small, tmp_path, probe=16)
    exact = ev(bpe_databin, trained_ckpt, small, tmp_path, exact_search=True)
    # IVF16,Flat probing every list is exact search in the reduced space
    assert res["interpolated"]["ppl"] == pytest.approx(exact["interpolated"]["ppl"], rel=1e-5)
    assert "projected" in capsys.readouterr().out
    rows = neighbors.main(neighbors.NeighborsConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_filename=str(out),
        exact_search=True, k=4, text="Enter the king"))
    assert all(len(r["neighbors"]) == 4 for r in rows)
    base = ["reduce-dstore", "--dstore-dir"]
    assert cli_run(base + [str(trained_dstore.path), "--out", str(tmp_path / "x"),
                           "--pca-dim", "999"]) == 2
    assert cli_run(base + [str(out), "--out", str(tmp_path / "y"), "--pca-dim", "4"]) == 2
