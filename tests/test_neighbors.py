"""`knnlm neighbors`: self-retrieval finds the exact source position; the numbers equal
the LM, the kNN math and the datastore."""
import json

import numpy as np
import pytest
import torch

from knnlm import build_dstore, neighbors
from knnlm.knn import math as knn
from knnlm.cli import run as cli_run
from knnlm.knn.datastore import Datastore


@pytest.fixture(scope="module")
def valid_dstore(bpe_databin, trained_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("valid_ds") / "ds"
    build_dstore.main(build_dstore.BuildDstoreConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_dir=str(out), gen_subset="valid",
        knn_keytype="att", tokens_per_sample=64, quiet=True))
    return Datastore(out)


def test_same_text_retrieves_its_own_positions(bpe_databin, trained_ckpt, valid_dstore, corpus_dir,
                                               tmp_path, capsys):
    lines = (corpus_dir / "valid.txt").read_text().splitlines()[:3]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    rows = neighbors.main(neighbors.NeighborsConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_filename=str(valid_dstore.path),
        exact_search=True, k=4, file=str(tmp_path / "t.txt"), json=True))
    tokens = np.asarray(bpe_databin.split("valid"))
    assert len(rows) == sum(len(bpe_databin.vocab.encode_text(l)) + 1 for l in lines)
    for row in rows:
        first = row["neighbors"][0]
        # the source position is the nearest (ties: another block starting after the same
        # token has the very same context, e.g. position 0 and a block after a line end)
        own = [nb for nb in row["neighbors"] if nb["source_position"] == row["position"]]
        assert own and own[0]["distance"] <= first["distance"] + 1e-3 and first["distance"] < 1e-2
        assert own[0]["value"] == row["target"] == tokens[row["position"]]
        w = torch.tensor([nb["weight"] for nb in row["neighbors"]])
        assert w.sum().item() == pytest.approx(1.0)
        hit = sum(nb["weight"] for nb in row["neighbors"] if nb["value"] == row["target"])
        assert row["knn_prob"] == pytest.approx(hit, rel=1e-6)
    printed = json.loads(capsys.readouterr().out)
    assert printed["score_mode"]["name"] == "exact-l2" and printed["k"] == 4
    for row in printed["positions"][:20]:
        own = [nb for nb in row["neighbors"] if nb["source_position"] == row["position"]][0]
        assert own["source_context"] == row["context"] and own["value_text"] == row["target_text"]


def test_text_output_and_bad_input(bpe_databin, trained_ckpt, valid_dstore, capsys):
    base = ["neighbors", str(bpe_databin.path), "--path", str(trained_ckpt),
            "--dstore-filename", str(valid_dstore.path), "--exact-search", "--k", "3"]
    assert cli_run(base + ["--text", "Enter the king"]) == 0
    out = capsys.readouterr().out
    assert "p_LM" in out and " 1." in out and " 3." in out
    assert cli_run(base) == 2                       # no text
    assert cli_run(base + ["--text", "x", "--k", "0"]) == 2
    assert cli_run(base + ["--text", "x", "--file", "y"]) == 2


def test_retomaton_follows_the_text_through_its_own_entries(bpe_databin, trained_ckpt,
                                                            valid_dstore, corpus_dir, tmp_path):
    from knnlm.knn import index
    flat = str(tmp_path / "flat.faiss")
    index.build_index(index.BuildIndexConfig(dstore_dir=str(valid_dstore.path), knn_keytype="att",
                                             index_factory="Flat", faiss_index=flat, quiet=True))
    (tmp_path / "t.txt").write_text((corpus_dir / "valid.txt").read_text().splitlines()[0] + "\n")
    rows = neighbors.main(neighbors.NeighborsConfig(
        data=str(bpe_databin.path), path=str(trained_ckpt), dstore_filename=str(valid_dstore.path),
        indexfile=flat, k=4, retomaton=True, min_knns=1, file=str(tmp_path / "t.txt")))
    # the first step searches and finds its own entry; from there the pointer to the next
    # entry always predicts the text's next token, so no step searches again
    assert rows[0]["searched"] and not any(r["searched"] for r in rows[1:])
    for row in rows:
        assert row["position"] in [nb["source_position"] for nb in row["neighbors"]]
