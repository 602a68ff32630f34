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


def test_shard_layout_over_nodes_and_gpus(capsys):
    """--nodes/--gpus-per-node: one shard per rank; a rank holds its keys' codes and ids
    and a copy of the quantizer; the fewest nodes that hold the index do, one fewer does
    not; the time per query adds the merge of W lists and their bytes on the filesystem."""
    n, d, f = 1_000_000_000, 4096, "IVF65536,PQ64"
    cfg = plan_mod.PlanConfig(dstore_size=n, dimension=d, index_factory=f, nodes=8,
                              gpus_per_node=8, gpu_memory=80.0, fs_gbps=2.0)
    lay = plan_mod.layout(n, d, f, cfg, plan_mod.MEASURED, gflops=100.0)
    shared = 65536 * 4096 * 4 + 256 * 4096 * 4
    assert lay["ranks"] == lay["shards"] == 64 and lay["device"] == "gpu"
    assert lay["rank_gib"] == pytest.approx((15_625_000 * 72 + shared) / 2 ** 30)
    assert lay["fits"] and lay["rank_budget_gib"] == pytest.approx(64.0)
    # the probed codes (32 lists of n / 64 / 65536 keys, 64 bytes each) at the bandwidth
    assert lay["rank_ms"] == pytest.approx(32 * 15_625_000 / 65536 * 64 / 2000e9 * 1e3)
    assert lay["transfer_ms"] == pytest.approx(66 * 1024 * 12 / 2e9 * 1e3)
    assert lay["search_ms_per_query"] == pytest.approx(
        lay["rank_ms"] + lay["merge_ms"] + lay["transfer_ms"]) and lay["merge_ms"] > 0
    # CPU ranks, 64 GiB nodes: the index does not fit on 2 nodes; min_nodes is the fewest
    small = dict(dstore_size=n, dimension=d, index_factory=f, ram_per_node=64.0,
                 ranks_per_node=2)
    lay = plan_mod.layout(n, d, f, plan_mod.PlanConfig(**small, nodes=1), plan_mod.MEASURED, 100.0)
    assert not lay["fits"] and lay["rank_budget_gib"] == pytest.approx(25.6)
    m = lay["min_nodes"]
    fits = [plan_mod.layout(n, d, f, plan_mod.PlanConfig(**small, nodes=x), plan_mod.MEASURED,
                            100.0)["fits"] for x in (m - 1, m)]
    assert fits == [False, True]
    one = plan_mod.search_ms(-(-n // (2 * m)), d, f, cfg, plan_mod.MEASURED, 100.0)
    lay = plan_mod.layout(n, d, f, plan_mod.PlanConfig(**small, nodes=m), plan_mod.MEASURED, 100.0)
    assert lay["rank_ms"] == pytest.approx(2 * one)       # two ranks share a node's cores
    with pytest.raises(UserError, match="IVF4096,PQ64 "):
        plan_mod.layout(10 ** 8, 1024, "IVF4096,PQ128x4fs", cfg, plan_mod.MEASURED, 100.0)
    assert cli_run(["plan", "--dstore-size", str(n), "--dimension", str(d), "--index-factory",
                    f, "--nodes", "2", "--ram-per-node", "16"]) == 0
    out = capsys.readouterr().out
    assert "--shards 2 --keep-shards" in out and "does NOT fit" in out
    assert "torchrun --nnodes 2 --nproc_per_node 1" in out
    assert cli_run(["plan", "--dstore-size", "10", "--dimension", "8", "--nodes", "0"]) == 2
    assert cli_run(["plan", "--dstore-size", "10", "--dimension", "8", "--gpus-per-node",
                    "-1"]) == 2
