#!/usr/bin/env bash
# kNN-LM on the model of wikitext_bpe_train.sh, then every analysis of "Why do Nearest
# Neighbor Language Models Work?": LM eval; datastore of the training split (att and ffn
# keys); FAISS indexes (L2 and IP); kNN-LM eval with retrieval caches and a λ/T sweep;
# the parametric heads (fine-tuned on the frozen LM); `knnlm analyze`.
#
#   bash wikitext_bpe_knn.sh                                # WikiText-103
#   CORPUS=shakespeare ARCH=small bash wikitext_bpe_knn.sh  # small mode: 2 CPU cores
#
# Same variables and run directory as wikitext_bpe_train.sh. Each stage is skipped when
# its output and sidecar are there; logs go to $RUN/logs/.
#
# Windows: our --tokens-per-sample counts the context too (fairseq's eval_lm takes the
# model's 3072 and subtracts the context window). The fork's evaluation,
# --sample-break-mode complete --max-tokens 3072 --context-window 2560 (blocks of whole
# lines up to 512 tokens, each after up to 2560 of context), is here --tokens-per-sample
# 3072 --context-window 2560 --sample-break-mode complete; its datastore flags
# (--sample-break-mode none --context-window 1536: 1536 new tokens after up to 1536 of
# context) are --tokens-per-sample 3072 --context-window 1536. Small mode keeps the same
# protocol at a 256-token window.
set -euo pipefail

CORPUS=${CORPUS:-wikitext-103}
KNNLM=${KNNLM:-knnlm}
SEED=${SEED:-1}
if [[ $CORPUS == shakespeare ]]; then   # small mode
  ARCH=${ARCH:-small}
  BPE=${BPE:-bytelevel}
  EVAL_TOKENS_PER_SAMPLE=${EVAL_TOKENS_PER_SAMPLE:-256}
  EVAL_CONTEXT_WINDOW=${EVAL_CONTEXT_WINDOW:-128}
  DSTORE_TOKENS_PER_SAMPLE=${DSTORE_TOKENS_PER_SAMPLE:-256}
  DSTORE_CONTEXT_WINDOW=${DSTORE_CONTEXT_WINDOW:-64}
  INDEX_FACTORY=${INDEX_FACTORY:-IVF2048,PQ32}
  INDEX_TRAIN_SIZE=${INDEX_TRAIN_SIZE:-100000}
  PROBE=${PROBE:-8}
  LARGE_PROBE=${LARGE_PROBE:-128}
  ANALYZE_MAX_EVAL_TOKENS=${ANALYZE_MAX_EVAL_TOKENS:-10000}
  HEAD_UPDATES=${HEAD_UPDATES:-60}
  HEAD_MAX_TOKENS=${HEAD_MAX_TOKENS:-4096}
  HEAD_LR=${HEAD_LR:-2e-3}
  WEIGHT_TOKENS=${WEIGHT_TOKENS:-300000}   # training tokens scored for the loss weights
  OVERFIT_EPOCHS=${OVERFIT_EPOCHS:-12}     # the base LM trained on, dropout 0 (~4.5 min/epoch)
  OVERFIT_LR=${OVERFIT_LR:-1e-3}
  OVERFIT_MAX_TOKENS=${OVERFIT_MAX_TOKENS:-4096}
  EXTRA_EVAL_FLAGS=${EXTRA_EVAL_FLAGS:-}
else
  ARCH=${ARCH:-transformer_lm_wikibpe}
  BPE=${BPE:-subword}
  EVAL_TOKENS_PER_SAMPLE=${EVAL_TOKENS_PER_SAMPLE:-3072}
  EVAL_CONTEXT_WINDOW=${EVAL_CONTEXT_WINDOW:-2560}
  DSTORE_TOKENS_PER_SAMPLE=${DSTORE_TOKENS_PER_SAMPLE:-3072}
  DSTORE_CONTEXT_WINDOW=${DSTORE_CONTEXT_WINDOW:-1536}
  INDEX_FACTORY=${INDEX_FACTORY:-IVF4096,PQ64}
  INDEX_TRAIN_SIZE=${INDEX_TRAIN_SIZE:-1000000}
  PROBE=${PROBE:-32}
  LARGE_PROBE=${LARGE_PROBE:-1024}
  ANALYZE_MAX_EVAL_TOKENS=${ANALYZE_MAX_EVAL_TOKENS:-0}
  HEAD_UPDATES=${HEAD_UPDATES:-20000}
  HEAD_MAX_TOKENS=${HEAD_MAX_TOKENS:-3072}
  HEAD_LR=${HEAD_LR:-5e-4}
  WEIGHT_TOKENS=${WEIGHT_TOKENS:-0}        # 0: the whole training split
  OVERFIT_EPOCHS=${OVERFIT_EPOCHS:-5}
  OVERFIT_LR=${OVERFIT_LR:-1e-2}          # the fork's (NAG)
  OVERFIT_MAX_TOKENS=${OVERFIT_MAX_TOKENS:-3072}
  EXTRA_EVAL_FLAGS=${EXTRA_EVAL_FLAGS:---fp16}
fi
EVAL_BREAK_MODE=${EVAL_BREAK_MODE:-complete}
RUN=${RUN:-runs/${CORPUS}_${ARCH}}
K=${K:-1024}
LMBDA=${LMBDA:-0.25}
DATA_BIN=$RUN/data-bin
CKPT=${CKPT:-$RUN/checkpoints/checkpoint_best.pt}
DSTORE=$RUN/dstore
RESULTS=$RUN/results
HEADS=$RUN/heads
LOGS=$RUN/logs
WINDOW=(--tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" --context-window "$EVAL_CONTEXT_WINDOW"
        --sample-break-mode "$EVAL_BREAK_MODE")
# the datastore's own window: scoring the training text with it makes each token's
# nearest neighbour its own entry, the one --ignore-top drops
DSTORE_WINDOW=(--tokens-per-sample "$DSTORE_TOKENS_PER_SAMPLE"
               --context-window "$DSTORE_CONTEXT_WINDOW")
# word-level perplexity as the paper reports it: '@@' pieces joined back into words
WORDS=(); [[ $BPE == subword ]] && WORDS=(--remove-bpe "@@ ")

mkdir -p "$LOGS" "$RESULTS" "$HEADS"
log() { echo "[$(date '+%F %T')] $*" | tee -a "$LOGS/pipeline.log"; }
complete() { [[ -f $1 ]] && grep -q '"complete": true' "$1"; }
[[ -f $CKPT ]] || { echo "no checkpoint $CKPT: run wikitext_bpe_train.sh first" >&2; exit 2; }

# 1. LM-only perplexity
for split in valid test; do
  if [[ -f $RESULTS/lm_$split.json ]]; then log "eval-lm $split: done"; continue; fi
  log "eval-lm $split"
  # shellcheck disable=SC2086
  $KNNLM eval-lm "$DATA_BIN" --path "$CKPT" --gen-subset "$split" "${WINDOW[@]}" "${WORDS[@]}" \
    --results-path "$RESULTS/lm_$split.json" $EXTRA_EVAL_FLAGS 2>&1 | tee "$LOGS/eval_lm_$split.log"
done

# 2. datastore of the training split, att and ffn keys (resumes after a kill)
log "build-dstore"
$KNNLM build-dstore "$DATA_BIN" --path "$CKPT" --gen-subset train --dstore-dir "$DSTORE" \
  --knn-keytype att,ffn "${DSTORE_WINDOW[@]}" 2>&1 | tee -a "$LOGS/build_dstore.log"

# 3. indexes: both keytypes, L2 and inner product (knnlm analyze reuses them)
for keytype in att ffn; do
  for metric in l2 ip; do
    if complete "$DSTORE/index_${keytype}_${metric}.faiss.json"; then
      log "build-index $keytype $metric: done"; continue
    fi
    log "build-index $keytype $metric"
    $KNNLM build-index --dstore-dir "$DSTORE" --knn-keytype "$keytype" --metric "$metric" \
      --index-factory "$INDEX_FACTORY" --train-size "$INDEX_TRAIN_SIZE" --probe "$PROBE" \
      --seed "$SEED" 2>&1 | tee -a "$LOGS/build_index.log"
  done
done

# 4. kNN-LM (original defaults: att keys, L2, λ 0.25, T 1) with retrieval caches, and a
#    λ / T sweep on valid
for split in valid test; do
  if complete "$RESULTS/cache_$split/cache.json" && [[ -f $RESULTS/knnlm_$split.json ]]; then
    log "eval-lm --knnlm $split: done"; continue
  fi
  log "eval-lm --knnlm $split"
  # shellcheck disable=SC2086
  $KNNLM eval-lm "$DATA_BIN" --path "$CKPT" --gen-subset "$split" "${WINDOW[@]}" "${WORDS[@]}" \
    --knnlm --dstore-filename "$DSTORE" --k "$K" --probe "$PROBE" --lmbda "$LMBDA" --knn-temp 1 \
    --knn-sim-func do_not_recomp_l2 --save-retrieval "$RESULTS/cache_$split" \
    --results-path "$RESULTS/knnlm_$split.json" $EXTRA_EVAL_FLAGS 2>&1 | tee "$LOGS/knnlm_$split.log"
done
if [[ ! -f $RESULTS/cache_valid/sweep/sweep.json ]]; then
  log "sweep valid"
  $KNNLM sweep --cache "$RESULTS/cache_valid" --lmbda 0:1:0.01 \
    --knn-temp 0.25,0.5,1,2,3,4,6,8,12,16 2>&1 | tee "$LOGS/sweep.log"
fi

# 5. parametric heads on the frozen LM (paper §3.3 and §3.8); each resumes or says done
log "allot-embeddings"
[[ -f $HEADS/extra_embed.json ]] || \
  $KNNLM allot-embeddings "$DATA_BIN" --total-ratio 3 --out "$HEADS/extra_embed.json"
declare -A HEAD_FLAGS=(
  [att]="--softmax-input att --init-out-embed --finetune-out-embed"
  [att_kv3]="--softmax-input att --pseudo-vocab-ratio 3 --finetune-out-embed"
  [ffn_extra3v]="--num-extra-embed-file $HEADS/extra_embed.json --finetune-out-embed"
  [ffn_mos3]="--k-mos 3 --finetune-mos"
  [att_addlin_interp]="--additional-linear --finetune-additional-linear --interpolated-loss --train-lambda $LMBDA"
  [ffn_kv1]="--init-out-embed --finetune-out-embed"
  [ffn_kv1_weighted]="--init-out-embed --finetune-out-embed --weighted-loss $HEADS/knn_helped.json"
  # the fork's interpolated-loss heads (wikitext_bpe_interpolated_loss.sh): kv1 and kv3,
  # reading ffn or att
  [ffn_kv1_interp]="--init-out-embed --finetune-out-embed --interpolated-loss --train-lambda $LMBDA"
  [att_kv1_interp]="--softmax-input att --init-out-embed --finetune-out-embed --interpolated-loss --train-lambda $LMBDA"
  [ffn_kv3_interp]="--pseudo-vocab-ratio 3 --finetune-out-embed --interpolated-loss --train-lambda $LMBDA"
  [att_kv3_interp]="--softmax-input att --pseudo-vocab-ratio 3 --finetune-out-embed --interpolated-loss --train-lambda $LMBDA"
)
# the loss weights of the original's --weighted-loss: on the training text (each token's own
# datastore entry dropped by --ignore-top), the share of each token type where kNN beats the LM
if [[ ! -f $HEADS/knn_helped.json ]]; then
  log "loss weights"
  $KNNLM eval-lm "$DATA_BIN" --path "$CKPT" --gen-subset train "${DSTORE_WINDOW[@]}" \
    --max-eval-tokens "$WEIGHT_TOKENS" --knnlm --dstore-filename "$DSTORE" --k "$K" \
    --probe "$PROBE" --lmbda "$LMBDA" --knn-temp 1 --ignore-top \
    --knn-sim-func do_not_recomp_l2 \
    --save-scores "$RESULTS/train_lm_scores.npy" --save-knn-scores "$RESULTS/train_knn_scores.npy" \
    2>&1 | tee "$LOGS/loss_weights.log"
  $KNNLM loss-weights "$DATA_BIN" --scores "$RESULTS/train_lm_scores.npy" \
    --knn-scores "$RESULTS/train_knn_scores.npy" --out "$HEADS/knn_helped.json" \
    2>&1 | tee -a "$LOGS/loss_weights.log"
fi
# training recipes of the heads and the overfitting stage. WikiText: the fork's own
# (wikitext_bpe_{kv,mos,extra_embed}_finetune.sh: NAG lr 5e-2, clip 100;
# _additional_linear.sh: NAG lr 1e-3, clip 1; _interpolated_loss.sh and _loss_weighting.sh:
# NAG lr 1 with reduce_lr_on_plateau, shrink 0.5, 3000 warm-up updates from 1e-7, clip 1;
# _overfit.sh: NAG lr 1e-2, clip 100). Small mode: one short recipe for every head
# (Adam, betas (0.9, 0.98), cosine to HEAD_LR: its runs are a few hundred updates; the fork's
# rates were set for runs of up to 286k updates), and Adam at OVERFIT_LR for overfitting.
if [[ $CORPUS == shakespeare ]]; then
  SHORT="--optimizer adam --adam-betas (0.9,0.98) --lr 0 --max-lr $HEAD_LR --lr-scheduler cosine"
  SHORT+=" --warmup-updates $((HEAD_UPDATES / 10)) --clip-norm 0 --validate-interval 0"
  declare -A RECIPE=([finetune]="$SHORT" [addlin]="$SHORT" [plateau]="$SHORT")
  OVERFIT_RECIPE="--optimizer adam --adam-betas (0.9,0.98) --lr $OVERFIT_LR --clip-norm 1"
else
  declare -A RECIPE=(
    [finetune]="--optimizer nag --lr 5e-2 --clip-norm 100 --validate-interval 1"
    [addlin]="--optimizer nag --lr 1e-3 --clip-norm 1 --validate-interval 1"
    [plateau]="--optimizer nag --lr 1.0 --lr-scheduler reduce_lr_on_plateau --lr-shrink 0.5 --warmup-updates 3000 --warmup-init-lr 1e-7 --clip-norm 1 --validate-interval 1"
  )
  OVERFIT_RECIPE="--optimizer nag --lr $OVERFIT_LR --clip-norm 100"
fi
declare -A HEAD_RECIPE=([att]=plateau [att_kv3]=finetune [ffn_extra3v]=finetune
  [ffn_mos3]=finetune [att_addlin_interp]=addlin [ffn_kv1]=plateau [ffn_kv1_weighted]=plateau
  [ffn_kv1_interp]=plateau [att_kv1_interp]=plateau [ffn_kv3_interp]=plateau
  [att_kv3_interp]=plateau)
HEAD_LIST=""
for name in att att_kv3 ffn_extra3v ffn_mos3 att_addlin_interp ffn_kv1 ffn_kv1_weighted \
            ffn_kv1_interp att_kv1_interp ffn_kv3_interp att_kv3_interp; do
  log "head $name"
  # shellcheck disable=SC2086
  $KNNLM train "$DATA_BIN" --restore-file "$CKPT" --save-dir "$HEADS/$name" \
    ${HEAD_FLAGS[$name]} ${RECIPE[${HEAD_RECIPE[$name]}]} \
    --tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" --max-tokens "$HEAD_MAX_TOKENS" \
    --max-update "$HEAD_UPDATES" --max-valid-tokens 30000 --seed "$SEED" \
    2>&1 | tee -a "$LOGS/head_$name.log"
  HEAD_LIST+="${HEAD_LIST:+,}$name=$HEADS/$name/checkpoint_last.pt"
done

# 5b. centroids of the datastore's keys as the output layer (the original's cluster/, as
#     the fork ran it: centroids of the att keys with the softmax reading att): k-means into
#     nspecial + 2(V - nspecial) centroids, 2 centroids per token, and the k-means ones
#     scored by -||h - c||^2 (use_l2); each alone and interpolated with the LM
#     (sweep --score-files), on valid
if [[ ! -f $RESULTS/lm_valid_scores.npy ]]; then
  $KNNLM eval-lm "$DATA_BIN" --path "$CKPT" --gen-subset valid "${WINDOW[@]}" "${WORDS[@]}" \
    --max-eval-tokens "$ANALYZE_MAX_EVAL_TOKENS" --save-scores "$RESULTS/lm_valid_scores.npy"
fi
for mode in kmeans per-word; do
  dir=$RUN/centroids/$mode
  if [[ ! -f $dir/centroids.json ]]; then
    log "centroids $mode"
    $KNNLM centroids --dstore-dir "$DSTORE" --knn-keytype att --mode "$mode" --ratio 2 \
      --seed "$SEED" --out "$dir" 2>&1 | tee -a "$LOGS/centroids.log"
  fi
done
declare -A CENTROID_RUNS=([kmeans]="kmeans" [per-word]="per-word" [kmeans_l2]="kmeans --use-l2")
for run in kmeans per-word kmeans_l2; do
  read -r mode extra <<< "${CENTROID_RUNS[$run]}"
  dir=$RUN/centroids/$mode
  if [[ ! -f $RESULTS/centroids_$run/sweep.json ]]; then
    # shellcheck disable=SC2086
    $KNNLM eval-lm "$DATA_BIN" --path "$CKPT" --gen-subset valid "${WINDOW[@]}" "${WORDS[@]}" \
      --max-eval-tokens "$ANALYZE_MAX_EVAL_TOKENS" --load-centroids "$dir/centroids.npy" \
      --load-centroid-distribution "$dir/centroid_dist.npz" $extra \
      --save-scores "$RESULTS/centroids_${run}_scores.npy" 2>&1 | tee -a "$LOGS/centroids.log"
    $KNNLM sweep --score-files "$RESULTS/lm_valid_scores.npy,$RESULTS/centroids_${run}_scores.npy" \
      --lmbda 0:1:0.01 --out "$RESULTS/centroids_$run" 2>&1 | tee -a "$LOGS/centroids.log"
  fi
done

# 5c. overfitting (paper: ruled out): the base LM trained on past convergence, dropout 0,
#     a fixed learning rate, each epoch's checkpoint kept; analyze's overfit part scores
#     each on the training text and on valid, alone and with the base LM (0 epochs: skip)
OVERFIT_FLAGS=()
if (( OVERFIT_EPOCHS > 0 )); then
  log "overfit: $OVERFIT_EPOCHS epochs"
  $KNNLM train "$DATA_BIN" --restore-file "$CKPT" --save-dir "$RUN/overfit" \
    --dropout 0 --attention-dropout 0 --activation-dropout 0 \
    --tokens-per-sample "$EVAL_TOKENS_PER_SAMPLE" --max-tokens "$OVERFIT_MAX_TOKENS" \
    --max-epoch "$OVERFIT_EPOCHS" --save-interval 1 --validate-interval 1 \
    --max-valid-tokens 30000 $OVERFIT_RECIPE --seed "$SEED" \
    2>&1 | tee -a "$LOGS/overfit.log"
  OVERFIT_FLAGS=(--overfit-dir "$RUN/overfit")
fi

# 6. every analysis of the paper in $RESULTS/analysis (report.md, JSON, PNG)
log "analyze"
$KNNLM analyze "$DATA_BIN" --path "$CKPT" --dstore-filename "$DSTORE" \
  --results-dir "$RESULTS/analysis" --index-dir "$DSTORE" --gen-subset valid "${WINDOW[@]}" \
  --max-eval-tokens "$ANALYZE_MAX_EVAL_TOKENS" --k "$K" --probe "$PROBE" \
  --large-probe "$LARGE_PROBE" --index-factory "$INDEX_FACTORY" \
  --train-size "$INDEX_TRAIN_SIZE" --seed "$SEED" --head "$HEAD_LIST" "${OVERFIT_FLAGS[@]}" \
  2>&1 | tee "$LOGS/analyze.log"
log "done: $RESULTS/analysis/report.md"
