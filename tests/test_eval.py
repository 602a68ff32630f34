"""Blocked evaluation equals token-by-token scoring; word counting; eval-lm end to end."""
import json
import math

import numpy as np
import pytest
import torch

from knnlm import evaluate
from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
from knnlm.data.blocks import score_windows
from knnlm.data.tokenizer import Dictionary, count_words


def token_by_token(model, tokens, eos, T, C, n, starts=None):
    """log p(t_i) from one forward pass per target over exactly the left context the
    blocked evaluation gives it (its window's context plus the block prefix; ``starts``:
    where each target's context starts, else the none-mode windows')."""
    out = np.zeros(n)
    stream_in = np.concatenate([[eos], tokens[:-1]]).astype(np.int64)
    if starts is None:
        starts = np.zeros(n, dtype=np.int64)
        for w in score_windows(n, T, C):
            starts[w.score_start:w.end] = w.ctx_start
    for i in range(n):
        x = torch.from_numpy(stream_in[starts[i]:i + 1])[None]
        with torch.no_grad():
            f, _ = model(x)
            lp = torch.log_softmax(model.output_layer(f[0, -1]).double(), -1)
        out[i] = lp[int(tokens[i])].item()
    return out


def fairseq_context_starts(tokens, eos, T, C, mode):
    """Where each target's context starts under fairseq's eval-lm with
    ``--sample-break-mode MODE --context-window C`` on a T-token model, written as
    fairseq's code runs: TokenBlockDataset (block T - C; whole lines) and
    LMContextWindowDataset's ``prev_tokens`` carried from block to block. Lines longer
    than T are first cut into T-token pieces (knnlm's one departure: fairseq would feed
    the model more than T positions)."""
    ends = list(np.flatnonzero(np.asarray(tokens) == eos) + 1)
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    sizes, prev_end = [], 0
    for e in ends:
        size = e - prev_end
        while size > T:
            sizes.append(T)
            size -= T
        sizes.append(size)
        prev_end = e
    block, slices, tok, cur = T - C, [], 0, 0
    for sz in sizes:
        if mode == "complete" and (cur == 0 or cur + sz <= block):
            cur += sz
            continue
        if cur:
            slices.append((tok, tok + cur))
            tok += cur
        cur = sz
        if mode == "eos":
            slices.append((tok, tok + cur))
            tok, cur = tok + cur, 0
    if cur:
        slices.append((tok, tok + cur))
    starts, prev = np.zeros(len(tokens), dtype=np.int64), []
    for s, e in slices:
        extra = len(prev) + (e - s) - T           # max_sample_len = block + C = T
        if extra > 0:
            prev = prev[extra:]
        starts[s:e] = prev[0] if prev else s
        prev = (prev + list(range(s, e)))[-C:]   # C > 0, as fairseq asserts
    return starts


@pytest.mark.parametrize("mode", ["complete", "eos"])
@pytest.mark.parametrize("T,C", [(16, 8), (12, 11), (24, 4)])
def test_whole_line_blocks_with_context_equal_fairseqs_protocol(bpe_databin, tiny_ckpt, tmp_path,
                                                                 mode, T, C):
    """--sample-break-mode complete/eos with a context window: every target is scored once,
    with exactly the context fairseq's eval-lm gives it (token by token, in one forward
    pass each), and no input longer than T."""
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt))
    tokens = np.asarray(bpe_databin.split("valid"))[:300]
    cfg = evaluate.EvalConfig(data=str(bpe_databin.path), path=str(tiny_ckpt), gen_subset="valid",
                              tokens_per_sample=T, context_window=C, sample_break_mode=mode,
                              max_eval_tokens=300, max_tokens=64, save_scores=str(tmp_path / "s.npy"),
                              quiet=True)
    res = evaluate.eval_lm(model, bpe_databin, cfg, torch.device("cpu"))
    scores = np.load(tmp_path / "s.npy")
    assert res["tokens"] == 300 and (scores < 0).all()
    starts = fairseq_context_starts(tokens, bpe_databin.eos, T, C, mode)
    assert (np.arange(300) - starts < T).all()                 # inputs of at most T
    assert (starts < np.arange(300)).sum() > 250               # and context is given
    ref = token_by_token(model, tokens, bpe_databin.eos, T, C, 300, starts)
    np.testing.assert_allclose(scores, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("T,C,max_tokens", [(16, 0, 64), (16, 8, 40), (12, 11, 1000), (7, 3, 7)])
def test_blocked_equals_token_by_token(bpe_databin, tiny_ckpt, tmp_path, T, C, max_tokens):
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt))
    n = 150
    tokens = bpe_databin.split("valid")
    cfg = evaluate.EvalConfig(data=str(bpe_databin.path), path=str(tiny_ckpt), gen_subset="valid",
                              tokens_per_sample=T, context_window=C, max_tokens=max_tokens,
                              softmax_batch=13, save_scores=str(tmp_path / "s.npy"),
                              save_tokens=str(tmp_path / "t.npy"), quiet=True)
    res = evaluate.eval_lm(model, bpe_databin, cfg, torch.device("cpu"))
    scores = np.load(tmp_path / "s.npy")
    assert res["tokens"] == len(tokens) == len(scores)
    assert (scores < 0).all()  # every token scored (the memmap starts at 0)
    assert np.array_equal(np.load(tmp_path / "t.npy"), np.asarray(tokens, dtype=np.int32))
    ref = token_by_token(model, np.asarray(tokens), bpe_databin.eos, T, C, n)
    np.testing.assert_allclose(scores[:n], ref, rtol=0, atol=2e-5)
    assert res["nll_sum"] == pytest.approx(-scores.astype(np.float64).sum(), rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(res["nll_sum"] / res["tokens"]), rel=1e-9)


def test_more_context_changes_scores_but_not_coverage(bpe_databin, tiny_ckpt, tmp_path):
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt))
    out = {}
    for C in (0, 12):
        cfg = evaluate.EvalConfig(data=str(bpe_databin.path), path=str(tiny_ckpt),
                                  gen_subset="test", tokens_per_sample=16, context_window=C,
                                  save_scores=str(tmp_path / f"{C}.npy"), quiet=True)
        out[C] = evaluate.eval_lm(model, bpe_databin, cfg, torch.device("cpu"))
    assert out[0]["tokens"] == out[12]["tokens"]
    assert out[0]["words"] == out[12]["words"]
    s0, s12 = np.load(tmp_path / "0.npy"), np.load(tmp_path / "12.npy")
    # the first 16 targets have the same context in both runs; later ones do not
    np.testing.assert_allclose(s0[:4], s12[:4], atol=1e-6)
    assert not np.allclose(s0, s12)


def test_break_mode_eos_scores_every_token(dict_databin, tmp_path):
    from conftest import tiny_model, write_model_checkpoint
    model = tiny_model(dict_databin.vocab_size)
    ckpt = write_model_checkpoint(model, dict_databin, tmp_path / "m.pt")
    cfg = evaluate.EvalConfig(data=str(dict_databin.path), path=str(ckpt), gen_subset="valid",
                              sample_break_mode="eos", tokens_per_sample=64,
                              save_scores=str(tmp_path / "s.npy"), quiet=True)
    res = evaluate.eval_lm(model, dict_databin, cfg, torch.device("cpu"))
    assert res["tokens"] == len(dict_databin.split("valid"))
    assert (np.load(tmp_path / "s.npy") < 0).all()
    # word-level dictionary, no BPE: every token is a word
    assert res["words"] == res["tokens"]
    assert res["word_ppl"] == pytest.approx(res["ppl"], rel=1e-9)


def test_count_words_dictionary_bpe_markers():
    d = Dictionary.build(["th@@ e ki@@ ng spe@@ a@@ ks"], padding_factor=1)
    ids = np.array([d.indices[w] for w in "th@@ e ki@@ ng spe@@ a@@ ks".split()] + [d.eos])
    prev = np.concatenate([[d.eos], ids[:-1]])
    flags = d.word_flags("@@")
    assert count_words(ids, prev, d, flags) == 4  # the, king, speaks, </s>
    assert count_words(ids, prev, d, d.word_flags(None)) == len(ids)


def test_count_words_byte_bpe(bpe_databin):
    vocab = bpe_databin.vocab
    lines = ["The king speaks, my lady.", "", "  sweet   night"]
    ids = np.concatenate(vocab.encode_lines(lines))
    prev = np.concatenate([[vocab.eos], ids[:-1]])
    n = count_words(ids, prev, vocab, vocab.word_flags())
    # words: The king speaks, my lady. </s> | </s> | sweet night </s>; the runs of blanks
    # that the byte-level pre-tokenizer emits as pieces of their own are not words
    assert n == sum(len(l.split()) for l in lines) + len(lines)


def test_eval_lm_cli_writes_results(bpe_databin, tiny_ckpt, tmp_path, capsys):
    from knnlm.cli import run
    out = tmp_path / "res.json"
    rc = run(["eval-lm", str(bpe_databin.path), "--path", str(tiny_ckpt), "--gen-subset", "test",
              "--tokens-per-sample", "32", "--context-window", "16", "--results-path", str(out),
              "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert res["tokens"] == len(bpe_databin.split("test"))
    printed = capsys.readouterr().out
    assert f"{res['ppl']:.2f} per token" in printed and "per word" in printed
    # an untrained model is close to uniform over the vocabulary
    assert 0.3 * bpe_databin.vocab_size < res["ppl"] < 3 * bpe_databin.vocab_size
