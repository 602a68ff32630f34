"""Bad input over every command, table-driven: each case exits 2 with exactly one stderr
line and no traceback, and leaves every artifact that was there byte for byte. Also: a
second writer on one output is refused, and a full disk is one line that damages nothing."""
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnlm import evaluate
from knnlm.cli import run
from knnlm.guard import output_lock
from knnlm.knn import index

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(bpe_databin, trained_ckpt, trained_dstore, tmp_path_factory):
    """Artifacts a user already has, and bad files to hand the commands."""
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(bpe_databin.path, w / "db")
    shutil.copy(trained_ckpt, w / "ckpt.pt")
    shutil.copytree(trained_dstore.path, w / "ds", ignore=shutil.ignore_patterns("index_*"))
    index.build_index(index.BuildIndexConfig(dstore_dir=str(w / "ds"), knn_keytype="att",
                                             index_factory="IVF32,PQ8", train_size=4000,
                                             quiet=True))
    evaluate.main(evaluate.EvalConfig(
        data=str(w / "db"), path=str(w / "ckpt.pt"), gen_subset="valid", tokens_per_sample=64,
        knnlm=True, dstore_filename=str(w / "ds"), k=16, probe=8, lmbda=0.25, knn_temp=1.0,
        save_retrieval=str(w / "cache"), results_path=str(w / "results.json"),
        max_eval_tokens=500, quiet=True))
    (w / "afile.txt").write_text("a file, where a directory is expected\n")
    (w / "adir").mkdir()
    (w / "bad.txt").write_bytes("good text\nthen Latin-1: caf\xe9\n".encode("latin-1"))
    (w / "bin.txt").write_bytes(b"text\x00\x01\x02binary")
    (w / "empty.txt").write_text("")
    (w / "good.txt").write_text("To be, or not to be\n")
    with open(w / "evil.pt", "wb") as fh:
        pickle.dump({"format": "knnlm-checkpoint", "x": os.getcwd}, fh)
    # a data-bin whose valid split is empty
    shutil.copytree(w / "db", w / "db_empty")
    meta = json.loads((w / "db_empty" / "data.json").read_text())
    np.save(w / "db_empty" / "valid.npy", np.zeros(0, dtype=meta["splits"]["valid"]["dtype"]))
    meta["splits"]["valid"]["tokens"] = 0
    (w / "db_empty" / "data.json").write_text(json.dumps(meta))
    (w / "long").mkdir()
    return w


def snapshot(root: Path) -> dict:
    """Every path under ``root``: a file's hash, a directory as such (a refused run must
    leave no new file, lock or directory behind)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def cases(w: Path) -> list[list[str]]:
    db, ck, ds, cache = str(w / "db"), str(w / "ckpt.pt"), str(w / "ds"), str(w / "cache")
    af, ad, out = str(w / "afile.txt"), str(w / "adir"), str(w / "new")
    ev = ["eval-lm", db, "--path", ck, "--gen-subset", "valid", "--quiet",
          "--tokens-per-sample", "64", "--max-eval-tokens", "200"]
    kn = ev + ["--knnlm", "--dstore-filename", ds, "--k", "8", "--probe", "4"]
    bd = ["build-dstore", db, "--path", ck, "--gen-subset", "valid", "--tokens-per-sample", "64",
          "--quiet"]
    bi = ["build-index", "--dstore-dir", ds, "--quiet"]
    tr = ["train", db, "--arch", "tiny", "--max-update", "2", "--save-dir", out + "_ckpt",
          "--quiet"]
    sw = ["sweep", "--cache", cache, "--quiet"]
    tu = ["tune", db, "--path", ck, "--dstore-filename", ds, "--quiet",
          "--tokens-per-sample", "64", "--max-eval-tokens", "200", "--probe", "4"]
    an = ["analyze", db, "--path", ck, "--dstore-filename", ds, "--results-dir", out + "_an",
          "--quiet"]
    ge = ["generate", db, "--path", ck, "--max-new-tokens", "3"]
    ne = ["neighbors", db, "--path", ck, "--dstore-filename", ds, "--probe", "4", "--k", "2"]
    al = ["allot-embeddings", db]
    txt = ["data", "fetch", "text", "--dest", out + "_corpus", "--valid", str(w / "good.txt"),
           "--test", str(w / "good.txt")]
    pre = ["preprocess", "--destdir", out + "_bin", "--vocab-size", "300"]
    long_name = str(w / "long" / ("x" * 300))
    return [
        # data fetch
        ["data", "fetch", "imagenet", "--dest", out],
        ["data", "fetch", "text", "--dest", out, "--train", str(w / "good.txt")],
        txt + ["--train", str(w / "missing.txt")],
        txt + ["--train", str(w / "bin.txt")],
        txt + ["--train", str(w / "bad.txt")],
        txt + ["--train", str(w / "empty.txt")],
        txt + ["--train", str(w / "bad.txt"), "--encoding", "no-such-codec"],
        txt + ["--train", str(w / "good.txt"), "--errors", "sometimes"],
        ["data", "fetch", "text", "--dest", af, "--train", str(w / "good.txt"), "--valid",
         str(w / "good.txt"), "--test", str(w / "good.txt")],
        ["data", "fetch", "shakespeare", "--dest", out, "--from", str(w / "none.tar.gz")],
        # preprocess
        ["preprocess", "--destdir", out + "_bin"],
        pre + ["--trainpref", str(w / "missing.txt")],
        pre + ["--trainpref", str(w / "bad.txt")],
        pre + ["--trainpref", str(w / "bin.txt")],
        pre + ["--trainpref", str(w / "empty.txt")],
        pre + ["--trainpref", str(w / "good.txt"), "--validpref", str(w / "bad.txt")],
        ["preprocess", "--destdir", af, "--trainpref", str(w / "good.txt")],
        ["preprocess", "--destdir", db, "--trainpref", str(w / "bad.txt")],
        pre + ["--trainpref", str(w / "good.txt"), "--hf-tokenizer", ad],
        pre + ["--trainpref", str(w / "good.txt"), "--tokenizer", str(w / "no.json")],
        pre + ["--trainpref", str(w / "good.txt"), "--vocab-size", "abc"],
        # train
        tr + ["--lr", "nan"],
        tr + ["--lr", "inf"],
        tr + ["--max-update", "-1"],
        tr + ["--decoder-layers", "0"],
        tr + ["--decoder-embed-dim", "30", "--decoder-attention-heads", "4"],
        tr + ["--dropout", "1.5"],
        tr + ["--arch", "gigantic"],
        tr + ["--stop-time-hours", "nan"],
        tr + ["--max-tokens", "0"],
        tr + ["--restore-file", str(w / "missing.pt"), "--finetune-out-embed"],
        tr + ["--restore-file", str(w / "evil.pt")],
        tr + ["--num-extra-embed-file", str(w / "bad.txt")],
        ["train", db, "--arch", "tiny", "--max-update", "2", "--save-dir", af],
        ["train", str(w / "db_empty"), "--arch", "tiny", "--max-update", "2", "--save-dir",
         out + "_ck2"],
        ["train", str(w / "nope"), "--max-update", "2"],
        # eval-lm
        ["eval-lm", db, "--gen-subset", "valid"],
        ["eval-lm", db, "--path", str(w / "missing.pt")],
        ["eval-lm", db, "--path", af],
        ["eval-lm", db, "--path", str(w / "evil.pt")],
        ["eval-lm", str(w / "db_empty"), "--path", ck, "--gen-subset", "valid"],
        ev + ["--gen-subset", "dev"],
        ev + ["--tokens-per-sample", "0"],
        ev + ["--context-window", "-1"],
        ev + ["--context-window", "9999"],
        ev + ["--results-path", ad],
        ev + ["--results-path", long_name],
        ev + ["--save-scores", ad],
        ev + ["--save-tokens", ad],
        ev + ["--max-eval-tokens", "-1"],
        ev + ["--fp16", "--bf16"],
        ev + ["--sample-break-mode", "sometimes"],
        ev + ["--knnlm"],
        ev + ["--knnlm", "--dstore-filename", str(w / "nods")],
        kn + ["--lmbda", "1.5"],
        kn + ["--lmbda", "nan"],
        kn + ["--knn-temp", "0"],
        kn + ["--knn-temp", "inf"],
        kn + ["--k", "0"],
        kn + ["--k", "10000000"],
        kn + ["--probe", "0"],
        kn + ["--faiss-metric-type", "ip"],
        kn + ["--indexfile", af],
        kn + ["--knn-sim-func", "cosine"],
        kn + ["--save-retrieval", af],
        kn + ["--save-knn-scores", ad],
        kn + ["--no-load-keys"],
        kn + ["--knnlm-gpus", "-1"],
        # build-dstore
        bd + ["--dstore-dir", af],
        bd + ["--dstore-dir", out + "_ds", "--knn-keytype", "bogus"],
        bd + ["--dstore-dir", out + "_ds", "--knn-keytype", "layer:99"],
        bd + ["--dstore-dir", out + "_ds", "--dstore-size", "5"],
        bd + ["--dstore-dir", out + "_ds", "--max-dstore-tokens", "-1"],
        bd + ["--dstore-dir", out + "_ds", "--tokens-per-sample", "0"],
        bd + ["--dstore-dir", out + "_ds", "--knn-keytype", "att,att"],
        ["build-dstore", str(w / "db_empty"), "--path", ck, "--gen-subset", "valid",
         "--dstore-dir", out + "_ds2"],
        ["build-dstore", db, "--path", str(w / "evil.pt"), "--dstore-dir", out + "_ds3"],
        # build-index
        ["build-index", "--dstore-dir", str(w / "nods")],
        bi + ["--knn-keytype", "bogus"],
        bi + ["--index-factory", "IVF999999,PQ8", "--faiss-index", out + ".faiss"],
        bi + ["--index-factory", "Bogus42", "--faiss-index", out + ".faiss"],
        bi + ["--index-factory", "IVF16,PQ7", "--faiss-index", out + ".faiss"],
        bi + ["--index-factory", "IVF16,PQ8", "--train-size", "5", "--faiss-index", out + ".faiss"],
        bi + ["--faiss-index", ad],
        bi + ["--train-size", "0"],
        bi + ["--probe", "0"],
        bi + ["--metric", "cosine"],
        bi + ["--dimension", "5", "--faiss-index", out + ".faiss"],
        bi + ["--shards", "0"],
        # plan
        ["plan"],
        ["plan", "--dstore-size", "0", "--dimension", "8"],
        ["plan", "--dstore-size", "1000", "--dimension", "-1"],
        # sweep
        ["sweep", "--cache", str(w / "nocache")],
        ["sweep", "--cache", af],
        sw + ["--lmbda", "0:1:1e-7"],
        sw + ["--knn-temp", "nan"],
        sw + ["--knn-temp", "0"],
        sw + ["--lmbda", "2"],
        sw + ["--k", "99999"],
        sw + ["--score", "bogus"],
        sw + ["--out", af],
        sw + ["--score-files", str(w / "x.npy")],
        ["sweep", "--cache", cache, "--score-files", "a.npy,b.npy", "--out", out],
        ["sweep", "--cache", str(w / "ds")],
        # tune
        ["tune", db, "--path", ck],
        tu + ["--k", "10000000"],
        tu + ["--knn-temp", "0,1"],
        tu + ["--lmbda", "nan"],
        tu + ["--exact-search", "--score", "exact"],
        tu + ["--results-path", ad],
        # analyze
        an[:5] + [str(w / "nods"), *an[6:]],
        an + ["--head", f"x={w / 'nope.pt'}"],
        an + ["--head", "no_equals_sign"],
        an + ["--parts", "bogus"],
        an + ["--parts", "overfit"],
        an + ["--overfit-dir", str(w)],
        an + ["--overfit-train-tokens", "0"],
        an[:7] + [af, "--quiet"],
        an + ["--subsample", "2"],
        an + ["--k", "0"],
        an + ["--lmbda", "0:1:1e-9"],
        # allot-embeddings
        al + ["--out", out + ".json", "--total-ratio", "nan"],
        al + ["--out", out + ".json", "--total-ratio", "inf"],
        al + ["--out", out + ".json", "--total-ratio", "0.5"],
        al + ["--out", ad],
        al + ["--out", out + ".json", "--by", "loss"],
        al + ["--out", out + ".json", "--by", "loss", "--scores", str(w / "missing.npy")],
        # generate
        ge + ["--prompts-file", str(w / "bad.txt")],
        ge + ["--prompts-file", str(w / "bin.txt")],
        ge + ["--prompts-file", str(w / "empty.txt")],
        ge + ["--prompt", "To be", "--temperature", "nan"],
        ge + ["--prompt", "To be", "--max-new-tokens", "0"],
        ge + ["--prompt", "To be", "--sampling-topp", "2"],
        ge + ["--prompt", "To be", "--beam", "2"],
        ge + ["--prompt", "To be", "--results-path", ad],
        ge + ["--prompt", "To be", "--knnlm"],
        ge + ["--prompt", "To be", "--prompts-file", str(w / "good.txt")],
        # neighbors
        ne + ["--file", str(w / "bad.txt")],
        ne,
        ne + ["--text", "To be", "--context-tokens", "-1"],
        ne + ["--text", "To be", "--k", "0"],
        ["neighbors", db, "--path", ck, "--dstore-filename", str(w / "nods"), "--text", "To be"],
        # demo
        ["demo", "--max-update", "0"],
        ["demo", "--workdir", af],
        ["demo", "--dstore-tokens", "0"],
        ["demo", "--context-window", "999"],
        ["demo", "--hf", str(w / "nope.gguf"), "--workdir", out + "_demo",
         "--corpus-from", str(w / "none.tar.gz")],
    ]


def test_every_bad_input_is_one_line_and_damages_nothing(world, capsys):
    before = snapshot(world)
    table = cases(world)
    assert len(table) >= 100
    failures = []
    for argv in table:
        capsys.readouterr()
        try:
            rc = run(argv)
        except SystemExit as exc:        # argparse's own errors
            rc = exc.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or "Traceback" in err:
            failures.append((argv[:2], argv[-4:], rc, err[-300:]))
    assert not failures, "\n".join(map(str, failures))
    after = snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed"
    assert sorted(set(after) - set(before)) == [], "a refused run left files behind"


def test_a_second_writer_is_refused(world, tmp_path):
    """While one process holds an output, another writer is refused in one line naming
    it; once free, the same command gives the bytes a lone run gives."""
    argv = [sys.executable, "-m", "knnlm", "build-dstore", str(world / "db"), "--path",
            str(world / "ckpt.pt"), "--gen-subset", "valid", "--tokens-per-sample", "64",
            "--max-dstore-tokens", "600", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    lone = subprocess.run(argv + ["--dstore-dir", str(tmp_path / "lone")], env=env,
                          capture_output=True, text=True)
    assert lone.returncode == 0, lone.stderr
    with output_lock(tmp_path / "shared", "dir", "datastore"):
        busy = subprocess.run(argv + ["--dstore-dir", str(tmp_path / "shared")], env=env,
                              capture_output=True, text=True)
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert f"is being written by process {os.getpid()}" in busy.stderr
    assert not (tmp_path / "shared" / "keys_att.npy").exists()
    again = subprocess.run(argv + ["--dstore-dir", str(tmp_path / "shared")], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name in ("keys_att.npy", "vals.npy", "pos.npy"):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "lone" / name).read_bytes()


def test_a_full_disk_is_one_line_and_the_stage_resumes(world, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of eval-lm's cache: one line naming the file, the artifacts
    already there intact, and the rerun resumes to the same numbers as a lone run."""
    import knnlm.knn.cache as cache_mod
    base = ["eval-lm", str(world / "db"), "--path", str(world / "ckpt.pt"), "--gen-subset",
            "valid", "--tokens-per-sample", "64", "--max-eval-tokens", "400", "--max-tokens",
            "128", "--knnlm", "--dstore-filename", str(world / "ds"), "--k", "8", "--probe", "4",
            "--lmbda", "0.3", "--knn-temp", "2", "--quiet"]
    assert run(base + ["--save-retrieval", str(tmp_path / "lone"), "--results-path",
                       str(tmp_path / "lone.json")]) == 0
    before = snapshot(world)
    real = cache_mod.write_json_atomic
    calls = {"n": 0}

    def full_disk(path, obj):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)
    monkeypatch.setattr(cache_mod, "write_json_atomic", full_disk)
    capsys.readouterr()
    rc = run(base + ["--save-retrieval", str(tmp_path / "c"), "--results-path",
                     str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"knnlm eval-lm: error: no space left on the device: {tmp_path / 'c' / 'cache.json'}"]
    monkeypatch.setattr(cache_mod, "write_json_atomic", real)
    assert snapshot(world) == before
    assert run(base + ["--save-retrieval", str(tmp_path / "c"), "--results-path",
                       str(tmp_path / "c.json")]) == 0
    assert "resuming" in capsys.readouterr().out
    lone = json.loads((tmp_path / "lone.json").read_text())["results"]["interpolated"]["ppl"]
    again = json.loads((tmp_path / "c.json").read_text())["results"]["interpolated"]["ppl"]
    assert again == pytest.approx(lone, rel=1e-9)
