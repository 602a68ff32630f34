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

# 5. tune λ, T, k and the score mode on valid: writes $RUN/dstore/index_att_l2.faiss.tuned.json
$KNNLM tune "$RUN/data-bin" --hf-model "$MODEL" --gen-subset valid \
  --tokens-per-sample "$WINDOW" --context-window "$CONTEXT" \
  --dstore-filename "$RUN/dstore" --k "$K,$((K / 4)),$((K / 16))" --probe "$PROBE" \
  --save-retrieval "$RUN/cache_valid"

# 6. kNN-LM perplexity on test: no --lmbda / --knn-temp, so the tuned settings are used
$KNNLM eval-lm "$RUN/data-bin" --hf-model "$MODEL" --gen-subset test \
  --tokens-per-sample "$WINDOW" --context-window "$CONTEXT" \
  --knnlm --dstore-filename "$RUN/dstore" --probe "$PROBE"

# 7. generation with the (tuned) kNN-LM, and what it retrieves for a text
$KNNLM generate "$RUN/data-bin" --hf-model "$MODEL" --prompt "$PROMPT" --max-new-tokens 30 \
  --knnlm --dstore-filename "$RUN/dstore" --probe "$PROBE"
$KNNLM neighbors "$RUN/data-bin" --hf-model "$MODEL" --dstore-filename "$RUN/dstore" \
  --probe "$PROBE" --k 4 --text "$PROMPT"
