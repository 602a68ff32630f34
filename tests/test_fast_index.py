"""Fast-scan (4-bit PQ, ``x4fs``) and refine (``RFlat``, ``Refine(SQfp16)``) indexes: built
by build-index, read by every search path, held to brute force and to the keys."""
import faiss
import numpy as np
import pytest

from knnlm.cli import run
from knnlm.knn import index, index_read
from knnlm.knn.search import exact_distances
from knnlm.knn.torch_index import TorchIndex
from knnlm.util import UserError
from test_knn_eval import kcfg, run_eval


def build(ds, out, factory, **kw):
    return index.build_index(index.BuildIndexConfig(
        dstore_dir=str(ds.path), knn_keytype="att", index_factory=factory, faiss_index=str(out),
        train_size=8000, quiet=True, **kw))


@pytest.fixture(scope="module")
def indexes(trained_dstore, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_index")
    out = {}
    for name, factory in (("fs", "IVF32,PQ16x4fs"), ("rflat", "IVF32,PQ16x4fs,RFlat"),
                          ("sq16", "IVF32,PQ8x4fs,Refine(SQfp16)")):
        out[name] = root / f"{name}.faiss"
        build(trained_dstore, out[name], factory)
    return out


def test_auto_factory_is_fast_scan_at_the_same_bytes():
    assert index.auto_factory(5_000, 128) == "Flat"
    assert index.auto_factory(1_740_000, 128) == "IVF4096,PQ64x4fs"     # 32 bytes, as PQ32
    assert index.auto_factory(100_000, 1024) == "IVF1024,PQ128x4fs"     # 64 bytes, as PQ64
    assert index.auto_factory(20_000, 32) == "IVF512,PQ16x4fs"
    assert index.auto_factory(20_000, 7) == "IVF512,Flat"               # no even M divides 7
    # the original flags build the original (8-bit) IVF-PQ
    assert index.BuildIndexConfig(dstore_dir="x", ncentroids=256).factory(10 ** 6, 1024) == \
        "IVF256,PQ64"


def test_fast_scan_recall_and_distances(trained_dstore, indexes):
    """At nprobe = nlist the fast-scan search returns the keys whose codes are nearest
    (against an exhaustive ranking of every reconstructed key: what it can find), its
    distances are those asymmetric distances up to the rounding of its 8-bit lookup
    tables, and the neighbours are the brute-force ones as far as 16 bytes of code for 32
    dimensions allow."""
    ds = trained_dstore
    idx, meta = index_read.load_index(indexes["fs"], ds, "att", nprobe=32)
    assert index_read.is_fast_scan(idx) and index_read.refine_stage(idx) is None
    assert not index_read.returns_exact_distances(idx, "float16")
    xb = np.asarray(ds.keys("att"), dtype=np.float32)
    rng = np.random.default_rng(0)
    xq = xb[rng.choice(len(xb), 100, replace=False)] + rng.normal(0, 0.05, (100, xb.shape[1]))
    xq = xq.astype(np.float32)
    D, I = idx.search(xq, 10)
    faiss.extract_index_ivf(idx).make_direct_map()
    recon = idx.reconstruct_batch(np.arange(idx.ntotal))
    adc_all = ((xq[:, None] - recon[None]) ** 2).sum(-1)
    best = np.sort(adc_all, axis=1)[:, :10]        # (many keys share a code: ties)
    adc = np.take_along_axis(adc_all, I, 1)
    tol = 0.02 * best.max()                          # the 8-bit lookup tables' rounding
    assert np.abs(np.sort(adc, axis=1) - best).max() <= tol
    assert np.abs(D - adc).max() <= 2.5 * tol     # (the rounding reaches ~2% here)
    exact = np.argsort(((xq[:, None] - xb[None]) ** 2).sum(-1), axis=1)[:, :10]
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(I, exact)]) >= 0.5


@pytest.mark.parametrize("name", ["rflat", "sq16"])
def test_refine_returns_the_exact_distances_of_the_keys(trained_dstore, indexes, name):
    ds = trained_dstore
    idx, _ = index_read.load_index(indexes[name], ds, "att", nprobe=8, k_factor=3)
    assert index_read.returns_exact_distances(idx, "float16")
    assert faiss.downcast_index(idx).k_factor == 3
    xq = np.asarray(ds.keys("att")[:64], dtype=np.float32) + 0.01
    D, I = idx.search(xq, 16)
    np.testing.assert_allclose(D, exact_distances(xq, ds.keys("att"), I, "l2"),
                               rtol=1e-5, atol=1e-5)
    assert (np.diff(D, axis=1) >= 0).all()            # re-ranked: closest first


def test_refine_k_factor_1_equals_base_index_with_recomputed_scores(
        bpe_databin, trained_ckpt, trained_dstore, indexes, tmp_path):
    """A refine index at k_factor 1 re-ranks exactly the base index's neighbours, so the
    kNN-LM equals the base (fast-scan) index with exact L2 recomputed from the keys; its
    scores need no keys (--no-load-keys) and FAISS-score mode gives the same numbers."""
    ds = trained_dstore
    base = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, indexfile=str(indexes["fs"]),
                         probe=8))
    rflat = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path,
                          indexfile=str(indexes["rflat"]), probe=8, load_keys=False))
    faiss_scored = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, probe=8,
                                 indexfile=str(indexes["rflat"]),
                                 knn_sim_func="do_not_recomp_l2"))
    for r in (rflat, faiss_scored):
        assert abs(r["interpolated"]["ppl"] / base["interpolated"]["ppl"] - 1) < 1e-6
    fast = run_eval(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, indexfile=str(indexes["fs"]),
                         probe=8, knn_sim_func="do_not_recomp_l2"))
    assert fast["interpolated"]["ppl"] != base["interpolated"]["ppl"]   # quantised scores


def test_k_factor_needs_a_refine_index(bpe_databin, trained_ckpt, trained_dstore, indexes,
                                       capsys):
    rc = run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
              "--dstore-filename", str(trained_dstore.path), "--indexfile", str(indexes["fs"]),
              "--k-factor", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no refine stage" in err


def test_torch_backend_refuses_fast_scan_and_refine(trained_dstore, indexes):
    for name in ("fs", "rflat"):
        idx, _ = index_read.load_index(indexes[name], trained_dstore, "att")
        with pytest.raises(UserError, match="--knn-backend faiss"):
            TorchIndex.from_faiss(idx)


def test_sharded_refine_build_equals_the_unsharded_one(trained_dstore, indexes, tmp_path):
    """Shards of a refine index merge their inverted lists and their refine codes."""
    ds = trained_dstore
    out = tmp_path / "sharded.faiss"
    build(ds, out, "IVF32,PQ16x4fs,RFlat", shards=3, num_keys_to_add_at_a_time=4096)
    a, _ = index_read.load_index(indexes["rflat"], ds, "att", nprobe=8)
    b, _ = index_read.load_index(out, ds, "att", nprobe=8)
    xq = np.asarray(ds.keys("att")[::97], dtype=np.float32)
    Da, Ia = a.search(xq, 12)
    Db, Ib = b.search(xq, 12)
    assert np.array_equal(Ia, Ib) and np.array_equal(Da, Db)
