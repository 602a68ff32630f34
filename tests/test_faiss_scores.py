"""The FAISS-score mode (``--knn-sim-func do_not_recomp_l2``) as a first-class path: the kNN
features run in it without reading a key (``--no-load-keys``: the keys are not even opened)
on a fast-scan index, and their numbers equal the index's own search scored by the kNN
math."""
import json

import faiss
import numpy as np
import pytest
import torch

from knnlm import generate, neighbors
from knnlm.data.preprocess import DataBin
from knnlm.knn import index, math as knn, prune, reduce
from knnlm.knn.datastore import Datastore
from knnlm.knn.search import KnnSearch
from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint

from test_knn_eval import K, kcfg, run_eval

FAISS = dict(knn_sim_func="do_not_recomp_l2", load_keys=False, probe=8)
N_EVAL = 400


def fast_index(ds_dir, factory="IVF32,PQ16x4fs"):
    out = f"{ds_dir}/fast.faiss"
    index.build_index(index.BuildIndexConfig(dstore_dir=str(ds_dir), knn_keytype="att",
                                             index_factory=factory, faiss_index=out,
                                             train_size=8000, quiet=True))
    return out


@pytest.fixture(scope="module")
def stores(trained_dstore, tmp_path_factory):
    """The datastore, a pruned (weighted) one and a PCA-reduced one, each with a fast-scan
    index."""
    root = tmp_path_factory.mktemp("faiss_scores")
    base_index = fast_index(trained_dstore.path)
    pruned = root / "pruned"
    prune.main(prune.PruneConfig(dstore_dir=str(trained_dstore.path), out=str(pruned),
                                 method="merge", merge_k=4, indexfile=base_index, probe=8,
                                 quiet=True))
    reduced = root / "pca16"
    reduce.main(reduce.ReduceConfig(dstore_dir=str(trained_dstore.path), out=str(reduced),
                                    pca_dim=16, quiet=True))
    return dict(base=(trained_dstore, base_index),
                pruned=(Datastore(pruned), fast_index(pruned)),
                reduced=(Datastore(reduced), fast_index(reduced, "IVF32,PQ8x4fs")))


def reference_knn_scores(ds, index_path, queries, targets, temp, projection=None):
    """log p_kNN of each target from a direct FAISS search of the (projected) queries."""
    idx = faiss.read_index(index_path)
    faiss.extract_index_ivf(idx).nprobe = 8
    q = queries if projection is None else projection(queries)
    D, I = idx.search(np.ascontiguousarray(q, dtype=np.float32), K)
    vals = np.where(I >= 0, np.asarray(ds.vals)[np.maximum(I, 0)], -1)
    counts = None
    if ds.counts is not None:
        counts = torch.from_numpy(np.log(np.asarray(ds.counts, dtype=np.float64)[np.maximum(I, 0)]))
    return knn.knn_target_log_probs(-torch.from_numpy(D).double(), torch.from_numpy(vals),
                                    torch.from_numpy(targets), temp, torch.from_numpy(I >= 0),
                                    counts).numpy()


@pytest.mark.parametrize("which", ["base", "pruned", "reduced"])
def test_eval_lm_equals_the_index_search(bpe_databin, trained_ckpt, stores, tmp_path, which):
    ds, idx = stores[which]
    res = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, indexfile=idx, lmbda=0.3,
                        knn_temp=2.0, max_eval_tokens=N_EVAL, **FAISS,
                        save_queries=str(tmp_path / "q.npy"), save_tokens=str(tmp_path / "t.npy"),
                        save_knn_scores=str(tmp_path / "knn.npy")))
    assert res["interpolated"]["score_mode"]["name"] == "faiss-l2"
    projection = None
    if which == "reduced":
        from knnlm.knn.reduce import Projection
        projection = Projection(ds)
    ref = reference_knn_scores(ds, idx, np.load(tmp_path / "q.npy"),
                               np.load(tmp_path / "t.npy").astype(np.int64), 2.0, projection)
    got = np.load(tmp_path / "knn.npy")
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-5,
                               atol=1e-5)


def test_gate_at_fraction_one_is_the_plain_faiss_scored_knnlm(bpe_databin, trained_ckpt, stores,
                                                               tmp_path):
    """A gate trained on a FAISS-scored cache; searching every token equals the plain run."""
    from knnlm import train_gate
    ds, idx = stores["base"]
    common = dict(indexfile=idx, lmbda=0.3, knn_temp=2.0, **FAISS)
    run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, gen_subset="test",
                  max_eval_tokens=1500, save_retrieval=str(tmp_path / "cache"), **common))
    train_gate.main(train_gate.TrainGateConfig(cache=str(tmp_path / "cache"),
                                               out=str(tmp_path / "gate"), epochs=2, quiet=True))
    plain = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, max_eval_tokens=N_EVAL,
                          **common))
    gated = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, max_eval_tokens=N_EVAL,
                          gate=str(tmp_path / "gate"), retrieval_fraction=1.0, **common))
    assert gated["interpolated"]["ppl"] == pytest.approx(plain["interpolated"]["ppl"], rel=1e-9)
    half = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, max_eval_tokens=N_EVAL,
                         gate=str(tmp_path / "gate"), retrieval_fraction=0.5, **common))
    assert 0.2 < half["interpolated"]["efficiency"]["searches"] / N_EVAL < 0.8


def test_generate_and_neighbors_use_the_index_distances(bpe_databin, trained_ckpt, stores):
    """generate's next-token distribution and neighbors' scores come from the index's
    distances (keys never opened)."""
    ds, idx = stores["base"]
    cfg = generate.GenerateConfig(data=str(bpe_databin.path), path=str(trained_ckpt),
                                  prompt="the king", knnlm=True, dstore_filename=str(ds.path),
                                  indexfile=idx, k=K, lmbda=0.4, knn_temp=2.0, **FAISS)
    fp = model_fingerprint(load_checkpoint(trained_ckpt)["model"])
    search = KnnSearch(cfg, fp, DataBin(bpe_databin.path), torch.device("cpu"),
                       log=lambda m: None)
    assert search.retriever.keys is None
    q = np.asarray(ds.keys("att")[123], dtype=np.float32) + 0.01
    logits = torch.randn(bpe_databin.vocab_size, generator=torch.Generator().manual_seed(0))
    got, _ = generate.next_log_probs(logits, torch.from_numpy(q), search, cfg)
    raw = faiss.read_index(idx)
    faiss.extract_index_ivf(raw).nprobe = 8
    D, I = raw.search(q[None], K)
    vals = torch.from_numpy(np.asarray(ds.vals)[I])
    dense = knn.knn_full_log_probs(-torch.from_numpy(D).double(), vals, len(logits), 2.0)[0]
    want = knn.interpolate(torch.log_softmax(logits.double(), -1), dense, 0.4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    out = generate.main(cfg)
    assert out["score_mode"]["name"] == "faiss-l2" and len(out["results"][0]["ids"]) == 50
    rows = neighbors.main(neighbors.NeighborsConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_filename=str(ds.path),
        indexfile=idx, k=8, text="the king is", json=True, **FAISS))
    assert rows and all(nb["score"] == pytest.approx(-nb["distance"]) for r in rows
                        for nb in r["neighbors"])


def test_retomaton_in_faiss_mode_needs_no_key_file(stores, tmp_path):
    """The RetoMaton walk in the FAISS-score mode opens no key file: a datastore directory
    without its keys works. (The HF processor's FAISS-score mode: test_hf_generate.py.)"""
    import shutil
    ds, idx = stores["base"]
    bare = tmp_path / "bare"
    shutil.copytree(ds.path, bare)
    (bare / "keys_att.npy").unlink()
    (bare / "keys_ffn.npy").unlink()
    shutil.copy(idx, bare / "index_att_l2.faiss")
    side = json.loads((ds.path / "fast.faiss.json").read_text())
    (bare / "index_att_l2.faiss.json").write_text(json.dumps(side))
    from knnlm.knn.options import KnnOptions
    from knnlm.knn.pointers import PointerWalk
    from types import SimpleNamespace
    opts = KnnOptions(knnlm=True, dstore_filename=str(bare), k=16, lmbda=0.3, knn_temp=2.0,
                      retomaton=True, min_knns=2, **FAISS)
    search = KnnSearch(opts, ds.meta["model_fingerprint"], SimpleNamespace(tokenizer_sha256=None),
                       torch.device("cpu"), log=lambda m: None)
    walk = PointerWalk(search, 2)
    q = np.asarray(ds.keys("att")[100:140], dtype=np.float32)
    out = walk.search_stream(q, np.asarray(ds.vals[100:140], dtype=np.int64))
    assert out["searched"].sum() < 40 and (out["I"] >= 0).any()
    assert out["exact"] is None                     # nothing recomputed from keys
