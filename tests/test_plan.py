"""knnlm plan: exact sizes of knnlm's formats, projected times from measured costs."""
import pytest

from knnlm.cli import run as cli_run
from knnlm.knn import plan as plan_mod
from knnlm.util import UserError


def test_sizes_are_the_formats_byte_counts(trained_dstore):
    cfg = plan_mod.PlanConfig(dstore_size=103_225_485, dimension=1024, index_factory="IVF4096,PQ64",
                              keytypes=2)
    out = plan_mod.plan(103_225_485, 1024, "IVF4096,PQ64", cfg, plan_mod.MEASURED, gflops=100.0)
    n = 103_225_485
    assert out["keys_gib"] == pytest.approx(2 * n * 1024 * 2 / 2 ** 30)
    assert out["vals_pos_gib"] == pytest.approx(n * 8 / 2 ** 30)
    # codes + ids per key, the coarse centroids and the PQ codebooks
    assert out["index_gib"] == pytest.approx((n * 72 + 4096 * 1024 * 4 + 256 * 1024 * 4) / 2 ** 30)
    # the measured configuration reproduces the measured costs
    same = plan_mod.plan(10_000_000, 256, "IVF1024,PQ32", plan_mod.PlanConfig(
        dstore_size=1, dimension=1, train_size=200_000), plan_mod.MEASURED, gflops=1e9)
    assert same["add_hours"] * 3600 == pytest.approx(211.4)
    assert same["train_hours"] * 3600 == pytest.approx(29.2)
    assert same["search_ms_per_query"] == pytest.approx(47.7, rel=1e-3)
    assert plan_mod.parse_factory("Flat", 64) == (0, 256, False, 0)
    # fast-scan: 4 bits a sub-quantizer; a refine stage stores the keys again
    assert plan_mod.parse_factory("IVF4096,PQ64x4fs", 128) == (4096, 32, True, 0)
    assert plan_mod.parse_factory("IVF64,PQ16x4fs,RFlat", 32) == (64, 8, True, 128)
    fs = plan_mod.plan(n, 1024, "IVF4096,PQ128x4fs,Refine(SQfp16)", cfg, plan_mod.MEASURED,
                       gflops=100.0)
    assert fs["index_gib"] == pytest.approx((n * (64 + 2048 + 8) + 4096 * 1024 * 4
                                             + 16 * 1024 * 4) / 2 ** 30)
    with pytest.raises(UserError, match="factories"):
        plan_mod.parse_factory("HNSW32", 64)


def test_plan_of_an_existing_datastore(trained_dstore, capsys):
    assert cli_run(["plan", "--dstore-dir", str(trained_dstore.path), "--probe", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{trained_dstore.size:,} x {trained_dstore.dim}" in out and "ms/query" in out
    assert cli_run(["plan", "--dimension", "8"]) == 2
