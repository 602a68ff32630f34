"""build-dstore: keys equal the model's representations, values are next tokens, a killed
dump resumes to identical bytes, and readers refuse bad datastores."""
import json
import shutil

import numpy as np
import pytest
import torch

from knnlm import build_dstore
from knnlm.lm.checkpoint import load_checkpoint, model_fingerprint, model_from_checkpoint
from knnlm.util import UserError
from knnlm.data.blocks import score_windows, shifted_inputs
from knnlm.knn.datastore import Datastore, normalize_keytype

from conftest import tiny_model, write_model_checkpoint


def dstore_cfg(databin, ckpt, out, **kw):
    base = dict(data=str(databin.path), path=str(ckpt), dstore_dir=str(out), gen_subset="valid",
                knn_keytype="att,ffn,layer:0", tokens_per_sample=24, context_window=8,
                max_tokens=100, quiet=True)
    base.update(kw)
    return build_dstore.BuildDstoreConfig(**base)


@pytest.fixture(scope="module")
def built(bpe_databin, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("dstore") / "ds"
    build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, out))
    return out


def test_keys_equal_direct_representations(bpe_databin, tiny_ckpt, built):
    ds = Datastore(built)
    tokens = np.asarray(bpe_databin.split("valid"))
    assert ds.size == len(tokens) and ds.dim == 32
    assert np.array_equal(ds.vals, tokens)                     # value = the next token
    assert np.array_equal(ds.pos, np.arange(len(tokens)))
    assert ds.keys("att").dtype == np.float16
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt)).eval()
    for w in score_windows(len(tokens), 24, 8)[:12]:
        x = torch.from_numpy(shifted_inputs(tokens, bpe_databin.eos, w.ctx_start, w.end))[None]
        with torch.no_grad():
            _, hid = model(x, return_hidden=("att", "ffn", "layer:0"))
        off = w.score_start - w.ctx_start
        for kt in ("att", "ffn", "layer:0"):
            want = hid[kt][0, off:].numpy()
            got = ds.keys(kt)[w.score_start:w.end].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    # the keytype aliases of the original code
    assert np.array_equal(ds.keys("last_ffn_input"), ds.keys("att"))
    assert np.array_equal(ds.keys("last_linear_input"), ds.keys("ffn"))


def test_positions_map_back_to_text(bpe_databin, built):
    ds = Datastore(built)
    tokens = np.asarray(bpe_databin.split("valid"))
    i = 57
    context = bpe_databin.vocab.decode(tokens[max(0, ds.pos[i] - 10):ds.pos[i]].tolist())
    nxt = bpe_databin.vocab.decode([int(ds.vals[i])])
    text = bpe_databin.vocab.decode(tokens[:ds.pos[i] + 1].tolist())
    assert text.endswith(context + nxt)


class Crash(Exception):
    pass


def test_interrupted_dump_resumes_to_identical_bytes(bpe_databin, tiny_ckpt, built, tmp_path):
    out = tmp_path / "ds"

    def crash(rows):
        if rows > 1000:
            raise Crash()
    with pytest.raises(Crash):
        build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, out), on_batch=crash)
    meta = json.loads((out / "datastore.json").read_text())
    assert 0 < meta["rows_written"] < meta["size"] and not meta["complete"]
    with pytest.raises(UserError, match="incomplete"):
        Datastore(out)
    # scribble over the rows after the committed ones: the resume must rewrite them
    keys = np.load(out / "keys_att.npy", mmap_mode="r+")
    keys[meta["rows_written"]:] = 7
    keys.flush()
    del keys
    build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, out))
    for f in ("keys_att.npy", "keys_ffn.npy", "keys_layer0.npy", "vals.npy", "pos.npy"):
        assert (out / f).read_bytes() == (built / f).read_bytes(), f
    Datastore(out)


def test_rerun_of_a_finished_dump_is_a_no_op(bpe_databin, tiny_ckpt, built, capsys):
    before = (built / "keys_att.npy").stat().st_mtime_ns
    build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, built))
    assert "already built" in capsys.readouterr().out
    assert (built / "keys_att.npy").stat().st_mtime_ns == before


def test_datastore_from_another_checkpoint_is_refused(bpe_databin, tiny_ckpt, built, tmp_path):
    ds = Datastore(built)
    ds.check_model(model_fingerprint(load_checkpoint(tiny_ckpt)["model"]), bpe_databin.tokenizer_sha256)
    other = write_model_checkpoint(tiny_model(bpe_databin.vocab_size, seed=5), bpe_databin,
                                   tmp_path / "other.pt")
    with pytest.raises(UserError, match="another checkpoint"):
        ds.check_model(model_fingerprint(load_checkpoint(other)["model"]))
    with pytest.raises(UserError, match="another vocabulary"):
        ds.check_model(ds.meta["model_fingerprint"], "0" * 64)
    # resuming into a directory of another build is refused too
    with pytest.raises(UserError, match="another configuration"):
        build_dstore.main(dstore_cfg(bpe_databin, other, built))


def test_truncated_key_file_is_detected(built, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    raw = (copy / "keys_ffn.npy").read_bytes()
    (copy / "keys_ffn.npy").write_bytes(raw[:-64])
    ds = Datastore(copy)
    with pytest.raises(UserError, match="truncated"):
        ds.keys("ffn")


def test_bad_keytype_and_size(bpe_databin, tiny_ckpt, tmp_path):
    with pytest.raises(UserError, match="knn-keytype"):
        normalize_keytype("last_hidden")
    with pytest.raises(UserError, match="dstore-size"):
        build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, tmp_path / "x", dstore_size=5))
    with pytest.raises(UserError, match="layers"):
        build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, tmp_path / "y", knn_keytype="layer:7"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_lm_save_knnlm_dstore_spelling(bpe_databin, tiny_ckpt, built, tmp_path, capsys):
    from knnlm.cli import run
    out = tmp_path / "orig"
    rc = run(["eval-lm", str(bpe_databin.path), "--path", str(tiny_ckpt), "--gen-subset", "valid",
              "--save-knnlm-dstore", "--dstore-mmap", str(out), "--knn-keytype",
              "last_ffn_input,last_linear_input,layer:0", "--tokens-per-sample", "24",
              "--context-window", "8", "--max-tokens", "100", "--quiet"])
    assert rc == 0
    assert "datastore" in capsys.readouterr().out
    for f in ("keys_att.npy", "keys_ffn.npy", "vals.npy"):
        assert (out / f).read_bytes() == (built / f).read_bytes()
    assert run(["eval-lm", str(bpe_databin.path), "--path", str(tiny_ckpt),
                "--save-knnlm-dstore"]) == 2


def test_keys_that_overflow_fp16_are_refused(bpe_databin, tmp_path):
    """An att of magnitude 1e6 is inf in fp16 (and would be every query's nearest key in
    brute force): the dump stops with the entry named; fp32 keys take it."""
    model = tiny_model(bpe_databin.vocab_size)
    with torch.no_grad():
        model.layers[-1].final_layer_norm.weight.fill_(1e6)   # att = this LayerNorm's output
    ckpt = write_model_checkpoint(model, bpe_databin, tmp_path / "big.pt")
    with pytest.raises(UserError, match=r"att key of datastore entry 0 is not finite.*--dstore-fp32"):
        build_dstore.main(dstore_cfg(bpe_databin, ckpt, tmp_path / "ds", knn_keytype="att"))
    assert json.loads((tmp_path / "ds" / "datastore.json").read_text())["rows_written"] == 0
    build_dstore.main(dstore_cfg(bpe_databin, ckpt, tmp_path / "ds32", knn_keytype="att",
                                 dstore_fp32=True))
    assert np.abs(Datastore(tmp_path / "ds32").keys("att")).max() > 65504


def test_whole_line_blocks_give_fairseqs_keys_and_the_same_queries(bpe_databin, tiny_ckpt,
                                                                   tmp_path):
    """build-dstore --sample-break-mode complete --context-window C: each key is the
    representation under the context fairseq's eval-lm gives its position (computed
    alone, one forward pass each), and eval-lm --knnlm with the same flags searches with
    those very vectors as queries."""
    from knnlm import evaluate
    from test_eval import fairseq_context_starts
    out = tmp_path / "ds"
    build_dstore.main(dstore_cfg(bpe_databin, tiny_ckpt, out, knn_keytype="att",
                                 tokens_per_sample=16, context_window=8,
                                 sample_break_mode="complete", max_dstore_tokens=200))
    ds = Datastore(out)
    assert ds.meta["blocking"] == dict(tokens_per_sample=16, context_window=8,
                                       sample_break_mode="complete")
    tokens = np.asarray(bpe_databin.split("valid"))[:200]
    starts = fairseq_context_starts(tokens, bpe_databin.eos, 16, 8, "complete")
    stream_in = np.concatenate([[bpe_databin.eos], tokens[:-1]]).astype(np.int64)
    model = model_from_checkpoint(load_checkpoint(tiny_ckpt)).eval()
    for i in range(0, 200, 3):
        with torch.no_grad():
            _, hid = model(torch.from_numpy(stream_in[starts[i]:i + 1])[None],
                           return_hidden=("att",))
        np.testing.assert_allclose(ds.keys("att")[i].astype(np.float32), hid["att"][0, -1].numpy(),
                                   rtol=2e-3, atol=2e-3)
    evaluate.main(evaluate.EvalConfig(
        data=str(bpe_databin.path), path=str(tiny_ckpt), gen_subset="valid", tokens_per_sample=16,
        context_window=8, sample_break_mode="complete", max_eval_tokens=200, knnlm=True,
        dstore_filename=str(out), exact_search=True, k=4, lmbda=0.25, knn_temp=1.0,
        save_queries=str(tmp_path / "q.npy"), max_tokens=64, quiet=True))
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), ds.keys("att")[:200].astype(np.float32),
                               rtol=2e-3, atol=2e-3)
