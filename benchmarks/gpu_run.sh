#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a GPU machine that cannot reach a package index: installs the
# carried wheels when FAISS is missing (faiss-cpu; gpu_prepare.sh downloads them into .whl/),
# runs the check on the carried data-bin under a time limit, and leaves in RESULT_DIR what
# it found: device.txt, gpu_check.log, summary.json, times.txt, failed.txt,
# torch_backend.json and cuda_tests.log (a summary is written after a timeout too, listing what
# is missing).
#
#   bash benchmarks/gpu_prepare.sh                      # here, once: .whl/ and the data-bin
#   bash benchmarks/gpu_run.sh RESULT_DIR [LIMIT_S]     # there (LIMIT_S: default 540)
#
# The environment of gpu_check.sh (DEVICE, UPDATES, BIG_SPLIT, ...) passes through; DATA
# picks the data-bin (default runs/demo/data-bin, what `make demo` writes).
set -uo pipefail
RES=${1:?result directory}
LIMIT=${2:-540}
PY=${PYTHON:-python3}
mkdir -p "$RES"
if ! $PY -c "import faiss" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/knnlm-site .whl/*.whl || { echo "no FAISS and no wheels in .whl/" >&2; exit 3; }
  export PYTHONPATH=/tmp/knnlm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  nproc
  $PY -c "import faiss, numpy, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'faiss', faiss.__version__, 'numpy', numpy.__version__)"
} > "$RES/device.txt"
WORK=${WORK:-/tmp/knnlm-gpu-check}
rm -rf "$WORK"
timeout "$LIMIT" bash benchmarks/gpu_check.sh "${DATA:-runs/demo/data-bin}" "$WORK" > "$RES/gpu_check.log" 2>&1
rc=$?
[ "$rc" = 124 ] && echo "gpu_check.sh stopped at the ${LIMIT}s limit" >> "$RES/gpu_check.log"
[ -f "$WORK/summary.json" ] || $PY benchmarks/gpu_summary.py "$WORK" > /dev/null 2>&1
for f in summary.json times.txt failed.txt torch_backend.json cuda_tests.log; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$RES/"
done
echo "gpu_check.sh exit $rc"
cat "$RES/summary.json" 2>/dev/null
exit "$rc"
