"""An index kept in shards searched by several ranks when things go wrong: a shard missing
on one rank, a rank killed, a run killed mid-search. Every rank stops with one line (no
hang), and the rerun with the same retrieval cache finishes with the results of one that
was never stopped."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from knnlm.cli import run as cli_run
from knnlm.knn import index, index_read
from knnlm.util import UserError
from test_hf import hf_databin, hf_tokenizer_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def build(ds, out, **kw):
    cfg = index.BuildIndexConfig(dstore_dir=str(ds.path), faiss_index=str(out), seed=1,
                                 quiet=True, **kw)
    return index.main(cfg)


@pytest.fixture
def sharded(bpe_databin, trained_ckpt, trained_dstore, tmp_path):
    """An index kept in 3 shards, and the reference: one process, the merged index."""
    ds = trained_dstore
    build(ds, tmp_path / "one.faiss", index_factory="IVF16,Flat", metric="l2")
    build(ds, tmp_path / "kept.faiss", index_factory="IVF16,Flat", metric="l2", shards=3,
          keep_shards=True)
    argv = ["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--gen-subset",
            "valid", "--tokens-per-sample", "64", "--knnlm", "--k", "16", "--probe", "4",
            "--dstore-filename", str(ds.path), "--lmbda", "0.25", "--knn-temp", "1",
            "--knn-sim-func", "do_not_recomp_l2", "--cpu", "--quiet"]
    assert cli_run(argv + ["--indexfile", str(tmp_path / "one.faiss"), "--results-path",
                           str(tmp_path / "one.json")]) == 0
    ref = json.loads((tmp_path / "one.json").read_text())["results"]
    return argv + ["--indexfile", str(tmp_path / "kept.faiss"), "--save-retrieval",
                   str(tmp_path / "cache"), "--results-path", str(tmp_path / "two.json")], ref


def env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def torchrun(argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), "-m", "knnlm", *argv],
                          env=env(), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("knnlm eval-lm: error:")]


def finished_as_reference(tmp_path, ref):
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert two["interpolated"]["ppl"] == pytest.approx(ref["interpolated"]["ppl"], rel=1e-3)
    assert two["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)


def test_missing_shard_on_one_rank_stops_every_rank(sharded, tmp_path):
    """Rank 1's shard file is missing: rank 1 says so, rank 0 stops with rank 1's reason
    (one line each, no traceback from knnlm, no hang); with the file back, the rerun
    finishes with the merged index's results."""
    argv, ref = sharded
    shard = tmp_path / "kept.faiss.shard1of3"
    shard.rename(tmp_path / "aside")
    t0 = time.monotonic()
    p = torchrun(argv, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 110
    lines = error_lines(p.stderr)
    assert len(lines) == 2, p.stderr[-3000:]
    assert any("shard kept.faiss.shard1of3 is missing (rank 1 of 2 searches it)" in line
               and "stopped" not in line for line in lines)
    assert any("stopped" in line and "rank 1: " in line and "shard1of3 is missing" in line
               for line in lines)
    assert "knnlm/evaluate.py" not in p.stderr and "knnlm/distributed.py" not in p.stderr
    assert not (tmp_path / "two.json").exists()
    (tmp_path / "aside").rename(shard)
    p = torchrun(argv)
    assert p.returncode == 0, p.stderr[-3000:]
    finished_as_reference(tmp_path, ref)


def launch(argv, rank: int, port: int, log: Path, timeout: float = 5, out=os.devnull):
    """A rank started by hand (no torchrun agent to stop the others): rank 0 hosts the
    rendezvous store."""
    e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-m", "knnlm", *argv, "--heartbeat-timeout",
                             str(timeout)], env=e, stdout=open(out, "w"),
                            stderr=open(log, "w"))


def kill_one(procs, victim: int, logs: list[Path], command: str) -> tuple[int, str, list]:
    """SIGKILL rank ``victim``; the survivor's exit status, stderr and error lines."""
    try:
        procs[victim].send_signal(signal.SIGKILL)
        rc = procs[1 - victim].wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err = logs[1 - victim].read_text()
    return rc, err, [line for line in err.splitlines()
                     if line.startswith(f"knnlm {command}: error:")]


def wait_for(path: Path, proc, limit: float = 120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, "the rank ended before it got there"
        assert time.monotonic() - t0 < limit, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_stops_the_other_and_the_rerun_resumes(sharded, tmp_path, victim):
    """Ranks launched by hand, so no launcher stops the survivor: rank 1 SIGKILLed once
    the LM pass is under way leaves rank 0 waiting for a heartbeat that never comes; it
    stops after --heartbeat-timeout with one line. Rank 0 (the store's host) killed leaves
    rank 1 without its store: one line. The rerun under torchrun keeps the LM pass and
    finishes with the merged index's results."""
    argv, ref = sharded
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [launch(argv, r, port, logs[r]) for r in range(2)]
    try:
        wait_for(tmp_path / "cache" / "exact_search" / "lm_pass.json", procs[0])
    finally:                                   # on failure, no rank left behind
        rc, err, lines = kill_one(procs, victim, logs, "eval-lm")
    assert rc == 2 and len(lines) == 1, err[-3000:]
    if victim == 1:
        assert "rank 1 stopped responding (no heartbeat for 5 s" in lines[0]
    else:
        assert "lost the rendezvous store at 127.0.0.1:" in lines[0]
    assert "Traceback" not in err
    p = torchrun(argv)
    assert p.returncode == 0, p.stderr[-3000:]
    finished_as_reference(tmp_path, ref)


class Killed(Exception):
    pass


def test_shard_search_resumes_after_a_kill(trained_dstore, tmp_path, monkeypatch):
    """search_every with a state directory, killed after its second block: the rerun
    searches only the blocks not committed and returns what an unbroken search does."""
    ds = trained_dstore
    build(ds, tmp_path / "kept.faiss", index_factory="IVF16,Flat", metric="l2", shards=2,
          keep_shards=True)
    idx, _ = index_read.load_index(tmp_path / "kept.faiss", ds, "att", nprobe=4)
    xq = np.asarray(ds.keys("att")[::7], dtype=np.float32)[:1000] + 0.01
    D0, I0 = idx.search_every(xq, 8, block=256)
    searched, kill_at = [], [3]
    real = index_read.ShardedIndex.search

    def killed(self, q, k):
        searched.append(len(q))
        if len(searched) == kill_at[0]:
            kill_at[0] = 0
            raise Killed
        return real(self, q, k)
    monkeypatch.setattr(index_read.ShardedIndex, "search", killed)
    with pytest.raises(Killed):
        idx.search_every(xq, 8, state_dir=tmp_path / "state", identity=dict(a=1), block=256)
    searched.clear()
    D1, I1 = idx.search_every(xq, 8, state_dir=tmp_path / "state", identity=dict(a=1),
                              block=256)
    assert searched == [256, 232]                     # blocks 3 and 4 only
    assert np.array_equal(D0, D1) and np.array_equal(I0, I1)
    searched.clear()                                  # other identity: from the start
    D2, _ = idx.search_every(xq, 8, state_dir=tmp_path / "state", identity=dict(a=2),
                             block=256)
    assert searched == [256, 256, 256, 232] and np.array_equal(D0, D2)
    shutil.rmtree(tmp_path / "state")


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF32,PQ8"])
def test_torch_backend_searches_kept_shards(trained_dstore, tmp_path, factory):
    """--knn-backend torch over an index kept in shards (what a GPU rank runs, here on the
    CPU): each shard's data in the torch backend, the lists merged as FAISS's are."""
    from types import SimpleNamespace
    import torch
    from knnlm.knn.search import place_index
    ds = trained_dstore
    build(ds, tmp_path / "kept.faiss", index_factory=factory, metric="l2", shards=3,
          keep_shards=True)
    idx, _ = index_read.load_index(tmp_path / "kept.faiss", ds, "att", nprobe=4)
    xq = np.asarray(ds.keys("att")[::97], dtype=np.float32) + 0.01
    cfg = SimpleNamespace(retomaton=False, knn_backend="torch", knnlm_gpu=False)
    placed, backend = place_index(idx, cfg, torch.device("cpu"))
    assert backend == "torch (cpu; 3 of 3 shards, top-k merged)"
    D0, I0 = idx.search(xq, 16)
    D1, I1 = placed.search(xq, 16)
    assert np.allclose(D0, D1, rtol=1e-4, atol=1e-3)
    # PQ codes repeat (equal distances): neighbours whose distance no other has must agree
    gap = np.diff(D0, axis=1) > 1e-3
    alone = np.concatenate([gap[:, :1], gap[:, 1:] & gap[:, :-1], gap[:, -1:]], axis=1)
    assert alone.mean() > 0.3 and np.mean(I0[alone] == I1[alone]) > 0.995
    with pytest.raises(UserError, match="--knn-backend torch"):
        place_index(idx, SimpleNamespace(retomaton=False, knn_backend="faiss", knnlm_gpu=True),
                    torch.device("cpu"))


def test_commands_that_search_as_they_go_share_the_shards(sharded, bpe_databin, trained_ckpt,
                                                         trained_dstore, tmp_path):
    """Under torchrun, eval-lm without a retrieval cache, generate, neighbors and tune
    search every rank's shards batch by batch (rank 0 runs the command, rank 1 answers):
    what one process with the merged index gives (greedy continuation, neighbours,
    perplexity, tuned settings)."""
    argv, ref = sharded
    ds = str(trained_dstore.path)
    knn = ["--dstore-filename", ds, "--k", "16", "--probe", "4", "--knn-sim-func",
           "do_not_recomp_l2", "--cpu"]
    common = [str(bpe_databin.path), "--path", str(trained_ckpt)]

    def both(cmd, extra, out_flag, name):
        one = [cmd, *common, *knn, *extra, "--indexfile", str(tmp_path / "one.faiss")]
        assert cli_run(one + [out_flag, str(tmp_path / f"{name}1.json")]) == 0
        p = torchrun([cmd, *common, *knn, *extra, "--indexfile", str(tmp_path / "kept.faiss"),
                      out_flag, str(tmp_path / f"{name}2.json")])
        assert p.returncode == 0, p.stderr[-3000:]
        assert "searched by 2 ranks" in p.stdout + p.stderr
        return [json.loads((tmp_path / f"{name}{i}.json").read_text()) for i in (1, 2)]

    a, b = both("generate", ["--knnlm", "--prompt", "the king", "--max-new-tokens", "12",
                             "--lmbda", "0.5", "--knn-temp", "1"], "--results-path", "gen")
    assert a["results"][0]["ids"] == b["results"][0]["ids"]
    a, b = both("eval-lm", ["--knnlm", "--gen-subset", "valid", "--tokens-per-sample", "64",
                            "--lmbda", "0.25", "--knn-temp", "1", "--max-eval-tokens", "600",
                            "--quiet"], "--results-path", "eval")
    assert b["results"]["interpolated"]["ppl"] == pytest.approx(
        a["results"]["interpolated"]["ppl"], rel=1e-4)
    one = ["neighbors", *common, *knn, "--text", "the king is", "--json"]
    p1 = subprocess.run([sys.executable, "-m", "knnlm", *one, "--indexfile",
                         str(tmp_path / "one.faiss")], env=env(), capture_output=True, text=True)
    p2 = torchrun([*one, "--indexfile", str(tmp_path / "kept.faiss")])
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    rows1 = json.loads(p1.stdout)["positions"]
    rows2 = json.loads(p2.stdout[p2.stdout.index("{"):])["positions"]
    d1 = [[nb["distance"] for nb in r["neighbors"]] for r in rows1]
    d2 = [[nb["distance"] for nb in r["neighbors"]] for r in rows2]
    assert np.allclose(d1, d2, rtol=1e-5)
    tune = ["tune", *common, "--dstore-filename", ds, "--probe", "4", "--lmbda", "0.1,0.5",
            "--knn-temp", "1,3", "--k", "8,16", "--score", "faiss", "--max-eval-tokens", "600",
            "--cpu", "--quiet"]
    assert cli_run(tune + ["--indexfile", str(tmp_path / "one.faiss"), "--results-path",
                           str(tmp_path / "tune1.json")]) == 0
    p = torchrun(tune + ["--indexfile", str(tmp_path / "kept.faiss"), "--results-path",
                         str(tmp_path / "tune2.json")])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"tune{i}.json").read_text())["tuned"] for i in (1, 2))
    assert a["settings"] == b["settings"]
    assert b["heldout"]["ppl"] == pytest.approx(a["heldout"]["ppl"], rel=1e-4)
    # rank 1's shard missing: it says so, rank 0 stops with its reason
    (tmp_path / "kept.faiss.shard1of3").rename(tmp_path / "aside")
    p = torchrun(["generate", *common, *knn, "--knnlm", "--prompt", "the king", "--indexfile",
                  str(tmp_path / "kept.faiss")])
    (tmp_path / "aside").rename(tmp_path / "kept.faiss.shard1of3")
    lines = [x for x in p.stderr.splitlines() if x.startswith("knnlm generate: error:")]
    assert p.returncode != 0 and len(lines) == 2, p.stderr[-3000:]
    assert sum("rank 1: " in x and "shard1of3 is missing" in x for x in lines) == 1
    # a command that does not search, or an index not kept in shards: refused, one line
    p = torchrun(["generate", *common, "--prompt", "the king", "--cpu"])
    assert p.returncode != 0 and "shares out the search of an index kept in shards" in p.stderr


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_while_serving_stops_the_other(bpe_databin, trained_ckpt, trained_dstore,
                                                      tmp_path, victim):
    """generate over 2 ranks started by hand: rank 1 SIGKILLed between or inside batches
    leaves rank 0 with a collective that fails (one line: the rank that left); rank 0
    killed leaves rank 1 waiting for its next batch with no store (one line)."""
    ds = trained_dstore
    build(ds, tmp_path / "kept.faiss", index_factory="IVF16,Flat", metric="l2", shards=2,
          keep_shards=True)
    (tmp_path / "prompts.txt").write_text("the king\nmy lord\nthe queen\nand then\n" * 8)
    argv = ["generate", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
            "--dstore-filename", str(ds.path), "--indexfile", str(tmp_path / "kept.faiss"),
            "--k", "16", "--probe", "4", "--knn-sim-func", "do_not_recomp_l2", "--lmbda",
            "0.5", "--knn-temp", "1", "--cpu", "--prompts-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "500"]
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    out0 = tmp_path / "rank0.out"
    procs = [launch(argv, r, port, logs[r], out=out0 if r == 0 else os.devnull)
             for r in range(2)]
    try:
        t0 = time.monotonic()
        while "searched by 2 ranks" not in (out0.read_text() if out0.exists() else ""):
            assert procs[0].poll() is None and time.monotonic() - t0 < 120, logs[0].read_text()
            time.sleep(0.05)
        time.sleep(0.5)                        # into the generation
        assert procs[0].poll() is None, "generation ended before the kill"
    finally:                                   # on failure, no rank left behind
        rc, err, lines = kill_one(procs, victim, logs, "generate")
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if victim == 1:       # inside a batch, or between two (then rank 1's gather fails)
        assert "stopped: a rank left the shared search (connection" in lines[0]
    else:                 # waiting for a batch (its store gone), or inside one
        assert any(why in lines[0] for why in ("lost the rendezvous store", "stopped: rank 0 "
                                               "left the shared search (connection"))


SCRIPT = '''
import json, sys
import torch, transformers
from knnlm.hf_generate import KNNLogitsProcessor
from knnlm.knn.options import KnnOptions
from knnlm.knn.rank_search import sharing
root, index, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
opts = KnnOptions(knnlm=True, dstore_filename=root + "/ds", indexfile=index)
with sharing(opts, "the script") as leader:
    if leader:
        model = transformers.AutoModelForCausalLM.from_pretrained(root + "/model").eval()
        model.generation_config.eos_token_id = None
        proc = KNNLogitsProcessor(model, root + "/ds", indexfile=index, k=8, lmbda=0.5,
                                  knn_temp=1.0, probe=4)
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([ids]), logits_processor=[proc],
                                 max_new_tokens=10, do_sample=False)
        proc.close()
        json.dump(new.tolist(), open(out, "w"))
'''


def test_an_hf_script_under_torchrun_shares_the_shards(hf_databin, tmp_path):  # noqa: F811
    """A script of one's own around KNNLogitsProcessor, under torchrun with `sharing`:
    HF greedy generation with the kNN-LM over 2 ranks' shards equals the merged index's
    in one process."""
    import torch
    import transformers
    from knnlm import build_dstore
    from knnlm.knn.datastore import Datastore
    from test_hf import FAMILIES, tiny_config
    torch.manual_seed(0)
    getattr(transformers, FAMILIES["gpt2"][1])(
        tiny_config("gpt2", hf_databin.vocab_size)).eval().save_pretrained(tmp_path / "model")
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(hf_databin.path), hf_model=str(tmp_path / "model"),
        dstore_dir=str(tmp_path / "ds"), gen_subset="train", tokens_per_sample=64, quiet=True))
    ds = Datastore(tmp_path / "ds")
    build(ds, tmp_path / "one.faiss", index_factory="IVF16,Flat", metric="l2")
    build(ds, tmp_path / "kept.faiss", index_factory="IVF16,Flat", metric="l2", shards=2,
          keep_shards=True)
    (tmp_path / "script.py").write_text(SCRIPT)
    ids = json.dumps([hf_databin.eos, *map(int, hf_databin.vocab.encode_text("Enter the king"))])
    one = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path),
                          str(tmp_path / "one.faiss"), str(tmp_path / "one.json"), ids],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), str(tmp_path / "script.py"),
                          str(tmp_path), str(tmp_path / "kept.faiss"), str(tmp_path / "two.json"),
                          ids], env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "searched by 2 ranks" in two.stdout
    assert json.loads((tmp_path / "one.json").read_text()) == \
        json.loads((tmp_path / "two.json").read_text())
