"""Training and eval-lm throughput of a model preset on this machine (JSON output).

Measures, in one run and on the same batches:
- training tokens/s (full update: forward, backward, optimizer step);
- eval-lm tokens/s (``knnlm.evaluate.eval_lm``: blocking, target log-probs, word counts);
- a bare loop over the same windows and batches: ``model(x)``, the output layer and the
  log-softmax + target gather that perplexity needs (and, for reference, the same loop
  without the normalisation);
and reports the ratio eval-lm / bare (target >= 0.90). Repetitions alternate the two so
that machine noise hits both; medians are reported.

    python benchmarks/train_eval_throughput.py --data runs/demo/data-bin --out result.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knnlm import evaluate  # noqa: E402
from knnlm.lm import train  # noqa: E402
from knnlm.data import preprocess  # noqa: E402
from knnlm.data.blocks import batch_windows, score_windows, shifted_inputs  # noqa: E402
from knnlm.data.preprocess import DataBin  # noqa: E402


def synthetic_databin(dest: Path) -> Path:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)]
    for split, n in dict(train=20000, valid=4000, test=100).items():
        lines = [" ".join(rng.choice(words, rng.integers(5, 20))) for _ in range(n)]
        (dest / f"{split}.txt").write_text("\n".join(lines) + "\n")
    preprocess.main(preprocess.PreprocessConfig(destdir=str(dest / "bin"), srcdir=str(dest),
                                                vocab_size=8000, quiet=True))
    return dest / "bin"


def bare_loop(model, tokens, eos, pad, windows, max_tokens, logprobs: bool) -> float:
    """A hand-written loop over the same batches: forward + output layer, and with
    ``logprobs`` the normalisation and target gather any perplexity needs."""
    batches = []
    for batch in batch_windows(windows, max_tokens):
        L = max(w.length for w in batch)
        x = np.full((len(batch), L), pad, dtype=np.int64)
        y = np.full((len(batch), L), 0, dtype=np.int64)
        for b, w in enumerate(batch):
            x[b, :w.length] = shifted_inputs(tokens, eos, w.ctx_start, w.end)
            y[b, :w.length] = tokens[w.ctx_start:w.end]
        batches.append((torch.from_numpy(x), torch.from_numpy(y)))
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in batches:
            f, _ = model(x)
            logits = model.output_layer(f)
            if logprobs:
                torch.log_softmax(logits, -1).gather(-1, y[..., None])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data-bin (default: runs/demo/data-bin, else synthetic)")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--tokens-per-sample", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=60000, help="tokens of valid scored")
    ap.add_argument("--train-updates", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/train_eval.json")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data = args.data or ("runs/demo/data-bin" if Path("runs/demo/data-bin/data.json").is_file()
                         else str(synthetic_databin(Path(tmp.name))))
    databin = DataBin(data)
    T = args.tokens_per_sample

    # ---- training throughput
    with tempfile.TemporaryDirectory() as save:
        cfg = train.TrainConfig(data=data, arch=args.arch, save_dir=save, tokens_per_sample=T,
                                max_tokens=4096, max_update=10 ** 9, quiet=True, cpu=True)
        trainer = train.Trainer(cfg)
        batches = train.epoch_batches(trainer.blocks, 1, 1, cfg.max_tokens, None, T)
        trainer.train_step([batches[0]])  # warm-up
        t0 = time.perf_counter()
        ntok = 0
        for i in range(args.train_updates):
            ntok += trainer.train_step([batches[1 + i]])[1]
        train_tps = ntok / (time.perf_counter() - t0)
        model = trainer.model

    # ---- eval-lm vs bare forward on the same windows
    tokens = databin.split("valid")
    n = min(len(tokens), args.eval_tokens)
    view = tokens[:n]
    windows = score_windows(n, T, 0)
    ecfg = evaluate.EvalConfig(data=data, path="-", gen_subset="valid", tokens_per_sample=T,
                               max_tokens=args.max_tokens, quiet=True)

    eval_s, bare_s, logits_s = [], [], []
    for _ in range(args.reps):
        bare_s.append(bare_loop(model, view, databin.eos, databin.pad, windows, args.max_tokens, True))
        eval_s.append(evaluate.eval_tokens(model, view, databin, ecfg, torch.device("cpu"))["seconds"])
        logits_s.append(bare_loop(model, view, databin.eos, databin.pad, windows, args.max_tokens, False))
    eval_tps, bare_tps = n / statistics.median(eval_s), n / statistics.median(bare_s)
    logits_tps = n / statistics.median(logits_s)
    out = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpus=os.cpu_count(), torch=torch.__version__,
                     threads=torch.get_num_threads()),
        config=vars(args) | dict(data=data),
        params=sum(p.numel() for p in model.parameters()),
        train_tokens_per_s=train_tps,
        eval_tokens_per_s=eval_tps,
        bare_logprobs_tokens_per_s=bare_tps,
        bare_logits_tokens_per_s=logits_tps,
        eval_over_bare=eval_tps / bare_tps,
        eval_over_bare_logits_only=eval_tps / logits_tps,
        eval_seconds=eval_s, bare_seconds=bare_s, bare_logits_seconds=logits_s,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "config")}, indent=2))


if __name__ == "__main__":
    main()
