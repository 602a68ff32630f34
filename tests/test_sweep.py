"""Offline sweeps equal direct eval-lm --knnlm runs at the same settings."""
import json

import numpy as np
import pytest
import torch

from knnlm import evaluate
from knnlm.knn import index, sweep
from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint
from knnlm.util import UserError
from knnlm.data.preprocess import DataBin


@pytest.fixture(scope="module")
def setup(bpe_databin, trained_ckpt, trained_dstore, tmp_path_factory):
    index.build_index(index.BuildIndexConfig(dstore_dir=str(trained_dstore.path), knn_keytype="att",
                                             index_factory="IVF32,PQ8", train_size=4000, quiet=True))
    root = tmp_path_factory.mktemp("sweep")
    cfg = direct_cfg(bpe_databin, trained_ckpt, trained_dstore, k=16, lmbda=0.25, knn_temp=1.0,
                     save_retrieval=str(root / "cache"), save_exact_dists=True)
    run(cfg)
    return root / "cache"


def direct_cfg(databin, ckpt, ds, **kw):
    return evaluate.EvalConfig(data=str(databin.path), path=str(ckpt), gen_subset="valid",
                               tokens_per_sample=64, context_window=32, knnlm=True,
                               dstore_filename=str(ds.path), probe=32, quiet=True, **kw)


def run(cfg):
    ckpt = load_checkpoint(cfg.path)
    return evaluate.eval_lm(model_from_checkpoint(ckpt), DataBin(cfg.data), cfg,
                            torch.device("cpu"), model_fingerprint(ckpt["model"]))


@pytest.mark.parametrize("score,sim", [("faiss", "do_not_recomp_l2"), ("exact", None)])
def test_sweep_point_equals_direct_eval(bpe_databin, trained_ckpt, trained_dstore, setup,
                                        tmp_path, score, sim):
    res = sweep.main(sweep.SweepConfig(cache=str(setup), lmbda="0:1:0.1", knn_temp="0.5,2,8",
                                       k="8,16", score=score, out=str(tmp_path), quiet=True))
    grid = np.array(res[f"{score}@k=8"]["ppl_grid"])       # (T, λ)
    direct = run(direct_cfg(bpe_databin, trained_ckpt, trained_dstore, k=8, lmbda=0.3,
                            knn_temp=2.0, knn_sim_func=sim))
    assert grid[1, 3] == pytest.approx(direct["interpolated"]["ppl"], rel=1e-5)
    assert res[f"{score}@k=8"]["lm_ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    # λ = 0 column is the LM, λ = 1 the kNN at that temperature
    assert grid[1, 0] == pytest.approx(direct["ppl"], rel=1e-6)
    direct1 = run(direct_cfg(bpe_databin, trained_ckpt, trained_dstore, k=8, lmbda=1.0,
                             knn_temp=2.0, knn_sim_func=sim))
    assert grid[1, -1] == pytest.approx(direct1["knn"]["ppl"], rel=1e-5)
    best = res[f"{score}@k=8"]
    assert best["interp_ppl"] == pytest.approx(grid.min(), rel=1e-9)
    assert best["oracle_ppl"] <= min(best["lm_ppl"], best["interp_ppl"])
    out = json.loads((tmp_path / "sweep.json").read_text())
    assert out["lambdas"][3] == 0.3 and out["temps"] == [0.5, 2.0, 8.0]
    assert (tmp_path / "sweep.md").read_text().count("|") > 10
    assert (tmp_path / "ppl_vs_temp.png").stat().st_size > 1000


def test_sweep_bad_inputs(setup, tmp_path, trained_dstore):
    with pytest.raises(UserError, match="exceeds the cached k"):
        sweep.main(sweep.SweepConfig(cache=str(setup), k="32", out=str(tmp_path), quiet=True))
    with pytest.raises(UserError, match="--lmbda"):
        sweep.SweepConfig(cache=str(setup), lmbda="0:2:0.5")
    with pytest.raises(UserError, match="--knn-temp"):
        sweep.SweepConfig(cache=str(setup), knn_temp="0,1")
    with pytest.raises(UserError, match="--lmbda"):
        sweep.SweepConfig(cache=str(setup), lmbda="a:b")
    import shutil
    other = tmp_path / "ds"
    shutil.copytree(trained_dstore.path, other)
    side = json.loads((other / "datastore.json").read_text())
    side["split"] = "valid"
    (other / "datastore.json").write_text(json.dumps(side))
    with pytest.raises(UserError, match="another datastore"):
        sweep.main(sweep.SweepConfig(cache=str(setup), dstore_filename=str(other), quiet=True))


def test_parse_grid():
    assert sweep.parse_grid("0:1:0.25", "x") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sweep.parse_grid("1,2.5", "x") == [1.0, 2.5]


def test_three_models_interpolated_with_the_best_simplex_weights(tmp_path):
    """sweep --score-files A,B,C: EM's weights beat every point of a fine simplex grid, and
    with two models EM lands on the λ grid's best point."""
    import itertools
    import math
    rng = np.random.default_rng(0)
    n = 3000
    probs = rng.dirichlet([0.5, 0.5, 0.5], size=n).T                 # (3, n)
    lp = np.log(probs * rng.uniform(0.05, 1.0, (3, n))).astype(np.float32)
    paths = []
    for i in range(3):
        np.save(tmp_path / f"m{i}.npy", lp[i])
        paths.append(str(tmp_path / f"m{i}.npy"))
    res = sweep.main(sweep.SweepConfig(score_files=",".join(paths), out=str(tmp_path / "o")))
    w = np.array(res["weights"])
    assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all()

    def loglik(weights):
        return float(np.logaddexp.reduce(lp.astype(np.float64) + np.log(np.maximum(weights, 1e-300))[:, None], 0).sum())
    best_grid = max(loglik(np.array([a, b, 1 - a - b]))
                    for a, b in itertools.product(np.arange(0, 1.001, 0.02), repeat=2) if a + b <= 1)
    assert loglik(w) >= best_grid - 1e-6
    assert res["interp_ppl"] == pytest.approx(math.exp(-loglik(w) / n), rel=1e-9)
    assert res["interp_ppl"] < min(res["model_ppl"])
    two = sweep.sweep_scores(paths[0], paths[1], [round(x, 4) for x in np.arange(0, 1.0001, 0.001)])
    from knnlm.knn.math import mixture_weights
    w2 = mixture_weights(torch.from_numpy(lp[:2].astype(np.float64)))
    assert float(w2[1]) == pytest.approx(two["best_lambda"], abs=1e-3)
