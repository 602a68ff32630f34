"""HF causal LMs through forward hooks: tiny random models of 18 families built offline
(GPT-2, Llama, GPT-NeoX, OPT, Gemma 2, Gemma 3, Granite, Cohere, Phi-3, Qwen2/3, Mistral,
Mixtral, Falcon, BLOOM, GPT-J, GPT-BigCode, MPT); representations, perplexity and datastore keys against
the models' own outputs."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from knnlm import build_dstore, evaluate
from knnlm.cli import run as cli_run
from knnlm.util import UserError
from knnlm.data import preprocess
from knnlm.data.blocks import shifted_inputs
from knnlm.data.preprocess import DataBin
from knnlm.knn.datastore import Datastore
from knnlm.lm.hf import HFCausalLM, load_hf_model, locate_modules

FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=2, n_positions=128),
             "ln_2"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=32,
              intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=128), "post_attention_layernorm"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_hidden_layers=2, hidden_size=32,
                 intermediate_size=64, num_attention_heads=2, max_position_embeddings=128),
                 "post_attention_layernorm"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64,
            num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32),
            "final_layer_norm"),
}
WITH_TOKENIZER = set(FAMILIES)      # the four above: the model directory holds the tokenizer
_DEC = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128)
# families that post-process their logits (soft-capping, scaling), and the other layouts:
# the att norm is the module whose output the last MLP reads (parallel blocks: the input norm)
FAMILIES.update({
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DEC, head_dim=16,
               final_logit_softcapping=3.0), "pre_feedforward_layernorm"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_DEC, logits_scaling=4.0),
                "post_attention_layernorm"),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_DEC, logit_scale=0.5), "input_layernorm"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DEC, "post_attention_layernorm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DEC, "post_attention_layernorm"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=16), "post_attention_layernorm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DEC, "post_attention_layernorm"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_hidden_layers=2, hidden_size=32,
               num_attention_heads=2), "input_layernorm"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=32, n_head=2),
              "post_attention_layernorm"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_embd=32, n_head=2, n_positions=128,
             rotary_dim=8), "ln_1"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_layer=2, n_embd=32,
                    n_head=2, n_positions=128), "ln_2"),
    "mpt": ("MptConfig", "MptForCausalLM", dict(n_layers=2, d_model=32, n_heads=2, max_seq_len=128),
            "norm_2"),
    # a sparse mixture of experts as the MLP (the att key: the router's input)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_DEC, num_local_experts=2,
                num_experts_per_tok=1), "post_attention_layernorm"),
    # what AutoModelForCausalLM builds for Gemma 3: the multimodal model, its text decoder
    # inside (a vision tower of one layer; the vocabulary goes into the text config)
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", dict(
        text_config=dict(_DEC, head_dim=16, sliding_window=16, final_logit_softcapping=3.0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=5, eoi_token_index=6, image_token_index=7),
        "pre_feedforward_layernorm"),
})

FINAL_NORM = dict(gpt2="ln_f", llama="norm", gpt_neox="final_layer_norm",
                  opt="decoder.final_layer_norm", falcon="ln_f", bloom="ln_f", gptj="ln_f",
                  gpt_bigcode="ln_f", mpt="norm_f",
                  gemma3="language_model.norm")       # inside the backbone; else "norm"


def tiny_llama(vocab_size: int, tokenizer_dir, out):
    """A tiny random Llama (seed 0) and the test tokenizer, both saved to ``out``;
    (model, tokenizer, out)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok, out


def tiny_config(family: str, vocab_size: int):
    """The tiny random config of ``family`` (ids: bos 0, pad 1, eos 2)."""
    cfg_cls, _, kw, _ = FAMILIES[family]
    if "text_config" in kw:
        kw = dict(kw, text_config=dict(kw["text_config"], vocab_size=vocab_size))
    return getattr(transformers, cfg_cls)(vocab_size=vocab_size, bos_token_id=0,
                                          eos_token_id=2, pad_token_id=1, **kw)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(bpe_databin, tmp_path_factory):
    """The test corpus' byte-level BPE as an HF fast tokenizer (eos/bos </s>, <s>)."""
    from tokenizers import Tokenizer
    d = tmp_path_factory.mktemp("hf_tok")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(bpe_databin.path / "tokenizer.json")),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session", params=list(FAMILIES))
def hf_model_dir(request, hf_tokenizer_dir, bpe_databin, tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(request.param, bpe_databin.vocab_size)
    model = getattr(transformers, FAMILIES[request.param][1])(config).eval()
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(d)
    if request.param in WITH_TOKENIZER:
        # transformers maps some model types to their own tokenizer class, which would
        # re-tokenize differently from the test data-bin (and be refused, rightly)
        transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_databin(hf_tokenizer_dir, corpus_dir, tmp_path_factory) -> DataBin:
    dest = tmp_path_factory.mktemp("databin_hf")
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest), srcdir=str(corpus_dir),
                                                hf_tokenizer=str(hf_tokenizer_dir), quiet=True))
    return DataBin(dest)


def test_hf_databin_keeps_the_text(hf_databin, corpus_dir):
    text = (corpus_dir / "valid.txt").read_text()
    assert hf_databin.vocab.decode(hf_databin.split("valid")) == text
    assert hf_databin.eos == 0   # the stream starts with <s>


def test_hooked_representations_equal_the_modules_outputs(hf_model_dir):
    model = load_hf_model(str(hf_model_dir))
    family = model.cfg.model_type
    norm = getattr(model.layers[-1], FAMILIES[family][3])
    final = model.backbone.get_submodule(FINAL_NORM.get(family, "norm"))
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out))
    pre = final.register_forward_pre_hook(lambda m, a: seen.__setitem__("final_in", a[0]))
    tokens = torch.randint(4, 300, (2, 17))
    hooks_before = [len(layer._forward_hooks) for layer in model.layers]
    with torch.no_grad():
        ffn, hid = model(tokens, return_hidden=("att", "ffn", "layer:0", "layer:-1", "layer:1"))
        hooks_after = [len(layer._forward_hooks) for layer in model.layers]
        full = model.hf(input_ids=tokens, output_hidden_states=True)
    handle.remove()
    pre.remove()
    # layer:N is a layer's output before the final norm, as for our own Transformer
    torch.testing.assert_close(hid["layer:-1"], seen["final_in"], rtol=0, atol=0)
    torch.testing.assert_close(hid["layer:1"], hid["layer:-1"], rtol=0, atol=0)
    assert not torch.allclose(hid["layer:-1"], hid["ffn"])
    assert hooks_after == hooks_before                  # our layer hooks are gone
    torch.testing.assert_close(hid["att"], seen["norm"].reshape(hid["att"].shape), rtol=0, atol=0)
    torch.testing.assert_close(hid["ffn"], full.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(model.output_layer(ffn), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hid["layer:0"], full.hidden_states[1], rtol=0, atol=0)
    # no hook left behind, also when the forward fails
    assert not model.att_module._forward_pre_hooks
    with pytest.raises(Exception):
        model(torch.full((1, 3), 10_000), return_hidden=("att",))
    assert not model.att_module._forward_pre_hooks


def test_eval_lm_equals_the_models_own_loss(hf_model_dir, hf_databin):
    T = 32
    res = evaluate.main(evaluate.EvalConfig(data=str(hf_databin.path), hf_model=str(hf_model_dir),
                                            gen_subset="valid", tokens_per_sample=T, quiet=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir).eval()
    tokens = hf_databin.split("valid")
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(tokens), T):
            e = min(len(tokens), s + T)
            ids = np.concatenate([shifted_inputs(tokens, hf_databin.eos, s, e), tokens[e - 1:e]])
            out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                        labels=torch.from_numpy(ids.astype(np.int64))[None])
            nll += float(out.loss) * (e - s)
    assert res["ppl"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-4)
    assert res["words"] > 0


def test_build_dstore_keys_equal_hooked_tensors(hf_model_dir, hf_databin, tmp_path):
    out = tmp_path / "ds"
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(hf_databin.path), hf_model=str(hf_model_dir), dstore_dir=str(out),
        gen_subset="valid", knn_keytype="att,ffn", tokens_per_sample=32, context_window=0,
        quiet=True))
    ds = Datastore(out)
    tokens = hf_databin.split("valid")
    model = load_hf_model(str(hf_model_dir))
    inp = torch.from_numpy(shifted_inputs(tokens, hf_databin.eos, 32, 64).astype(np.int64))[None]
    with torch.no_grad():
        _, hid = model(inp, return_hidden=("att", "ffn"))
    for kt in ("att", "ffn"):
        np.testing.assert_allclose(np.asarray(ds.keys(kt)[32:64], dtype=np.float32),
                                   hid[kt][0].numpy(), rtol=2e-3, atol=2e-3)
    assert np.array_equal(np.asarray(ds.vals), np.asarray(tokens, dtype=np.int32))


def test_bad_hf_inputs(hf_model_dir, hf_databin, bpe_databin, tmp_path):
    base = ["eval-lm", str(hf_databin.path), "--gen-subset", "valid", "--quiet"]
    assert cli_run(base + ["--hf-model", str(tmp_path / "absent")]) == 2
    assert cli_run(base + ["--hf-model", "no-such-org/no-such-model"]) == 2
    # a data-bin made with another tokenizer than the model's (when it has one)
    has_tokenizer = (hf_model_dir / "tokenizer.json").is_file()
    assert cli_run(["eval-lm", str(bpe_databin.path), "--hf-model", str(hf_model_dir),
                    "--quiet", "--max-eval-tokens", "64"]) == (2 if has_tokenizer else 0)
    if not has_tokenizer:    # never an empty tokenizer made up from the model type
        from knnlm.hub import load_hf_tokenizer
        with pytest.raises(UserError, match="holds no tokenizer files"):
            load_hf_tokenizer(str(hf_model_dir))
    with pytest.raises(UserError, match="expected one of"):
        locate_modules(torch.nn.Linear(2, 2), "some_new_family")


def test_unknown_logit_postprocessing_is_refused(hf_model_dir):
    """A family whose own logits are not the LM head over the final state (here: a model
    whose known post-processing is switched off) is refused at load, not scored wrongly."""
    model = load_hf_model(str(hf_model_dir))
    model.check_logits()
    if model._transform is None:        # add one the model does not do
        model._transform = lambda x: x * 2
    else:                               # drop the one it does
        model._transform = None
    with pytest.raises(UserError, match="differs from the model's own logits"):
        model.check_logits()


def test_default_window_of_a_long_context_model(hf_tokenizer_dir, hf_databin, tmp_path, capsys):
    """Max positions 131,072 (Llama 3.1): the default input is 2,048 tokens, half of them
    left context, and that is printed; flags override either."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=hf_databin.vocab_size, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=1,
                                      **dict(_DEC, max_position_embeddings=131_072))
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir).save_pretrained(tmp_path / "m")
    base = dict(data=str(hf_databin.path), hf_model=str(tmp_path / "m"), gen_subset="valid",
                max_eval_tokens=300, quiet=True)
    res = evaluate.main(evaluate.EvalConfig(**base))
    assert (res["tokens_per_sample"], res["context_window"]) == (2048, 1024)
    assert "window: 2,048 tokens per input (default; the model has 131,072 positions), " \
        "1,024 of them left context (default)" in capsys.readouterr().out
    res = evaluate.main(evaluate.EvalConfig(**base, tokens_per_sample=64))
    assert (res["tokens_per_sample"], res["context_window"]) == (64, 0)
    res = evaluate.main(evaluate.EvalConfig(**base, context_window=100))
    assert (res["tokens_per_sample"], res["context_window"]) == (2048, 100)



def test_greedy_generation_equals_model_generate(hf_model_dir, hf_databin, tmp_path):
    from knnlm import generate
    ds = tmp_path / "ds"
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(hf_databin.path), hf_model=str(hf_model_dir), dstore_dir=str(ds),
        gen_subset="valid", knn_keytype="att", tokens_per_sample=64, quiet=True))
    prompt = "Enter the king, and"
    cfg = dict(data=str(hf_databin.path), hf_model=str(hf_model_dir), prompt=prompt,
               max_new_tokens=8)
    ours = generate.main(generate.GenerateConfig(**cfg))["results"][0]["ids"]
    zero = generate.main(generate.GenerateConfig(**cfg, knnlm=True, dstore_filename=str(ds),
                                                 exact_search=True, k=8, lmbda=0.0))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir).eval()
    ids = [hf_databin.eos] + list(hf_databin.vocab.encode_text(prompt))
    with torch.no_grad():       # knnlm generate --hf-model stops at EOS, as HF does
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert ours == out[0, len(ids):].tolist() == zero["results"][0]["ids"]


def test_example_script_runs_end_to_end(corpus_dir, tmp_path):
    """examples/hf_knnlm.sh on a tiny random GPT-2 saved in a local directory."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    model_dir = tmp_path / "gpt2-tiny"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator((corpus_dir / "train.txt").read_text().splitlines(),
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                              show_progress=False))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=128, bos_token_id=0,
        eos_token_id=0)).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    env = dict(os.environ, KNNLM=f"{sys.executable} -m knnlm", WINDOW="64", CONTEXT="32",
               K="16", PROBE="8", PROMPT="Enter the king", PYTHONPATH=str(root))
    p = subprocess.run(["bash", str(root / "examples" / "hf_knnlm.sh"), str(model_dir),
                        str(corpus_dir), str(tmp_path / "run")], env=env, capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "kNN-LM" in p.stdout and "p_kNN" in p.stdout and "tok/s" in p.stdout
    # eval-lm, generate and neighbors took λ and T from the tuned file `knnlm tune` wrote
    assert p.stdout.count("index_att_l2.faiss.tuned.json (tuned on valid") == 3


def test_fingerprint_ignores_the_load_dtype(hf_model_dir):
    from knnlm.lm.hf import hf_fingerprint
    a = load_hf_model(str(hf_model_dir))
    b = load_hf_model(str(hf_model_dir), torch.bfloat16)
    c = load_hf_model(str(hf_model_dir), torch.float16)
    assert next(b.hf.parameters()).dtype == torch.bfloat16
    assert hf_fingerprint(a.hf) == hf_fingerprint(b.hf) == hf_fingerprint(c.hf)
    with torch.no_grad():
        next(a.hf.parameters()).view(-1)[0] += 1.0
    assert hf_fingerprint(a.hf) != hf_fingerprint(b.hf)


def test_quiet_is_silent_through_an_hf_model(hf_databin, hf_tokenizer_dir, tmp_path):
    """--quiet: nothing on stderr, transformers' weight-loading bar included."""
    import os
    import subprocess
    import sys
    torch.manual_seed(0)
    cfg_cls, model_cls, kw, _ = FAMILIES["llama"]
    config = getattr(transformers, cfg_cls)(vocab_size=hf_databin.vocab_size, bos_token_id=0,
                                            eos_token_id=2, pad_token_id=1, **kw)
    getattr(transformers, model_cls)(config).save_pretrained(tmp_path / "m")
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "knnlm", "build-dstore", str(hf_databin.path), "--hf-model",
            str(tmp_path / "m"), "--dstore-dir", str(tmp_path / "ds"), "--tokens-per-sample",
            "64", "--max-dstore-tokens", "300"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE",
                                                                     "TRANSFORMERS_VERB"))}
    env["PYTHONPATH"] = str(root)
    loud = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr           # the bar --quiet must silence
    quiet = subprocess.run(argv + ["--quiet", "--dstore-dir", str(tmp_path / "ds2")],
                           capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_the_mlp_of_every_layout_is_found():
    """transformers 4.x names Mixtral's sparse MoE block ``block_sparse_moe`` (5.x: ``mlp``);
    Gemma 3's decoder sits in its multimodal backbone's ``language_model``."""
    def tree(layers_path, mlp_name):
        layer = torch.nn.Module()
        setattr(layer, mlp_name, torch.nn.Linear(2, 2))
        root = node = torch.nn.Module()
        *parents, last = layers_path.split(".")
        for p in parents:
            setattr(node, p, torch.nn.Module())
            node = getattr(node, p)
        setattr(node, last, torch.nn.ModuleList([layer]))
        return root, getattr(layer, mlp_name)
    for model_type, layout in [("mixtral", ("layers", "block_sparse_moe")),
                               ("mixtral", ("layers", "mlp")),
                               ("gemma3", ("language_model.layers", "mlp"))]:
        root, mlp = tree(*layout)
        assert locate_modules(root, model_type)[1] is mlp
    with pytest.raises(UserError, match="block_sparse_moe"):
        locate_modules(tree("layers", "experts")[0], "mixtral")
