"""eval-lm --knnlm against brute-force references."""
import json
import math

import numpy as np
import pytest
import torch

from knnlm import evaluate
from knnlm.knn import index
from knnlm.knn.cache import RetrievalCache
from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint
from knnlm.data.preprocess import DataBin
from knnlm.data.blocks import score_windows, shifted_inputs
from knnlm.knn.exact import brute_force_search
from knnlm.knn.search import exact_distances

K = 16


@pytest.fixture(scope="module")
def ivf_index(trained_dstore):
    meta = index.build_index(index.BuildIndexConfig(
        dstore_dir=str(trained_dstore.path), knn_keytype="att", index_factory="IVF32,PQ8",
        train_size=4000, quiet=True))
    return meta


def kcfg(databin, ckpt, ds, tmp_path, **kw):
    base = dict(data=str(databin.path), path=str(ckpt), gen_subset="valid", tokens_per_sample=64,
                context_window=32, knnlm=True, dstore_filename=str(ds.path), k=K, probe=32,
                quiet=True)
    base.update(kw)
    return evaluate.EvalConfig(**base)


def run_eval(cfg):
    ckpt = load_checkpoint(cfg.path)
    return evaluate.eval_lm(model_from_checkpoint(ckpt), DataBin(cfg.data), cfg,
                            torch.device("cpu"), model_fingerprint(ckpt["model"]))


def direct_queries(databin, ckpt, n, T=64, C=32):
    """att of the first n valid targets, from direct forward passes."""
    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    toks = np.asarray(databin.split("valid"))
    out = []
    for w in score_windows(len(toks), T, C):
        if w.score_start >= n:
            break
        x = torch.from_numpy(shifted_inputs(toks, databin.eos, w.ctx_start, w.end))[None]
        with torch.no_grad():
            _, h = model(x, return_hidden=("att",))
        out.append(h["att"][0, w.score_start - w.ctx_start:].numpy())
    return np.concatenate(out)[:n], toks[:n]


def test_exact_search_and_knn_scores_match_numpy(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    cfg = kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, exact_search=True,
               knn_temp=2.0, save_knn_scores=str(tmp_path / "knn.npy"),
               save_retrieval=str(tmp_path / "cache"))
    res = run_eval(cfg)
    n = 40
    q, targets = direct_queries(bpe_databin, trained_ckpt, n)
    xb = np.asarray(trained_dstore.keys("att"), dtype=np.float64)
    d = ((q[:, None, :].astype(np.float64) - xb[None]) ** 2).sum(-1)      # (n, N) brute force
    order = np.argsort(d, axis=1, kind="stable")[:, :K]
    cache = RetrievalCache(tmp_path / "cache")
    # neighbours: the same set as numpy's (ties aside), distances equal
    np.testing.assert_allclose(cache.faiss_dists[:n], np.take_along_axis(d, order, 1), rtol=1e-3, atol=1e-3)
    # p_kNN of each target by explicit loops
    knn_scores = np.load(tmp_path / "knn.npy")
    vals = np.asarray(trained_dstore.vals)
    for i in range(n):
        w = [math.exp(-d[i, j] / 2.0) for j in order[i]]
        hit = sum(wj for wj, j in zip(w, order[i]) if vals[j] == targets[i])
        ref = math.log(hit / sum(w)) if hit > 0 else -math.inf
        if ref == -math.inf:
            assert knn_scores[i] == -np.inf
        else:
            assert knn_scores[i] == pytest.approx(ref, abs=2e-3)
    assert res["knn"]["tokens"] == res["tokens"]


def test_recomputed_distances_equal_numpy(bpe_databin, trained_ckpt, trained_dstore, ivf_index, tmp_path):
    cfg = kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, save_exact_dists=True,
               save_retrieval=str(tmp_path / "cache"), save_queries=str(tmp_path / "q.npy"))
    run_eval(cfg)
    cache = RetrievalCache(tmp_path / "cache")
    q = np.load(tmp_path / "q.npy").astype(np.float32)
    ids = np.asarray(cache.ids[:50])
    xb = np.asarray(trained_dstore.keys("att"), dtype=np.float64)
    ref = ((xb[ids] - q[:50, None, :].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(cache.exact_dists[:50], ref, rtol=1e-4, atol=1e-4)
    # FAISS's PQ distances are approximations of the same numbers
    assert not np.allclose(cache.faiss_dists[:50], ref, rtol=1e-3)
    assert np.corrcoef(cache.faiss_dists[:50].ravel(), ref.ravel())[0, 1] > 0.8
    assert np.array_equal(cache.vals[:50], np.asarray(trained_dstore.vals)[ids])


@pytest.mark.parametrize("sim", [None, "do_not_recomp_l2", "dot"])
def test_lambda_0_is_the_lm_and_lambda_1_the_knn(bpe_databin, trained_ckpt, trained_dstore,
                                                 ivf_index, tmp_path, sim):
    r0 = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, lmbda=0.0, knn_sim_func=sim))
    r1 = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, lmbda=1.0, knn_sim_func=sim))
    assert r0["interpolated"]["ppl"] == r0["ppl"]
    assert r1["interpolated"]["ppl"] == r1["knn"]["ppl"]
    plain = run_eval(evaluate.EvalConfig(data=str(bpe_databin.path), path=str(trained_ckpt),
                                         gen_subset="valid", tokens_per_sample=64,
                                         context_window=32, quiet=True))
    assert r0["ppl"] == plain["ppl"]


def test_ignore_top_removes_self_retrieval(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    """Scoring the training split with its own datastore: the nearest neighbour of every
    position is itself (distance 0) unless --ignore-top drops it."""
    common = dict(gen_subset="train", exact_search=True, tokens_per_sample=64, context_window=32)
    self_ = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path,
                          save_retrieval=str(tmp_path / "a"), **common))
    ign = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, ignore_top=True,
                        save_retrieval=str(tmp_path / "b"), **common))
    a, b = RetrievalCache(tmp_path / "a"), RetrievalCache(tmp_path / "b")
    rows = np.arange(a.size)
    assert (a.faiss_dists[:, 0] <= 1e-2).mean() > 0.99        # the self-hit
    own = (np.asarray(a.ids[:, 0]) == rows)
    assert own.mean() > 0.5                                     # ties with duplicates aside
    assert not (np.asarray(b.ids) == rows[:, None]).any()       # never itself
    assert self_["knn"]["ppl"] < ign["knn"]["ppl"]


def test_bad_knn_inputs(bpe_databin, trained_ckpt, trained_dstore, tiny_ckpt, ivf_index, tmp_path, capsys):
    from knnlm.cli import run
    base = ["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset", "valid",
            "--tokens-per-sample", "64", "--knnlm", "--dstore-filename", str(trained_dstore.path)]
    cases = [
        (base + ["--lmbda", "1.5"], "--lmbda"),
        (base + ["--knn-temp", "0"], "--knn-temp"),
        (base + ["--k", str(trained_dstore.size + 1)], "exceeds the datastore"),
        (base + ["--no-load-keys"], "--no-load-keys"),
        (base + ["--faiss-metric-type", "ip"], "index sidecar not found"),
        (["eval-lm", str(bpe_databin.path), "--path", str(tiny_ckpt), "--knnlm",
          "--dstore-filename", str(trained_dstore.path)], "another checkpoint"),
        (base[:-2], "--dstore-filename"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        rc = run(argv)
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert pattern.lower() in err.lower(), (argv, err)


def test_brute_force_search_ip_and_chunks():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((1000, 8)).astype(np.float32)
    xq = rng.standard_normal((5, 8)).astype(np.float32)
    D, I = brute_force_search(torch.from_numpy(xq), xb, 7, "ip", chunk=128)
    ref = np.argsort(-(xq @ xb.T), axis=1)[:, :7]
    assert np.array_equal(I, ref)
    np.testing.assert_allclose(D, np.take_along_axis(xq @ xb.T, ref, 1), rtol=1e-5)
    np.testing.assert_allclose(exact_distances(xq, xb, I, "ip"), D, rtol=1e-5)


def test_exact_distances_and_l2_search_on_a_read_only_memmap(tmp_path):
    """Recomputed distances equal a loop over (query, neighbour) pairs, across the query
    chunks, with missing neighbours (-1) masked; L2 brute force equals numpy's ordering."""
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((700, 12)).astype(np.float16)
    np.save(tmp_path / "keys.npy", xb)
    keys = np.load(tmp_path / "keys.npy", mmap_mode="r")
    xq = rng.standard_normal((37, 12)).astype(np.float32)
    ids = rng.integers(0, 700, (37, 9))
    ids[3, 4] = ids[30, 0] = -1
    for metric in ("l2", "ip"):
        got = exact_distances(xq, keys, ids, metric)
        for i in range(37):
            for j in range(9):
                if ids[i, j] < 0:
                    assert got[i, j] == (np.inf if metric == "l2" else -np.inf)
                    continue
                k = xb[ids[i, j]].astype(np.float32)
                ref = ((xq[i] - k) ** 2).sum() if metric == "l2" else xq[i] @ k
                assert abs(got[i, j] - ref) <= 1e-5 * max(1.0, abs(ref))
    D, I = brute_force_search(torch.from_numpy(xq), keys, 11, "l2", chunk=100)
    full = ((xq[:, None, :] - xb.astype(np.float32)[None]) ** 2).sum(-1)
    assert np.array_equal(I, np.argsort(full, axis=1, kind="stable")[:, :11])
    np.testing.assert_allclose(D, np.take_along_axis(full, I, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(exact_distances(xq, keys, I, "l2"), D, rtol=1e-4, atol=1e-4)


def test_move_dstore_to_mem_gives_the_same_result(bpe_databin, trained_ckpt, trained_dstore,
                                                  ivf_index, tmp_path):
    a = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path))
    b = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, move_dstore_to_mem=True))
    assert a["interpolated"]["ppl"] == b["interpolated"]["ppl"]
    from knnlm.knn.datastore import Datastore
    mem = Datastore(trained_dstore.path, in_memory=True)
    assert not isinstance(mem.keys("att"), np.memmap) and mem.keys("att").dtype == np.float16


def test_gpu_search_flags_fall_back_or_refuse(bpe_databin, trained_ckpt, trained_dstore, ivf_index,
                                              tmp_path, capsys):
    """Without FAISS GPU support --knnlm-gpu searches on the CPU (same result); asking for
    more GPUs than present is refused."""
    from knnlm.cli import run as cli_run
    from knnlm.knn.index import gpu_available
    if gpu_available():
        pytest.skip("a FAISS GPU build is present")
    cpu = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, knn_sim_func="do_not_recomp_l2"))
    gpu = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, knn_sim_func="do_not_recomp_l2",
                   knnlm_gpu=True, gpu_shard=True))
    assert gpu["interpolated"]["ppl"] == cpu["interpolated"]["ppl"]
    assert "searching on the CPU" in capsys.readouterr().out
    n = torch.cuda.device_count()
    assert cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset",
                    "valid", "--tokens-per-sample", "64", "--knnlm", "--dstore-filename",
                    str(trained_dstore.path), "--k", "16", "--knnlm-gpu", "--knnlm-gpus",
                    str(n + 1), "--quiet"]) == 2


def test_killed_knnlm_eval_resumes_to_identical_outputs(bpe_databin, trained_ckpt, trained_dstore,
                                                       ivf_index, tmp_path, monkeypatch):
    from knnlm.knn import scorer

    def cfg(d):
        return kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, max_tokens=256,
                    save_retrieval=str(d / "cache"), save_exact_dists=True,
                    save_scores=str(d / "scores.npy"), save_knn_scores=str(d / "knn.npy"))
    ref = run_eval(cfg(tmp_path / "ref"))
    real, calls = scorer.KnnScorer.score, []

    def dies(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt   # killed in the 4th batch
        return real(self, *a, **kw)
    monkeypatch.setattr(scorer.KnnScorer, "score", dies)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg(tmp_path / "b"))
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "cache" / "cache.json").read_text())["progress"]["done"] > 0
    got = run_eval(cfg(tmp_path / "b"))
    for key in ("ppl", "word_ppl", "words"):
        assert got[key] == ref[key]
        assert got["knn"][key] == ref["knn"][key] and got["interpolated"][key] == ref["interpolated"][key]
    for f in ("scores.npy", "knn.npy", "cache/ids.npy", "cache/vals.npy", "cache/faiss_dists.npy",
              "cache/exact_dists.npy", "cache/lm_logprobs.npy", "cache/words.npy"):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert RetrievalCache(tmp_path / "b" / "cache").meta["complete"]


def test_ignore_top_reports_whether_it_dropped_the_tokens_own_entry(bpe_databin, trained_ckpt,
                                                                    trained_dstore, tmp_path,
                                                                    capsys):
    """With the datastore's split and window, every dropped neighbour is the token's own
    entry (or a duplicate of it); with another window (the loss-weight stage's mistake in
    the fork's script) it often is not, and a warning says so."""
    common = dict(gen_subset="train", exact_search=True, ignore_top=True, max_eval_tokens=3000)
    same = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path,
                         tokens_per_sample=64, context_window=32, **common))
    rep = same["interpolated"]["ignore_top"]
    assert rep["tokens"] == 3000 and rep["dropped_own_entry"] == 3000
    assert "--ignore-top dropped" not in capsys.readouterr().err
    other = run_eval(kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path,
                          tokens_per_sample=48, context_window=8, **common))
    assert other["interpolated"]["ignore_top"]["share"] < 0.95
    err = capsys.readouterr().err
    assert "--ignore-top dropped the token's own entry for only" in err
    assert "--tokens-per-sample 64 --context-window 32 --sample-break-mode none" in err
