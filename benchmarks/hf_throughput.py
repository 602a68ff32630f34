"""eval-lm and build-dstore throughput over an HF model, against a bare ``model(x)`` loop
over the same windows and batches (JSON output).

Measures, alternating the three so that machine noise hits each:
- bare: ``model.hf(input_ids=x).logits`` (HF's own forward, LM head included), then the
  log-softmax + target gather any perplexity needs;
- eval-lm (``knnlm.evaluate.eval_tokens``: blocking, the LM head in softmax chunks, target
  log-probs, word counts);
- build-dstore (``knnlm.build_dstore.build_dstore``: the ``att`` hook, fp16 keys and values
  written to a memmap);
and reports eval / bare and build-dstore / bare (target >= 0.90 each). Defaults read the
outputs of ``make demo-hf`` (SmolLM2-135M-Instruct on Shakespeare).

    python benchmarks/hf_throughput.py --hf-model runs/demo-smollm2/model \\
        --data runs/demo-smollm2/data-bin --out benchmarks/results/hf_throughput.json
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, write_result  # noqa: E402
from knnlm import build_dstore, evaluate  # noqa: E402
from knnlm.data.blocks import batch_windows, score_windows, shifted_inputs  # noqa: E402
from knnlm.data.preprocess import DataBin  # noqa: E402
from knnlm.lm.checkpoint import load_lm  # noqa: E402


def bare_loop(hf, tokens, eos, pad, windows, max_tokens) -> float:
    """HF's forward over the same batches, plus the normalisation and target gather."""
    batches = []
    for batch in batch_windows(windows, max_tokens):
        L = max(w.length for w in batch)
        x = np.full((len(batch), L), pad, dtype=np.int64)
        y = np.zeros((len(batch), L), dtype=np.int64)
        for b, w in enumerate(batch):
            x[b, :w.length] = shifted_inputs(tokens, eos, w.ctx_start, w.end)
            y[b, :w.length] = tokens[w.ctx_start:w.end]
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in batches:
            torch.log_softmax(hf(input_ids=x).logits.float(), -1).gather(-1, y[..., None])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-model", default="runs/demo-smollm2/model")
    ap.add_argument("--data", default="runs/demo-smollm2/data-bin")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of train scored / dumped")
    ap.add_argument("--tokens-per-sample", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/hf_throughput.json")
    a = ap.parse_args()
    databin = DataBin(a.data)
    device = torch.device("cpu")
    model, fingerprint = load_lm(None, a.hf_model, databin, device)
    tokens = databin.split("train")[:a.tokens]
    n, T = len(tokens), a.tokens_per_sample
    windows = score_windows(n, T, 0)
    ecfg = evaluate.EvalConfig(data=a.data, hf_model=a.hf_model, gen_subset="train",
                               tokens_per_sample=T, context_window=0, max_tokens=a.max_tokens,
                               quiet=True)
    work = Path(tempfile.mkdtemp(prefix="knnlm-hfbench-"))
    dcfg = build_dstore.BuildDstoreConfig(data=a.data, hf_model=a.hf_model,
                                          dstore_dir=str(work / "ds"), gen_subset="train",
                                          knn_keytype="att", tokens_per_sample=T,
                                          context_window=0, max_tokens=a.max_tokens,
                                          max_dstore_tokens=n, quiet=True)
    bare_s, eval_s, dstore_s = [], [], []
    bare_loop(model.hf, tokens, databin.eos, databin.pad, windows[:2], a.max_tokens)  # warm-up
    try:
        for _ in range(a.reps):
            bare_s.append(bare_loop(model.hf, tokens, databin.eos, databin.pad, windows,
                                    a.max_tokens))
            eval_s.append(evaluate.eval_tokens(model, tokens, databin, ecfg, device)["seconds"])
            shutil.rmtree(work / "ds", ignore_errors=True)
            t0 = time.perf_counter()
            build_dstore.build_dstore(model, databin, dcfg, device, fingerprint)
            dstore_s.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in dict(bare=bare_s, eval=eval_s,
                                                    dstore=dstore_s).items()}
    out = dict(benchmark="hf_throughput", machine=machine() | dict(torch=torch.__version__,
                                                                    threads=torch.get_num_threads()),
               config=vars(a), model_type=model.cfg.model_type,
               params=sum(p.numel() for p in model.hf.parameters()), tokens=n,
               bare_tokens_per_s=n / med["bare"], eval_tokens_per_s=n / med["eval"],
               dstore_tokens_per_s=n / med["dstore"], eval_over_bare=med["bare"] / med["eval"],
               dstore_over_bare=med["bare"] / med["dstore"],
               runs=dict(bare_s=bare_s, eval_s=eval_s, dstore_s=dstore_s))
    write_result(a.out, out)


if __name__ == "__main__":
    main()
