"""The Python API against the command line: a datastore built from a model object and
texts (a list, a datasets.Dataset, an IterableDataset) equals the one the CLI builds from
the same text; KNNLM's perplexity is eval-lm's, its loss the kNN-LM's mean NLL; save/load."""
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import knnlm
from knnlm.cli import run
from test_hf import hf_databin, hf_tokenizer_dir, tiny_config  # noqa: F401  (fixtures)

from conftest import refused

KNN = dict(k=16, lmbda=0.5, knn_temp=2.0)


@pytest.fixture(scope="module")
def texts(corpus_dir):
    lines = (corpus_dir / "train.txt").read_text().splitlines()
    # documents of a few lines each, one with an empty line inside
    return ["\n".join(lines[i:i + 5]) for i in range(0, 300, 5)] + ["tail one\n\ntail two"]


@pytest.fixture(scope="module")
def held_out(corpus_dir):
    return (corpus_dir / "valid.txt").read_text().splitlines()[:40]


@pytest.fixture(scope="module")
def hf(hf_databin, hf_tokenizer_dir, tmp_path_factory):  # noqa: F811
    """A tiny random Llama in memory, its tokenizer, and the same saved to a directory."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", hf_databin.vocab_size)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    d = tmp_path_factory.mktemp("api_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, d


@pytest.fixture(scope="module")
def built(hf, texts, tmp_path_factory):
    model, tok, _ = hf
    out = tmp_path_factory.mktemp("api") / "ds"
    return knnlm.Datastore.build(model, tok, texts, out=out, keytype="att,ffn",
                                 tokens_per_sample=64, context_window=16, index="IVF4,Flat",
                                 quiet=True)


def same_sidecar(a: dict, b: dict, ignore=("data_dir", "datastore", "datastore_fingerprint",
                                           "seconds", "add_s", "train_s", "timings", "config",
                                           "created")) -> None:
    assert {k: v for k, v in a.items() if k not in ignore} == \
        {k: v for k, v in b.items() if k not in ignore}


def test_a_datastore_built_in_python_equals_the_clis(built, hf, texts, tmp_path):
    model, tok, model_dir = hf
    (tmp_path / "train.txt").write_text("".join(t + "\n" for t in texts))
    db, ds = tmp_path / "db", tmp_path / "ds"
    assert run(["preprocess", "--trainpref", str(tmp_path / "train.txt"), "--hf-tokenizer",
                str(model_dir), "--destdir", str(db), "--quiet"]) == 0
    assert run(["build-dstore", str(db), "--hf-model", str(model_dir), "--dstore-dir", str(ds),
                "--knn-keytype", "att,ffn", "--tokens-per-sample", "64", "--context-window",
                "16", "--quiet"]) == 0
    assert run(["build-index", "--dstore-dir", str(ds), "--knn-keytype", "att",
                "--index-factory", "IVF4,Flat", "--quiet"]) == 0
    for name in ("keys_att.npy", "keys_ffn.npy", "vals.npy", "pos.npy",
                 "index_att_l2.faiss"):
        assert (built.path / name).read_bytes() == (ds / name).read_bytes(), name
    assert (built.path / "data-bin" / "train.npy").read_bytes() == (db / "train.npy").read_bytes()
    same_sidecar(json.loads((built.path / "datastore.json").read_text()),
                 json.loads((ds / "datastore.json").read_text()))
    same_sidecar(json.loads((built.path / "index_att_l2.faiss.json").read_text()),
                 json.loads((ds / "index_att_l2.faiss.json").read_text()))
    assert built.size == len(np.load(db / "train.npy")) and built.keytypes == ["att", "ffn"]
    assert built.indexes() == [built.path / "index_att_l2.faiss"]
    # the same call again: the datastore is reused, not rebuilt
    again = knnlm.Datastore.build(model, tok, texts, out=built.path, keytype="att,ffn",
                                  tokens_per_sample=64, context_window=16, index="IVF4,Flat",
                                  quiet=True)
    assert again.fingerprint == built.fingerprint


def test_datasets_and_iterables_build_the_same_datastore(built, hf, texts, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, tok, model_dir = hf
    kw = dict(keytype="att,ffn", tokens_per_sample=64, context_window=16, index=None,
              quiet=True)
    table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    sources = {"dataset": table, "iterable": table.to_iterable_dataset(),
               "generator": (t for t in texts), "rows": [{"body": t} for t in texts]}
    for name, items in sources.items():
        ds = knnlm.Datastore.build(model, tok, items, out=tmp_path / name,
                                   text_column="body" if name == "rows" else "text", **kw)
        assert (ds.path / "keys_att.npy").read_bytes() == \
            (built.path / "keys_att.npy").read_bytes(), name
    # the command line: build-dstore --hf-dataset (a save_to_disk directory) and
    # preprocess --hf-dataset (a jsonl file)
    table.save_to_disk(str(tmp_path / "saved"))
    assert run(["build-dstore", str(tmp_path / "cli-db"), "--hf-model", str(model_dir),
                "--hf-dataset", str(tmp_path / "saved"), "--split", "train", "--dstore-dir",
                str(tmp_path / "cli-ds"), "--knn-keytype", "att,ffn", "--tokens-per-sample",
                "64", "--context-window", "16", "--quiet"]) == 0
    assert (tmp_path / "cli-ds" / "keys_ffn.npy").read_bytes() == \
        (built.path / "keys_ffn.npy").read_bytes()
    with open(tmp_path / "rows.jsonl", "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    assert run(["preprocess", "--hf-dataset", str(tmp_path / "rows.jsonl"), "--hf-tokenizer",
                str(model_dir), "--destdir", str(tmp_path / "jsonl-db"), "--quiet"]) == 0
    assert (tmp_path / "jsonl-db" / "train.npy").read_bytes() == \
        (built.path / "data-bin" / "train.npy").read_bytes()


def test_bad_texts_are_refused_in_one_line(hf, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    model, tok, model_dir = hf
    with pytest.raises(knnlm.util.UserError, match="item 1 is not text"):
        knnlm.Datastore.build(model, tok, ["fine", None], out=tmp_path / "a", quiet=True)
    with pytest.raises(knnlm.util.UserError, match="no column 'body'"):
        knnlm.Datastore.build(model, tok, datasets.Dataset.from_dict({"text": ["x"]}),
                              out=tmp_path / "b", text_column="body", quiet=True)
    with pytest.raises(knnlm.util.UserError, match="no texts"):
        knnlm.Datastore.build(model, tok, [], out=tmp_path / "c", quiet=True)
    base = ["build-dstore", str(tmp_path / "db"), "--hf-model", str(model_dir), "--dstore-dir",
            str(tmp_path / "ds"), "--quiet"]
    assert refused(base + ["--hf-dataset", str(tmp_path / "absent")], capsys,
                   "cannot load the dataset") is None
    assert refused(base + ["--hf-dataset", str(tmp_path), "--split", "train,test"], capsys,
                   "one split") is None
    assert not (tmp_path / "db").exists() and not (tmp_path / "ds").exists()


def test_perplexity_is_eval_lms(built, hf, held_out, tmp_path):
    model, tok, model_dir = hf
    (tmp_path / "valid.txt").write_text("".join(t + "\n" for t in held_out))
    db = tmp_path / "db"
    assert run(["preprocess", "--validpref", str(tmp_path / "valid.txt"), "--hf-tokenizer",
                str(model_dir), "--destdir", str(db), "--quiet"]) == 0
    out = tmp_path / "res.json"
    assert run(["eval-lm", str(db), "--hf-model", str(model_dir), "--gen-subset", "valid",
                "--knnlm", "--dstore-filename", str(built.path), "--k", "16", "--lmbda", "0.5",
                "--knn-temp", "2", "--probe", "4", "--tokens-per-sample", "64",
                "--context-window", "16", "--results-path", str(out), "--quiet"]) == 0
    cli = json.loads(out.read_text())["results"]
    knn = knnlm.KNNLM(model, built, probe=4, quiet=True, **KNN)
    res = knn.perplexity(held_out, tokens_per_sample=64, context_window=16)
    assert res["tokens"] == cli["tokens"] and res["words"] == cli["words"]
    for part in ("knn", "interpolated"):
        assert res[part]["ppl"] == pytest.approx(cli[part]["ppl"], rel=1e-9)
    assert res["ppl"] == pytest.approx(cli["ppl"], rel=1e-9)
    assert res["interpolated"]["ppl"] < res["ppl"]       # the datastore helps on its domain


def test_loss_is_the_knnlms_mean_nll_and_the_model_is_it_inside_with(built, hf, held_out):
    """A text shorter than the window: the loss of [BOS] + its tokens is the log of
    eval-lm's interpolated per-token perplexity (each token sees all its context)."""
    model, tok, _ = hf
    text = held_out[3]
    knn = knnlm.KNNLM(model, built, probe=4, quiet=True, **KNN)
    res = knn.perplexity([text], tokens_per_sample=64, context_window=0)
    databin = knnlm.data.preprocess.DataBin(built.data_bin)
    ids = [databin.eos, *knnlm.data.preprocess.binarize([text], databin.vocab)[0].tolist()]
    assert len(ids) <= 64
    x = torch.tensor([ids])
    loss = knn.loss(x)
    assert float(loss) == pytest.approx(math.log(res["interpolated"]["ppl"]), rel=1e-5)
    with torch.no_grad():
        plain = model(input_ids=x, labels=x).loss
        with knn:
            inside = model(input_ids=x, labels=x).loss
        after = model(input_ids=x, labels=x).loss
    assert float(plain) == pytest.approx(math.log(res["ppl"]), rel=1e-5)
    assert float(inside) == pytest.approx(float(loss), rel=1e-6) and float(after) == float(plain)


def test_generate_and_save_load(built, hf, tmp_path):
    model, tok, _ = hf
    tok.padding_side = "left"
    batch = tok(["Enter the king", "What say"], return_tensors="pt", padding=True)
    knn = knnlm.KNNLM(model, built, probe=4, quiet=True, **KNN)
    got = knn.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with knnlm.KNNLogitsProcessor(model, built.path, probe=4, **KNN) as proc:
        want = model.generate(**batch, max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id, logits_processor=[proc])
    assert torch.equal(got, want)
    copy = built.save(tmp_path / "copy")
    assert knnlm.Datastore.load(tmp_path / "copy").fingerprint == built.fingerprint
    assert copy.data_bin == tmp_path / "copy" / "data-bin"
    again = knnlm.KNNLM(model, copy, probe=4, quiet=True, **KNN)
    assert torch.equal(again.generate(**batch, max_new_tokens=6, do_sample=False,
                                      pad_token_id=tok.pad_token_id), got)
    with pytest.raises(knnlm.util.UserError, match="not empty"):
        built.save(tmp_path / "copy")


def readme_example() -> str:
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## The Python API"):]
    return section[section.index("```python\n") + 10:section.index("```\n", section.index(
        "```python\n"))]


def test_the_readmes_python_example_runs(hf, corpus_dir, tmp_path, monkeypatch):
    """The README's example as written, with the tiny model for MODEL, the test corpus
    for corpus/ and a temporary directory for runs/."""
    import re
    model, tok, model_dir = hf
    code = readme_example()
    code = re.sub(r'^MODEL = .*$', f'MODEL = {str(model_dir)!r}', code, flags=re.M)
    assert 'open("corpus/train.txt")' in code and 'OUT = "runs/py/dstore"' in code
    (tmp_path / "corpus").symlink_to(corpus_dir)
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["res"]["interpolated"]["ppl"] > 1 and env["out"].shape[0] == 2
    assert float(env["loss_again"].detach()) == pytest.approx(float(env["loss"]), rel=1e-6)
    assert env["same"].fingerprint == env["grown"].fingerprint != env["ds"].fingerprint
    assert env["grown"].size > env["ds"].size
    assert (tmp_path / "runs" / "py" / "dstore" / "datastore.json").is_file()


FACT = "The secret word of the castle is zebracorn, said the king."


@pytest.fixture()
def small(hf, texts, tmp_path):
    """A datastore of the first 30 texts, with an IVF index (a copy of it, trained and
    empty, kept aside: the quantizer a rebuild reuses)."""
    import faiss
    model, tok, _ = hf
    ds = knnlm.Datastore.build(model, tok, texts[:30], out=tmp_path / "small", keytype="att",
                               tokens_per_sample=64, context_window=16, index="IVF4,Flat",
                               quiet=True)
    empty = faiss.read_index(str(ds.path / "index_att_l2.faiss"))
    empty.reset()
    return ds, empty


def test_add_equals_a_rebuild_with_the_same_quantizer(small, hf, texts, tmp_path):
    import faiss
    from knnlm import build_dstore
    ds, empty = small
    model, tok, model_dir = hf
    old_keys = np.load(ds.path / "keys_att.npy")
    grown = ds.add(texts[30:45])
    db = grown.data_bin
    assert grown.size == len(np.load(db / json.loads((db / "data.json").read_text())[
        "splits"]["train"]["file"]))
    assert grown.size > ds.size and grown.meta["grown"][-1]["from_size"] == ds.size
    # the build of the grown data: the same entries, keys and fingerprint
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(db), hf_model=str(model_dir), dstore_dir=str(tmp_path / "re"),
        knn_keytype="att", tokens_per_sample=64, context_window=16, quiet=True))
    re = knnlm.Datastore.load(tmp_path / "re")
    assert re.fingerprint == grown.fingerprint
    for name in ("vals.npy", "pos.npy"):
        assert (re.path / name).read_bytes() == (grown.path / name).read_bytes()
    a, b = (np.load(p / "keys_att.npy").astype(np.float32) for p in (re.path, grown.path))
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    assert (np.load(grown.path / "keys_att.npy")[:ds.size] == old_keys).all()   # untouched
    # the index: the old one plus the new keys, against the same quantizer given every key
    added = faiss.read_index(str(grown.path / "index_att_l2.faiss"))
    empty.add(a)
    for index in (added, empty):
        faiss.extract_index_ivf(index).nprobe = 2
    q = a[::37]
    _, i_add = added.search(q, 8)
    _, i_re = empty.search(q, 8)
    assert added.ntotal == grown.size and (i_add == i_re).mean() > 0.99
    side = json.loads((grown.path / "index_att_l2.faiss.json").read_text())
    assert side["datastore_fingerprint"] == grown.fingerprint and side["grown"][-1]["from_size"] \
        == ds.size
    # added again at once: nothing more
    again = grown.add(texts[30:45])
    assert again.size == grown.size and again.fingerprint == grown.fingerprint


def test_an_added_fact_becomes_predictable(small, hf):
    ds, _ = small
    model, tok, _ = hf
    knn_kw = dict(probe=4, quiet=True, k=16, lmbda=0.5, knn_temp=1.0)
    before = knnlm.KNNLM(model, ds, **knn_kw).perplexity([FACT], tokens_per_sample=64)
    grown = ds.add([FACT] * 3)
    after = knnlm.KNNLM(model, grown, **knn_kw).perplexity([FACT], tokens_per_sample=64)
    assert after["ppl"] == pytest.approx(before["ppl"], rel=1e-9)      # the LM is the LM
    assert after["interpolated"]["ppl"] < 0.5 * before["interpolated"]["ppl"]


def test_tuned_settings_follow_a_grown_datastore(small, hf, held_out, tmp_path, capsys):
    ds, _ = small
    model, tok, model_dir = hf
    (tmp_path / "valid.txt").write_text("".join(t + "\n" for t in held_out[:10]))
    assert run(["preprocess", "--validpref", str(tmp_path / "valid.txt"), "--hf-tokenizer",
                str(model_dir), "--destdir", str(tmp_path / "db"), "--quiet"]) == 0
    assert run(["tune", str(tmp_path / "db"), "--hf-model", str(model_dir), "--dstore-filename",
                str(ds.path), "--probe", "4", "--tokens-per-sample", "64", "--lmbda", "0:1:0.25",
                "--knn-temp", "1,2", "--k", "8", "--quiet"]) == 0
    tuned = json.loads((ds.path / "index_att_l2.faiss.tuned.json").read_text())
    grown = ds.add([FACT])
    after = json.loads((ds.path / "index_att_l2.faiss.tuned.json").read_text())
    assert after["settings"] == tuned["settings"]
    assert after["grown_since"] == {"datastore_size": ds.size}
    assert after["identity"]["datastore_fingerprint"] == grown.fingerprint
    capsys.readouterr()
    knn = knnlm.KNNLM(model, grown, probe=4)
    assert knn.settings["tuned_file"] is not None and knn.opts.lmbda == tuned["settings"]["lmbda"]
    assert f"tuned when the datastore held {ds.size:,} entries" in capsys.readouterr().out


def test_a_killed_add_resumes_to_the_same_bytes(small, hf, texts, tmp_path):
    """Killed before any of its writes, the same add() run again gives the files of an
    add() never killed (JSON timings aside)."""
    import shutil
    from killpoints import Killed, kill_before_write, snapshot
    ds, _ = small
    model, _, _ = hf
    start = tmp_path / "start"
    shutil.copytree(ds.path, start)

    def fresh():
        shutil.rmtree(ds.path)
        shutil.copytree(start, ds.path)

    def norm():
        out = {}
        for path, digest in snapshot([ds.path]).items():
            if path.endswith(".json"):
                obj = json.loads(Path(path).read_text())
                for k in ("seconds", "train_s", "add_s"):
                    obj.pop(k, None)
                digest = json.dumps(obj, sort_keys=True)
            out[path] = digest
        return out
    from pathlib import Path
    knnlm.Datastore.load(ds.path).add(texts[30:40], model, quiet=True)
    want = norm()
    n = 0
    for n in range(1, 100):
        fresh()
        with kill_before_write(n) as st:
            try:
                knnlm.Datastore.load(ds.path).add(texts[30:40], model, quiet=True)
            except Killed:
                pass
        if not st["killed"]:
            break
        knnlm.Datastore.load(ds.path).add(texts[30:40], model, quiet=True)
        got = norm()
        assert got == want, (n, sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k)))
    assert n > 5
