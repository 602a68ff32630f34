"""`knnlm analyze`: its tables equal direct evals of the same settings; subsets are seeded
and exact; overlap and distance statistics equal loops."""
import json

import numpy as np
import pytest

from knnlm import evaluate
from knnlm.knn import sweep
from knnlm.lm import train
from knnlm.analysis import analyze, stats
from knnlm.analysis.subsample import subset_rows, write_subset
from knnlm.cli import run as cli_run
from knnlm.knn.cache import RetrievalCache
from knnlm.knn.datastore import Datastore

from test_sweep import run as direct_run

EVAL = dict(tokens_per_sample=64, context_window=32, max_eval_tokens=1200)


@pytest.fixture(scope="module")
def head_ckpt(bpe_databin, trained_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("head_att")
    train.main(train.TrainConfig(
        data=str(bpe_databin.path), restore_file=str(trained_ckpt), save_dir=str(out),
        softmax_input="att", init_out_embed=True, finetune_out_embed=True, tokens_per_sample=64,
        max_tokens=512, lr=3e-3, max_update=5, validate_interval=0, max_valid_tokens=256,
        quiet=True))
    return out / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def overfit_dir(bpe_databin, trained_ckpt, tmp_path_factory):
    """The base LM trained on, dropout 0, keeping each epoch's checkpoint (4 updates an epoch)."""
    out = tmp_path_factory.mktemp("overfit")
    train.main(train.TrainConfig(
        data=str(bpe_databin.path), restore_file=str(trained_ckpt), save_dir=str(out),
        dropout=0.0, tokens_per_sample=64, max_tokens=8192, lr=3e-3, max_epoch=2,
        save_interval=1, validate_interval=0, max_valid_tokens=256, quiet=True))
    return out


@pytest.fixture(scope="module")
def analysis(bpe_databin, trained_ckpt, trained_dstore, head_ckpt, overfit_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    # its own --index-dir: the session's datastore is shared with other tests
    cfg = analyze.AnalyzeConfig(index_dir=str(out / "indexes"),
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_filename=str(trained_dstore.path),
        results_dir=str(out), k=32, probe=2, large_probe=16, index_factory="IVF32,PQ8",
        train_size=4000, lmbda="0:1:0.05", knn_temp="0.5,2", subsample="0.5,1",
        head=f"att={head_ckpt}", overfit_dir=str(overfit_dir), overfit_train_tokens=1000,
        quiet=True, **EVAL)
    return cfg, analyze.main(cfg)


def direct(cfg, ds_path, **kw):
    ecfg = evaluate.EvalConfig(data=cfg.data, path=cfg.path, gen_subset=cfg.gen_subset, knnlm=True,
                               dstore_filename=str(ds_path), k=cfg.k, quiet=True, **EVAL, **kw)
    return direct_run(ecfg)


def test_tables_equal_direct_evals(analysis):
    cfg, res = analysis
    out = cfg.results_dir
    rows = {(r["keytype"], r["metric"]): r for r in res["representation"]["rows"]}
    b = rows[("ffn", "ip")]["best"]
    d = direct(cfg, cfg.dstore_filename, knn_keytype="ffn", faiss_metric_type="ip",
               indexfile=f"{cfg.index_dir}/index_ffn_ip.faiss", probe=2, knn_sim_func="do_not_recomp_l2",
               lmbda=b["lmbda"], knn_temp=b["temp"])
    assert b["ppl"] == pytest.approx(d["interpolated"]["ppl"], rel=1e-5)
    assert rows[("ffn", "ip")]["lm_ppl"] == pytest.approx(d["ppl"], rel=1e-6)
    modes = {r["mode"]: r for r in res["retrieval"]["rows"]}
    t1 = modes["FAISS mask, real score (nprobe 2)"]["t1"]
    d = direct(cfg, cfg.dstore_filename, indexfile=f"{cfg.index_dir}/index_att_l2.faiss", probe=2,
               lmbda=t1["lmbda"], knn_temp=1.0)   # default: exact L2 of the FAISS neighbours
    assert t1["ppl"] == pytest.approx(d["interpolated"]["ppl"], rel=1e-5)
    b = modes["real mask, real score (exact search)"]["best"]
    d = direct(cfg, cfg.dstore_filename, exact_search=True, lmbda=b["lmbda"], knn_temp=b["temp"])
    assert b["ppl"] == pytest.approx(d["interpolated"]["ppl"], rel=1e-4)
    half = [r for r in res["size"]["rows"] if r["fraction"] == 0.5][0]
    sub = f"{out}/subsets/0.5"
    d = direct(cfg, sub, indexfile=f"{sub}/index_att_l2.faiss", probe=2,
               knn_sim_func="do_not_recomp_l2", lmbda=half["best"]["lmbda"],
               knn_temp=half["best"]["temp"])
    assert half["best"]["ppl"] == pytest.approx(d["interpolated"]["ppl"], rel=1e-5)
    assert half["keys"] == Datastore(sub).size


def test_parametric_row_equals_direct_interpolation(analysis, head_ckpt):
    cfg, res = analysis
    row = res["parametric"]["rows"][0]
    assert row["head"]["softmax_input"] == "att"
    base = np.load(f"{cfg.results_dir}/evals/base_scores.npy").astype(np.float64)
    head = np.load(f"{cfg.results_dir}/evals/head_att_scores.npy").astype(np.float64)
    lam = row["lmbda"]
    mix = np.logaddexp(np.log1p(-lam) + base, np.log(lam) + head) if 0 < lam < 1 else \
        (base if lam == 0 else head)
    assert row["interp_ppl"] == pytest.approx(np.exp(-mix.mean()), rel=1e-6)
    grid = [np.exp(-np.logaddexp(np.log1p(-x) + base, np.log(x) + head).mean())
            for x in np.arange(0.05, 1.0, 0.05)]
    assert row["interp_ppl"] <= min(grid) + 1e-9
    assert row["alone_ppl"] == pytest.approx(np.exp(-head.mean()), rel=1e-6)


def test_overfit_rows_equal_direct_evals(analysis, overfit_dir):
    cfg, res = analysis
    part = res["overfit"]
    assert [r["epoch"] for r in part["rows"]] == [1, 2]
    def lm_ppl(ckpt, subset, n):
        return evaluate.main(evaluate.EvalConfig(data=cfg.data, path=ckpt, gen_subset=subset,
                                                 quiet=True, **dict(EVAL, max_eval_tokens=n)))["ppl"]
    assert part["base_ppl"] == pytest.approx(lm_ppl(cfg.path, "valid", 1200), rel=1e-6)
    assert part["base_train_ppl"] == pytest.approx(lm_ppl(cfg.path, "train", 1000), rel=1e-6)
    for r in part["rows"]:
        train_ppl = lm_ppl(str(overfit_dir / f"checkpoint{r['epoch']}.pt"), "train", 1000)
        assert r["train_ppl"] == pytest.approx(train_ppl, rel=1e-6)
        scores = np.load(f"{cfg.results_dir}/evals/overfit{r['epoch']}_scores.npy")
        assert r["alone_ppl"] == pytest.approx(np.exp(-scores.astype(np.float64).mean()), rel=1e-6)
        assert r["updates"] == 4 * r["epoch"]
    # training on lowers the training perplexity below the base's
    assert part["rows"][-1]["train_ppl"] < part["base_train_ppl"]
    assert "Overfitting" in open(f"{cfg.results_dir}/report.md").read()


def test_efficiency_part(analysis):
    cfg, res = analysis
    part = res["efficiency"]
    rows = {r["name"]: r for r in part["rows"]}
    plain = rows["kNN-LM"]
    assert plain["speedup"] == 1 and plain["searched"] == 1 and plain["ppl"] < part["lm_only"]["ppl"]
    for name, r in rows.items():
        if "adaptive" in name and "merge" not in name:
            f = float(name.split()[-1])
            assert abs(r["searched"] - f) < 0.25 and r["efficiency"]["method"] == "adaptive"
        if "RetoMaton" in name:
            assert r["efficiency"]["steps"] == cfg.max_eval_tokens
        assert r["time_over_lm"] == pytest.approx(part["lm_only"]["tokens_per_second"]
                                                  / r["tokens_per_second"])
    assert any("merge k'" in n for n in rows) and part["pareto"]
    # the fast paths: a refine stage at k_factor 1 re-ranks the fast-scan index's own
    # neighbours exactly, so it scores as the fast-scan index with exact scores does
    ff = part["fast_factory"]
    assert "x4fs" in ff and rows["FAISS scores"]["searched"] == 1
    assert rows["fast-scan + Refine(SQfp16)"]["ppl"] == pytest.approx(
        rows[f"fast-scan {ff}, exact scores"]["ppl"], rel=1e-6)
    assert "Efficiency" in open(f"{cfg.results_dir}/report.md").read()


def test_rerun_skips_everything_and_reports(analysis, capsys):
    cfg, res = analysis
    again = analyze.main(cfg)
    text = capsys.readouterr().out
    assert "-- eval-lm" not in text and text.count("already done") == len(analyze.PARTS)
    assert again["size"]["rows"] == res["size"]["rows"]
    report = (cfg.results_dir and open(f"{cfg.results_dir}/report.md").read())
    assert "knnlm eval-lm" in report and "knnlm sweep --cache" in report
    assert json.load(open(f"{cfg.results_dir}/timings.json"))["representation"] > 0


def test_subsets_are_seeded_exact_and_nested(trained_dstore, tmp_path):
    ds = trained_dstore
    a = subset_rows(ds.size, 0.1, 7)
    assert len(a) == round(0.1 * ds.size) and np.all(np.diff(a) > 0)
    assert np.array_equal(a, subset_rows(ds.size, 0.1, 7))
    assert not np.array_equal(a, subset_rows(ds.size, 0.1, 8))
    assert np.isin(a, subset_rows(ds.size, 0.3, 7)).all()
    sub = write_subset(ds, tmp_path / "s", "att", 0.1, 7)
    assert np.array_equal(np.asarray(sub.keys("att")), np.asarray(ds.keys("att"))[a])
    assert np.array_equal(np.asarray(sub.vals), np.asarray(ds.vals)[a])
    assert np.array_equal(np.asarray(sub.pos), np.asarray(ds.pos)[a])
    assert sub.meta["subset"]["parent_fingerprint"] == ds.fingerprint
    assert sub.meta["model_fingerprint"] == ds.meta["model_fingerprint"]


def test_overlap_and_gaps_equal_loops():
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    b = np.stack([rng.permutation(50)[:10] for _ in range(30)])
    b[0, 5:] = -1
    a[0, 7:] = -1
    got = stats.neighbour_overlap(a, b, [3, 10])
    for k in (3, 10):
        want = np.mean([len((set(x[:k]) & set(y[:k])) - {-1}) / k for x, y in zip(a, b)])
        assert got[k] == pytest.approx(want)
    ae, af, te = (rng.random((30, 10)) for _ in range(3))
    g = stats.distance_gaps(ae, af, te, 4)
    assert g["approx_minus_true"] == pytest.approx(ae[:, :4].mean() - te[:, :4].mean())
    assert g["abs_faiss_error"] == pytest.approx(np.abs(af[:, :4] - ae[:, :4]).mean())


def test_sweep_score_files(tmp_path):
    base, other = np.log([0.5, 0.1, 0.2]).astype(np.float32), np.log([0.1, 0.6, 0.3]).astype(np.float32)
    np.save(tmp_path / "a.npy", base)
    np.save(tmp_path / "b.npy", other)
    res = sweep.main(sweep.SweepConfig(score_files=f"{tmp_path}/a.npy,{tmp_path}/b.npy",
                                       lmbda="0:1:0.5", out=str(tmp_path / "o")))
    want = np.exp(-np.mean(np.log(0.5 * np.exp(base.astype(np.float64)) + 0.5 * np.exp(other))))
    assert res["best_lambda"] == 0.5 and res["interp_ppl"] == pytest.approx(want, rel=1e-6)
    np.save(tmp_path / "c.npy", base[:2])
    assert cli_run(["sweep", "--score-files", f"{tmp_path}/a.npy,{tmp_path}/c.npy",
                    "--out", str(tmp_path / "o")]) == 2


def test_bad_analyze_flags(tmp_path):
    for argv in (["--parts", "nope"], ["--head", "x"], ["--subsample", "0,1"],
                 ["--parts", "parametric"]):
        assert cli_run(["analyze", "db", "--path", "p", "--dstore-filename", "d",
                        "--results-dir", str(tmp_path), *argv]) == 2


def test_tokens_part_splits_the_gain_by_training_frequency(analysis, bpe_databin):
    """The per-token log-probs behind the part reproduce the sweep's best point; buckets
    cover every token; totals per type equal a loop over the tokens."""
    cfg, res = analysis
    part = res["tokens"]
    cache = RetrievalCache(f"{cfg.results_dir}/caches/att_l2")
    lm, _, mix = sweep.token_log_probs(cache, "faiss", cache.k, part["temp"], part["lmbda"])
    assert np.exp(-mix.mean()) == pytest.approx(part["knnlm_ppl"], rel=1e-6)
    assert np.exp(-lm.mean()) == pytest.approx(part["lm_ppl"], rel=1e-6)
    assert sum(r["tokens"] for r in part["buckets"]) == cache.size
    assert sum(r["gain_share"] for r in part["buckets"]) == pytest.approx(1.0)
    targets = np.asarray(cache.targets)
    counts = np.bincount(np.asarray(bpe_databin.split("train")), minlength=bpe_databin.vocab_size)
    for r in part["buckets"]:
        lo = int(r["counts"].replace(",", "").replace("≥", "").split("–")[0])
        hi = int(r["counts"].replace(",", "").split("–")[1]) + 1 if "–" in r["counts"] else \
            (1 if lo == 0 else 10 ** 12)
        m = (counts[targets] >= lo) & (counts[targets] < hi)
        assert m.sum() == r["tokens"]
        assert r["knnlm_ppl"] == pytest.approx(np.exp(-mix[m].mean()), rel=1e-6)
    best = part["top"]["gain"][0]
    loop = sum(mix[i] - lm[i] for i in range(len(targets)) if targets[i] == best["token"])
    assert best["gain"] == pytest.approx(loop, rel=1e-9)
    assert all(r["gain"] <= best["gain"] for r in part["top"]["gain"])
    assert all(r["gain"] < 0 for r in part["top"]["loss"])
    assert "Where retrieval helps" in open(f"{cfg.results_dir}/report.md").read()


def test_report_html_links_explorer_pages_of_the_extreme_spans(analysis):
    """report.html: the report's tables as HTML, and an explorer page for each span where
    the kNN-LM gains or loses most (the spans are the loop's extremes)."""
    import re
    from pathlib import Path
    from knnlm.analysis.stats import extreme_spans
    cfg, results = analysis
    out = Path(cfg.results_dir)
    page = (out / "report.html").read_text()
    assert "<table>" in page and "Where retrieval helps" in page
    spans = results["tokens"]["spans"]
    assert {s["kind"] for s in spans} == {"gain", "loss"}
    for link in re.findall(r'href="([^"]+)"', page):
        body = (out / link).read_text()
        assert "application/json" in body and "knnlm explorer" in body
    assert len(re.findall(r'href="explore/', page)) == len(spans)
    g = np.array([1.0, -2, 3, 0, 0, -5, 4, 4, -1, 0])
    got = extreme_spans(g, n=2, width=2)
    sums = [g[i:i + 2].sum() for i in range(9)]
    assert got[0]["gain"] == max(sums) == 8 and got[0]["start"] == 6
    assert [s for s in got if s["kind"] == "loss"][0]["gain"] == min(sums)
