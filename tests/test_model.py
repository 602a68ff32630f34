"""att / ffn / layer:N returned by the model equal tensors computed by hand."""
import pytest
import torch

from knnlm.lm.transformer import ARCHS, build_model, count_parameters

from conftest import tiny_model


def hand_forward(model, tokens):
    """Re-run the model from its submodules, step by step (eval mode, no dropout)."""
    cfg = model.cfg
    L = tokens.shape[1]
    x = model.embed_scale * model.embed_tokens(tokens)
    if cfg.decoder_learned_pos:
        x = x + model.embed_positions.weight[:L]
    else:
        x = x + model.sinusoidal[:L]
    outs = []
    for layer in model.layers:
        if cfg.decoder_normalize_before:
            h = x + layer.attention(layer.self_attn_layer_norm(x))
            att = layer.final_layer_norm(h)
            x = h + layer.fc2(layer.act(layer.fc1(att)))
        else:
            h = layer.self_attn_layer_norm(x + layer.attention(x))
            att = h
            x = layer.final_layer_norm(h + layer.fc2(layer.act(layer.fc1(att))))
        outs.append(x)
    ffn = model.layer_norm(x) if model.layer_norm is not None else x
    return att, ffn, outs


@pytest.mark.parametrize("overrides", [
    dict(),                                                     # pre-LN, final norm
    dict(no_decoder_final_norm=True),                           # the paper's wikibpe layout
    dict(decoder_normalize_before=False),                       # post-LN
    dict(decoder_learned_pos=True, activation_fn="gelu", share_decoder_input_output_embed=True),
])
def test_representations_match_hand_computation(overrides):
    model = tiny_model(97, decoder_layers=3, **overrides)
    tokens = torch.randint(4, 97, (2, 11))
    with torch.no_grad():
        feats, hid = model(tokens, return_hidden=("att", "ffn", "layer:0", "layer:-1"))
        att, ffn, outs = hand_forward(model, tokens)
    torch.testing.assert_close(hid["att"], att, rtol=0, atol=1e-6)
    torch.testing.assert_close(hid["ffn"], ffn, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats, ffn, rtol=0, atol=1e-6)
    torch.testing.assert_close(hid["layer:0"], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(hid["layer:-1"], outs[-1], rtol=0, atol=1e-6)
    if model.layer_norm is None and model.cfg.decoder_normalize_before:
        # without a final norm, ffn is the last layer's output; att is the FFN input, not it
        assert torch.equal(hid["ffn"], hid["layer:-1"])
    assert not torch.allclose(hid["att"], hid["ffn"])
    logits = model.output_layer(feats)
    torch.testing.assert_close(logits, ffn @ model.output_weight.T, rtol=1e-5, atol=1e-5)


def test_causal():
    model = tiny_model(50)
    a = torch.randint(4, 50, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(4, 50, (4,))
    with torch.no_grad():
        fa, ha = model(a, return_hidden=("att",))
        fb, hb = model(b, return_hidden=("att",))
    torch.testing.assert_close(fa[:, :8], fb[:, :8])
    torch.testing.assert_close(ha["att"][:, :8], hb["att"][:, :8])


def test_bad_representation_name():
    model = tiny_model(50)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, dtype=torch.long), return_hidden=("layer:9",))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, dtype=torch.long), return_hidden=("bogus",))


def test_presets():
    wiki = ARCHS["transformer_lm_wikibpe"]
    assert (wiki["decoder_layers"], wiki["decoder_embed_dim"], wiki["decoder_ffn_embed_dim"],
            wiki["decoder_attention_heads"]) == (16, 1024, 4096, 8)
    assert wiki["no_decoder_final_norm"] and not wiki["share_decoder_input_output_embed"]
    small = build_model("small", 8000)
    assert 1e6 < count_parameters(small) < 1e7
    tied = build_model("tiny", 100, share_decoder_input_output_embed=True)
    assert tied.output_weight is tied.embed_tokens.weight
