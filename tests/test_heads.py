"""Parametric heads: aggregation, mixture, L2 logits and fine-tuning against references."""
import json
import math

import numpy as np
import pytest
import torch

from knnlm.lm import train
from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
from knnlm.lm.heads_train import allot_extra_embeddings, model_from_base
from knnlm.lm import heads
from knnlm.lm.transformer import TransformerLM

from conftest import tiny_model


def loop_aggregate(row_lp: torch.Tensor, row_token: torch.Tensor, V: int) -> torch.Tensor:
    out = torch.full((row_lp.shape[0], V), float("-inf"), dtype=torch.float64)
    for m in range(row_lp.shape[0]):
        for w in range(V):
            rows = [r for r in range(len(row_token)) if row_token[r] == w]
            out[m, w] = math.log(sum(math.exp(float(row_lp[m, r])) for r in rows))
    return out


def test_aggregate_rows_matches_loop():
    V, g = 7, torch.Generator().manual_seed(0)
    for token_map in (heads.row_token_map(V, 3), heads.row_token_map(V, num_extra_embed=[0, 2, 1, 0, 5, 0, 1])):
        logits = torch.randn(4, len(token_map), generator=g, dtype=torch.float64) * 5
        row_lp = torch.log_softmax(logits, -1)
        got = heads.aggregate_rows(row_lp, token_map, V)
        torch.testing.assert_close(got, loop_aggregate(row_lp, token_map, V), rtol=0, atol=1e-12)
        assert torch.allclose(got.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_aggregate_rows_is_exact_far_below_the_maximum():
    # mass 1e-300 relative to the maximum survives (no exp underflow to log 0)
    row_lp = torch.tensor([[0.0, -700.0, -700.0]], dtype=torch.float64)
    got = heads.aggregate_rows(row_lp, torch.tensor([0, 1, 1]), 2)
    assert got[0, 1].item() == pytest.approx(-700.0 + math.log(2), abs=1e-9)


def test_one_row_per_token_and_mos_k1_equal_the_plain_softmax():
    V, D = 11, 5
    h, W = torch.randn(6, D), torch.randn(V, D)
    plain = torch.log_softmax(h @ W.T, -1)
    torch.testing.assert_close(heads.head_log_probs(h, W, heads.row_token_map(V), V), plain)
    comp = plain[:, None, :]
    torch.testing.assert_close(heads.mixture_log_probs(torch.randn(6, 1), comp), plain)


def test_mixture_matches_probability_space_sum():
    K, V = 3, 9
    prior, comp_logits = torch.randn(4, K, dtype=torch.float64), torch.randn(4, K, V, dtype=torch.float64)
    comp = torch.log_softmax(comp_logits, -1)
    pi = torch.softmax(prior, -1)
    want = torch.log((pi[..., None] * comp.exp()).sum(1))
    torch.testing.assert_close(heads.mixture_log_probs(prior, comp), want)


def test_l2_and_normalised_logits():
    h, W = torch.randn(4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    torch.testing.assert_close(heads.similarity_logits(h, W, use_l2=True), -torch.cdist(h, W) ** 2)
    hn = h / h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(heads.similarity_logits(h, W, norm_l2=True), hn @ W.T)


@pytest.mark.parametrize("head", [
    dict(pseudo_vocab_ratio=3), dict(k_mos=3), dict(softmax_input="att"),
    dict(additional_linear=True), dict(use_l2=True, norm_l2=True),
    dict(num_extra_embed=[1] * 20 + [0] * 30, k_mos=2)])
def test_model_heads_give_normalised_distributions_matching_hand_math(head):
    V = 50
    model = tiny_model(V, **head)
    tokens = torch.randint(4, V, (2, 9))
    with torch.no_grad():
        feats, hid = model(tokens, return_hidden=("att", "ffn"))
        lp = torch.log_softmax(model.output_layer(feats).double(), -1)
        assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 9, dtype=torch.float64))
        c = model.cfg
        h = hid[c.softmax_input].reshape(-1, c.decoder_embed_dim)
        W = model.output_weight
        if c.k_mos > 1:
            comps = []
            for k in range(c.k_mos):
                Pk = model.mos_proj.weight.view(c.k_mos, c.decoder_embed_dim, -1)[k]
                bk = model.mos_proj.bias.view(c.k_mos, -1)[k]
                comps.append(heads.head_log_probs(torch.tanh(h @ Pk.T + bk), W, model.row_token, V,
                                                  c.use_l2, c.norm_l2))
            want = heads.mixture_log_probs(h @ model.mos_prior.weight.T, torch.stack(comps, 1))
        else:
            want = heads.head_log_probs(h, W, model.row_token, V, c.use_l2, c.norm_l2)
        if c.additional_linear:
            att = hid["att"].reshape(-1, c.decoder_embed_dim)
            want = torch.log_softmax(want + att @ model.additional_linear.weight.T, -1)
    torch.testing.assert_close(lp.reshape(-1, V).float(), want.float(), rtol=1e-5, atol=1e-5)


def _base_ckpt(V=50):
    base = tiny_model(V)
    return dict(model_cfg=base.cfg.to_dict(), model=base.state_dict()), base


@pytest.mark.parametrize("head", [dict(pseudo_vocab_ratio=3), dict(additional_linear=True),
                                  dict(num_extra_embed=[2] * 10 + [0] * 40)])
def test_heads_initialised_from_the_base_reproduce_it(head):
    """K copies of each base row (noise aside) or a zero additional head = the base model;
    unequal copies weight token w by its row count: p(w) ∝ (1 + e_w)·exp(s_w)."""
    ckpt, base = _base_ckpt()
    model = model_from_base(ckpt, head, init_out_embed=True, seed=0).eval()
    if model.cfg.output_rows > 50:  # remove the symmetry-breaking noise to compare exactly
        with torch.no_grad():
            model.output_projection.weight.copy_(base.output_weight[model.row_token])
    tokens = torch.randint(4, 50, (2, 9))
    with torch.no_grad():
        want = base.output_layer(base(tokens)[0])
        if model.cfg.num_extra_embed:
            want = want + torch.log1p(torch.tensor(model.cfg.num_extra_embed, dtype=torch.float32))
        want = torch.log_softmax(want, -1)
        got = torch.log_softmax(model.output_layer(model(tokens)[0]), -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_interpolated_loss_formula():
    _, base = _base_ckpt()
    model = tiny_model(50, seed=3)
    inp, tgt = torch.randint(4, 50, (2, 9)), torch.randint(4, 50, (2, 9))
    tgt[1, -2:] = 1  # padding is ignored
    lam = 0.3
    loss = train.LossModule(model, pad=1, base=base, train_lambda=lam)(inp, tgt)
    with torch.no_grad():
        pb = torch.softmax(base.output_layer(base(inp)[0]).double(), -1)
        pn = torch.softmax(model.output_layer(model(inp)[0]).double(), -1)
    want = 0.0
    for b in range(2):
        for t in range(9):
            if tgt[b, t] != 1:
                w = tgt[b, t]
                want -= math.log((1 - lam) * pb[b, t, w] + lam * pn[b, t, w])
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_allotment_sums_exactly_and_follows_frequency():
    counts = np.array([0, 0, 0, 1, 5, 100, 10_000, 3, 0, 50])
    extra = allot_extra_embeddings(counts, 3.0)
    assert sum(extra) == 20 and len(extra) == 10
    order = np.argsort(counts, kind="stable")
    assert all(extra[a] <= extra[b] for a, b in zip(order, order[1:]))
    assert extra[0] == 0


@pytest.mark.parametrize("flags,trained", [
    (dict(pseudo_vocab_ratio=2, init_out_embed=True, finetune_out_embed=True), ("output_projection.",)),
    (dict(additional_linear=True, finetune_additional_linear=True, interpolated_loss=True,
          train_lambda=0.5), ("additional_linear.",)),
    (dict(k_mos=2, init_out_embed=True, finetune_mos=True), ("output_projection.", "mos_")),
])
def test_finetuning_changes_only_the_head(bpe_databin, trained_ckpt, tmp_path, flags, trained):
    extra = tmp_path / "extra.json"
    res = train.main(train.TrainConfig(
        data=str(bpe_databin.path), restore_file=str(trained_ckpt), save_dir=str(tmp_path / "ft"),
        tokens_per_sample=64, max_tokens=512, lr=3e-3, max_update=3, validate_interval=0,
        max_valid_tokens=256, quiet=True, **flags))
    assert math.isfinite(res["valid_ppl"])
    base = load_checkpoint(trained_ckpt)["model"]
    new = load_checkpoint(tmp_path / "ft" / "checkpoint_last.pt")
    changed = set()
    for name, t in new["model"].items():
        if name in base and base[name].shape == t.shape:
            if not torch.equal(base[name], t):
                changed.add(name)
        else:
            changed.add(name)
    assert changed and all(n.startswith(trained) for n in changed), changed
    assert isinstance(model_from_checkpoint(new), TransformerLM)
    assert not extra.exists()


def test_head_flags_need_a_base_model(bpe_databin, tmp_path):
    from knnlm.cli import run
    with pytest.raises(Exception):
        train.TrainConfig(data="x", max_update=1, finetune_out_embed=True)
    bad = tmp_path / "extra.json"
    bad.write_text(json.dumps([1, 2]))
    assert run(["train", str(bpe_databin.path), "--max-update", "1", "--arch", "tiny",
                "--num-extra-embed-file", str(bad), "--save-dir", str(tmp_path / "x")]) == 2
