"""One score mode, recorded and reused: eval-lm and a sweep of its cache agree in every
mode, and the flags mean what they meant in the original code."""
import json

import numpy as np
import pytest
import torch

from knnlm import evaluate
from knnlm.data.preprocess import DataBin
from knnlm.knn import index, sweep
from knnlm.knn.cache import RetrievalCache
from knnlm.knn.mode import ScoreMode
from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint

K = 16


@pytest.fixture(scope="module")
def indexes(trained_dstore):
    for metric in ("l2", "ip"):
        index.build_index(index.BuildIndexConfig(
            dstore_dir=str(trained_dstore.path), knn_keytype="att", metric=metric,
            index_factory="IVF32,PQ8", train_size=4000, quiet=True))


def run_eval(databin, ckpt, ds, **kw):
    cfg = evaluate.EvalConfig(data=str(databin.path), path=str(ckpt), gen_subset="valid",
                              tokens_per_sample=64, context_window=32, knnlm=True,
                              dstore_filename=str(ds.path), k=K, probe=4, quiet=True, **kw)
    ckpt_obj = load_checkpoint(cfg.path)
    return evaluate.eval_lm(model_from_checkpoint(ckpt_obj), DataBin(cfg.data), cfg,
                            torch.device("cpu"), model_fingerprint(ckpt_obj["model"]))


def test_flags_select_the_original_modes():
    f = ScoreMode.from_flags
    # FAISS mask: L2 neighbours re-scored with exact L2, IP neighbours keep FAISS's scores
    assert f(None, "l2", False) == ScoreMode(False, "l2", True, "l2")
    assert f(None, "ip", False) == ScoreMode(False, "ip", False, "ip")
    assert f("l2", "ip", False) == ScoreMode(False, "ip", True, "l2")
    assert f("dot", "l2", False) == ScoreMode(False, "l2", True, "ip")
    assert f("do_not_recomp_l2", "l2", False) == ScoreMode(False, "l2", False, "l2")
    assert f("do_not_recomp_l2", "ip", False) == ScoreMode(False, "ip", False, "ip")
    # real mask: brute force in the metric the flags name, its exact distances
    assert f(None, "ip", True) == ScoreMode(True, "ip", False, "ip")
    assert f("dot", "l2", True) == ScoreMode(True, "ip", False, "ip")
    assert f("l2", "ip", True) == ScoreMode(True, "l2", False, "l2")
    assert f(None, "l2", False).name == "faiss-l2+keys-l2"
    assert f("dot", "l2", False).cache_score == "exact"
    assert ScoreMode.from_dict(f("dot", "l2", False).to_dict()) == f("dot", "l2", False)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("exact_search", [False, True])
@pytest.mark.parametrize("sim", [None, "do_not_recomp_l2", "dot"])
def test_eval_lm_equals_the_sweep_of_its_cache(bpe_databin, trained_ckpt, trained_dstore, indexes,
                                               tmp_path, metric, exact_search, sim):
    res = run_eval(bpe_databin, trained_ckpt, trained_dstore, lmbda=0.3, knn_temp=3.0,
                   knn_sim_func=sim, faiss_metric_type=metric, exact_search=exact_search,
                   save_retrieval=str(tmp_path / "cache"), results_path=None)
    mode = ScoreMode.from_flags(sim, metric, exact_search)
    assert res["interpolated"]["score_mode"]["name"] == mode.name
    cache = RetrievalCache(tmp_path / "cache")
    assert cache.mode == mode
    out = sweep.main(sweep.SweepConfig(cache=str(tmp_path / "cache"), lmbda="0.3", knn_temp="3",
                                       out=str(tmp_path / "sweep"), quiet=True))
    assert list(out) == [f"{mode.cache_score}@k={K}"]          # the evaluation's own mode
    row = out[f"{mode.cache_score}@k={K}"]
    assert row["score_mode"]["name"] == mode.name
    rel = abs(row["interp_ppl"] - res["interpolated"]["ppl"]) / res["interpolated"]["ppl"]
    assert rel <= 1e-6, (mode.name, row["interp_ppl"], res["interpolated"]["ppl"])
    assert abs(row["lm_ppl"] - res["ppl"]) / res["ppl"] <= 1e-6
    side = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert side["evaluation_score_mode"]["name"] == mode.name


def test_ip_index_default_scores_with_faiss_inner_products(bpe_databin, trained_ckpt,
                                                            trained_dstore, indexes, tmp_path):
    """The original's default for an IP index: FAISS's inner products, not exact L2."""
    default = run_eval(bpe_databin, trained_ckpt, trained_dstore, faiss_metric_type="ip",
                       save_retrieval=str(tmp_path / "a"))
    faiss = run_eval(bpe_databin, trained_ckpt, trained_dstore, faiss_metric_type="ip",
                     knn_sim_func="do_not_recomp_l2")
    l2 = run_eval(bpe_databin, trained_ckpt, trained_dstore, faiss_metric_type="ip",
                  knn_sim_func="l2")
    assert default["interpolated"]["ppl"] == faiss["interpolated"]["ppl"] != l2["interpolated"]["ppl"]
    assert not RetrievalCache(tmp_path / "a").has_exact     # nothing recomputed, none stored


def test_the_cache_holds_the_distances_the_evaluation_used(bpe_databin, trained_ckpt,
                                                           trained_dstore, indexes, tmp_path):
    run_eval(bpe_databin, trained_ckpt, trained_dstore, save_retrieval=str(tmp_path / "c"))
    cache = RetrievalCache(tmp_path / "c")
    assert cache.has_exact and cache.mode.recompute          # without --save-exact-dists
    # a version 1 cache (no recorded mode) is read as the mode its flags had then
    side = json.loads((tmp_path / "c" / "cache.json").read_text())
    side.pop("score_mode")
    side["version"] = 1
    (tmp_path / "c" / "cache.json").write_text(json.dumps(side))
    assert RetrievalCache(tmp_path / "c").mode == cache.mode
    both = sweep.main(sweep.SweepConfig(cache=str(tmp_path / "c"), score="faiss,exact",
                                        knn_temp="1,2", out=str(tmp_path / "s"), quiet=True))
    assert both[f"faiss@k={K}"]["score_mode"]["name"] == "faiss-l2"
    assert both[f"exact@k={K}"]["score_mode"]["name"] == "faiss-l2+keys-l2"
    assert "faiss-l2+keys-l2" in (tmp_path / "s" / "sweep.md").read_text()
