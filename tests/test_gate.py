"""Adaptive retrieval: n-gram features equal a counting loop; the gate at fraction 1 is the
plain kNN-LM and at 0 the LM; the searched tokens are those the gate ranks highest."""
from collections import Counter

import numpy as np
import pytest
import torch

from knnlm import train_gate
from knnlm.cli import run as cli_run
from knnlm.data.preprocess import DataBin
from knnlm.knn import gate as gate_mod
from knnlm.knn.cache import RetrievalCache
from knnlm.knn.datastore import Datastore

from test_knn_eval import ivf_index, kcfg, run_eval  # noqa: F401 (fixture)

N = 800


def ecfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, **kw):
    return kcfg(bpe_databin, trained_ckpt, trained_dstore, tmp_path, max_eval_tokens=N,
                lmbda=0.3, knn_temp=2.0, probe=8, **kw)


@pytest.fixture(scope="module")
def trained_gate(bpe_databin, trained_ckpt, trained_dstore, ivf_index, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("gate")
    run_eval(ecfg(bpe_databin, trained_ckpt, trained_dstore, root,
                  save_retrieval=str(root / "cache")))
    meta = train_gate.main(train_gate.TrainGateConfig(cache=str(root / "cache"),
                                                      out=str(root / "gate"), epochs=8,
                                                      quiet=True))
    return root, meta


def test_ngram_counts_equal_a_counting_loop():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 5, 400)
    tables = gate_mod.count_ngrams(stream, eos=9, chunk=64)   # chunks cross n-gram borders
    padded = [9] * 4 + stream.tolist()
    for n in gate_mod.NGRAM_ORDERS:
        ctx = [tuple(padded[4 + t - n:4 + t]) for t in range(len(stream))]
        counts = Counter(ctx)
        followers = {}                              # fertility: distinct next tokens
        for c, tok in zip(ctx, stream.tolist()):
            followers.setdefault(c, set()).add(tok)
        probe = rng.integers(0, 5, 300)
        pctx = [tuple(([9] * 4 + probe.tolist())[4 + t - n:4 + t]) for t in range(len(probe))]
        got = gate_mod.lookup_counts(tables, gate_mod.context_hashes(probe, 9, n, 0, len(probe)), n)
        assert got.tolist() == [counts.get(c, 0) for c in pctx]
        fert = gate_mod.lookup_counts(tables, gate_mod.context_hashes(probe, 9, n, 0, len(probe)),
                                      n, "fert")
        assert fert.tolist() == [len(followers.get(c, ())) for c in pctx]
        if n == 1:
            assert 1 < max(fert) <= 5
        mid = gate_mod.context_hashes(probe, 9, n, 100, 180)      # a slice: same hashes
        assert np.array_equal(mid, gate_mod.context_hashes(probe, 9, n, 0, len(probe))[100:180])


def test_train_gate_curves_and_files(trained_gate):
    root, meta = trained_gate
    rows = {r["fraction"]: r for r in meta["curves"]}
    assert rows[0.0]["gate_ppl"] == pytest.approx(rows[0.0]["random_ppl"])   # the LM
    assert rows[1.0]["gate_ppl"] == pytest.approx(rows[1.0]["random_ppl"])   # all searched
    assert meta["train_tokens"] + meta["valid_tokens"] == N
    assert len(meta["quantiles"]) == 1001 and meta["features"][0] == "lm_entropy"
    # efficient-knnlm's "all" features by default: LM, counts, fertility, the query
    assert meta["features"][2:10] == list(gate_mod.COUNT_FEATURES + gate_mod.FERTILITY_FEATURES)
    assert meta["use_query"] and meta["features"][-1] == "query_31"
    g = gate_mod.Gate(root / "gate")      # loads with weights_only, npz without pickles
    assert g.threshold(0.0, None) > 1 and g.threshold(1.0, None) < 0


def test_gated_eval_searches_the_top_tokens(bpe_databin, trained_ckpt, trained_dstore,
                                           trained_gate, tmp_path):
    root, meta = trained_gate
    out = lambda name, **kw: run_eval(ecfg(  # noqa: E731
        bpe_databin, trained_ckpt, trained_dstore, tmp_path,
        save_knn_scores=str(tmp_path / f"{name}_knn.npy"),
        save_scores=str(tmp_path / f"{name}_lm.npy"), **kw))
    plain = out("plain")
    every = out("all", gate=str(root / "gate"), retrieval_fraction=1.0)
    assert every["interpolated"]["ppl"] == pytest.approx(plain["interpolated"]["ppl"], rel=1e-12)
    none = out("none", gate=str(root / "gate"), retrieval_fraction=0.0)
    assert none["interpolated"]["ppl"] == pytest.approx(plain["ppl"], rel=1e-12)
    assert none["interpolated"]["efficiency"]["searches"] == 0
    half = out("half", gate=str(root / "gate"), retrieval_fraction=0.5)
    eff = half["interpolated"]["efficiency"]
    # the gate's λ̂ of every token, recomputed from the LM pass train-gate makes
    g = gate_mod.Gate(root / "gate")
    cache = RetrievalCache(root / "cache")
    x, _ = train_gate.lm_features(cache.meta["config"], cache, DataBin(bpe_databin.path),
                                  Datastore(trained_dstore.path), g.tables, g.use_query,
                                  torch.device("cpu"), True)
    keep = g.net.lambdas(x) >= eff["threshold"]
    assert eff["searches"] == keep.sum() and eff["steps"] == N
    assert 0.3 < keep.mean() < 0.7          # the quantiles came from the training tokens
    knn_half, knn_all = np.load(tmp_path / "half_knn.npy"), np.load(tmp_path / "plain_knn.npy")
    lm = np.load(tmp_path / "plain_lm.npy")
    np.testing.assert_array_equal(knn_half[keep], knn_all[keep])
    np.testing.assert_array_equal(knn_half[~keep], lm[~keep])
    mix = np.where(keep, np.logaddexp(np.log(0.7) + lm.astype(np.float64),
                                      np.log(0.3) + knn_all.astype(np.float64)), lm)
    assert half["interpolated"]["ppl"] == pytest.approx(np.exp(-mix.mean()), rel=1e-5)
    own = out("own", gate=str(root / "gate"), retrieval_fraction=0.5, gate_lambda=True)
    assert own["interpolated"]["efficiency"]["gate_lambda"]
    assert own["interpolated"]["ppl"] != half["interpolated"]["ppl"]


@pytest.mark.parametrize("extra, needle", [
    (["--gate", "G"], "--retrieval-fraction"),
    (["--retrieval-fraction", "0.5"], "--gate"),
    (["--gate", "G", "--retrieval-fraction", "2"], "[0, 1]"),
    (["--gate", "G", "--retrieval-fraction", "0.5", "--save-retrieval", "C"], "exclusive"),
    (["--gate", "G", "--retrieval-fraction", "0.5", "--retomaton"], "--retomaton"),
])
def test_bad_gate_flags(bpe_databin, trained_ckpt, trained_dstore, tmp_path, extra, needle,
                        capsys):
    extra = [str(tmp_path / e) if e in ("G", "C") else e for e in extra]
    rc = cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
                  "--dstore-filename", str(trained_dstore.path), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_gate_of_another_datastore_is_refused(bpe_databin, trained_ckpt, trained_dstore,
                                               trained_gate, tmp_path, capsys):
    import json
    root, _ = trained_gate
    other = tmp_path / "gate"
    other.mkdir()
    for f in ("gate.pt", "ngrams.npz"):
        (other / f).write_bytes((root / "gate" / f).read_bytes())
    meta = json.loads((root / "gate" / "gate.json").read_text())
    meta["datastore_fingerprint"] = "0" * 16
    (other / "gate.json").write_text(json.dumps(meta))
    rc = cli_run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
                  "--dstore-filename", str(trained_dstore.path), "--gate", str(other),
                  "--retrieval-fraction", "0.5", "--tokens-per-sample", "64"])
    assert rc == 2 and "another datastore" in capsys.readouterr().err


def test_gated_generation(bpe_databin, trained_ckpt, trained_dstore, trained_gate):
    from knnlm import generate
    root, _ = trained_gate
    cfg = lambda **kw: generate.GenerateConfig(  # noqa: E731
        data=str(bpe_databin.path), path=str(trained_ckpt), prompt="Enter the king, and my",
        max_new_tokens=20, knnlm=True, dstore_filename=str(trained_dstore.path), k=16, probe=8,
        lmbda=0.6, knn_temp=2.0, **kw)
    plain = generate.main(cfg())["results"][0]["ids"]
    lm = generate.main(generate.GenerateConfig(data=str(bpe_databin.path), path=str(trained_ckpt),
                                               prompt="Enter the king, and my",
                                               max_new_tokens=20))["results"][0]["ids"]
    every = generate.main(cfg(gate=str(root / "gate"), retrieval_fraction=1.0))
    assert every["results"][0]["ids"] == plain and every["efficiency"]["searches"] == 20
    never = generate.main(cfg(gate=str(root / "gate"), retrieval_fraction=0.0))
    assert never["results"][0]["ids"] == lm and never["efficiency"]["searches"] == 0
    half = generate.main(cfg(gate=str(root / "gate"), retrieval_fraction=0.5))["efficiency"]
    assert half["steps"] == 20 and 0 <= half["searches"] <= 20


def test_gated_neighbors(bpe_databin, trained_ckpt, trained_dstore, trained_gate):
    from knnlm import neighbors
    root, _ = trained_gate
    kw = dict(data=str(bpe_databin.path), path=str(trained_ckpt),
              dstore_filename=str(trained_dstore.path), k=4, probe=8, knn_temp=2.0,
              text="Enter the king, and my lord of York")
    plain = neighbors.main(neighbors.NeighborsConfig(**kw))
    half = neighbors.main(neighbors.NeighborsConfig(gate=str(root / "gate"),
                                                    retrieval_fraction=0.5, **kw))
    thr = gate_mod.Gate(root / "gate").threshold(0.5, None)
    for p, h in zip(plain, half):
        assert h["searched"] == (h["gate_lambda"] >= thr)
        if h["searched"]:
            assert h["neighbors"] == p["neighbors"] and h["knn_prob"] == p["knn_prob"]
        else:
            assert h["neighbors"] == [] and h["knn_prob"] == pytest.approx(h["lm_prob"])


def test_train_gate_uses_the_indexs_tuned_settings(trained_gate, trained_dstore, tmp_path):
    import json
    root, meta = trained_gate
    tuned = trained_dstore.path / "index_att_l2.faiss.tuned.json"
    assert not tuned.exists()
    ident = dict(datastore_fingerprint=trained_dstore.fingerprint, keytype="att",
                 faiss_metric_type="l2", exact_search=False)
    tuned.write_text(json.dumps(dict(format="knnlm-tuned", version=1, identity=ident,
                                     settings=dict(knn_temp=3.0, lmbda=0.4, k=16,
                                                   knn_sim_func="l2"))))
    try:
        got = train_gate.main(train_gate.TrainGateConfig(
            cache=str(root / "cache"), out=str(tmp_path / "g"), epochs=1, quiet=True))
        assert (got["knn_temp"], got["lmbda"]) == (3.0, 0.4)
        flags = train_gate.main(train_gate.TrainGateConfig(
            cache=str(root / "cache"), out=str(tmp_path / "g2"), epochs=1, knn_temp=2.0,
            lmbda=0.3, quiet=True))
        assert (flags["knn_temp"], flags["lmbda"]) == (2.0, 0.3)
    finally:
        tuned.unlink()
    assert meta["knn_temp"] == 2.0      # no tuned file: the cache's own settings


def test_lm_stats_equal_the_definitions():
    """The gate's LM features, computed in one exp and one dot per block of rows, equal
    the entropy and max log-prob of log_softmax computed directly (more rows than a block,
    a peaked row and a flat one)."""
    import torch
    from knnlm.lm.scoring import STATS_ROWS, lm_stats
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(STATS_ROWS * 2 + 5, 300, generator=g) * 4
    logits[3, 7] = 80.0                       # nearly one-hot
    logits[4] = 0.25                          # uniform
    out = torch.empty(len(logits), 2)
    lm_stats(logits, torch.logsumexp(logits, 1, True), out)
    lp = torch.log_softmax(logits.double(), 1)
    torch.testing.assert_close(out[:, 0].double(), -(lp.exp() * lp).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1].double(), lp.max(1).values, rtol=1e-6, atol=1e-6)
    assert abs(float(out[4, 0]) - np.log(300)) < 1e-5 and float(out[3, 0]) < 1e-5
