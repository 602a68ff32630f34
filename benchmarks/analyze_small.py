"""Wall time of `knnlm analyze` on the small mode of the shell pipeline, split by part and
by stage (index builds, kNN-LM evals, LM evals, sweeps, datastore subsets).

Needs the small mode's outputs: ``CORPUS=shakespeare ARCH=small KNNLM=.venv/bin/knnlm
RUN=runs/small bash wikitext_bpe_train.sh && ... bash wikitext_bpe_knn.sh``. The
analysis runs from scratch into a fresh results directory with its own indexes
(``--index-dir``), so the indexes the pipeline built are neither reused nor touched.

    python benchmarks/analyze_small.py --run runs/small --out benchmarks/results/analyze_small.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, write_result

HEADS = ("att", "att_kv3", "ffn_extra3v", "ffn_mos3", "att_addlin_interp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/small", help="run directory of the small mode")
    p.add_argument("--out", default="benchmarks/results/analyze_small.json")
    p.add_argument("--max-eval-tokens", type=int, default=10000)
    p.add_argument("--keep", action="store_true", help="keep the analysis outputs (RUN/bench_analyze)")
    a = p.parse_args()
    run = Path(a.run)
    work = run / "bench_analyze"
    if work.exists():
        shutil.rmtree(work)
    heads = ",".join(f"{h}={run}/heads/{h}/checkpoint_last.pt" for h in HEADS
                     if (run / "heads" / h / "checkpoint_last.pt").is_file())
    argv = [sys.executable, "-m", "knnlm", "analyze", str(run / "data-bin"),
            "--path", str(run / "checkpoints" / "checkpoint_best.pt"),
            "--dstore-filename", str(run / "dstore"), "--results-dir", str(work / "results"),
            "--index-dir", str(work / "indexes"), "--tokens-per-sample", "256",
            "--context-window", "128", "--max-eval-tokens", str(a.max_eval_tokens),
            "--k", "1024", "--probe", "8", "--large-probe", "128",
            "--index-factory", "IVF2048,PQ32", "--train-size", "100000", "--quiet"]
    if heads:
        argv += ["--head", heads]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    timings = json.loads((work / "results" / "timings.json").read_text())
    out = dict(benchmark="analyze_small", total_s=total, command=" ".join(argv[2:]),
               parts={k: v for k, v in timings.items() if not k.startswith("stage:")},
               stages={k[6:]: v for k, v in timings.items() if k.startswith("stage:")},
               max_eval_tokens=a.max_eval_tokens, heads=heads.count("=") if heads else 0,
               machine=machine())
    out["stages"]["other (model loading, statistics, reports)"] = total - sum(out["stages"].values())
    write_result(a.out, out, hide=("machine",))
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
