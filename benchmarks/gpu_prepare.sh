#!/usr/bin/env bash
# Prepares benchmarks/gpu_run.sh for a GPU machine that cannot reach a package index: the
# faiss-cpu wheel of the installed version, for CPython PY_VERSION (default 3.12) on
# x86-64 Linux, in .whl/ (kept out of git by .git/info/exclude), and the demo's data-bin
# (`make demo` when it is missing). Carry both: .whl and runs/demo/data-bin (~23 MB).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version=$($PY -c "import faiss; print(faiss.__version__)")
rm -rf .whl
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "faiss-cpu==$version"
[ -f runs/demo/data-bin/data.json ] || make demo
du -sh .whl runs/demo/data-bin
