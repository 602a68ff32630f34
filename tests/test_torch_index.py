"""The torch search backend against FAISS's CPU search on the same index: the same
neighbours (ties aside) and distances, for every supported index type and metric."""
import faiss
import numpy as np
import pytest
import torch

from knnlm.knn.index import train_index
from knnlm.knn.search import KnnSearch
from knnlm.knn.torch_index import SCANS, ShardedTorchIndex, TorchIndex
from knnlm.util import UserError

D_ = 16


def clustered(n, seed):
    """Keys around 40 centres (lists of unequal length), as datastore keys are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D_)).astype(np.float32) * 3
    x = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, D_)).astype(np.float32)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered(6000, 0), clustered(300, 1)


def built(factory, metric, xb, by_residual=True):
    index = faiss.index_factory(D_, factory, metric)
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.by_residual = by_residual
    if isinstance(index, faiss.IndexPreTransform):    # a short OPQ rotation search
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4
    train_index(index, xb[:3000], use_gpu=False)      # no polysemous training, as build-index
    index.add(xb)
    if ivf is not None:
        ivf.nprobe = 5
    return index


def agree(index, ti, xq, k, rtol=1e-4):
    D, I = index.search(xq, k)
    D2, I2 = ti.search(xq, k)
    assert D2.dtype == np.float32 and I2.dtype == np.int64 and D2.shape == I2.shape == (len(xq), k)
    overlap = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (a >= 0).sum())
                       for a, b in zip(I, I2)])
    assert overlap > 0.999, overlap                       # the same neighbours, ties aside
    assert np.array_equal(I < 0, I2 < 0)                  # missing ones in the same places
    ok = I >= 0
    scale = np.abs(D[ok]).max()
    np.testing.assert_allclose(D2[ok], D[ok], rtol=rtol, atol=rtol * scale)
    # the same distance for the same neighbour, not just the same sorted values
    for a, b, da, db in zip(I[:20], I2[:20], D[:20], D2[:20]):
        got = dict(zip(b, db))
        for i, d in zip(a, da):
            if i >= 0 and i in got:
                assert abs(got[i] - d) <= rtol * scale


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
@pytest.mark.parametrize("factory,by_residual", [
    ("Flat", True), ("IVF32,Flat", True), ("IVF32,PQ8", True), ("IVF32,PQ8", False),
    ("OPQ8,IVF32,PQ8", True)])
def test_torch_search_equals_faiss(data, metric, factory, by_residual, scan):
    xb, xq = data
    index = built(factory, metric, xb, by_residual)
    ti = TorchIndex.from_faiss(index)
    ti.scan = scan
    if factory != "Flat":
        assert ti.nprobe == 5
    agree(index, ti, xq, 50)


@pytest.mark.parametrize("scan", SCANS)
def test_more_neighbours_than_probed_candidates_come_back_as_minus_one(data, scan):
    xb, xq = data
    index = built("IVF32,PQ8", faiss.METRIC_L2, xb)
    faiss.extract_index_ivf(index).nprobe = 1
    ti = TorchIndex.from_faiss(index)
    ti.scan = scan
    agree(index, ti, xq[:30], 1000)                       # lists hold ~190 keys: -1 padding
    assert (ti.search(xq[:30], 1000)[1] == -1).any()


@pytest.mark.parametrize("scan", SCANS)
def test_decoding_per_search_equals_the_decoded_table(data, monkeypatch, scan):
    """Past the memory budget the codes are decoded list by list at every search."""
    from knnlm.knn import torch_index
    xb, xq = data
    index = built("IVF32,PQ8", faiss.METRIC_L2, xb)
    full = TorchIndex.from_faiss(index)
    monkeypatch.setattr(torch_index, "CPU_DECODE_BUDGET", 0)
    lazy = TorchIndex.from_faiss(index)
    lazy.scan = scan
    assert full.table is not None and lazy.table is None
    for a, b in zip(full.search(xq, 20), lazy.search(xq, 20)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_the_bucketed_scan_splits_its_gemms_and_equals_the_list_loop(data, metric, monkeypatch):
    """However small the GEMMs (lists and queries split across many), the bucketed scan
    writes exactly the list loop's candidates; and the GPU default is the bucketed one."""
    from knnlm.knn import torch_index
    xb, xq = data
    index = built("IVF32,PQ8", metric, xb)
    faiss.extract_index_ivf(index).nprobe = 7
    ti = TorchIndex.from_faiss(index)
    assert ti.scan == "lists"
    want = ti.search(xq, 60)
    ti.scan = "buckets"
    for budget in (1 << 24, 4096, 1):     # one GEMM per group .. one list and query each
        monkeypatch.setattr(torch_index, "SCAN_ELEMENTS", budget)
        got = ti.search(xq, 60)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
        assert np.mean(got[1] == want[1]) > 0.999


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_lists_sharded_over_devices_merge_to_the_whole(data, metric):
    xb, xq = data
    index = built("IVF32,PQ8", metric, xb)
    whole = TorchIndex.from_faiss(index)
    sharded = ShardedTorchIndex(index, ["cpu", "cpu", "cpu"])
    assert [s.ntotal for s in sharded.shards] != [0, 0, 0] and sharded.ntotal == index.ntotal
    D, I = whole.search(xq, 40)
    D2, I2 = sharded.search(xq, 40)
    np.testing.assert_allclose(D2, D, rtol=1e-5, atol=1e-5)
    assert np.mean(I == I2) > 0.999
    # merged on the device in merge_topk's order (ties by shard, then rank)
    from knnlm.knn.exact import merge_topk
    D3, I3 = merge_topk([s.search(xq, 40) for s in sharded.shards], 40, whole.metric)
    assert np.array_equal(D2, D3) and np.array_equal(I2, I3)


def test_unsupported_indexes_are_refused(data):
    xb, _ = data
    hnsw = faiss.index_factory(D_, "HNSW8")
    with pytest.raises(UserError, match="torch backend"):
        TorchIndex.from_faiss(hnsw)
    pq4 = faiss.index_factory(D_, "IVF8,PQ8x4")
    train_index(pq4, xb[:3000], use_gpu=False)
    with pytest.raises(UserError, match="8-bit"):
        TorchIndex.from_faiss(pq4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scan", SCANS)
def test_torch_search_on_the_gpu_equals_faiss(data, scan):
    xb, xq = data
    index = built("IVF32,PQ8", faiss.METRIC_L2, xb)
    ti = TorchIndex.from_faiss(index, "cuda")
    assert ti.scan == "buckets"
    ti.scan = scan
    agree(index, ti, xq, 50)


def test_eval_lm_with_the_torch_backend_equals_faiss(bpe_databin, trained_ckpt, trained_dstore,
                                                     tmp_path, monkeypatch):
    """eval-lm --knn-backend torch (here on the CPU) gives FAISS's perplexity and says which
    backend searched, in the results and the cache; without a cache it scores on the
    backend's device (KnnSearch.scores_on_device), with the same perplexity."""
    from knnlm import evaluate
    from knnlm.data.preprocess import DataBin
    from knnlm.knn import index as index_mod
    from knnlm.knn.cache import RetrievalCache
    from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint
    index_mod.build_index(index_mod.BuildIndexConfig(
        dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory="IVF32,PQ8",
        train_size=4000, faiss_index=str(tmp_path / "ivf.faiss"), quiet=True))
    ckpt = load_checkpoint(trained_ckpt)
    out = {}
    calls = []
    real = KnnSearch.scores_on_device
    monkeypatch.setattr(KnnSearch, "scores_on_device", lambda *a: calls.append(1) or real(*a))
    for backend, cache in (("faiss", True), ("torch", True), ("torch", False)):
        cfg = evaluate.EvalConfig(
            data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid",
            tokens_per_sample=64, context_window=32, knnlm=True, k=16, probe=4,
            dstore_filename=str(trained_dstore.path), indexfile=str(tmp_path / "ivf.faiss"),
            knn_sim_func="do_not_recomp_l2", knn_backend=backend,
            save_retrieval=str(tmp_path / backend) if cache else None, quiet=True)
        out[backend, cache] = evaluate.eval_lm(model_from_checkpoint(ckpt), DataBin(cfg.data), cfg,
                                               torch.device("cpu"), model_fingerprint(ckpt["model"]))
        assert bool(calls) == (backend == "torch" and not cache)   # no cache: scored on device
    a, b = out["faiss", True]["interpolated"], out["torch", True]["interpolated"]
    assert out["torch", False]["interpolated"]["ppl"] == b["ppl"]
    assert (a["search_backend"], b["search_backend"]) == ("faiss-cpu", "torch (cpu)")
    ca, cb = RetrievalCache(tmp_path / "faiss"), RetrievalCache(tmp_path / "torch")
    da, db = np.asarray(ca.faiss_dists), np.asarray(cb.faiss_dists)
    np.testing.assert_allclose(db, da, rtol=1e-4, atol=1e-4)
    # the same neighbours up to ties: a neighbour only one backend returned is at the
    # distance of the k-th (PQ codes make exact ties common)
    for ra, rb, dr in zip(np.asarray(ca.ids), np.asarray(cb.ids), da):
        only = set(ra) ^ set(rb)
        if only:
            assert abs(dr[-1] - dr[[i for i, x in enumerate(ra) if x in only] or [-1]]).max() <= 1e-4
    assert b["ppl"] == pytest.approx(a["ppl"], rel=2e-3)
    assert cb.meta["search_backend"] == "torch (cpu)"


@pytest.mark.parametrize("ignore_top", [False, True])
def test_scores_on_device_equal_the_host_path(bpe_databin, trained_ckpt, trained_dstore, tmp_path,
                                              ignore_top):
    """KnnSearch.scores_on_device (the torch backend's results scored where they are) gives
    KnnSearch.search's scores, values, mask and log counts, on a weighted datastore too."""
    from knnlm.data.preprocess import DataBin
    from knnlm.knn import index as index_mod
    from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint
    from test_knn_eval import kcfg
    from test_prune import write_like
    rows = np.arange(0, trained_dstore.size, 2)
    counts = np.random.default_rng(0).integers(1, 4, len(rows)).astype(np.float32)
    ds = write_like(trained_dstore, tmp_path / "w", rows, counts)
    index_mod.build_index(index_mod.BuildIndexConfig(
        dstore_dir=str(ds.path), knn_keytype="att", index_factory="IVF16,PQ8", train_size=3000,
        quiet=True))
    fp = model_fingerprint(load_checkpoint(trained_ckpt)["model"])
    knn = KnnSearch(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, k=24, probe=4,
                         knn_backend="torch", knn_sim_func="do_not_recomp_l2",
                         ignore_top=ignore_top), fp, DataBin(bpe_databin.path), torch.device("cpu"))
    assert knn.on_device
    q = np.asarray(ds.keys("att")[:300], dtype=np.float32)
    host, dev = knn.search(q), knn.scores_on_device(q)
    assert torch.equal(dev["scores"], host["scores"]) and torch.equal(dev["mask"], host["mask"])
    assert np.array_equal(dev["vals"].numpy(), host["vals"])
    assert torch.equal(dev["log_counts"], host["log_counts"])
    assert (host["log_counts"] > 0).any()
    recompute = KnnSearch(kcfg(bpe_databin, trained_ckpt, ds, tmp_path, k=24, probe=4,
                               knn_backend="torch"), fp, DataBin(bpe_databin.path),
                          torch.device("cpu"))
    assert not recompute.on_device            # exact distances come from the host's keys
