import numpy as np
import pytest

from knnlm.data.blocks import Window, batch_windows, score_windows, shifted_inputs, train_blocks


def test_score_windows_hand_cases():
    got = [(w.ctx_start, w.score_start, w.end) for w in score_windows(10, 4, 2)]
    assert got == [(0, 0, 2), (0, 2, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    got = [(w.ctx_start, w.score_start, w.end) for w in score_windows(10, 4, 0)]
    assert got == [(0, 0, 4), (4, 4, 8), (8, 8, 10)]
    got = [(w.ctx_start, w.score_start, w.end) for w in score_windows(7, 5, 3)]
    assert got == [(0, 0, 2), (0, 2, 4), (1, 4, 6), (3, 6, 7)]


@pytest.mark.parametrize("n,T,C", [(1, 3, 0), (97, 16, 0), (97, 16, 15), (97, 16, 8), (64, 64, 63)])
def test_score_windows_cover_each_target_once(n, T, C):
    seen = np.zeros(n, dtype=int)
    for w in score_windows(n, T, C):
        assert w.length <= T
        assert w.score_start - w.ctx_start <= C
        # the context is as long as it may be: C tokens, or all there is
        assert w.score_start - w.ctx_start == min(C, w.score_start)
        seen[w.score_start:w.end] += 1
    assert (seen == 1).all()


def test_score_windows_rejects_bad_context():
    with pytest.raises(ValueError):
        score_windows(10, 4, 4)


def test_shifted_inputs():
    toks = np.array([5, 6, 7, 8])
    assert shifted_inputs(toks, 2, 0, 4).tolist() == [2, 5, 6, 7]
    assert shifted_inputs(toks, 2, 2, 4).tolist() == [6, 7]
    assert shifted_inputs(toks, 2, 0, 1).tolist() == [2]


def test_train_blocks_modes():
    eos = 2
    # lines: [5 6 2] [7 2] [8 9 10 11 2]
    toks = np.array([5, 6, 2, 7, 2, 8, 9, 10, 11, 2])
    assert train_blocks(toks, eos, 4, "none").tolist() == [[0, 4], [4, 8], [8, 10]]
    assert train_blocks(toks, eos, 4, "eos").tolist() == [[0, 3], [3, 5], [5, 9], [9, 10]]
    assert train_blocks(toks, eos, 5, "complete").tolist() == [[0, 5], [5, 10]]
    assert train_blocks(toks, eos, 4, "complete").tolist() == [[0, 3], [3, 5], [5, 9], [9, 10]]


def test_batch_windows_respects_max_tokens():
    ws = [Window(i * 4, i * 4, i * 4 + 4) for i in range(10)]
    batches = list(batch_windows(ws, max_tokens=12))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert [w for b in batches for w in b] == ws
