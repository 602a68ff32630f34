"""`knnlm tune` picks the sweep's best point, writes it next to the index, and every kNN
command given no λ/T flags uses it (and only when it belongs to their index)."""
import json
import shutil

import numpy as np
import pytest

from knnlm import cli, evaluate, tune
from knnlm.knn import index
from knnlm.knn.mode import SIM_FUNCS, ScoreMode
from knnlm.knn.tuned import read_tuned
from knnlm.util import UserError

GRID = dict(lmbda="0:1:0.05", knn_temp="0.5,1,2,4,8", k="8,32")


@pytest.fixture(scope="module")
def ds_copy(trained_dstore, tmp_path_factory):
    """A private copy of the datastore with its own IVF index (tuned files land here)."""
    root = tmp_path_factory.mktemp("tune") / "ds"
    shutil.copytree(trained_dstore.path, root)
    for name in [p.name for p in root.glob("index_*")]:
        (root / name).unlink()
    index.build_index(index.BuildIndexConfig(dstore_dir=str(root), knn_keytype="att",
                                             index_factory="IVF32,PQ8", train_size=4000,
                                             quiet=True))
    return root


def common(databin, ckpt, ds, **kw):
    return dict(data=str(databin.path), path=str(ckpt), tokens_per_sample=64, context_window=32,
                dstore_filename=str(ds), probe=4, quiet=True, **kw)


@pytest.fixture(scope="module")
def tuned(bpe_databin, trained_ckpt, ds_copy):
    return tune.main(tune.TuneConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                     gain_tolerance=0, **GRID))


def test_sim_func_inverts_from_flags():
    for sim in (None, *SIM_FUNCS):
        for metric in ("l2", "ip"):
            for exact in (False, True):
                mode = ScoreMode.from_flags(sim, metric, exact)
                assert ScoreMode.from_flags(mode.sim_func, metric, exact) == mode


def test_tune_picks_the_best_point_of_the_sweep(tuned, ds_copy):
    path = ds_copy / "index_att_l2.faiss.tuned.json"
    assert json.loads(path.read_text()) == tuned
    sweep = json.loads((ds_copy / "index_att_l2.faiss.tune-valid" / "sweep" / "sweep.json")
                       .read_text())
    # every (score mode, k, T, λ) of the sweep; the tuned point is the minimum of them all
    points = [(ppl, key, sweep["temps"][ti], sweep["lambdas"][li])
              for key, r in sweep["results"].items()
              for ti, row in enumerate(r["ppl_grid"]) for li, ppl in enumerate(row)]
    ppl, key, temp, lmbda = min(points)
    st = tuned["settings"]
    assert (st["lmbda"], st["knn_temp"], st["k"]) == (lmbda, temp, int(key.split("=")[1]))
    assert tuned["heldout"]["ppl"] == pytest.approx(ppl, rel=1e-12)
    assert set(sweep["results"]) == {"faiss@k=8", "faiss@k=32", "exact@k=8", "exact@k=32"}
    assert tuned["score_mode"]["name"] == sweep["results"][key]["score_mode"]["name"]
    assert tuned["heldout"]["ppl"] < tuned["heldout"]["untuned_ppl"]
    assert tuned["command"].startswith("knnlm tune")


def test_tolerance_takes_the_cheapest_point_near_the_best():
    """Within the tolerance (a share of the best point's log-perplexity gain over the LM)
    FAISS scores beat exact ones and a smaller k a larger one; outside it the best point
    stands. A weak gain leaves less room than a strong one."""
    def res(lm, **ppl):
        return {k.replace("_", "@k="): dict(interp_ppl=v, lm_ppl=lm) for k, v in ppl.items()}
    strong = res(200.0, exact_32=100.0, faiss_32=100.4, exact_8=100.2, faiss_8=103.0)
    # gain ln 2 = 0.693: faiss@32 is 0.4% (0.6% of the gain) off, faiss@8 3% (4.3%)
    assert tune.choose_point(strong, 0)[0] == "exact@k=32"
    assert tune.choose_point(strong, 0.005)[0] == "exact@k=8"
    assert tune.choose_point(strong, 0.01)[0] == "faiss@k=32"
    assert tune.choose_point(strong, 0.05)[0] == "faiss@k=8"
    weak = res(32.32, exact_32=30.47, faiss_32=30.61)       # gain 5.9%: 0.46% is 7.8% of it
    assert tune.choose_point(weak, 0.05)[0] == "exact@k=32"
    assert tune.choose_point(weak, 0.1)[0] == "faiss@k=32"


def test_tune_with_the_default_tolerance(tuned, ds_copy, bpe_databin, trained_ckpt, tmp_path):
    """The default tune (reusing the cached evaluation) writes the cheapest point that
    keeps 95% of the best one's gain, and records the best."""
    other = tmp_path / "tuned.json"
    got = tune.main(tune.TuneConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                    results_path=str(other), **GRID))
    want, _ = tune.choose_point(json.loads(other.read_text())["sweep"], 0.05)
    score = "exact" if got["score_mode"]["recompute"] else "faiss"
    assert f"{score}@k={got['settings']['k']}" == want
    assert got["best"]["ppl"] == pytest.approx(tuned["heldout"]["ppl"], rel=1e-12)
    gain = np.log(got["heldout"]["lm_ppl"] / got["best"]["ppl"])
    assert np.log(got["heldout"]["ppl"] / got["best"]["ppl"]) <= 0.05 * gain + 1e-12
    tune.main(tune.TuneConfig(**common(bpe_databin, trained_ckpt, ds_copy), gain_tolerance=0,
                              **GRID))   # leave the module's tuned file as it was


def test_eval_lm_without_lambda_and_temp_reproduces_the_tuned_number(
        bpe_databin, trained_ckpt, ds_copy, tuned, capsys):
    res = evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                            gen_subset="valid", knnlm=True))
    m = res["interpolated"]
    assert m["ppl"] == pytest.approx(tuned["heldout"]["ppl"], rel=1e-6)
    assert (m["lmbda"], m["knn_temp"], m["k"]) == tuple(
        tuned["settings"][n] for n in ("lmbda", "knn_temp", "k"))
    assert m["score_mode"]["name"] == tuned["score_mode"]["name"]
    assert set(m["settings"]["source"].values()) == {"tuned"}
    out = capsys.readouterr().out
    assert "from " + str(ds_copy / "index_att_l2.faiss.tuned.json") in out


def test_explicit_flags_win(bpe_databin, trained_ckpt, ds_copy, tuned, capsys):
    # λ given: the tuned file is not read at all; the rest are the defaults
    res = evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                            gen_subset="valid", knnlm=True, lmbda=0.1, k=16))
    m = res["interpolated"]
    assert (m["lmbda"], m["knn_temp"], m["k"]) == (0.1, 1.0, 16)
    assert m["settings"]["tuned_file"] is None
    assert m["score_mode"]["name"] == "faiss-l2+keys-l2"
    # k given alone: λ, T and the score mode from the tuned file, k from the flag
    res = evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                            gen_subset="valid", knnlm=True, k=16))
    m = res["interpolated"]
    assert (m["lmbda"], m["knn_temp"], m["k"]) == (tuned["settings"]["lmbda"],
                                                   tuned["settings"]["knn_temp"], 16)
    assert m["settings"]["source"] == dict(lmbda="tuned", knn_temp="tuned", k="flag",
                                           knn_sim_func="tuned")


def test_tuned_file_of_another_index_is_ignored(bpe_databin, trained_ckpt, ds_copy, tuned,
                                                tmp_path, capsys):
    other = tmp_path / "other.faiss"
    index.build_index(index.BuildIndexConfig(dstore_dir=str(ds_copy), knn_keytype="att",
                                             index_factory="IVF16,PQ8", train_size=4000,
                                             faiss_index=str(other), quiet=True))
    shutil.copy(ds_copy / "index_att_l2.faiss.tuned.json", str(other) + ".tuned.json")
    capsys.readouterr()
    res = evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, ds_copy),
                                            indexfile=str(other), gen_subset="valid", knnlm=True,
                                            max_eval_tokens=300))
    m = res["interpolated"]
    assert (m["lmbda"], m["knn_temp"], m["k"]) == (0.25, 1.0, 1024)
    assert m["settings"]["tuned_file"] is None
    err = capsys.readouterr().err             # on stderr, --quiet or not (common: quiet)
    assert err == f"knnlm: warning: ignoring {other}.tuned.json: it was tuned for another index\n"


@pytest.mark.parametrize("text, needle", [
    ("{garbage", "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
    ('{"format": "something-else"}', "is not a knnlm tuned-settings file"),
    ('{"format": "knnlm-tuned", "version": 99, "identity": {}}', "version 99")])
@pytest.mark.parametrize("flags", [{}, dict(lmbda=0.3, knn_temp=2.0)])
def test_a_tuned_file_that_does_not_parse_is_an_error_used_or_not(
        bpe_databin, trained_ckpt, ds_copy, tmp_path, text, needle, flags):
    """Never skipped in silence: garbage next to the index stops the run naming the file,
    even when the flags make it unnecessary."""
    path = tmp_path / "ds"
    shutil.copytree(ds_copy, path, ignore=shutil.ignore_patterns("*.tune-valid"))
    side = path / "index_att_l2.faiss.tuned.json"
    side.write_text(text)
    with pytest.raises(UserError, match=f"{side}.*{needle}|{needle}.*{side}"):
        evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, path),
                                          gen_subset="valid", knnlm=True, max_eval_tokens=300,
                                          **flags))


@pytest.mark.parametrize("field, value, needle", [
    ("lmbda", float("nan"), "λ nan is not in [0, 1]"), ("lmbda", 1.5, "λ 1.5 is not in"),
    ("knn_temp", -1.0, "temperature -1.0 is not a positive"),
    ("knn_temp", float("inf"), "temperature inf is not"), ("k", 0, "k 0 is not a positive"),
    ("knn_sim_func", "cosine", "score function 'cosine'")])
def test_a_tuned_file_with_unusable_settings_is_refused_naming_it(
        bpe_databin, trained_ckpt, ds_copy, tuned, tmp_path, capsys, field, value, needle):
    path = tmp_path / "ds"
    shutil.copytree(ds_copy, path, ignore=shutil.ignore_patterns("*.tune-valid"))
    side = path / "index_att_l2.faiss.tuned.json"
    data = json.loads(side.read_text())
    data["settings"][field] = value
    side.write_text(json.dumps(data))            # NaN and inf as JSON's NaN / Infinity
    capsys.readouterr()
    rc = cli.run(["eval-lm", str(bpe_databin.path), "--path", str(trained_ckpt), "--knnlm",
                  "--dstore-filename", str(path), "--probe", "4", "--tokens-per-sample", "64",
                  "--context-window", "32", "--max-eval-tokens", "50", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(side) in err and needle in err


def test_hint_without_a_tuned_file(bpe_databin, trained_ckpt, ds_copy, tuned, tmp_path, capsys):
    path = tmp_path / "exact"
    shutil.copytree(ds_copy, path, ignore=shutil.ignore_patterns("index_*"))
    evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, path),
                                      gen_subset="valid", knnlm=True, exact_search=True, k=8,
                                      max_eval_tokens=200))
    out = capsys.readouterr().out
    assert "hint: T 1 is rarely the best temperature" in out and "knnlm tune" in out
    assert sum(line.startswith(("kNN settings", "hint")) for line in out.splitlines()) == 2
    # an explicit T 1 gets no hint
    evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, path),
                                      gen_subset="valid", knnlm=True, exact_search=True, k=8,
                                      knn_temp=1.0, max_eval_tokens=200))
    assert "hint" not in capsys.readouterr().out


def test_tune_exact_search_and_reuse(bpe_databin, trained_ckpt, ds_copy, tmp_path, capsys):
    path = tmp_path / "exact"
    shutil.copytree(ds_copy, path, ignore=shutil.ignore_patterns("index_*"))
    cfg = tune.TuneConfig(**common(bpe_databin, trained_ckpt, path), exact_search=True,
                          max_eval_tokens=600, lmbda="0:1:0.1", knn_temp="1,4", k="16")
    first = tune.main(cfg)
    assert (path / "exact_att_l2.tuned.json").is_file()
    assert first["score_mode"]["name"] == "exact-l2"
    assert first["identity"]["index_fingerprint"] is None
    capsys.readouterr()
    again = tune.main(tune.TuneConfig(**common(bpe_databin, trained_ckpt, path), exact_search=True,
                                      max_eval_tokens=600, lmbda="0:1:0.1", knn_temp="1,4",
                                      k="16"))
    assert "is cached" in capsys.readouterr().out
    assert again["settings"] == first["settings"]
    res = evaluate.main(evaluate.EvalConfig(**common(bpe_databin, trained_ckpt, path),
                                            gen_subset="valid", knnlm=True, exact_search=True,
                                            max_eval_tokens=600))
    assert res["interpolated"]["ppl"] == pytest.approx(first["heldout"]["ppl"], rel=1e-6)
    # a tuned file of another model is not used
    data = json.loads((path / "exact_att_l2.tuned.json").read_text())
    ident = dict(data["identity"], model_fingerprint="0" * 16)
    assert read_tuned(path / "exact_att_l2.tuned.json", ident)[0] is None


def test_tune_evaluates_anew_after_the_index_is_rebuilt(bpe_databin, trained_ckpt, ds_copy,
                                                        tmp_path, capsys):
    """A cache made with one index is not reused once another index (another factory) is
    built at the same path: the same flags, but not the same neighbours. Both the index
    and the cache of the old one are replaced only when asked (--overwrite)."""
    path = tmp_path / "rebuilt"
    shutil.copytree(ds_copy, path, ignore=shutil.ignore_patterns("index_*"))

    def build(factory, **kw):
        index.build_index(index.BuildIndexConfig(dstore_dir=str(path), knn_keytype="att",
                                                 index_factory=factory, train_size=4000,
                                                 quiet=True, **kw))

    def run(**kw):
        return tune.main(tune.TuneConfig(**common(bpe_databin, trained_ckpt, path),
                                         max_eval_tokens=400, lmbda="0:1:0.1", knn_temp="1,4",
                                         k="16", **kw))
    build("IVF32,PQ8")
    run()
    capsys.readouterr()
    run()
    assert "is cached" in capsys.readouterr().out
    with pytest.raises(UserError, match="index .* was made with another configuration "
                                        r"\(factory differ\); give --overwrite"):
        build("IVF16,PQ8x4fs")
    build("IVF16,PQ8x4fs", overwrite=True)
    assert "--overwrite: replacing index" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"retrieval cache .* another configuration \(.*"
                                        "index_fingerprint"):
        run()
    second = run(overwrite=True)
    assert "is cached" not in capsys.readouterr().out
    cache = json.loads((path / "index_att_l2.faiss.tune-valid" / "cache.json").read_text())
    assert cache["index"]["factory"] == "IVF16,PQ8x4fs"
    assert second["identity"]["index_fingerprint"] == cache["index_fingerprint"]


def test_tune_cli_bad_inputs(bpe_databin, trained_ckpt, ds_copy, capsys):
    base = [str(bpe_databin.path), "--path", str(trained_ckpt), "--dstore-filename",
            str(ds_copy), "--quiet"]
    assert cli.run(["tune", *base, "--k", "100000"]) == 2
    assert "exceeds the datastore size" in capsys.readouterr().err
    assert cli.run(["tune", *base, "--knn-temp", "0,1"]) == 2
    assert "--knn-temp" in capsys.readouterr().err
    assert cli.run(["tune", *base, "--exact-search", "--score", "exact"]) == 2
    assert cli.run(["tune", str(bpe_databin.path), "--path", str(trained_ckpt)]) == 2
    assert "--dstore-filename" in capsys.readouterr().err
