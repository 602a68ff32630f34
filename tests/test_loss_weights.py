"""`knnlm loss-weights` and `train --weighted-loss`: the share where kNN helped, against a
loop; the weighted loss, against a hand sum; zero weights train bit-identically."""
import json

import numpy as np
import pytest
import torch

from knnlm.cli import run
from knnlm.lm import train
from knnlm.lm.checkpoint import load_checkpoint
from knnlm.lm.loss_weights import knn_helped_share, read_loss_weights
from knnlm.lm.train import LossModule
from knnlm.util import UserError

from test_train import tiny_cfg


def test_share_equals_a_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, 500)
    lm, knn = rng.normal(size=500), rng.normal(size=500)
    share = knn_helped_share(tokens, lm, knn, 9)
    for v in range(9):
        hits = [knn[i] > lm[i] for i in range(500) if tokens[i] == v]
        assert share[v] == (sum(hits) / len(hits) if hits else 0.0)


def test_weighted_loss_is_the_weighted_sum_of_token_nlls():
    torch.manual_seed(0)
    V, pad = 11, 1
    emb = torch.nn.Embedding(V, 8)
    head = torch.nn.Linear(8, V)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, x):
            return self.emb(x), {}

        def output_layer(self, f):
            return self.head(f)

    inp = torch.randint(0, V, (3, 5))
    tgt = torch.randint(0, V, (3, 5))
    tgt[0, 0] = pad
    w = torch.rand(V) + 1
    got = LossModule(M(), pad, weights=w)(inp, tgt)
    lp = torch.log_softmax(head(emb(inp)), -1).detach()
    want = sum(-float(w[tgt[b, i]]) * float(lp[b, i, tgt[b, i]])
               for b in range(3) for i in range(5) if tgt[b, i] != pad)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)


def test_zero_weights_train_identically_and_others_do_not(bpe_databin, tmp_path):
    V = bpe_databin.vocab_size
    (tmp_path / "zero.json").write_text(json.dumps([0.0] * V))
    (tmp_path / "some.json").write_text(json.dumps([float(i % 3) for i in range(V)]))
    train.main(tiny_cfg(bpe_databin, tmp_path / "plain", max_update=6))
    train.main(tiny_cfg(bpe_databin, tmp_path / "zero", max_update=6,
                        weighted_loss=str(tmp_path / "zero.json")))
    train.main(tiny_cfg(bpe_databin, tmp_path / "some", max_update=6,
                        weighted_loss=str(tmp_path / "some.json")))
    a, b, c = (load_checkpoint(tmp_path / d / "checkpoint_last.pt")["model"]
               for d in ("plain", "zero", "some"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loss_weights_command_and_bad_files(bpe_databin, tmp_path, capsys):
    tokens = np.asarray(bpe_databin.split("train"))[:1000]
    rng = np.random.default_rng(1)
    lm = rng.normal(size=1000).astype(np.float32)
    knn = rng.normal(size=1000).astype(np.float32)
    np.save(tmp_path / "lm.npy", lm)
    np.save(tmp_path / "knn.npy", knn)
    out = tmp_path / "w.json"
    assert run(["loss-weights", str(bpe_databin.path), "--scores", str(tmp_path / "lm.npy"),
                "--knn-scores", str(tmp_path / "knn.npy"), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got == pytest.approx(knn_helped_share(tokens, lm, knn, bpe_databin.vocab_size).tolist())
    np.save(tmp_path / "short.npy", knn[:10])
    assert run(["loss-weights", str(bpe_databin.path), "--scores", str(tmp_path / "lm.npy"),
                "--knn-scores", str(tmp_path / "short.npy"), "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "neg.json").write_text(json.dumps([-1.0] * bpe_databin.vocab_size))
    with pytest.raises(UserError, match="non-negative"):
        read_loss_weights(str(tmp_path / "neg.json"), bpe_databin.vocab_size)
    with pytest.raises(UserError, match="lists 3 tokens"):
        (tmp_path / "three.json").write_text("[1, 2, 3]")
        read_loss_weights(str(tmp_path / "three.json"), bpe_databin.vocab_size)
