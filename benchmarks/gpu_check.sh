#!/usr/bin/env bash
# GPU parity check: on a machine with an NVIDIA GPU, evaluates one checkpoint on CPU and on
# GPU (fp32 and bf16) and compares perplexities; trains a few updates on GPU in fp32, bf16
# and fp16 and reports tokens/s. Prints a JSON summary; exits non-zero on a mismatch.
#
#   bash benchmarks/gpu_check.sh DATA_BIN CHECKPOINT [OUT_DIR]
set -euo pipefail
DATA=${1:?data-bin directory}
CKPT=${2:?checkpoint}
OUT=${3:-gpu_check_out}
TPS=${TPS:-256}
CTX=${CTX:-128}
UPDATES=${UPDATES:-40}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

eval_run() {  # name, extra flags...
  local name=$1; shift
  $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset valid --tokens-per-sample "$TPS" \
      --context-window "$CTX" --quiet --results-path "$OUT/eval_$name.json" "$@"
}
eval_run cpu --cpu
eval_run cuda_fp32 --device cuda
eval_run cuda_bf16 --device cuda --bf16

for prec in fp32 bf16 fp16; do
  flag=""; [ "$prec" != fp32 ] && flag="--$prec"
  rm -rf "$OUT/train_$prec"
  $PY -m knnlm train "$DATA" --arch small --tokens-per-sample "$TPS" --max-tokens 16384 \
      --max-update "$UPDATES" --lr 2e-3 --warmup-updates 5 --validate-interval 0 \
      --max-valid-tokens 30000 --save-dir "$OUT/train_$prec" --quiet $flag \
      > "$OUT/train_$prec.log"
done

$PY - "$OUT" "$UPDATES" <<'PY'
import json, sys, pathlib
out, updates = pathlib.Path(sys.argv[1]), int(sys.argv[2])
ev = {n: json.loads((out / f"eval_{n}.json").read_text())["results"] for n in ("cpu", "cuda_fp32", "cuda_bf16")}
summary = {n: dict(ppl=r["ppl"], word_ppl=r["word_ppl"], tok_s=round(r["tokens_per_second"])) for n, r in ev.items()}
rel32 = abs(ev["cuda_fp32"]["ppl"] / ev["cpu"]["ppl"] - 1)
rel16 = abs(ev["cuda_bf16"]["ppl"] / ev["cpu"]["ppl"] - 1)
summary["rel_diff_fp32"], summary["rel_diff_bf16"] = rel32, rel16
for prec in ("fp32", "bf16", "fp16"):
    log = (out / f"train_{prec}.log").read_text()
    last = [json.loads(l) for l in (out / f"train_{prec}" / "train_log.jsonl").read_text().splitlines()][-1]
    summary[f"train_{prec}"] = dict(valid_ppl=last["valid_ppl"], log=log.strip().splitlines()[-1])
ok = rel32 < 1e-3 and rel16 < 2e-2 and all(summary[f"train_{p}"]["valid_ppl"] < 8000 for p in ("fp32", "bf16", "fp16"))
summary["ok"] = ok
print(json.dumps(summary, indent=2))
(out / "summary.json").write_text(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY
