"""Shared by the benchmarks: each measured stage runs in a fresh process (so its peak RSS
is its own), and prints one JSON line that the driver collects."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(script: str, name: str, argv: list[str]) -> dict:
    """Run ``script --stage name argv`` in a new process; its JSON result."""
    out = subprocess.run([sys.executable, script, "--stage", name, *argv], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def finish_stage(result: dict) -> None:
    """Inside a stage process: add the peak RSS and print the result line."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor(),
                cpus=os.cpu_count())


def write_result(path: str, out: dict, hide=("machine", "runs")) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in hide}, indent=2))
