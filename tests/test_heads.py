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


def fork_row_token(V: int, K: int, nspecial: int) -> list[int]:
    """The original fork's pseudo-vocabulary layout (its initialize_projection_matrix):
    specials one row each, then K consecutive rows per token."""
    rows = {}
    for i in range(V):
        if i < nspecial:
            rows[i] = i
        else:
            for j in range(nspecial + K * (i - nspecial), nspecial + K * (i - nspecial + 1)):
                rows[j] = i
    return [rows[j] for j in range(len(rows))]


def test_pseudo_vocabulary_rows_are_laid_out_as_the_fork_does():
    assert heads.row_token_map(9, 3, num_specials=4).tolist() == fork_row_token(9, 3, 4)
    model = tiny_model(50, pseudo_vocab_ratio=2)           # num_special_tokens 4 by default
    assert model.cfg.output_rows == 4 + 2 * 46 == model.output_projection.weight.shape[0]
    assert model.row_token.tolist() == fork_row_token(50, 2, 4)


def test_aggregate_rows_matches_loop():
    V, g = 7, torch.Generator().manual_seed(0)
    for token_map in (heads.row_token_map(V, 3, tiled=True), heads.row_token_map(V, 3, num_specials=2),
                      heads.row_token_map(V, 2), heads.row_token_map(V, num_extra_embed=[0, 2, 1, 0, 5, 0, 1])):
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
        if c.k_mos > 1:   # the fork's MoS: linear projections (no tanh), prior with a bias
            comps = []
            for k in range(c.k_mos):
                Pk = model.mos_proj.weight.view(c.k_mos, c.decoder_embed_dim, -1)[k]
                bk = model.mos_proj.bias.view(c.k_mos, -1)[k]
                comps.append(heads.head_log_probs(h @ Pk.T + bk, W, model.row_token, V,
                                                  c.use_l2, c.norm_l2))
            prior = h @ model.mos_prior.weight.T + model.mos_prior.bias
            want = heads.mixture_log_probs(prior, torch.stack(comps, 1))
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
    """Copies of each base row (noise aside) or a zero additional head = the base model,
    each token weighted by its row count n_w: p(w) ∝ n_w·exp(s_w)."""
    ckpt, base = _base_ckpt()
    model = model_from_base(ckpt, head, seed=0, copy_out_embed=True).eval()
    if model.cfg.output_rows > 50:  # remove the symmetry-breaking noise to compare exactly
        with torch.no_grad():
            model.output_projection.weight.copy_(base.output_weight[model.row_token])
    tokens = torch.randint(4, 50, (2, 9))
    with torch.no_grad():
        want = base.output_layer(base(tokens)[0])
        # token w has n_w copies of its row (the specials one each with K rows per token)
        want = want + torch.log(torch.bincount(model.row_token, minlength=50).float())
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


@pytest.mark.parametrize("by", ["frequency", "loss"])
def test_allotment_is_the_forks_log_rule(by):
    """e_w = floor(log_b c_w) (by frequency; 0 when unseen) or floor(log_b (1 + L_w)) (by
    loss), as the fork's analysis scripts computed them, at the base found for ~3V rows."""
    rng = np.random.default_rng(0)
    values = (rng.zipf(1.3, 3000).clip(0, 10 ** 6) * (rng.random(3000) > 0.05)
              if by == "frequency" else rng.gamma(2.0, 40.0, 3000))
    extra, base = allot_extra_embeddings(values, 3.0, by)
    ref = [(math.floor(math.log(v, base)) if v else 0) if by == "frequency"
           else math.floor(math.log(1 + v, base)) for v in values]
    assert extra == ref
    assert abs(sum(extra) - 2 * 3000) <= 0.05 * 3000     # ~3V rows (counts move in steps)
    # one more or one fewer row of a step moves the total away from the budget
    for other in (base * 1.02, base / 1.02):
        alt = sum(math.floor(math.log(v, other)) if v else 0 for v in values) \
            if by == "frequency" else sum(math.floor(math.log(1 + v, other)) for v in values)
        assert abs(alt - 6000) >= abs(sum(extra) - 6000)


def test_output_rows_start_as_the_fork_sets_them():
    """Same shape: the base W_sm (also for an att-input head); more rows: random unless
    --preserve-out-embed (first row of each token) or --copy-out-embed (every row);
    --init-out-embed: random N(0, 1/D) whatever was loaded."""
    ckpt, base = _base_ckpt()
    W = base.output_weight.detach()
    att = model_from_base(ckpt, dict(softmax_input="att"), seed=0)
    assert torch.equal(att.output_weight, W)
    init = model_from_base(ckpt, dict(softmax_input="att"), seed=0, init_out_embed=True)
    assert not torch.allclose(init.output_weight, W)
    assert init.output_weight.std().item() == pytest.approx(32 ** -0.5, rel=0.1)
    extra = dict(num_extra_embed=[2] * 10 + [0] * 40)
    fresh = model_from_base(ckpt, extra, seed=0)
    assert not torch.allclose(fresh.output_weight[:50], W)
    kept = model_from_base(ckpt, extra, seed=0, preserve_out_embed=True)
    assert torch.equal(kept.output_weight[:50], W)
    assert not torch.allclose(kept.output_weight[50:], W[kept.row_token[50:]], atol=0.05)
    copied = model_from_base(ckpt, extra, seed=0, copy_out_embed=True)
    assert torch.equal(copied.output_weight[:50], W)
    torch.testing.assert_close(copied.output_weight[50:], W[copied.row_token[50:]],
                               atol=0.05, rtol=0)


def test_a_mos_checkpoint_from_before_the_fork_layout_keeps_its_tanh():
    """Checkpoints without head_version were written with tanh projections, no prior bias
    and tiled pseudo-vocabulary rows: they load and score as they did."""
    from knnlm.lm.transformer import ModelConfig
    cfg = tiny_model(50, k_mos=2).cfg.to_dict()
    cfg.pop("head_version")
    old = ModelConfig.from_dict(dict(cfg, pseudo_vocab_ratio=2))
    assert old.head_version == 1 and old.output_rows == 100
    model = TransformerLM(old).eval()
    assert model.mos_prior.bias is None
    h = torch.randn(3, 32)
    with torch.no_grad():
        got = model.output_layer(h)
        comps = torch.stack([heads.head_log_probs(
            torch.tanh(h @ model.mos_proj.weight.view(2, 32, 32)[k].T + model.mos_proj.bias.view(2, 32)[k]),
            model.output_weight, torch.arange(50).repeat(2), 50) for k in range(2)], 1)
        want = heads.mixture_log_probs(h @ model.mos_prior.weight.T, comps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,trained", [
    (dict(pseudo_vocab_ratio=2, init_out_embed=True, finetune_out_embed=True), ("output_projection.",)),
    (dict(additional_linear=True, finetune_additional_linear=True, interpolated_loss=True,
          train_lambda=0.5), ("additional_linear.",)),
    (dict(k_mos=2, finetune_mos=True), ("mos_",)),                   # the fork's: MoS only
    (dict(k_mos=2, finetune_out_embed=True), ("output_projection.",)),
    (dict(k_mos=2, init_out_embed=True, finetune_mos=True, finetune_out_embed=True),
     ("output_projection.", "mos_")),
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
    changed = {name for name, t in new["model"].items()      # of the base's parameters
               if name in base and base[name].shape == t.shape and not torch.equal(base[name], t)}
    assert all(n.startswith(trained) for n in changed), changed
    assert any(n.startswith(trained) and (n in changed or n not in base
                                          or base[n].shape != t.shape)
               for n, t in new["model"].items())
    assert isinstance(model_from_checkpoint(new), TransformerLM)
    assert not extra.exists()


def test_finetune_flags_train_the_forks_parameter_groups():
    from knnlm.lm.heads_train import freeze_for_finetune
    model = tiny_model(50, k_mos=2, additional_linear=True)

    def trainable(groups):
        freeze_for_finetune(model, groups)
        return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable(["out_embed"]) == {"output_projection"}
    assert trainable(["mos"]) == {"mos_proj", "mos_prior"}
    assert trainable(["out_embed", "mos"]) == {"output_projection", "mos_proj", "mos_prior"}
    assert trainable(["additional_linear"]) == {"additional_linear"}


def test_head_flags_need_a_base_model(bpe_databin, tmp_path):
    from knnlm.cli import run
    with pytest.raises(Exception):
        train.TrainConfig(data="x", max_update=1, finetune_out_embed=True)
    bad = tmp_path / "extra.json"
    bad.write_text(json.dumps([1, 2]))
    assert run(["train", str(bpe_databin.path), "--max-update", "1", "--arch", "tiny",
                "--num-extra-embed-file", str(bad), "--save-dir", str(tmp_path / "x")]) == 2


def test_mixture_of_softmaxes_is_initialised_as_fairseqs_linear():
    """The fork's MoS layers are fairseq Linear()s: xavier-uniform weights, each of the k
    projections on its own (d, d) fan, and zero biases (PyTorch's default init differs:
    kaiming bounds 1/sqrt(d), random biases)."""
    import math
    from conftest import tiny_model
    torch.manual_seed(0)
    model = tiny_model(300, k_mos=4, decoder_embed_dim=64)
    d, k = 64, 4
    bound = math.sqrt(6 / (d + d))
    for block in model.mos_proj.weight.detach().view(k, d, d):
        assert block.abs().max() <= bound
        assert block.abs().max() > 0.98 * bound                 # uniform up to the bound
        assert block.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert (model.mos_proj.bias == 0).all()
    prior = model.mos_prior.weight.detach()
    assert prior.abs().max() <= math.sqrt(6 / (d + k))
    assert prior.std().item() == pytest.approx(math.sqrt(6 / (d + k)) / math.sqrt(3), rel=0.1)
    assert (model.mos_prior.bias == 0).all()
