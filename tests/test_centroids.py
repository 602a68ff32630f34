"""Centroids of datastore keys as an output layer: the head against a loop, the model's own
output rows as centroids reproduce the LM, k-means and per-word centroids against brute
force, and the sparse file round trip."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import refused
from knnlm import evaluate
from knnlm.cli import run
from knnlm.data import centroid_files as cfiles
from knnlm.knn import centroids as cmod
from knnlm.knn.datastore import Datastore
from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
from knnlm.lm.heads import CentroidOutput


def test_head_equals_a_loop():
    torch.manual_seed(0)
    C, V, D = 6, 9, 4
    cent = torch.randn(C, D)
    dense = torch.rand(C, V) * (torch.rand(C, V) < 0.4)
    dense[:, 0] += 0.01                               # every centroid maps somewhere
    dense = dense / dense.sum(1, keepdim=True)
    base = torch.nn.Module()
    base.cfg = None
    head = CentroidOutput(base, cent, dense.to_sparse(), 2.0)
    h = torch.randn(3, D)
    got = head.output_layer(h)
    for i in range(3):
        pc = torch.softmax(2.0 * (cent @ h[i]), 0)
        for w in range(V):
            p = sum(float(dense[c, w]) * float(pc[c]) for c in range(C))
            assert float(got[i, w]) == pytest.approx(np.log(max(p, 1e-9)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("use_l2, norm_l2", [(True, False), (False, True), (True, True)])
def test_the_originals_l2_variants_equal_a_loop(use_l2, norm_l2):
    """use_l2: softmax over -scale·||h - μ||²; norm_l2: h normalised first."""
    torch.manual_seed(1)
    C, V, D = 5, 7, 4
    cent, dense = torch.randn(C, D), torch.rand(C, V) + 0.01
    dense = dense / dense.sum(1, keepdim=True)
    base = torch.nn.Module()
    base.cfg = None
    head = CentroidOutput(base, cent, dense.to_sparse(), 0.7, use_l2=use_l2, norm_l2=norm_l2)
    h = torch.randn(3, D) * 2
    got = head.output_layer(h)
    for i in range(3):
        x = h[i] / h[i].norm() if norm_l2 else h[i]
        s = [-float(((x - cent[c]) ** 2).sum()) if use_l2 else float(cent[c] @ x)
             for c in range(C)]
        pc = torch.softmax(0.7 * torch.tensor(s, dtype=torch.float64), 0)
        for w in range(V):
            p = sum(float(dense[c, w]) * float(pc[c]) for c in range(C))
            assert float(got[i, w]) == pytest.approx(np.log(p), rel=1e-4, abs=1e-5)


def test_the_forks_centroid_command_lines(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    """--model-overrides "{'knn_keytype': 'last_ffn_input', 'use_last_ffn_input': True,
    'use_l2': True}" with att centroids: the flags of those names; with ffn centroids the
    att input is refused."""
    from knnlm.util import UserError, parse_config
    for keytype in ("att", "ffn"):
        cmod.main(cmod.CentroidsConfig(dstore_dir=str(trained_dstore.path),
                                       out=str(tmp_path / keytype), knn_keytype=keytype,
                                       mode="per-word", ratio=1, niter=2, quiet=True))
    argv = lambda kt: [str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset",  # noqa: E731
                       "valid", "--tokens-per-sample", "64", "--max-eval-tokens", "300",
                       "--load-centroids", str(tmp_path / kt / "centroids.npy"),
                       "--load-centroid-distribution", str(tmp_path / kt / "centroid_dist.npz"),
                       "--model-overrides", "{'knn_keytype': 'last_ffn_input', "
                       "'use_last_ffn_input': True, 'use_l2': True}", "--quiet"]
    cfg = parse_config(evaluate.EvalConfig, argv("att"), prog="knnlm eval-lm")
    assert cfg.use_l2 and not cfg.norm_l2 and cfg.centroid_input == "att"
    l2 = evaluate.main(cfg)
    dot = evaluate.main(parse_config(evaluate.EvalConfig, argv("att")[:-3] + ["--quiet"],
                                     prog="knnlm eval-lm"))
    assert np.isfinite(l2["ppl"]) and l2["ppl"] != dot["ppl"]
    with pytest.raises(UserError, match="holds ffn centroids"):
        evaluate.main(parse_config(evaluate.EvalConfig, argv("ffn"), prog="knnlm eval-lm"))


def test_output_rows_as_centroids_reproduce_the_lm(bpe_databin, trained_ckpt, tmp_path):
    """One centroid per token, its output-embedding row, scale 1: the LM itself."""
    weight = model_from_checkpoint(load_checkpoint(trained_ckpt)).output_weight.detach().numpy()
    np.save(tmp_path / "rows.npy", weight)
    base = dict(data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid",
                tokens_per_sample=64, quiet=True)
    lm = evaluate.main(evaluate.EvalConfig(**base))
    cen = evaluate.main(evaluate.EvalConfig(**base, load_centroids=str(tmp_path / "rows.npy")))
    assert cen["ppl"] == pytest.approx(lm["ppl"], rel=1e-5)
    half = evaluate.main(evaluate.EvalConfig(**base, load_centroids=str(tmp_path / "rows.npy"),
                                             centroid_scale=0.5))
    assert half["ppl"] > lm["ppl"]                     # a flatter softmax


@pytest.fixture(scope="module")
def kmeans_dir(trained_dstore, tmp_path_factory):
    out = tmp_path_factory.mktemp("cent") / "km"
    cmod.main(cmod.CentroidsConfig(dstore_dir=str(trained_dstore.path), out=str(out),
                                   knn_keytype="ffn", mode="kmeans", ratio=2, niter=5,
                                   quiet=True))
    return out


def test_kmeans_distribution_is_the_assignment_counts(trained_dstore, bpe_databin, kmeans_dir):
    ds = Datastore(trained_dstore.path)
    cent = np.load(kmeans_dir / "centroids.npy")
    V, nspec = ds.meta["vocab_size"], bpe_databin.vocab.num_specials
    assert cent.shape == (nspec + 2 * (V - nspec), ds.dim)
    keys = np.asarray(ds.keys("ffn"), dtype=np.float32)[:3000]
    vals = np.asarray(ds.vals)[:3000]
    ids = cmod.assign(keys, cent)
    d2 = ((keys[:, None, :] - cent[None]) ** 2).sum(-1)        # brute force, 3000 keys
    assert (d2[np.arange(len(ids)), ids] <= d2.min(1) + 1e-3).all()
    data, indices, indptr, shape = cfiles.load_csr(kmeans_dir / "centroid_dist.npz")
    assert shape == (len(cent), V)
    dense = np.zeros(shape)
    for r in range(shape[0]):
        dense[r, indices[indptr[r]:indptr[r + 1]]] = data[indptr[r]:indptr[r + 1]]
    all_ids = cmod.assign(np.asarray(ds.keys("ffn"), dtype=np.float32), cent)
    c = int(all_ids[0])
    mine = np.asarray(ds.vals)[all_ids == c]
    for w in np.unique(mine):
        assert dense[c, w] == pytest.approx((mine == w).mean(), rel=1e-6)
    used = np.unique(all_ids)
    assert np.allclose(dense[used].sum(1), 1, atol=1e-5)
    side = json.loads((kmeans_dir / "centroids.json").read_text())
    assert side["datastore_fingerprint"] == ds.fingerprint and side["keytype"] == "ffn"
    del vals


def test_kmeans_centroids_score_and_interpolate(bpe_databin, trained_ckpt, kmeans_dir):
    base = dict(data=str(bpe_databin.path), path=str(trained_ckpt), gen_subset="valid",
                tokens_per_sample=64, quiet=True)
    res = evaluate.main(evaluate.EvalConfig(
        **base, load_centroids=str(kmeans_dir / "centroids.npy"),
        load_centroid_distribution=str(kmeans_dir / "centroid_dist.npz")))
    assert np.isfinite(res["ppl"]) and res["ppl"] > 1


def test_per_word_centroids_belong_to_their_token(trained_dstore, tmp_path):
    out = tmp_path / "pw"
    cmod.main(cmod.CentroidsConfig(dstore_dir=str(trained_dstore.path), out=str(out),
                                   knn_keytype="att", mode="per-word", ratio=2, niter=5,
                                   quiet=True))
    cent = np.load(out / "centroids.npy")
    data, indices, indptr, shape = cfiles.load_csr(out / "centroid_dist.npz")
    assert (np.diff(indptr) == 1).all() and np.allclose(data, 1)
    ds = Datastore(trained_dstore.path)
    vals = np.asarray(ds.vals)
    counts = np.bincount(vals, minlength=shape[1])
    owners = indices
    assert (np.bincount(owners, minlength=shape[1]) == np.minimum(counts, 2)).all()
    rare = int(np.flatnonzero(counts == 1)[0]) if (counts == 1).any() else None
    if rare is not None:           # a token with a single key: that key is its centroid
        key = np.asarray(ds.keys("att"), dtype=np.float32)[vals == rare][0]
        assert np.allclose(cent[owners == rare][0], key)


def test_csr_file_reads_back_and_bad_inputs(tmp_path, bpe_databin, trained_ckpt, kmeans_dir,
                                            capsys):
    rows, cols = np.array([0, 0, 2]), np.array([1, 3, 0])
    cfiles.save_csr(tmp_path / "m.npz", rows, cols, np.array([0.5, 0.5, 1.0]), (3, 4))
    data, indices, indptr, shape = cfiles.load_csr(tmp_path / "m.npz")
    assert shape == (3, 4) and indptr.tolist() == [0, 2, 2, 3] and indices.tolist() == [1, 3, 0]
    try:
        from scipy import sparse
    except ImportError:
        pass
    else:
        assert sparse.load_npz(tmp_path / "m.npz").toarray()[0, 3] == 0.5
    ev = ["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset",
          "valid", "--tokens-per-sample", "64", "--quiet"]
    np.save(tmp_path / "wrongdim.npy", np.zeros((5, 7), np.float32))
    shutil.copy(kmeans_dir / "centroid_dist.npz", tmp_path / "dist.npz")
    for extra in (["--load-centroids", str(tmp_path / "wrongdim.npy")],
                  ["--load-centroids", str(kmeans_dir / "centroids.npy"),
                   "--load-centroid-distribution", str(tmp_path / "m.npz")],
                  ["--load-centroid-distribution", str(tmp_path / "dist.npz")],
                  ["--load-centroids", str(kmeans_dir / "centroids.npy"), "--centroid-scale",
                   "0"],
                  ["--load-centroids", str(tmp_path / "nope.npy")]):
        capsys.readouterr()
        assert run(ev + extra) == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_centroid_finetuning_is_the_forks(bpe_databin, trained_ckpt, kmeans_dir, tmp_path,
                                          capsys):
    """wikitext_bpe_finetune.sh: train --restore-file --load-centroids C
    --load-centroid-distribution P --finetune-centroids. Before any update the model is
    eval-lm --load-centroids's scorer; training moves the centroid rows only; eval-lm scores
    the result by itself, and --load-centroid-distribution alone swaps its P(w | c)."""
    from knnlm.lm import train
    from knnlm.lm.heads_train import centroid_head, model_from_base
    cent, dist = str(kmeans_dir / "centroids.npy"), str(kmeans_dir / "centroid_dist.npz")
    flags = dict(data=str(bpe_databin.path), restore_file=str(trained_ckpt),
                 load_centroids=cent, load_centroid_distribution=dist, finetune_centroids=True,
                 tokens_per_sample=64, max_tokens=512, lr=1e-2, max_update=3,
                 validate_interval=0, max_valid_tokens=256, quiet=True)
    cfg = train.TrainConfig(save_dir=str(tmp_path / "ft"), **flags)
    assert cfg.finetune_out_embed
    base_ckpt = load_checkpoint(trained_ckpt)
    V = bpe_databin.vocab_size
    model = model_from_base(base_ckpt, cfg.head_config(bpe_databin.vocab), 1,
                            centroids=centroid_head(cfg, base_ckpt, V)).eval()
    base = model_from_checkpoint(base_ckpt).eval()
    c, csr, _ = cfiles.load_centroids(cent, dist, V, base.cfg.decoder_embed_dim)
    index, prob = cfiles.distribution_coo(csr)
    ref = CentroidOutput(base, torch.from_numpy(c), torch.sparse_coo_tensor(
        torch.from_numpy(index), torch.from_numpy(prob), size=csr[3], check_invariants=True), 1.0)
    tokens = torch.from_numpy(np.asarray(bpe_databin.split("valid")[:40], np.int64))[None]
    with torch.no_grad():
        got = model.output_layer(model(tokens)[0])
        want = ref.output_layer(ref(tokens)[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(1), atol=1e-4)

    train.main(cfg)
    new = load_checkpoint(tmp_path / "ft" / "checkpoint_last.pt")
    assert new["model_cfg"]["centroid_rows"] == len(c)
    changed = {n for n, t in new["model"].items() if n in base_ckpt["model"]
               and base_ckpt["model"][n].shape == t.shape
               and not torch.equal(base_ckpt["model"][n], t)}
    assert changed == set()                       # the body: untouched
    assert not np.allclose(new["model"]["output_projection.weight"].numpy(), c)

    ev = dict(data=str(bpe_databin.path), path=str(tmp_path / "ft" / "checkpoint_last.pt"),
              gen_subset="valid", tokens_per_sample=64, max_eval_tokens=300, quiet=True)
    own = evaluate.main(evaluate.EvalConfig(**ev))
    again = evaluate.main(evaluate.EvalConfig(**ev, load_centroid_distribution=dist))
    assert np.isfinite(own["ppl"]) and again["ppl"] == pytest.approx(own["ppl"], rel=1e-6)
    flat = tmp_path / "flat.npz"             # every centroid: the uniform distribution
    C = len(c)
    cfiles.save_csr(flat, np.repeat(np.arange(C), V), np.tile(np.arange(V), C),
                  np.full(C * V, 1.0 / V), (C, V))
    uniform = evaluate.main(evaluate.EvalConfig(**ev, load_centroid_distribution=str(flat)))
    assert uniform["ppl"] == pytest.approx(V, rel=1e-3)

    # the fork's third command: go on from the fine-tuned model, no --load-centroids
    more = train.TrainConfig(**dict(flags, restore_file=ev["path"], load_centroids=None),
                             save_dir=str(tmp_path / "ft2"))
    train.main(more)
    assert load_checkpoint(tmp_path / "ft2" / "checkpoint_last.pt")["model_cfg"][
        "centroid_rows"] == C

    argv = ["eval-lm", ev["data"], "--path", ev["path"], "--gen-subset", "valid", "--quiet"]
    tr = ["train", ev["data"], "--restore-file", str(trained_ckpt), "--max-update", "1",
          "--save-dir", str(tmp_path / "x"), "--quiet"]
    for args, needle in [
            (argv + ["--model-overrides", "{'use_last_ffn_input': True}"],
             "the checkpoint's head has"),
            (argv + ["--k-mos", "2"], "the checkpoint's head has --k-mos 1"),
            (["eval-lm", ev["data"], "--path", str(trained_ckpt), "--gen-subset", "valid",
              "--load-centroid-distribution", dist], "has no centroid head"),
            (tr + ["--load-centroid-distribution", dist], "has no centroid head"),
            (tr + ["--load-centroids", cent, "--load-centroid-distribution", dist,
                   "--use-last-ffn-input"], "holds ffn centroids but the softmax reads att"),
            (tr + ["--load-centroids", cent, "--k-mos", "2"], "a centroid head takes none")]:
        assert refused(args, capsys, needle) is None, args
