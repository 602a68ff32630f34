"""The streaming exact search: one pass over the keys for all queries equals brute force
(ties aside), shards of the keys merge to the whole, and a killed pass resumes."""
import numpy as np
import pytest
import torch

from conftest import free_port
from knnlm.knn import exact
from knnlm.knn.exact import brute_force_search, merge_topk, stream_search


@pytest.fixture(scope="module")
def xbq():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((5000, 12)).astype(np.float16)      # fp16 keys, as datastores
    xq = rng.standard_normal((700, 12)).astype(np.float32)
    return xb, xq


def numpy_topk(xq, xb, k, metric):
    xb = xb.astype(np.float64)
    if metric == "l2":
        d = ((xq.astype(np.float64)[:, None, :] - xb[None]) ** 2).sum(-1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
    else:
        d = xq.astype(np.float64) @ xb.T
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_one_pass_over_the_keys_equals_numpy(xbq, metric):
    xb, xq = xbq
    D, I = stream_search(xq, xb, 20, metric, query_block=128, key_chunk=900)
    Dr, Ir = numpy_topk(xq, xb, 20, metric)
    np.testing.assert_allclose(D, Dr, rtol=1e-4, atol=1e-4)
    assert np.mean(I == Ir) > 0.999
    Db, Ib = brute_force_search(torch.from_numpy(xq), xb, 20, metric, chunk=700)
    np.testing.assert_allclose(D, Db, rtol=1e-5, atol=1e-5)


def test_key_ranges_merge_to_the_whole(xbq):
    xb, xq = xbq
    whole = stream_search(xq, xb, 30, "l2", key_chunk=1000)
    parts = [stream_search(xq, xb, 30, "l2", key_range=(a, b), key_chunk=1000)
             for a, b in ((0, 1700), (1700, 3333), (3333, 5000))]
    D, I = merge_topk(parts, 30, "l2")
    np.testing.assert_allclose(D, whole[0], rtol=1e-5, atol=1e-5)
    assert np.mean(I == whole[1]) > 0.999
    few = stream_search(xq, xb, 30, "l2", key_range=(0, 10))      # fewer keys than k
    assert (few[1][:, 10:] == -1).all() and np.isinf(few[0][:, 10:]).all()
    assert (np.diff(few[0][:, :10], axis=1) >= 0).all()             # nearest first


def resume_reading(xq, xb, state_dir, monkeypatch):
    """After a killed pass: rerun it, recording the first key of every chunk it reads."""
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(exact, "_key_chunk", lambda keys, s, e, dev: seen.append(s) or
                        torch.from_numpy(np.asarray(keys[s:e], dtype=np.float32)))
    got = stream_search(xq, xb, 16, "l2", key_chunk=800, state_dir=state_dir, save_interval_s=0)
    return seen, got


def test_killed_pass_resumes_after_its_last_saved_chunk(xbq, tmp_path, monkeypatch):
    xb, xq = xbq
    ref = stream_search(xq, xb, 16, "l2", key_chunk=800)
    real, calls = exact._save, []

    def dies(*a, **kw):
        calls.append(1)
        real(*a, **kw)
        if len(calls) == 3:
            raise KeyboardInterrupt      # killed after the third chunk was saved
    monkeypatch.setattr(exact, "_save", dies)
    with pytest.raises(KeyboardInterrupt):
        stream_search(xq, xb, 16, "l2", key_chunk=800, state_dir=tmp_path, save_interval_s=0)
    seen, got = resume_reading(xq, xb, tmp_path, monkeypatch)
    assert seen[0] == 2400                                   # chunks 0..2 were not read again
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    # other queries: the saved state is not theirs, the pass starts over
    seen.clear()
    stream_search(xq[:50], xb, 16, "l2", key_chunk=800, state_dir=tmp_path)
    assert seen[0] == 0


def test_a_kill_inside_a_save_leaves_the_previous_state_whole(xbq, tmp_path, monkeypatch):
    """The state (top-k, keys covered, identity) is one file made visible by one rename:
    killed with the new state written but not yet renamed, the pass resumes from the
    previous one, reads its chunks again, and ends equal to an uninterrupted pass (no key
    counted twice, no top-k of one save paired with the progress of another)."""
    xb, xq = xbq
    ref = stream_search(xq, xb, 16, "l2", key_chunk=800)
    import os
    real, calls = os.replace, []

    def dies(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt      # the third save's file is written, not renamed
        return real(src, dst)
    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        stream_search(xq, xb, 16, "l2", key_chunk=800, state_dir=tmp_path, save_interval_s=0)
    seen, got = resume_reading(xq, xb, tmp_path, monkeypatch)
    assert seen[0] == 1600                                   # after the second save
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    assert len(np.unique(got[1][0])) == 16


def test_eval_lm_exact_search_reads_each_key_once_and_resumes(bpe_databin, trained_ckpt,
                                                              trained_dstore, tmp_path,
                                                              monkeypatch):
    """eval-lm --exact-search: the LM pass, then one pass over the keys for every query of
    the split, then the scoring; killed in any pass, the rerun gives the same bytes."""
    from knnlm import evaluate
    from knnlm.data.preprocess import DataBin
    from knnlm.knn import scorer
    from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint
    ckpt = load_checkpoint(trained_ckpt)

    def run(d, **kw):
        cfg = evaluate.EvalConfig(
            data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid",
            tokens_per_sample=64, context_window=32, knnlm=True, k=16, max_tokens=256,
            dstore_filename=str(trained_dstore.path), exact_search=True, knn_temp=2.0,
            save_retrieval=str(d / "cache"), save_knn_scores=str(d / "knn.npy"), quiet=True, **kw)
        return evaluate.eval_lm(model_from_checkpoint(ckpt), DataBin(cfg.data), cfg,
                                torch.device("cpu"), model_fingerprint(ckpt["model"]))
    monkeypatch.setattr(evaluate, "EXACT_BLOCK", 700)      # several scoring blocks
    reads = []
    real_chunk = exact._key_chunk
    monkeypatch.setattr(exact, "_key_chunk", lambda keys, s, e, dev: reads.append((s, e)) or
                        real_chunk(keys, s, e, dev))
    ref = run(tmp_path / "ref")
    n = trained_dstore.size
    assert sorted(reads) == reads and reads[0][0] == 0 and reads[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(reads, reads[1:]))       # every key exactly once
    assert not (tmp_path / "ref" / "cache" / "exact_search").exists()  # work files removed
    monkeypatch.setattr(exact, "_key_chunk", real_chunk)
    # killed in the scoring pass, after the LM and search passes finished
    real_score, calls = scorer.KnnScorer.score, []

    def dies(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(self, *a, **kw)
    monkeypatch.setattr(scorer.KnnScorer, "score", dies)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(scorer.KnnScorer, "score", real_score)
    assert (tmp_path / "b" / "cache" / "exact_search" / "search" / "rank0" / "state.npz").is_file()
    reads.clear()
    monkeypatch.setattr(exact, "_key_chunk", lambda keys, s, e, dev: reads.append((s, e)) or
                        real_chunk(keys, s, e, dev))
    got = run(tmp_path / "b")
    assert not reads                                   # the search pass was not redone
    assert got["interpolated"]["ppl"] == ref["interpolated"]["ppl"]
    for f in ("knn.npy", "cache/ids.npy", "cache/faiss_dists.npy", "cache/lm_logprobs.npy"):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_torchrun_ranks_share_the_keys_of_the_exact_pass(bpe_databin, trained_ckpt,
                                                         trained_dstore, tmp_path):
    """2 processes (gloo): rank 0 runs the LM pass, each rank streams half the keys, rank 0
    merges and scores; the same neighbour distances and perplexity as one process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from knnlm.cli import run as cli_run
    from knnlm.knn.cache import RetrievalCache
    argv = ["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset", "valid",
            "--tokens-per-sample", "64", "--context-window", "32", "--knnlm", "--k", "16",
            "--dstore-filename", str(trained_dstore.path), "--exact-search", "--cpu", "--quiet"]
    assert cli_run(argv + ["--save-retrieval", str(tmp_path / "one"),
                           "--results-path", str(tmp_path / "one.json")]) == 0
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "knnlm", *argv,
                        "--save-retrieval", str(tmp_path / "two"),
                        "--results-path", str(tmp_path / "two.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert two["interpolated"]["ppl"] == pytest.approx(one["interpolated"]["ppl"], rel=1e-5)
    a, b = RetrievalCache(tmp_path / "one"), RetrievalCache(tmp_path / "two")
    np.testing.assert_allclose(np.asarray(b.faiss_dists), np.asarray(a.faiss_dists), rtol=1e-5,
                               atol=1e-5)
    assert np.mean(np.asarray(a.ids) == np.asarray(b.ids)) > 0.99


def test_torchrun_eval_lm_is_only_for_the_exact_search(bpe_databin, trained_ckpt, monkeypatch,
                                                       capsys):
    from knnlm.cli import run as cli_run
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt)]) == 2
    assert "shares out the search" in capsys.readouterr().err
