"""kNN math against brute-force loops over neighbours."""
import math

import numpy as np
import pytest
import torch

from knnlm.knn import math as knn
from knnlm.knn.search import exact_distances


def loop_knn_target(scores, vals, target, temp, keep=None):
    """Reference: explicit loops, Python floats."""
    keep = keep if keep is not None else [True] * len(scores)
    z = sum(math.exp(s / temp) for s, k in zip(scores, keep) if k)
    if z == 0:
        return float("-inf")
    hit = sum(math.exp(s / temp) for s, v, k in zip(scores, vals, keep) if k and v == target)
    return math.log(hit / z) if hit > 0 else float("-inf")


def random_case(B=40, k=12, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.rand(B, k, generator=g, dtype=torch.float64) * 20
    D[:, 3] = D[:, 4]                      # ties
    vals = torch.randint(0, V, (B, k), generator=g)
    vals[:, 5] = vals[:, 6]                # repeated values
    targets = torch.randint(0, V, (B,), generator=g)
    vals[0] = (targets[0] + 1) % V         # row 0: no neighbour has the target
    return D, vals, targets


@pytest.mark.parametrize("temp", [0.3, 1.0, 7.5])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_target_log_probs_match_loops(temp, metric):
    D, vals, targets = random_case()
    scores = knn.scores_from_distances(D, metric)
    got = knn.knn_target_log_probs(scores, vals, targets, temp)
    for b in range(len(D)):
        ref = loop_knn_target(scores[b].tolist(), vals[b].tolist(), int(targets[b]), temp)
        if ref == float("-inf"):
            assert got[b] == float("-inf")
        else:
            assert got[b].item() == pytest.approx(ref, abs=1e-10)
    assert got[0] == float("-inf")
    assert not torch.isnan(got).any()


def test_full_vocab_equals_target_path_and_sums_to_one():
    D, vals, targets = random_case(V=9)
    scores = knn.scores_from_distances(D, "l2")
    full = knn.knn_full_log_probs(scores, vals, 9, temp=2.0)
    tgt = knn.knn_target_log_probs(scores, vals, targets, temp=2.0)
    picked = full.gather(1, targets[:, None])[:, 0]
    assert torch.equal(torch.isinf(picked), torch.isinf(tgt))
    fin = torch.isfinite(tgt)
    torch.testing.assert_close(picked[fin], tgt[fin], rtol=0, atol=1e-10)
    torch.testing.assert_close(full.exp().sum(1), torch.ones(len(D), dtype=full.dtype))


def test_full_vocab_with_no_neighbour_kept_is_zero_mass_not_nan():
    D, vals, _ = random_case(B=4)
    mask = torch.ones(D.shape, dtype=torch.bool)
    mask[2] = False                                   # row 2: the search found nothing
    full = knn.knn_full_log_probs(knn.scores_from_distances(D, "l2"), vals, 9, 1.0, mask)
    assert not torch.isnan(full).any()
    assert torch.isneginf(full[2]).all()
    torch.testing.assert_close(full[[0, 1, 3]].exp().sum(1), torch.ones(3, dtype=full.dtype))


def test_masks_and_ignore_top():
    D, vals, targets = random_case()
    scores = knn.scores_from_distances(D, "l2")
    mask = torch.ones(D.shape, dtype=torch.bool)
    mask[:, 0] = False                       # --ignore-top drops the nearest neighbour
    got = knn.knn_target_log_probs(scores, vals, targets, 1.0, mask)
    ref = knn.knn_target_log_probs(scores[:, 1:], vals[:, 1:], targets, 1.0)
    torch.testing.assert_close(got, ref)
    none = torch.zeros_like(mask)
    assert torch.isinf(knn.knn_target_log_probs(scores, vals, targets, 1.0, none)).all()


def test_interpolation_edges_and_minus_inf():
    lm = torch.log(torch.tensor([0.2, 0.5, 0.01], dtype=torch.float64))
    kn = torch.tensor([math.log(0.9), float("-inf"), math.log(0.3)], dtype=torch.float64)
    assert torch.equal(knn.interpolate(lm, kn, 0.0), lm)
    assert torch.equal(knn.interpolate(lm, kn, 1.0), kn)
    mid = knn.interpolate(lm, kn, 0.25)
    ref = torch.log(0.75 * lm.exp() + 0.25 * kn.exp())
    torch.testing.assert_close(mid, ref)
    assert torch.isfinite(mid).all()       # a missing kNN match does not sink the token
    with pytest.raises(ValueError):
        knn.interpolate(lm, kn, 1.5)


def test_temperature_scaling_identity():
    """Scaling all distances by c equals dividing the temperature by c."""
    D, vals, targets = random_case()
    s = knn.scores_from_distances(D, "l2")
    a = knn.knn_target_log_probs(s * 3.0, vals, targets, temp=6.0)
    b = knn.knn_target_log_probs(s, vals, targets, temp=2.0)
    torch.testing.assert_close(a, b)
    # T -> infinity: uniform over the k neighbours, the share of target hits
    far = knn.knn_target_log_probs(s, vals, targets, temp=1e12)
    share = (vals == targets[:, None]).double().mean(1)
    fin = share > 0
    torch.testing.assert_close(far[fin], share[fin].log())


def test_l2_and_ip_sign_conventions():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2]])
    l2 = knn.scores_from_distances(torch.from_numpy(exact_distances(q, keys, ids, "l2")), "l2")
    ip = knn.scores_from_distances(torch.from_numpy(exact_distances(q, keys, ids, "ip")), "ip")
    assert l2.tolist() == [[-0.0, -2.0, -4.0]]       # nearest (itself) scores highest
    assert ip.tolist() == [[1.0, 0.0, 3.0]]          # the long vector wins under IP
    # FAISS returns squared L2 distances and raw inner products
    assert torch.equal(knn.scores_from_distances(torch.tensor([[0.0, 2.0, 4.0]]), "l2"), l2)
    assert torch.equal(knn.scores_from_distances(torch.tensor([[1.0, 0.0, 3.0]]), "ip"), ip)


def test_multi_temperature_path_equals_single_temperature():
    D, vals, targets = random_case(B=60, k=20)
    D[7] += torch.linspace(0, 3000, 20, dtype=torch.float64)   # far hits: float32 underflow
    vals[7, 0] = (targets[7] + 1) % 9
    scores = knn.scores_from_distances(D, "l2")
    mask = torch.rand(D.shape, generator=torch.Generator().manual_seed(3)) > 0.2
    mask[5] = False                                             # a row with nothing kept
    temps = [0.3, 1.0, 4.0, 50.0]
    multi = knn.knn_target_log_probs_temps(scores.float(), vals, targets, temps, mask)
    for i, T in enumerate(temps):
        ref = knn.knn_target_log_probs(scores, vals, targets, T, mask)
        assert torch.equal(torch.isinf(multi[i]), torch.isinf(ref)), T
        fin = torch.isfinite(ref)
        torch.testing.assert_close(multi[i][fin], ref[fin], rtol=1e-5, atol=1e-4)


def test_float32_path_equals_float64_across_row_blocks():
    """eval-lm's float32 path (:func:`knn_target_log_probs_fast`) against the float64
    log-space reference on more rows than one block, k = 1024, realistic L2 distances, with
    counts, a missing-neighbour tail, rows without any match, rows whose matches underflow
    in float32 and a row with nothing kept: log p within 2e-6 (relative beyond 1), the mean
    log p within 1e-7."""
    g = torch.Generator().manual_seed(5)
    B, k = knn.FAST_ROWS * 2 + 37, 1024
    D = torch.sort(torch.rand(B, k, generator=g, dtype=torch.float64) * 400 + 20, 1).values
    vals = torch.randint(0, 300, (B, k), generator=g, dtype=torch.int32)
    targets = vals[:, 17].clone()
    targets[::7] = 301                                    # no neighbour has the target
    D[3, 1:] += 2000                                      # its match (col 17) underflows
    mask = torch.ones(B, k, dtype=torch.bool)
    mask[600:620, 900:] = False                           # fewer than k found
    mask[1000] = False                                    # nothing found
    counts = torch.log(torch.randint(1, 9, (B, k), generator=g).double())
    scores = knn.scores_from_distances(D, "l2")
    for T in (1.0, 4.0):
        for m, c in ((None, None), (mask, None), (mask, counts)):
            ref = knn.knn_target_log_probs(scores, vals.long(), targets.long(), T, m, c)
            got = knn.knn_target_log_probs_fast(scores.float(), vals, targets, T, m,
                                                 None if c is None else c.float())
            assert got.dtype == torch.float64
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            fin = torch.isfinite(ref)
            # (the scores' own float32 rounding: relative, ~1e-8 of the underflow row's -2008)
            assert ((got[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1)).max() < 2e-6
            assert abs(float(got[fin].mean() / ref[fin].mean()) - 1) < 1e-7
    assert torch.isfinite(knn.knn_target_log_probs_fast(scores.float(), vals, targets, 1.0))[3]


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_sparse_generation_path_equals_the_dense_one(lmbda):
    """Generation's O(k) p_kNN (on the values of the kept neighbours) interpolated into
    p_LM equals the dense (V,) path: repeated values, a masked tail, counts, λ 0 and 1."""
    g = torch.Generator().manual_seed(2)
    V, k = 50, 30
    scores = -torch.rand(1, k, generator=g) * 20
    vals = torch.randint(0, 12, (1, k), generator=g)
    mask = torch.ones(1, k, dtype=torch.bool)
    mask[0, 25:] = False
    counts = torch.log(torch.randint(1, 4, (1, k), generator=g).float())
    lm = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)
    for c in (None, counts):
        dense = knn.knn_full_log_probs(scores, vals, V, 3.0, mask, c)[0].double()
        tokens, lp = knn.knn_sparse_log_probs(scores[0], vals[0], V, 3.0, mask[0],
                                              None if c is None else c[0])
        assert sorted(tokens.tolist()) == sorted(vals[0, :25].tolist())
        torch.testing.assert_close(lp, dense[tokens], rtol=1e-6, atol=1e-6)
        assert torch.isinf(dense[[t for t in range(V) if t not in tokens.tolist()]]).all()
        want = knn.interpolate(lm, dense, lmbda)
        got = knn.interpolate_sparse(lm, tokens, lp, lmbda)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)],
                                   rtol=1e-6, atol=1e-6)
    empty = knn.knn_sparse_log_probs(scores[0], vals[0], V, 1.0, torch.zeros(k, dtype=torch.bool))
    assert len(empty[0]) == 0 and len(empty[1]) == 0
