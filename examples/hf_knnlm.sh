#!/usr/bin/env bash
# kNN-LM over a HuggingFace causal LM on your own text, end to end.
#
#   bash examples/hf_knnlm.sh [MODEL] [CORPUS_DIR] [RUN_DIR]
#
# MODEL: an HF model name in the local HF cache (e.g. gpt2, EleutherAI/pythia-160m,
#        facebook/opt-125m, Qwen/Qwen2.5-0.5B) or a local directory with the weights and
#        the tokenizer. Nothing is downloaded unless HF_HUB_OFFLINE=0 is set.
# CORPUS_DIR: a directory with train.txt (the datastore's text), valid.txt and test.txt.
#
# Put the model in the cache first, on a machine with internet:
#   HF_HUB_OFFLINE=0 python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('gpt2'); t.AutoTokenizer.from_pretrained('gpt2')"
set -euo pipefail

MODEL=${1:-gpt2}
CORPUS=${2:-my_corpus}
RUN=${3:-runs/hf_knnlm}
KNNLM=${KNNLM:-knnlm}
WINDOW=${WINDOW:-1024}          # model input per block (GPT-2: 1024 positions)
CONTEXT=${CONTEXT:-512}         # left context of each scored block
FACTORY=${FACTORY:-}            # FAISS factory (default: chosen from the datastore size)
K=${K:-1024}
PROBE=${PROBE:-32}
LMBDA=${LMBDA:-0.25}
TEMP=${TEMP:-1}
PROMPT=${PROMPT:-The}

# 1. tokenize with the model's own tokenizer
[[ -f $RUN/data-bin/data.json ]] || \
  $KNNLM preprocess --srcdir "$CORPUS" --destdir "$RUN/data-bin" --hf-tokenizer "$MODEL"

# 2. LM perplexity
$KNNLM eval-lm "$RUN/data-bin" --hf-model "$MODEL" --gen-subset valid \
  --tokens-per-sample "$WINDOW" --context-window "$CONTEXT"

# 3. datastore of the training text: att keys (input of the last MLP) and ffn keys
$KNNLM build-dstore "$RUN/data-bin" --hf-model "$MODEL" --gen-subset train \
  --dstore-dir "$RUN/dstore" --knn-keytype att,ffn \
  --tokens-per-sample "$WINDOW" --context-window "$CONTEXT"

# 4. FAISS index over the att keys
$KNNLM build-index --dstore-dir "$RUN/dstore" --knn-keytype att --metric l2 \
  ${FACTORY:+--index-factory "$FACTORY"}

# 5. kNN-LM perplexity, with a retrieval cache, then λ / temperature tuned offline
$KNNLM eval-lm "$RUN/data-bin" --hf-model "$MODEL" --gen-subset valid \
  --tokens-per-sample "$WINDOW" --context-window "$CONTEXT" \
  --knnlm --dstore-filename "$RUN/dstore" --k "$K" --probe "$PROBE" --lmbda "$LMBDA" \
  --knn-temp "$TEMP" --save-retrieval "$RUN/cache_valid"
$KNNLM sweep --cache "$RUN/cache_valid" --lmbda 0:1:0.02 --knn-temp 0.5,1,2,4,8,16

# 6. generation with the kNN-LM, and what it retrieves for a text
$KNNLM generate "$RUN/data-bin" --hf-model "$MODEL" --prompt "$PROMPT" --max-new-tokens 30 \
  --knnlm --dstore-filename "$RUN/dstore" --k "$K" --probe "$PROBE" --lmbda "$LMBDA" \
  --knn-temp "$TEMP"
$KNNLM neighbors "$RUN/data-bin" --hf-model "$MODEL" --dstore-filename "$RUN/dstore" \
  --probe "$PROBE" --k 4 --text "$PROMPT"
