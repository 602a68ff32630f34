"""The lm-evaluation-harness path: its speed against eval-lm --knnlm on the same tokens, and
the numbers of the local tasks (JSON output).

Builds (once, into ``--work``) a datastore of the first ``--dstore-tokens`` tokens of the
Shakespeare training split with the model (``knnlm.Datastore.build``), the local tasks of
the test split (``knnlm lm-eval --make-tasks``), then:

- speed: the rolling log-likelihood of ``--docs`` documents of ``knnlm_rolling`` through
  the harness model (``loglikelihood_rolling``), against ``eval_tokens`` — eval-lm's
  scoring — over the same documents' tokens as one stream, both with the kNN-LM
  (target: harness / eval-lm <= 1.2);
- the tasks: ``knnlm lm-eval`` on knnlm_rolling and knnlm_cloze (``--limit`` documents
  each), LM and kNN-LM side by side.

    python benchmarks/harness_local.py --out benchmarks/results/harness_local.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import knnlm  # noqa: E402
from benchmarks.common import machine, write_result  # noqa: E402
from knnlm.cli import run  # noqa: E402


def prepare(work: Path, model_name: str, dstore_tokens: int) -> tuple[Path, Path]:
    """The model saved as safetensors, the corpus, the datastore and the local tasks."""
    from knnlm.data import corpora
    from knnlm.hub import load_hf_tokenizer, smollm2_gguf, transformers_module
    from knnlm.lm.hf import save_hf_model
    model_dir = work / "model"
    save_hf_model(smollm2_gguf() if model_name == "smollm2" else model_name, model_dir)
    if not (work / "corpus" / "train.txt").is_file():
        corpora.main(corpora.FetchConfig(action="fetch", name="shakespeare",
                                         dest=str(work / "corpus")))
    if not (work / "tasks" / "knnlm_rolling.yaml").is_file():
        assert run(["lm-eval", "--make-tasks", str(work / "tasks"), "--corpus",
                    str(work / "corpus")]) == 0
    ds = work / "dstore"
    if not (ds / "datastore.json").is_file():
        tok = load_hf_tokenizer(str(model_dir))
        model = transformers_module().AutoModelForCausalLM.from_pretrained(model_dir).eval()
        lines, docs, count = (work / "corpus" / "train.txt").read_text().splitlines(), [], 0
        for i in range(0, len(lines), 20):
            docs.append("\n".join(lines[i:i + 20]))
            count += len(tok(docs[-1])["input_ids"])
            if count >= dstore_tokens:
                break
        knnlm.Datastore.build(model, tok, docs, out=ds, tokens_per_sample=512,
                              context_window=256, quiet=True)
    return model_dir, ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-model", default="smollm2")
    ap.add_argument("--work", default="runs/harness_local")
    ap.add_argument("--dstore-tokens", type=int, default=100_000)
    ap.add_argument("--docs", type=int, default=8, help="rolling documents timed")
    ap.add_argument("--limit", type=int, default=20, help="documents per task in the table")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/harness_local.json")
    a = ap.parse_args()
    from lm_eval.api.instance import Instance
    from knnlm.evaluate import eval_tokens
    from knnlm.harness import KNNLMHarness
    work = Path(a.work)
    model_dir, ds = prepare(work, a.hf_model, a.dstore_tokens)
    args = dict(pretrained=str(model_dir), dstore=str(ds), k=a.k, probe=8,
                tokens_per_sample=512, context_window=256)
    h = KNNLMHarness(**args)
    docs = [json.loads(line)["text"] for line in
            (work / "tasks" / "rolling.jsonl").read_text().splitlines()[:a.docs]]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    from knnlm.data.preprocess import binarize, text_lines
    stream = np.concatenate([binarize(text_lines(d), h.vocab)[0] for d in docs])
    harness_s, eval_s = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        h.loglikelihood_rolling(reqs)
        harness_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with h._output(), torch.no_grad():
            eval_tokens(h.model, stream, h.databin, h.cfg, h.device, h._scorer(stream))
        eval_s.append(time.perf_counter() - t0)
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    t0 = time.perf_counter()
    assert run(["lm-eval", "--model-args", model_args, "--tasks", "knnlm_rolling,knnlm_cloze",
                "--include-path", str(work / "tasks"), "--limit", str(a.limit),
                "--out", str(work / "lm_eval"), "--quiet"]) == 0
    tasks_s = time.perf_counter() - t0
    table = json.loads((work / "lm_eval" / "results.json").read_text())
    out = dict(benchmark="harness_local", machine=machine(), config=vars(a),
               tokens=int(len(stream)), datastore=knnlm.Datastore.load(ds).size,
               harness_over_eval=statistics.median(harness_s) / statistics.median(eval_s),
               harness_tokens_per_s=len(stream) / statistics.median(harness_s),
               eval_tokens_per_s=len(stream) / statistics.median(eval_s),
               settings=table["settings"], table=table["table"], tasks_seconds=tasks_s,
               runs=dict(harness_s=harness_s, eval_s=eval_s))
    write_result(a.out, out)


if __name__ == "__main__":
    main()
