#!/usr/bin/env bash
# GPU parity check on a machine with an NVIDIA GPU: the tiny pipeline on GPU and on CPU.
#   1. train a `small` model for a few updates on GPU (fp32; bf16 and fp16 smoke runs);
#   2. eval-lm of one checkpoint on CPU and on GPU (fp32, bf16): perplexities must agree;
#   3. build-dstore of the valid split on GPU and on CPU: keys must agree (fp16 tolerance);
#   4. build-dstore with torchrun, one rank per GPU (2 gloo ranks on the CPU when there is
#      one GPU): files byte-identical to the one-process dump of the same device;
#   5. build-index (FAISS trains on GPU when it has GPU support), and CPU-trained unsharded
#      vs 4-shard 2-worker builds: the kNN-LM perplexities with the two must be equal;
#   6. eval-lm --knnlm on the test split, CPU vs GPU (--knnlm-gpu), with the FAISS index and
#      with --exact-search (brute force on the GPU): kNN-LM perplexities must agree;
#   7. without faiss-gpu: the torch search backend on the GPU (--knn-backend torch) against
#      FAISS CPU (same perplexity; kNN-LM eval time over LM-only eval time), an index trained
#      by the torch k-means on the GPU (recall@10 within 1% of FAISS CPU training), and the
#      streaming exact search over EXACT_N synthetic keys for EXACT_Q queries (keys/s).
# Prints GPU vs CPU timings and a JSON summary; exits non-zero on a mismatch.
#
#   bash benchmarks/gpu_check.sh DATA_BIN [OUT_DIR]
set -euo pipefail
DATA=${1:?data-bin directory}
OUT=${2:-gpu_check_out}
TPS=${TPS:-256}
CTX=${CTX:-128}
DCTX=${DCTX:-64}
UPDATES=${UPDATES:-60}
EXACT_N=${EXACT_N:-10000000}
EXACT_Q=${EXACT_Q:-100000}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
log() { echo "== $*" >&2; }
timed() {  # name, command...: runs it, appends "name seconds" to $OUT/times.txt
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@"
  awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { print n, b - a }' >> "$OUT/times.txt"
}
: > "$OUT/times.txt"

log "train on $DEVICE"
for prec in fp32 bf16 fp16; do
  flag=""; [ "$prec" != fp32 ] && flag="--$prec"
  [ "$DEVICE" = cpu ] && [ "$prec" != fp32 ] && continue
  rm -rf "$OUT/train_$prec"
  timed "train_$prec" $PY -m knnlm train "$DATA" --arch small --tokens-per-sample "$TPS" \
      --max-tokens 16384 --max-update "$UPDATES" --lr 2e-3 --warmup-updates 5 \
      --validate-interval 0 --max-valid-tokens 30000 --save-dir "$OUT/train_$prec" --quiet $flag \
      > "$OUT/train_$prec.log"
done
CKPT="$OUT/train_fp32/checkpoint_last.pt"
GPU=(--device "$DEVICE")

log "eval-lm CPU vs $DEVICE"
ev() { local name=$1; shift
  timed "eval_$name" $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset valid \
      --tokens-per-sample "$TPS" --context-window "$CTX" --quiet \
      --results-path "$OUT/eval_$name.json" "$@" > /dev/null; }
ev cpu --cpu
ev gpu_fp32 "${GPU[@]}"
[ "$DEVICE" = cpu ] || ev gpu_bf16 "${GPU[@]}" --bf16

log "build-dstore CPU vs $DEVICE"
for dev in cpu gpu; do
  rm -rf "$OUT/dstore_$dev"
  args=(--cpu); [ "$dev" = gpu ] && args=("${GPU[@]}")
  timed "dstore_$dev" $PY -m knnlm build-dstore "$DATA" --path "$CKPT" --gen-subset valid \
      --dstore-dir "$OUT/dstore_$dev" --knn-keytype att,ffn --tokens-per-sample "$TPS" \
      --context-window "$DCTX" --quiet "${args[@]}" > /dev/null
done

NGPU=0
[ "$DEVICE" = cpu ] || NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then ranks=$NGPU; rdev=gpu; rargs=(); else ranks=2; rdev=cpu; rargs=(--cpu); fi
log "build-dstore with torchrun: $ranks ranks ($rdev)"
rm -rf "$OUT/dstore_torchrun"
timed "dstore_torchrun_${ranks}x$rdev" $PY -m torch.distributed.run --standalone \
    --nproc_per_node "$ranks" -m knnlm build-dstore "$DATA" --path "$CKPT" --gen-subset valid \
    --dstore-dir "$OUT/dstore_torchrun" --knn-keytype att,ffn --tokens-per-sample "$TPS" \
    --context-window "$DCTX" --quiet "${rargs[@]}" > /dev/null 2> "$OUT/dstore_torchrun.log"
echo "$rdev" > "$OUT/dstore_torchrun.device"

log "build-index"
timed index $PY -m knnlm build-index --dstore-dir "$OUT/dstore_gpu" --index-factory IVF256,PQ32 \
    --train-size 60000 --quiet > /dev/null
for s in 1 4; do
  timed "index_cpu_shards$s" $PY -m knnlm build-index --dstore-dir "$OUT/dstore_gpu" \
      --index-factory IVF256,PQ32 --train-size 60000 --gpu no --shards $s --workers 2 \
      --faiss-index "$OUT/index_shards$s.faiss" --quiet > /dev/null
done

log "eval-lm --knnlm CPU vs $DEVICE"
kn() { local name=$1; shift
  timed "knnlm_$name" $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset test \
      --tokens-per-sample "$TPS" --context-window "$CTX" --knnlm --dstore-filename "$OUT/dstore_gpu" \
      --k 256 --probe 16 --lmbda 0.3 --knn-temp 4 --quiet --results-path "$OUT/knnlm_$name.json" \
      "$@" > /dev/null; }
kn faiss_cpu --cpu --knn-sim-func do_not_recomp_l2
kn faiss_gpu "${GPU[@]}" --knnlm-gpu --knn-sim-func do_not_recomp_l2
kn exact_cpu --cpu --exact-search
kn exact_gpu "${GPU[@]}" --knnlm-gpu --exact-search
for s in 1 4; do
  kn "shards${s}_cpu" --cpu --knn-sim-func do_not_recomp_l2 --indexfile "$OUT/index_shards$s.faiss"
done

log "without faiss-gpu: torch search backend, torch k-means training, streaming exact search"
timed "eval_test_$DEVICE" $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset test \
    --tokens-per-sample "$TPS" --context-window "$CTX" --quiet "${GPU[@]}" \
    --results-path "$OUT/eval_test_lm.json" > /dev/null
on_gpu=(--knnlm-gpu); [ "$DEVICE" = cpu ] && on_gpu=()
kn torch_backend "${GPU[@]}" "${on_gpu[@]}" --knn-backend torch --knn-sim-func do_not_recomp_l2
gpu_train=(--gpu yes); [ "$DEVICE" = cpu ] && gpu_train=(--gpu no)
timed index_torch_train $PY -m knnlm build-index --dstore-dir "$OUT/dstore_gpu" \
    --index-factory IVF256,PQ32 --train-size 60000 --train-backend torch "${gpu_train[@]}" \
    --faiss-index "$OUT/index_torch_train.faiss" --quiet > /dev/null
$PY - "$OUT" "$DEVICE" "$EXACT_N" "$EXACT_Q" > "$OUT/torch_paths.json" <<'PY'
import json, sys, time
import faiss, numpy as np, torch
from knnlm.knn.exact import stream_search
out, device, n, q = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
keys = np.load(f"{out}/dstore_gpu/keys_att.npy").astype(np.float32)
rng = np.random.default_rng(0)
xq = keys[rng.choice(len(keys), 2000, replace=False)] + 0.05 * rng.standard_normal((2000, keys.shape[1])).astype(np.float32)
flat = faiss.IndexFlatL2(keys.shape[1]); flat.add(keys)
truth = flat.search(xq, 10)[1]
rec = {}
for name, path in (("faiss_cpu", "index_shards1.faiss"), ("torch", "index_torch_train.faiss")):
    idx = faiss.read_index(f"{out}/{path}"); faiss.extract_index_ivf(idx).nprobe = 16
    I = idx.search(xq, 10)[1]
    rec[name] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, truth)]))
dev = torch.device(device)
g = torch.Generator(device=dev).manual_seed(0)
big = torch.randn(n, 256, generator=g, device=dev, dtype=torch.float16)
queries = torch.randn(q, 256, generator=g, device=dev).cpu().numpy()
if device != "cpu":
    torch.cuda.synchronize()
t0 = time.perf_counter()
stream_search(queries, big, 1024, "l2", device=dev)
sec = time.perf_counter() - t0
print(json.dumps(dict(recall_at_10=rec, exact=dict(keys=n, queries=q, dim=256, seconds=sec,
                                                   keys_per_s=n / sec, query_keys_per_s=n * q / sec))))
PY

$PY - "$OUT" <<'PY'
import json, pathlib, sys
import numpy as np
out = pathlib.Path(sys.argv[1])
res = lambda name: json.loads((out / f"{name}.json").read_text())["results"]
rel = lambda a, b: abs(a / b - 1)
s = {"times_s": {l.split()[0]: round(float(l.split()[1]), 2)
                 for l in (out / "times.txt").read_text().splitlines()}}
cpu, g32 = res("eval_cpu"), res("eval_gpu_fp32")
s["lm_ppl"] = dict(cpu=cpu["ppl"], gpu_fp32=g32["ppl"])
checks = {"eval fp32": rel(g32["ppl"], cpu["ppl"]) < 1e-4}
if (out / "eval_gpu_bf16.json").exists():
    s["lm_ppl"]["gpu_bf16"] = res("eval_gpu_bf16")["ppl"]
    checks["eval bf16"] = rel(s["lm_ppl"]["gpu_bf16"], cpu["ppl"]) < 2e-2
diffs = {}
for kt in ("att", "ffn"):
    a = np.load(out / "dstore_cpu" / f"keys_{kt}.npy").astype(np.float32)
    b = np.load(out / "dstore_gpu" / f"keys_{kt}.npy").astype(np.float32)
    diffs[kt] = float(np.abs(a - b).max() / (np.abs(a).max() + 1e-9))
s["dstore_key_max_rel_diff"] = diffs
checks["dstore keys"] = max(diffs.values()) < 1e-2
checks["dstore vals"] = bool(np.array_equal(np.load(out / "dstore_cpu" / "vals.npy"),
                                            np.load(out / "dstore_gpu" / "vals.npy")))
for mode in ("faiss", "exact"):
    c, g = res(f"knnlm_{mode}_cpu"), res(f"knnlm_{mode}_gpu")
    s[f"knnlm_{mode}"] = dict(cpu=c["interpolated"]["ppl"], gpu=g["interpolated"]["ppl"],
                              lm=c["ppl"])
    checks[f"knnlm {mode}"] = rel(g["interpolated"]["ppl"], c["interpolated"]["ppl"]) < 1e-3
    checks[f"knnlm {mode} helps"] = c["interpolated"]["ppl"] < c["ppl"]
dev = (out / "dstore_torchrun.device").read_text().strip()
same = all((out / "dstore_torchrun" / f).read_bytes() == (out / f"dstore_{dev}" / f).read_bytes()
           for f in ("keys_att.npy", "keys_ffn.npy", "vals.npy", "pos.npy"))
s["torchrun_dump_bytes_identical"] = dict(device=dev, identical=same)
checks["torchrun dump"] = same
sh = {n: res(f"knnlm_shards{n}_cpu")["interpolated"]["ppl"] for n in (1, 4)}
s["knnlm_sharded_index"] = sh
checks["sharded index"] = sh[1] == sh[4]
for prec in ("fp32", "bf16", "fp16"):
    p = out / f"train_{prec}" / "train_log.jsonl"
    if p.exists():
        s[f"train_{prec}_valid_ppl"] = json.loads(p.read_text().splitlines()[-1])["valid_ppl"]
lm_test, tb = res("eval_test_lm"), res("knnlm_torch_backend")
fc = res("knnlm_faiss_cpu")
s["torch_backend"] = dict(ppl=tb["interpolated"]["ppl"], faiss_cpu_ppl=fc["interpolated"]["ppl"],
                          backend=tb["interpolated"]["search_backend"],
                          knnlm_over_lm_time=s["times_s"]["knnlm_torch_backend"]
                          / s["times_s"][[k for k in s["times_s"] if k.startswith("eval_test_")][0]])
checks["torch backend ppl"] = rel(tb["interpolated"]["ppl"], fc["interpolated"]["ppl"]) < 1e-3
paths = json.loads((out / "torch_paths.json").read_text())
s.update(torch_training_recall_at_10=paths["recall_at_10"], streaming_exact=paths["exact"])
checks["torch training recall"] = paths["recall_at_10"]["torch"] >= paths["recall_at_10"]["faiss_cpu"] - 0.01
s["checks"] = checks
s["ok"] = all(checks.values())
print(json.dumps(s, indent=2))
(out / "summary.json").write_text(json.dumps(s, indent=2))
sys.exit(0 if s["ok"] else 1)
PY
