"""The lm-evaluation-harness model `knnlm` against eval-lm: rolling log-likelihoods are
eval-lm's summed NLL of the same text (LM and kNN-LM), a continuation's log-likelihood the
sum of eval-lm's per-token scores; local tasks run end to end through `knnlm lm-eval`."""
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

import knnlm
from knnlm.cli import run
from knnlm.knn import math as knn_math
from lm_eval.api.instance import Instance
from test_hf import hf_databin, hf_tokenizer_dir, tiny_llama  # noqa: F401  (fixtures)

KNN = dict(k=16, lmbda=0.5, knn_temp=2.0, probe=4, tokens_per_sample=64, context_window=16)


@pytest.fixture(scope="module")
def setup(hf_databin, hf_tokenizer_dir, corpus_dir, tmp_path_factory):  # noqa: F811
    """A tiny random Llama saved with its tokenizer, a datastore of the corpus' first 300
    training lines (IVF index), and the local tasks made from the corpus."""
    root = tmp_path_factory.mktemp("harness")
    model, tok, _ = tiny_llama(hf_databin.vocab_size, hf_tokenizer_dir, root / "model")
    lines = (corpus_dir / "train.txt").read_text().splitlines()[:300]
    ds = knnlm.Datastore.build(model, tok, ["\n".join(lines[i:i + 10]) for i in range(0, 300, 10)],
                               out=root / "ds", tokens_per_sample=64, context_window=16,
                               index="IVF4,Flat", quiet=True)
    assert run(["lm-eval", "--make-tasks", str(root / "tasks"), "--corpus", str(corpus_dir)]) == 0
    return root, ds


def harness(setup, **kw):
    from knnlm.harness import KNNLMHarness
    root, ds = setup
    return KNNLMHarness(pretrained=str(root / "model"), dstore=str(ds.path), **dict(KNN, **kw))


def eval_lm(root, text: str, tmp_path, extra=()) -> dict:
    """eval-lm --knnlm's results on a data-bin whose test split is ``text``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "t.txt").write_text(text + "\n")
    db = tmp_path / "db"
    assert run(["preprocess", "--testpref", str(tmp_path / "t.txt"), "--hf-tokenizer",
                str(root / "model"), "--destdir", str(db), "--quiet", "--overwrite"]) == 0
    out = tmp_path / "res.json"
    argv = ["eval-lm", str(db), "--hf-model", str(root / "model"), "--gen-subset", "test",
            "--knnlm", "--dstore-filename", str(root / "ds"), "--results-path", str(out),
            "--quiet"]
    for key, value in KNN.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert run(argv + list(extra)) == 0
    return json.loads(out.read_text())["results"]


def test_rolling_loglikelihood_is_eval_lms(setup, corpus_dir, tmp_path):
    root, _ = setup
    text = "\n".join((corpus_dir / "test.txt").read_text().splitlines()[:30]).strip()
    h = harness(setup)
    (ll,) = h.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    res = eval_lm(root, text, tmp_path)
    assert ll == pytest.approx(-res["interpolated"]["nll_sum"], rel=1e-9)
    with h.lm_only():
        (lm_ll,) = h.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert lm_ll == pytest.approx(-res["nll_sum"], rel=1e-9) and ll > lm_ll


def test_a_continuations_loglikelihood_is_the_sum_of_eval_lms_token_scores(setup, corpus_dir,
                                                                          tmp_path):
    root, _ = setup
    line = (corpus_dir / "test.txt").read_text().splitlines()[3].strip()
    context, continuation = line.rsplit(" ", 2)[0], " " + " ".join(line.rsplit(" ", 2)[1:])
    h = harness(setup)
    reqs = [Instance("loglikelihood", {}, (context, continuation), 0),
            Instance("loglikelihood", {}, ("", line), 1)]
    (ll, greedy), (whole, _) = h.loglikelihood(reqs)
    lm_scores, knn_scores = tmp_path / "lm.npy", tmp_path / "knn.npy"
    eval_lm(root, line, tmp_path, ["--save-scores", str(lm_scores), "--save-knn-scores",
                                    str(knn_scores)])
    mix = knn_math.interpolate(torch.from_numpy(np.load(lm_scores).astype(np.float64)),
                               torch.from_numpy(np.load(knn_scores).astype(np.float64)),
                               KNN["lmbda"]).numpy()
    n_ctx, n_all = len(h.tok_encode(context)), len(h.tok_encode(line))
    assert ll == pytest.approx(float(mix[n_ctx:n_all].sum()), rel=1e-5)
    assert whole == pytest.approx(float(mix[:n_all].sum()), rel=1e-5)
    assert isinstance(greedy, bool)


def test_local_tasks_run_side_by_side(setup, tmp_path):
    """`knnlm lm-eval` on the local tasks: one table, the LM's and the kNN-LM's numbers;
    the LM column is the harness at λ 0, and its word perplexity is eval-lm's word count's."""
    root, ds = setup
    args = ",".join([f"pretrained={root / 'model'}", f"dstore={ds.path}"] +
                    [f"{k}={v}" for k, v in KNN.items()])
    out = tmp_path / "out"
    assert run(["lm-eval", "--model-args", args, "--tasks", "knnlm_rolling,knnlm_cloze",
                "--include-path", str(root / "tasks"), "--limit", "3", "--out", str(out),
                "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())["table"]
    got = {(r["task"], r["metric"]): r for r in rows}
    assert {("knnlm_rolling", "word_perplexity"), ("knnlm_rolling", "bits_per_byte"),
            ("knnlm_cloze", "acc"), ("knnlm_cloze", "acc_norm")} <= set(got)
    wp = got["knnlm_rolling", "word_perplexity"]
    assert wp["knnlm"] < wp["lm"] and wp["diff"] == pytest.approx(wp["knnlm"] - wp["lm"])
    assert "| knnlm_cloze | acc |" in (out / "table.md").read_text()
    # the rolling task's word perplexity: eval-lm's over the same three documents
    docs = [json.loads(line)["text"] for line in
            (root / "tasks" / "rolling.jsonl").read_text().splitlines()[:3]]
    nll = words = 0
    for i, doc in enumerate(docs):
        res = eval_lm(root, doc, tmp_path / f"d{i}")
        nll, words = nll + res["interpolated"]["nll_sum"], words + res["words"]
    assert words == sum(len(d.split()) for d in docs)       # lm-eval's word count
    assert wp["knnlm"] == pytest.approx(math.exp(nll / words), rel=1e-6)


def test_generation_and_bad_arguments(setup):
    from knnlm.util import UserError
    h = harness(setup)
    (text,) = h.generate_until([Instance("generate_until", {}, ("Enter the king",
                                                                {"until": ["\n"],
                                                                 "max_gen_toks": 8}), 0)])
    assert isinstance(text, str) and "\n" not in text
    with pytest.raises(UserError, match="not supported here: num_beams"):
        h.generate_until([Instance("generate_until", {}, ("Enter", {"num_beams": 2}), 0)])
    # greedy at λ 0 is the LM's own greedy continuation (HF generate), cut at the stop
    with h.lm_only():
        (lm_text,) = h.generate_until([Instance("generate_until", {}, (
            "Enter the king", {"until": ["\n"], "max_gen_toks": 8, "temperature": 0.0}), 0)])
    root, _ = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    ids = torch.tensor([[h.prefix_token_id, *h.tok_encode("Enter the king")]])
    with torch.no_grad():
        seq = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=1, eos_token_id=None)
    assert lm_text == h.tok_decode(seq[0, ids.shape[1]:].tolist()).split("\n")[0]
    with pytest.raises(UserError, match="unknown colour"):
        harness(setup, colour=3)


def test_lm_evals_own_command_line_finds_the_model(setup, tmp_path):
    """python -m knnlm.harness: lm-eval's command line, the model `knnlm` registered."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root, ds = setup
    argv = [sys.executable, "-m", "knnlm.harness", "--model", "knnlm", "--model_args",
            f"pretrained={root / 'model'},dstore={ds.path},k=16,probe=4,tokens_per_sample=64",
            "--tasks", "knnlm_cloze", "--include_path", str(root / "tasks"), "--limit", "2",
            "--output_path", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "knnlm_cloze" in p.stdout and "acc" in p.stdout
