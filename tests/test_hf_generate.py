"""The kNN-LM inside HF model.generate(): KNNLogitsProcessor against plain generate() (λ 0),
against knnlm's own step-by-step kNN-LM decoding (λ > 0), batched against one by one."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from knnlm import KNNLogitsProcessor, build_dstore, generate, tune
from knnlm.generate import GenerateConfig, generate_one
from knnlm.knn import index
from knnlm.lm.hf import load_hf_model

from test_hf import FAMILIES, hf_databin, hf_tokenizer_dir  # noqa: F401  (fixtures)

PROMPTS = ["Enter the king, and", "What say you", "O"]


@pytest.fixture(scope="module", params=["gpt2", "llama", "opt"])
def hf_setup(request, hf_databin, tmp_path_factory):  # noqa: F811
    """A tiny random model of the family and a datastore of its att and ffn keys."""
    cfg_cls, model_cls, kw, _ = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(vocab_size=hf_databin.vocab_size, bos_token_id=0,
                                            eos_token_id=2, pad_token_id=1, **kw)
    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    getattr(transformers, model_cls)(config).eval().save_pretrained(root / "model")
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(hf_databin.path), hf_model=str(root / "model"), dstore_dir=str(root / "ds"),
        gen_subset="train", knn_keytype="att,ffn", tokens_per_sample=64, quiet=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    model.generation_config.eos_token_id = None        # fixed lengths: comparable outputs
    return model, root


def batch(databin, prompts):
    """Left-padded input ids and mask, BOS first (as knnlm generate feeds them)."""
    rows = [[databin.eos, *map(int, databin.vocab.encode_text(p))] for p in prompts]
    w = max(map(len, rows))
    ids = torch.tensor([[databin.pad] * (w - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (w - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pad_token_id=databin.pad), w


def run(model, inputs, proc=None, seed=0, **kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, logits_processor=[proc] if proc else None,
                              max_new_tokens=8, **kw)


@pytest.mark.parametrize("decoding", [dict(do_sample=False), dict(num_beams=3),
                                      dict(do_sample=True, top_k=20, temperature=0.8)])
def test_lambda_zero_equals_plain_generate(hf_setup, hf_databin, decoding):  # noqa: F811
    model, root = hf_setup
    inputs, _ = batch(hf_databin, PROMPTS)
    plain = run(model, inputs, **decoding)
    with KNNLogitsProcessor(model, root / "ds", exact_search=True, k=16, lmbda=0.0,
                            knn_temp=1.0) as proc:
        zero = run(model, inputs, proc, **decoding)
        assert proc.searches >= 8 * len(PROMPTS)          # it did search at every step
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("keytype", ["att", "ffn"])
def test_greedy_equals_step_by_step_knnlm_and_batch_equals_one_by_one(
        hf_setup, hf_databin, keytype):  # noqa: F811
    model, root = hf_setup
    kw = dict(exact_search=True, k=16, lmbda=0.6, knn_temp=2.0, knn_keytype=keytype)
    inputs, w = batch(hf_databin, PROMPTS)
    with KNNLogitsProcessor(model, root / "ds", **kw) as proc:
        batched = run(model, inputs, proc)[:, w:].tolist()
        single = [run(model, batch(hf_databin, [p])[0], proc)[0, -8:].tolist() for p in PROMPTS]
        plain = run(model, inputs)[:, w:].tolist()
        # knnlm's own decoder: one token at a time, p_kNN of the step's query over the vocab
        lm = load_hf_model(str(root / "model"))
        cfg = GenerateConfig(data=str(hf_databin.path), hf_model=str(root / "model"),
                             prompt="-", max_new_tokens=8, knnlm=True,
                             dstore_filename=str(root / "ds"), **kw)
        own = [generate_one(lm, hf_databin.vocab.encode_text(p), hf_databin.eos, cfg,
                            proc.search, torch.Generator(), torch.device("cpu"))[0]
               for p in PROMPTS]
    assert batched == single == own
    assert batched != plain                  # the datastore does change the output


def test_banned_tokens_stay_banned_and_rows_without_neighbours(hf_setup):
    model, root = hf_setup
    with KNNLogitsProcessor(model, root / "ds", exact_search=True, k=4, lmbda=1.0,
                            knn_temp=1.0) as proc:
        V = model.get_output_embeddings().weight.shape[0]
        scores = torch.randn(2, V)
        proc.store["query"] = torch.randn(2, 5, model.config.hidden_size
                                          if hasattr(model.config, "hidden_size")
                                          else model.config.n_embd)
        ds_vals = np.asarray(proc.search.ds.vals)
        banned = int(np.bincount(ds_vals).argmax())      # the most frequent value
        scores[:, banned] = -torch.inf
        out = proc(torch.zeros(2, 5, dtype=torch.long), scores)
        assert torch.isneginf(out[:, banned]).all()
        # λ 1: p_kNN alone, so only datastore values are possible
        finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert set(finite) <= set(np.unique(ds_vals).tolist())
    with pytest.raises(RuntimeError, match="saw no query"):
        proc(torch.zeros(2, 5, dtype=torch.long), scores)


def test_torch_backend_scores_on_its_device_as_the_host_does(hf_setup, monkeypatch):
    """With the torch backend the processor scores the neighbours where they were found
    (KnnSearch.scores_on_device): the same next-token scores as through the host."""
    from knnlm.knn.search import KnnSearch
    model, root = hf_setup
    index.build_index(index.BuildIndexConfig(dstore_dir=str(root / "ds"), knn_keytype="att",
                                             index_factory="IVF8,PQ4", train_size=2000,
                                             faiss_index=str(root / "ivf_torch.faiss"), quiet=True))
    V = model.get_output_embeddings().weight.shape[0]
    d = model.get_output_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    scores, query = torch.randn(3, V, generator=g), torch.randn(3, 4, d, generator=g)
    out = {}
    for on_device in (True, False):
        with KNNLogitsProcessor(model, root / "ds", indexfile=str(root / "ivf_torch.faiss"),
                                k=16, lmbda=0.5, knn_temp=2.0, probe=4, knn_backend="torch",
                                knn_sim_func="do_not_recomp_l2") as proc:
            assert proc.search.backend == "torch (cpu)" and proc.search.on_device
            if not on_device:
                monkeypatch.setattr(KnnSearch, "on_device", property(lambda self: False))
            proc.store["query"] = query
            out[on_device] = proc(torch.zeros(3, 4, dtype=torch.long), scores)
            monkeypatch.undo()
    assert torch.equal(out[True], out[False])
    assert not torch.equal(out[True], torch.log_softmax(scores, -1))   # p_kNN did enter
    with pytest.raises(Exception, match="knn-backend"):
        KNNLogitsProcessor(model, root / "ds", exact_search=True, k=4, lmbda=0.5, knn_temp=1.0,
                           knn_backend="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_processor_on_the_gpu_equals_the_cpu(hf_setup):
    """knnlm_gpu=True: the torch backend on the model's GPU gives the CPU's scores."""
    import copy
    model, root = hf_setup
    index.build_index(index.BuildIndexConfig(dstore_dir=str(root / "ds"), knn_keytype="att",
                                             index_factory="IVF8,PQ4", train_size=2000,
                                             faiss_index=str(root / "ivf_gpu.faiss"), quiet=True))
    V, d = model.get_output_embeddings().weight.shape
    g = torch.Generator().manual_seed(0)
    scores, query = torch.randn(3, V, generator=g), torch.randn(3, 4, d, generator=g)
    out = {}
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(dev)
        with KNNLogitsProcessor(m, root / "ds", indexfile=str(root / "ivf_gpu.faiss"), k=16,
                                lmbda=0.5, knn_temp=2.0, probe=4, knn_backend="torch",
                                knnlm_gpu=dev == "cuda", knn_sim_func="do_not_recomp_l2") as proc:
            assert proc.search.backend.startswith(f"torch ({dev}")
            proc.store["query"] = query.to(dev)
            out[dev] = proc(torch.zeros(3, 4, dtype=torch.long, device=dev), scores.to(dev)).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-4, atol=1e-4)


def test_processor_reads_the_tuned_settings(hf_setup, hf_databin, tmp_path, capsys):  # noqa: F811
    model, root = hf_setup
    index.build_index(index.BuildIndexConfig(dstore_dir=str(root / "ds"), knn_keytype="att",
                                             index_factory="Flat", quiet=True))
    tuned = tune.main(tune.TuneConfig(data=str(hf_databin.path), hf_model=str(root / "model"),
                                      dstore_filename=str(root / "ds"), tokens_per_sample=64,
                                      max_eval_tokens=400, lmbda="0:1:0.1", knn_temp="1,4",
                                      k="8,16", quiet=True))
    capsys.readouterr()
    with KNNLogitsProcessor(model, root / "ds") as proc:
        st = proc.settings
    assert (st["lmbda"], st["knn_temp"], st["k"]) == tuple(
        tuned["settings"][n] for n in ("lmbda", "knn_temp", "k"))
    assert st["tuned_file"].endswith("index_att_l2.faiss.tuned.json")
    assert "tuned on valid" in capsys.readouterr().out
    # the CLI: batched prompts, beam search, the tuned settings
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    res = generate.main(GenerateConfig(data=str(hf_databin.path), hf_model=str(root / "model"),
                                       prompts_file=str(tmp_path / "p.txt"), max_new_tokens=6,
                                       batch_size=2, beam=2, knnlm=True,
                                       dstore_filename=str(root / "ds")))
    assert len(res["results"]) == 3 and res["knn_settings"]["tuned_file"] is not None
    assert res["config"]["lmbda"] == tuned["settings"]["lmbda"]
    assert all(1 <= len(r["ids"]) <= 6 for r in res["results"])


def test_streamers_and_stopping_criteria_are_hfs_own(hf_setup, hf_databin):  # noqa: F811
    """A streamer sees the kNN-LM's tokens as they come; a stopping criterion ends it."""
    model, root = hf_setup

    class Collect(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    class StopAfter(transformers.StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n,
                              dtype=torch.bool)
    inputs, w = batch(hf_databin, PROMPTS[:1])
    streamer = Collect()
    with KNNLogitsProcessor(model, root / "ds", exact_search=True, k=16, lmbda=0.6,
                            knn_temp=2.0) as proc:
        out = run(model, inputs, proc, streamer=streamer,
                  stopping_criteria=transformers.StoppingCriteriaList([StopAfter(w + 3)]))
        full = run(model, inputs, proc)
    assert out.shape[1] == w + 3 and torch.equal(out, full[:, :w + 3])
    assert streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, w:].tolist()
