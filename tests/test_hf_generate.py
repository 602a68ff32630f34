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

from test_hf import FAMILIES, hf_databin, hf_tokenizer_dir, tiny_config  # noqa: F401  (fixtures)

PROMPTS = ["Enter the king, and", "What say you", "O"]


@pytest.fixture(scope="module", params=["gpt2", "llama", "opt", "gemma3", "mixtral"])
def hf_setup(request, hf_databin, tmp_path_factory):  # noqa: F811
    """A tiny random model of the family and a datastore of its att and ffn keys."""
    torch.manual_seed(0)
    config = tiny_config(request.param, hf_databin.vocab_size)
    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    getattr(transformers, FAMILIES[request.param][1])(config).eval().save_pretrained(
        root / "model")
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
    plain = run(model, inputs)[:, w:].tolist()
    with KNNLogitsProcessor(model, root / "ds", **kw) as proc:
        batched = run(model, inputs, proc)[:, w:].tolist()
        single = [run(model, batch(hf_databin, [p])[0], proc)[0, -8:].tolist() for p in PROMPTS]
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


def test_mix_is_the_knnlm_and_a_processor_without_its_forward_warns(hf_setup):
    """mix(): log((1-λ) p_LM + λ p_kNN) of given logits and queries (λ 1: only datastore
    values are possible); a processor only ever called for another model's steps warns."""
    model, root = hf_setup
    with KNNLogitsProcessor(model, root / "ds", exact_search=True, k=4, lmbda=1.0,
                            knn_temp=1.0) as proc:
        V, d = model.get_output_embeddings().weight.shape
        out = proc.mix(torch.randn(2, V), torch.randn(2, d))
        ds_vals = np.asarray(proc.search.ds.vals)
        finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert set(finite) <= set(np.unique(ds_vals).tolist())
        assert proc.searches == 2
        proc.mix(torch.randn(3, V), torch.zeros(3, d))     # identical queries: one search
        assert proc.searches == 3
        scores = torch.randn(2, V)          # another model's step: left as it is
        assert proc(torch.zeros(2, 5, dtype=torch.long), scores) is scores
        with pytest.warns(UserWarning, match="another model"):
            proc.close()


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
            out[on_device] = proc.mix(scores, query[:, -1])
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
            out[dev] = proc.mix(scores.to(dev), query[:, -1].to(dev)).cpu()
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


class Reference:
    """The kNN-LM from scratch, one sequence at a time: a full forward of a separately
    loaded (unhooked) model over the whole prefix, the last position's query searched,
    p_kNN over the vocabulary, mixed with λ (knnlm's own decoder step)."""

    def __init__(self, root, search, keytype="att", lmbda=0.6, knn_temp=2.0):
        from types import SimpleNamespace
        self.lm = load_hf_model(str(root / "model"))
        self.search, self.keytype = search, keytype
        self.cfg = SimpleNamespace(lmbda=lmbda, knn_temp=knn_temp)

    @torch.no_grad()
    def __call__(self, ids) -> torch.Tensor:
        from knnlm.generate import next_log_probs
        feats, hid = self.lm(torch.tensor([list(ids)]), return_hidden=(self.keytype,))
        logits = self.lm.output_layer(feats[:, -1])[0]
        return next_log_probs(logits, hid[self.keytype][0, -1], self.search, self.cfg)[0]


KNN = dict(exact_search=True, k=16, lmbda=0.6, knn_temp=2.0)


def prompt_ids(databin, text):
    return [databin.eos, *map(int, databin.vocab.encode_text(text))]


def greedy_reference(ref, ids, steps, processors=(), eos=None):
    ids = list(ids)
    for _ in range(steps):
        lp = ref(ids).float()[None]
        for p in processors:
            lp = p(torch.tensor([ids]), lp)
        tok = int(lp.argmax())
        ids.append(tok)
        if tok == eos:
            break
    return ids


@pytest.mark.parametrize("name", ["repetition_penalty", "no_repeat_ngram", "bad_words",
                                  "sequence_bias", "min_new_tokens"])
def test_hfs_processors_act_on_the_knnlm_distribution(hf_setup, hf_databin, name):  # noqa: F811
    """Every processor HF builds from generate()'s arguments runs after the kNN-LM mix:
    greedy generation equals the from-scratch kNN-LM with that processor applied to its
    log-probs, step by step."""
    from transformers import generation as g
    model, root = hf_setup
    ids = prompt_ids(hf_databin, PROMPTS[0])
    inp = dict(input_ids=torch.tensor([ids]), pad_token_id=hf_databin.pad)
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        ref = Reference(root, proc.search)
        free = greedy_reference(ref, ids, 8)[len(ids):]
        t1, t2 = free[0], free[1]
        eos = None
        kw, procs = {
            "repetition_penalty": (dict(repetition_penalty=10.0),
                                   [g.RepetitionPenaltyLogitsProcessor(10.0)]),
            "no_repeat_ngram": (dict(no_repeat_ngram_size=2),
                                [g.NoRepeatNGramLogitsProcessor(2)]),
            "bad_words": (dict(bad_words_ids=[[t1], [t2]]),
                          [g.NoBadWordsLogitsProcessor([[t1], [t2]])]),
            "sequence_bias": (dict(sequence_bias={(t1,): -50.0}),
                              [g.SequenceBiasLogitsProcessor({(t1,): -50.0})]),
            "min_new_tokens": (dict(min_new_tokens=4, eos_token_id=t2),
                               [g.MinNewTokensLengthLogitsProcessor(len(ids), 4, t2)]),
        }[name]
        if name == "min_new_tokens":
            eos = t2
            proc.eos = torch.tensor([t2])
        got = run(model, inp, proc, **kw)[0].tolist()
        want = greedy_reference(ref, ids, 8, procs, eos)
    assert got == want
    new = got[len(ids):]
    if name in ("bad_words", "sequence_bias"):
        assert new[0] != t1 and (name == "sequence_bias" or t2 not in new)
    if name == "min_new_tokens":
        assert t2 not in new[:4]
    if name == "repetition_penalty":      # the penalty holds on the kNN-LM's distribution
        new = got[len(ids):]
        repeats = sum(t in got[:len(ids) + i] for i, t in enumerate(new))
        free_repeats = sum(t in (ids + free)[:len(ids) + i] for i, t in enumerate(free))
        assert repeats <= free_repeats


def test_guidance_mixes_each_forward_with_its_own_query(hf_setup, hf_databin):  # noqa: F811
    """Classifier-free guidance: HF's unconditional forward is a kNN-LM forward of its own
    context (the last prompt token, then the generated tokens); the scores are
    s·(log p_cond − log p_uncond) + log p_uncond of the two kNN-LM distributions."""
    model, root = hf_setup
    ids = prompt_ids(hf_databin, PROMPTS[0])
    scale, steps = 1.5, 6
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        ref = Reference(root, proc.search)
        got = run(model, dict(input_ids=torch.tensor([ids]), pad_token_id=hf_databin.pad),
                  proc, guidance_scale=scale)[0, len(ids):].tolist()[:steps]
        seq, uncond = list(ids), [ids[-1]]
        for _ in range(steps):
            cond_lp, uncond_lp = ref(seq), ref(uncond)
            tok = int((scale * (cond_lp - uncond_lp) + uncond_lp).argmax())
            seq.append(tok)
            uncond.append(tok)
    assert got == seq[len(ids):]


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_equals_plain_knnlm_greedy(hf_setup, hf_databin, how):  # noqa: F811
    """The model verifies several drafted tokens in one forward: every position it returns
    is mixed, so greedy assisted / prompt-lookup decoding equals plain greedy."""
    model, root = hf_setup
    ids = prompt_ids(hf_databin, "the king the king the king and")
    inp = dict(input_ids=torch.tensor([ids]), pad_token_id=hf_databin.pad)
    extra = dict(assistant_model=transformers.AutoModelForCausalLM.from_pretrained(
        root / "model").eval()) if how == "assistant_model" else dict(prompt_lookup_num_tokens=3)
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        plain = run(model, inp, proc)
        forwards = proc.forwards
        assisted = run(model, inp, proc, **extra)
        assert proc.forwards - forwards <= 8
    assert torch.equal(plain, assisted)


def test_finished_rows_are_not_searched(hf_setup, hf_databin):  # noqa: F811
    """A row that generated the end-of-sequence token is padded by HF from then on: the
    next forwards do not search for it, and each row equals its own generation."""
    model, root = hf_setup
    inputs, w = batch(hf_databin, PROMPTS)
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        free = run(model, inputs, proc)[:, w:]
        eos = int(free[0, 1])              # row 0 stops at its second token
        proc.eos = torch.tensor([eos])
        before = proc.searches
        got = run(model, inputs, proc, eos_token_id=eos)
        searched = proc.searches - before
        single = [run(model, batch(hf_databin, [p])[0], proc, eos_token_id=eos)[0].tolist()
                  for p in PROMPTS]
    rows = got[:, w:].tolist()
    for p, r, one in zip(PROMPTS, rows, single):
        stop = r.index(eos) + 1 if eos in r else len(r)
        assert r[:stop] == one[len(prompt_ids(hf_databin, p)):]
    assert rows[0][1] == eos
    live = [min(len(r), (r.index(eos) + 1) if eos in r else len(r)) for r in rows]
    # prefill searches every row; a row is searched again until one step after its EOS
    assert searched <= len(rows) + sum(min(n, got.shape[1] - w - 1) for n in live)
    assert searched < len(rows) * (got.shape[1] - w)


def test_sampling_scores_are_the_warped_knnlm_of_each_rows_prefix(hf_setup, hf_databin):  # noqa: F811
    """Sampling at λ > 0 over left-padded prompts: every step's scores (after HF's
    temperature and top-k) equal the from-scratch kNN-LM of that row's own prefix, warped
    the same way."""
    from transformers import generation as g
    model, root = hf_setup
    inputs, w = batch(hf_databin, PROMPTS)
    warp = [g.TemperatureLogitsWarper(0.8), g.TopKLogitsWarper(20)]
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        ref = Reference(root, proc.search)
        out = run(model, inputs, proc, do_sample=True, top_k=20, temperature=0.8,
                  output_scores=True, return_dict_in_generate=True)
        for row, p in enumerate(PROMPTS):
            seq = prompt_ids(hf_databin, p)
            for t, step in enumerate(out.scores):
                want = ref(seq).float()[None]
                for f in warp:
                    want = f(torch.tensor([seq]), want)
                got = step[row][None]
                assert torch.equal(torch.isinf(got), torch.isinf(want))
                fin = torch.isfinite(want)
                torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
                seq.append(int(out.sequences[row, w + t]))


def test_beam_search_equals_a_from_scratch_beam_search(hf_setup, hf_databin):  # noqa: F811
    """Beam search at λ > 0 over left-padded prompts: each row's best sequence is the one a
    plain beam search over the from-scratch kNN-LM finds (no end-of-sequence token)."""
    model, root = hf_setup
    inputs, w = batch(hf_databin, PROMPTS)
    nb, steps = 3, 8          # run() generates 8 tokens
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        ref = Reference(root, proc.search)
        got = run(model, inputs, proc, num_beams=nb)[:, w:w + steps].tolist()
        for row, p in enumerate(PROMPTS):
            beams = [(0.0, prompt_ids(hf_databin, p))]
            for _ in range(steps):
                cands = []
                for score, seq in beams:
                    lp = ref(seq).float()
                    top = torch.topk(lp, 2 * nb)
                    cands += [(score + float(v), seq + [int(i)])
                              for v, i in zip(top.values, top.indices)]
                beams = sorted(cands, key=lambda c: -c[0])[:nb]
            assert got[row] == beams[0][1][-steps:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_keep_their_datastore(hf_setup, hf_databin, tmp_path, dtype):  # noqa: F811
    """A checkpoint loaded in fp16 or bf16 has its fp32 fingerprint (read from its files),
    so the datastore built from it in fp32 serves it; build-dstore --hf-dtype writes the
    same fingerprint; a model changed in memory gets another one."""
    from knnlm.knn.datastore import Datastore
    from knnlm.lm.hf import hf_fingerprint
    model, root = hf_setup
    half = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=dtype).eval()
    assert next(half.parameters()).dtype == dtype
    fp = Datastore(root / "ds").meta["model_fingerprint"]
    assert hf_fingerprint(half) == hf_fingerprint(model) == fp
    ids = torch.tensor([prompt_ids(hf_databin, PROMPTS[0])])
    with KNNLogitsProcessor(half, root / "ds", **KNN) as proc:
        out = half.generate(input_ids=ids, logits_processor=[proc], max_new_tokens=3,
                            pad_token_id=hf_databin.pad)
        assert out.shape[1] == ids.shape[1] + 3 and proc.forwards == 3
    if dtype == torch.float16:
        build_dstore.main(build_dstore.BuildDstoreConfig(
            data=str(hf_databin.path), hf_model=str(root / "model"), hf_dtype="fp16",
            dstore_dir=str(tmp_path / "ds16"), gen_subset="valid", knn_keytype="att",
            tokens_per_sample=64, quiet=True))
        assert Datastore(tmp_path / "ds16").meta["model_fingerprint"] == fp
    with torch.no_grad():
        half.get_output_embeddings().weight.view(-1)[0] += 1.0
    assert hf_fingerprint(half) != fp


def test_layer_n_datastores_generate(hf_setup, hf_databin, tmp_path):  # noqa: F811
    """knn_keytype layer:N: the query is that layer's output; greedy generation equals the
    from-scratch kNN-LM over those keys."""
    model, root = hf_setup
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(hf_databin.path), hf_model=str(root / "model"), dstore_dir=str(tmp_path / "ds"),
        gen_subset="train", knn_keytype="layer:0", tokens_per_sample=64, quiet=True))
    ids = prompt_ids(hf_databin, PROMPTS[1])
    with KNNLogitsProcessor(model, tmp_path / "ds", knn_keytype="layer:0", **KNN) as proc:
        got = run(model, dict(input_ids=torch.tensor([ids]), pad_token_id=hf_databin.pad),
                  proc)[0].tolist()
        want = greedy_reference(Reference(root, proc.search, "layer:0"), ids, 8)
    assert got == want
    with pytest.raises(Exception, match="layers"):
        KNNLogitsProcessor(model, tmp_path / "ds", knn_keytype="layer:9", **KNN)


def test_a_forward_with_labels_returns_the_knnlm_loss(hf_setup, hf_databin):  # noqa: F811
    """model(input_ids, labels=...) while attached: the logits of every position are the
    kNN-LM's and the loss is their mean negative log-likelihood."""
    model, root = hf_setup
    ids = prompt_ids(hf_databin, "Enter the king, and his train, and the queen")
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        ref = Reference(root, proc.search)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
        want = [float(ref(ids[:t + 1])[ids[t + 1]]) for t in range(len(ids) - 1)]
    got = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(
        1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert float(out.loss) == pytest.approx(-np.mean(want), rel=1e-5)


def test_generate_cli_says_what_the_models_generation_config_adds(hf_setup, hf_databin,  # noqa: F811
                                                                  tmp_path, capsys):
    """A model whose generation_config.json sets a repetition penalty: `knnlm generate`
    prints it and writes it to the results; it acts on the kNN-LM's distribution."""
    import shutil
    model, root = hf_setup
    shutil.copytree(root / "model", tmp_path / "model")
    gc = transformers.GenerationConfig.from_pretrained(tmp_path / "model")
    gc.repetition_penalty, gc.eos_token_id = 10.0, None
    gc.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    res = generate.main(GenerateConfig(data=str(hf_databin.path), hf_model=str(tmp_path / "model"),
                                       prompt=PROMPTS[0], max_new_tokens=6, knnlm=True,
                                       dstore_filename=str(root / "ds"), **KNN))
    assert "generation config also applies: repetition_penalty 10.0" in capsys.readouterr().out
    assert res["generation_config"] == {"repetition_penalty": 10.0}
    ids = prompt_ids(hf_databin, PROMPTS[0])
    from transformers import generation as g
    with KNNLogitsProcessor(model, root / "ds", **KNN) as proc:
        want = greedy_reference(Reference(root, proc.search), ids, 6,
                                [g.RepetitionPenaltyLogitsProcessor(10.0)])
    assert res["results"][0]["ids"] == want[len(ids):]
