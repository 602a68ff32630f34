"""Datastore dump and index build against bare baselines, each stage in its own process
(JSON output).

- dump: ``knnlm build-dstore`` (att + ffn keys) vs a bare ``model(x)`` forward (the
  representations, no output layer) over the same windows and batches; ratio of
  throughputs (target >= 0.90);
- index: ``knnlm build-index`` vs raw FAISS ``index_factory`` + ``train`` (same sample) +
  ``add`` of all keys; ratio of wall times (target <= 1.10);
- dump with 2 torchrun processes (gloo) vs 1: wall time ratio (process start-up included)
  and whether the files are byte-identical;
- peak RSS (ru_maxrss) of every stage, each measured in a fresh process.

    python benchmarks/dstore_index.py --data runs/demo/data-bin \\
        --path runs/demo/checkpoints/checkpoint_best.pt --out benchmarks/results/dstore_index.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish_stage, machine, run_stage, write_result  # noqa: E402


def stage_bare(a) -> dict:
    import torch
    from knnlm.lm.checkpoint import load_checkpoint, model_from_checkpoint
    from knnlm.data.blocks import batch_windows, score_windows, shifted_inputs
    from knnlm.data.preprocess import DataBin
    db = DataBin(a.data)
    tokens = db.split(a.subset)
    n = len(tokens)
    model = model_from_checkpoint(load_checkpoint(a.path)).eval()
    batches = []
    for batch in batch_windows(score_windows(n, a.tps, a.ctx), a.max_tokens):
        L = max(w.length for w in batch)
        x = np.full((len(batch), L), db.pad, dtype=np.int64)
        for b, w in enumerate(batch):
            x[b, :w.length] = shifted_inputs(tokens, db.eos, w.ctx_start, w.end)
        batches.append(torch.from_numpy(x))
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)  # the representations (no output layer: a dump needs none)
    return dict(seconds=time.perf_counter() - t0, rows=n)


def stage_dump(a) -> dict:
    from knnlm import build_dstore
    from knnlm.data.preprocess import DataBin
    n = len(DataBin(a.data).split(a.subset))
    cfg = build_dstore.BuildDstoreConfig(data=a.data, path=a.path, dstore_dir=a.dstore,
                                         gen_subset=a.subset, knn_keytype="att,ffn",
                                         tokens_per_sample=a.tps, context_window=a.ctx,
                                         max_tokens=a.max_tokens, cpu=True, quiet=True)
    t0 = time.perf_counter()
    build_dstore.main(cfg)
    return dict(seconds=time.perf_counter() - t0, rows=n)


def stage_index(a) -> dict:
    import faiss  # noqa: F401  (imported before the clock starts, as in raw_faiss)
    from knnlm.knn import index
    cfg = index.BuildIndexConfig(dstore_dir=a.dstore, knn_keytype="att", index_factory=a.factory,
                                 faiss_index=a.dstore + "/bench.faiss", train_size=a.train_size,
                                 gpu="no", quiet=True)
    t0 = time.perf_counter()
    index.build_index(cfg)
    return dict(seconds=time.perf_counter() - t0)


def stage_raw_faiss(a) -> dict:
    import faiss
    from knnlm.knn.datastore import Datastore
    from knnlm.knn.index import training_sample
    ds = Datastore(a.dstore)
    keys = ds.keys("att")
    t0 = time.perf_counter()
    _, xt = training_sample(keys, a.train_size, 1)  # the same sample build-index draws
    idx = faiss.index_factory(ds.dim, a.factory, faiss.METRIC_L2)
    inner = faiss.downcast_index(idx)
    if hasattr(inner, "do_polysemous_training"):  # no polysemous training, as build-index
        inner.do_polysemous_training = False
    idx.train(xt)
    idx.add(np.asarray(keys, dtype=np.float32))
    faiss.write_index(idx, a.dstore + "/raw.faiss")
    return dict(seconds=time.perf_counter() - t0)


def dump_two_processes(a, out: str) -> dict:
    """The same dump through torchrun with 2 processes (gloo, one thread each)."""
    import os
    import subprocess
    from common import ROOT
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29561", "-m", "knnlm", "build-dstore", a.data, "--path", a.path,
            "--dstore-dir", out, "--gen-subset", a.subset, "--knn-keytype", "att,ffn",
            "--tokens-per-sample", str(a.tps), "--context-window", str(a.ctx),
            "--max-tokens", str(a.max_tokens), "--cpu", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return dict(seconds=time.perf_counter() - t0)


STAGES = dict(bare=stage_bare, dump=stage_dump, index=stage_index, raw_faiss=stage_raw_faiss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/demo/data-bin")
    ap.add_argument("--path", default="runs/demo/checkpoints/checkpoint_best.pt")
    ap.add_argument("--subset", default="valid")
    ap.add_argument("--tps", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--factory", default="IVF256,PQ32")
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--dstore", help=argparse.SUPPRESS)
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/dstore_index.json")
    a = ap.parse_args()
    if a.stage:
        finish_stage(STAGES[a.stage](a))
        return
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--data", a.data, "--path", a.path, "--subset", a.subset, "--tps", str(a.tps),
                "--ctx", str(a.ctx), "--max-tokens", str(a.max_tokens), "--factory", a.factory,
                "--train-size", str(a.train_size), "--dstore", str(Path(tmp) / "ds")]
        bare = run_stage(__file__, "bare", argv)
        dump = run_stage(__file__, "dump", argv)
        bare2 = run_stage(__file__, "bare", argv)   # bracket the dump: noise hits both
        raw = run_stage(__file__, "raw_faiss", argv)
        idx = run_stage(__file__, "index", argv)
        raw2 = run_stage(__file__, "raw_faiss", argv)
        dump2 = dump_two_processes(a, str(Path(tmp) / "ds2"))
        identical = all((Path(tmp) / "ds" / f).read_bytes() == (Path(tmp) / "ds2" / f).read_bytes()
                        for f in ("keys_att.npy", "keys_ffn.npy", "vals.npy", "pos.npy"))
    bare_s = min(bare["seconds"], bare2["seconds"])
    raw_s = min(raw["seconds"], raw2["seconds"])
    out = dict(
        machine=machine(),
        config={k: v for k, v in vars(a).items() if k not in ("stage", "dstore")},
        rows=dump["rows"],
        dump_tokens_per_s=dump["rows"] / dump["seconds"],
        bare_forward_tokens_per_s=bare["rows"] / bare_s,
        dump_over_bare=(dump["rows"] / dump["seconds"]) / (bare["rows"] / bare_s),
        dump_2proc_seconds=dump2["seconds"], dump_1proc_seconds=dump["seconds"],
        dump_2proc_over_1proc_time=dump2["seconds"] / dump["seconds"],
        dump_2proc_bytes_identical=identical,
        index_seconds=idx["seconds"], raw_faiss_seconds=raw_s,
        index_over_raw=idx["seconds"] / raw_s,
        peak_rss_mib=dict(bare=bare["peak_rss_mib"], dump=dump["peak_rss_mib"],
                          index=idx["peak_rss_mib"], raw_faiss=raw["peak_rss_mib"]),
        runs=dict(bare=[bare, bare2], dump=dump, raw_faiss=[raw, raw2], index=idx),
    )
    write_result(a.out, out)


if __name__ == "__main__":
    main()
