"""Generation: KV-cached decoding equals re-encoding the prefix, λ = 0 equals plain
generation, HF generation equals model.generate, sampling filters."""
import numpy as np
import pytest
import torch

from knnlm import generate
from knnlm.knn import index
from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
from knnlm.cli import run as cli_run
from knnlm.data.preprocess import DataBin

PROMPT = "Enter the king, and my"


def gcfg(databin, ckpt, **kw):
    base = dict(data=str(databin.path), path=str(ckpt), prompt=PROMPT, max_new_tokens=12)
    base.update(kw)
    return generate.GenerateConfig(**base)


def test_greedy_equals_reencoding_every_step(bpe_databin, trained_ckpt):
    out = generate.main(gcfg(bpe_databin, trained_ckpt))
    model = model_from_checkpoint(load_checkpoint(trained_ckpt)).eval()
    ids = [bpe_databin.eos] + list(bpe_databin.vocab.encode_text(PROMPT))
    want = []
    with torch.no_grad():
        for _ in range(12):
            feats, _ = model(torch.tensor([ids + want]))
            want.append(int(torch.argmax(model.output_layer(feats[0, -1]))))
    assert out["results"][0]["ids"] == want


@pytest.fixture(scope="module")
def dstore_with_index(trained_dstore):
    index.build_index(index.BuildIndexConfig(dstore_dir=str(trained_dstore.path), knn_keytype="att",
                                             index_factory="IVF32,PQ8", train_size=4000, quiet=True))
    return trained_dstore


@pytest.mark.parametrize("search", [dict(probe=32), dict(exact_search=True)])
def test_lambda_zero_equals_plain_generation_and_knn_changes_it(bpe_databin, trained_ckpt,
                                                                dstore_with_index, search):
    knn = dict(knnlm=True, dstore_filename=str(dstore_with_index.path), k=16, **search)
    plain = generate.main(gcfg(bpe_databin, trained_ckpt))["results"][0]["ids"]
    zero = generate.main(gcfg(bpe_databin, trained_ckpt, lmbda=0.0, **knn))["results"][0]["ids"]
    assert zero == plain
    one = generate.main(gcfg(bpe_databin, trained_ckpt, lmbda=1.0, **knn))
    # λ = 1: every token is the value of a retrieved neighbour
    assert one["tokens"] == 12 and one["tokens_per_second"] > 0
    assert set(one["results"][0]["ids"]) <= set(np.unique(np.asarray(dstore_with_index.vals)).tolist())


def test_sampling_filters():
    lp = torch.log_softmax(torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5]), 0)
    gen = torch.Generator().manual_seed(0)
    cfg = lambda **kw: generate.GenerateConfig(data="d", path="p", prompt="x", sampling=True, **kw)
    assert {generate.choose(lp, cfg(sampling_topk=1), gen) for _ in range(20)} == {1}
    assert {generate.choose(lp, cfg(sampling_topp=0.01), gen) for _ in range(20)} == {1}
    assert {generate.choose(lp, cfg(sampling_topk=2), gen) for _ in range(200)} == {1, 2}
    # top-p 0.95: the smallest prefix reaching 0.95 (tokens 1, 2 and 4 here)
    probs = torch.softmax(lp, 0)
    kept = {generate.choose(lp, cfg(sampling_topp=0.95), gen) for _ in range(600)}
    assert kept == {1, 2, 4} and probs[[1, 2]].sum() < 0.95 <= probs[[1, 2, 4]].sum()
    draws = lambda s: [generate.choose(lp, cfg(), torch.Generator().manual_seed(s)) for _ in range(5)]
    assert draws(3) == draws(3)


def test_generate_bad_input(bpe_databin, trained_ckpt, tmp_path):
    base = ["generate", str(bpe_databin.path), "--path", str(trained_ckpt)]
    assert cli_run(base) == 2                                     # no prompt
    assert cli_run(base + ["--prompt", "a", "--max-new-tokens", "100000"]) == 2
    assert cli_run(base + ["--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert cli_run(base + ["--prompt", "a", "--sampling-topp", "2"]) == 2


def test_a_step_without_neighbours_uses_the_lm_alone():
    """FAISS found no neighbour (every id -1): p_kNN is undefined, the step is p_LM's."""
    class NoNeighbours:
        def search(self, q):
            I = np.full((1, 4), -1)
            return dict(I=I, vals=np.full((1, 4), -1), scores=torch.zeros(1, 4, dtype=torch.float64),
                        mask=torch.from_numpy(I >= 0))
    cfg = generate.GenerateConfig(data="unused", path="x.pt", prompt="a", lmbda=0.5)
    logits = torch.randn(11)
    got, _ = generate.next_log_probs(logits, torch.zeros(3), NoNeighbours(), cfg)
    assert torch.equal(got, torch.log_softmax(logits.double(), -1))


def test_retomaton_generation(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    flat = str(tmp_path / "flat.faiss")
    index.build_index(index.BuildIndexConfig(dstore_dir=str(trained_dstore.path), knn_keytype="att",
                                             index_factory="Flat", faiss_index=flat, quiet=True))
    knn = dict(knnlm=True, dstore_filename=str(trained_dstore.path), indexfile=flat, k=16,
               lmbda=0.5, knn_temp=2.0, max_new_tokens=30)
    plain = generate.main(gcfg(bpe_databin, trained_ckpt, **knn))
    # searching at every step (an exact index): the plain kNN-LM's text
    every = generate.main(gcfg(bpe_databin, trained_ckpt, retomaton=True, min_knns=17, **knn))
    assert every["results"][0]["ids"] == plain["results"][0]["ids"]
    assert every["efficiency"]["searches"] == every["efficiency"]["steps"] == 30
    walk = generate.main(gcfg(bpe_databin, trained_ckpt, retomaton=True, min_knns=1, **knn))
    eff = walk["efficiency"]
    assert eff["steps"] == 30 and 0 < eff["searches"] < 30
    assert eff["searches_saved"] == pytest.approx(1 - eff["searches"] / 30)
    assert plain["efficiency"] is None
