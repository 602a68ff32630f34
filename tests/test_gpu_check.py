"""The GPU check's scripts (benchmarks/gpu_*.sh run on a GPU machine; here: their syntax,
and the summary's verdicts on what the stages left)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "benchmarks" / "gpu_summary.py"


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_run.sh", "gpu_prepare.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], check=True)


def summarise(out):
    p = subprocess.run([sys.executable, str(SUMMARY), str(out)], capture_output=True, text=True)
    return p.returncode, json.loads((out / "summary.json").read_text())


def results(out, name, **res):
    (out / f"{name}.json").write_text(json.dumps(dict(results=res)))


def test_summary_of_nothing_lists_what_is_missing(tmp_path):
    rc, s = summarise(tmp_path)
    assert rc == 1 and not s["ok"] and not s["checks"]
    assert {"big_lm.json", "eval_cpu.json", "torch_paths.json"} <= set(s["missing"])


def test_summary_checks_and_targets(tmp_path):
    (tmp_path / "times.txt").write_text("big_lm 2.5\n")
    (tmp_path / "failed.txt").write_text("index exit 1\n")
    results(tmp_path, "big_lm", ppl=100.0, seconds=2.0)
    results(tmp_path, "big_lm_again", ppl=100.0, seconds=1.6)
    knn = dict(ppl=100.0, interpolated=dict(ppl=80.0, search_backend="torch (cuda:0)"))
    results(tmp_path, "big_torch", seconds=2.4, **knn)
    results(tmp_path, "big_faiss_cpu", seconds=8.0, **dict(knn, interpolated=dict(ppl=80.5)))
    results(tmp_path, "eval_cpu", ppl=50.0, seconds=1)
    results(tmp_path, "eval_gpu_fp32", ppl=50.0 * (1 + 1e-6), seconds=1)
    rc, s = summarise(tmp_path)
    big = s["target_1.74M_keys"]
    assert big["lm_eval_seconds"] == 1.6 and big["torch_knnlm_over_lm"] == pytest.approx(1.5)
    assert s["targets"]["kNN-LM eval / LM-only eval <= 1.7 (torch backend on the GPU)"] is True
    assert s["checks"]["eval fp32"] is True
    assert s["checks"]["target: torch backend ppl == FAISS CPU ppl"] is False   # 80 vs 80.5
    assert s["failed_stages"] == ["index exit 1"] and s["times_s"] == {"big_lm": 2.5}
    assert rc == 1 and not s["ok"]
