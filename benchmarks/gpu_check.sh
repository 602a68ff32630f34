#!/usr/bin/env bash
# GPU parity check on a machine with an NVIDIA GPU: the tiny pipeline on GPU and on CPU.
#   1. train a `small` model for a few updates on GPU (fp32; bf16 and fp16 smoke runs);
#   2. eval-lm of one checkpoint on CPU and on GPU (fp32, bf16): perplexities must agree;
#   3. build-dstore of the valid split on GPU and on CPU: keys must agree (fp16 tolerance);
#   4. build-dstore with torchrun, one rank per GPU (2 gloo ranks on the CPU when there is
#      one GPU): files byte-identical to the one-process dump of the same device;
#   5. build-index (FAISS trains on GPU when it has GPU support, else the torch k-means),
#      and CPU-trained unsharded vs 4-shard 2-worker builds: the kNN-LM perplexities with
#      the two must agree to 1e-6 (the workers' other FAISS thread count can move a key
#      tied to float32 rounding between two lists; see knnlm/knn/shards.py);
#   6. eval-lm --knnlm on the test split, CPU vs GPU (--knnlm-gpu), with the FAISS index and
#      with --exact-search (brute force on the GPU): kNN-LM perplexities must agree; the
#      4 shards kept unmerged, searched on the GPU by the torch backend (one process, and
#      one torchrun rank per GPU with 2+ GPUs), against the merged shards on the CPU;
#   7. without faiss-gpu: the torch search backend on the GPU (--knn-backend torch) against
#      FAISS CPU (same perplexity; kNN-LM eval time over LM-only eval time), an index trained
#      by the torch k-means on the GPU (recall@10 within 1% of FAISS CPU training), and the
#      streaming exact search over EXACT_N synthetic keys for EXACT_Q queries (keys/s).
# Stage 1b, run right after training because it holds the headline numbers: the datastore
# of the BIG_SPLIT split (the demo's train split: 1.74M keys), an index trained on the GPU
# by the torch k-means, and the test split's kNN-LM at k 1024, nprobe 32 with the torch
# backend on the GPU: its eval time over the LM-only eval's (each eval loop's own seconds,
# from the results JSON) and its perplexity against FAISS CPU's search of the same index;
# then benchmarks/torch_backend.py on that index (ms/query and neighbour overlap against
# faiss-cpu, torch vs FAISS training, the streaming exact search). Last, the test suite's
# CUDA-only tests (both torch scans against FAISS on the GPU, KNNLogitsProcessor on the GPU).
# Prints GPU vs CPU timings and a JSON summary (a stage that did not run is listed under
# "missing"); exits non-zero on a mismatch.
#
#   bash benchmarks/gpu_check.sh DATA_BIN [OUT_DIR]
# On a GPU machine without internet access, benchmarks/gpu_run.sh sets up and runs it.
set -euo pipefail
DATA=${1:?data-bin directory}
OUT=${2:-gpu_check_out}
TPS=${TPS:-256}
CTX=${CTX:-128}
DCTX=${DCTX:-64}
UPDATES=${UPDATES:-60}
EXACT_N=${EXACT_N:-10000000}
EXACT_Q=${EXACT_Q:-100000}
BIG_SPLIT=${BIG_SPLIT:-train}
BIG_FACTORY=${BIG_FACTORY:-IVF2048,PQ32}
BIG_TRAIN=${BIG_TRAIN:-131072}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
log() { echo "== $*" >&2; }
timed() {  # name, command...: runs it, appends "name seconds" to $OUT/times.txt; a failure
  local name=$1; shift          # is logged in $OUT/failed.txt and the script goes on
  local t0=$EPOCHREALTIME rc=0
  "$@" || rc=$?
  if [ "$rc" = 0 ]; then
    awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { print n, b - a }' >> "$OUT/times.txt"
  else
    echo "$name exit $rc" >> "$OUT/failed.txt"; log "$name FAILED (exit $rc)"
  fi
}
: > "$OUT/times.txt"; : > "$OUT/failed.txt"

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
on_gpu=(--knnlm-gpu); [ "$DEVICE" = cpu ] && on_gpu=()
gpu_train=(--gpu yes); [ "$DEVICE" = cpu ] && gpu_train=(--gpu no)

log "the target: $BIG_SPLIT datastore, $BIG_FACTORY trained by torch k-means, kNN-LM k 1024 nprobe 32"
rm -rf "$OUT/dstore_big"
timed dstore_big $PY -m knnlm build-dstore "$DATA" --path "$CKPT" --gen-subset "$BIG_SPLIT" \
    --dstore-dir "$OUT/dstore_big" --knn-keytype att --tokens-per-sample "$TPS" \
    --context-window "$DCTX" --quiet "${GPU[@]}" > /dev/null
timed index_big $PY -m knnlm build-index --dstore-dir "$OUT/dstore_big" --index-factory "$BIG_FACTORY" \
    --train-size "$BIG_TRAIN" --train-backend torch "${gpu_train[@]}" --quiet > /dev/null
big() { local name=$1; shift
  timed "big_$name" $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset test \
      --tokens-per-sample "$TPS" --context-window "$CTX" --quiet "${GPU[@]}" \
      --results-path "$OUT/big_$name.json" "$@" > /dev/null; }
knn_big=(--knnlm --dstore-filename "$OUT/dstore_big" --k 1024 --probe 32 --lmbda 0.25 --knn-temp 1
         --knn-sim-func do_not_recomp_l2)
big lm
big torch "${knn_big[@]}" "${on_gpu[@]}" --knn-backend torch
big faiss_cpu "${knn_big[@]}" --knn-backend faiss
big lm_again                                  # the LM-only time once more (warm caches)
timed torch_backend_bench $PY benchmarks/torch_backend.py --device "$DEVICE" \
    --index "$OUT/dstore_big/index_att_l2.faiss" --keys "$OUT/dstore_big/keys_att.npy" \
    --nprobe 32 --queries 16384 --train-factory "$BIG_FACTORY" --train-size "$BIG_TRAIN" \
    --exact-keys 1000000 --exact-queries 16384 --out "$OUT/torch_backend.json" > /dev/null

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
# the same 4 shards kept (never merged), searched by the torch backend on the GPU, by one
# process and (with 2+ GPUs) by one torchrun rank per GPU, each holding its own shards
timed index_kept4 $PY -m knnlm build-index --dstore-dir "$OUT/dstore_gpu" \
    --index-factory IVF256,PQ32 --train-size 60000 --gpu no --shards 4 --keep-shards \
    --faiss-index "$OUT/index_kept4.faiss" --quiet > /dev/null
if [ "$DEVICE" != cpu ]; then
  kn kept4_torch_gpu "${GPU[@]}" --knnlm-gpu --knn-backend torch --knn-sim-func do_not_recomp_l2 \
      --indexfile "$OUT/index_kept4.faiss"
  if [ "$NGPU" -ge 2 ]; then
    timed "knnlm_kept4_ranks${NGPU}" $PY -m torch.distributed.run --standalone \
        --nproc_per_node "$NGPU" -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset test \
        --tokens-per-sample "$TPS" --context-window "$CTX" --knnlm \
        --dstore-filename "$OUT/dstore_gpu" --k 256 --probe 16 --lmbda 0.3 --knn-temp 4 --quiet \
        --knnlm-gpu --knn-backend torch --knn-sim-func do_not_recomp_l2 \
        --indexfile "$OUT/index_kept4.faiss" --results-path "$OUT/knnlm_kept4_ranks.json" \
        > /dev/null 2> "$OUT/kept4_ranks.log"
  fi
fi

log "without faiss-gpu: torch search backend, torch k-means training, streaming exact search"
timed "eval_test_$DEVICE" $PY -m knnlm eval-lm "$DATA" --path "$CKPT" --gen-subset test \
    --tokens-per-sample "$TPS" --context-window "$CTX" --quiet "${GPU[@]}" \
    --results-path "$OUT/eval_test_lm.json" > /dev/null
kn torch_backend "${GPU[@]}" "${on_gpu[@]}" --knn-backend torch --knn-sim-func do_not_recomp_l2
timed index_torch_train $PY -m knnlm build-index --dstore-dir "$OUT/dstore_gpu" \
    --index-factory IVF256,PQ32 --train-size 60000 --train-backend torch "${gpu_train[@]}" \
    --faiss-index "$OUT/index_torch_train.faiss" --quiet > /dev/null
timed torch_paths $PY benchmarks/gpu_torch_paths.py "$OUT" "$DEVICE" "$EXACT_N" "$EXACT_Q" \
    > "$OUT/torch_paths.json"
if [ "$DEVICE" != cpu ]; then      # the test suite's CUDA-only tests (skipped on a CPU)
  log "the CUDA tests"
  timed cuda_tests $PY -m pytest -q -p no:cacheprovider tests/test_torch_index.py \
      tests/test_hf_generate.py -k "gpu" > "$OUT/cuda_tests.log" 2>&1
fi

$PY benchmarks/gpu_summary.py "$OUT"
