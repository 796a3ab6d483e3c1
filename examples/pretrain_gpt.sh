#!/usr/bin/env bash
# GPT-2 small (124M) pretraining on one node with many GPUs: torchrun --nproc-per-node $GPUS.
#
#   DATA_PATH=/data/owt_text_document VOCAB_FILE=gpt2/vocab.json MERGE_FILE=gpt2/merges.txt \
#   CHECKPOINT_DIR=/ckpt/gpt2-124m bash examples/pretrain_gpt.sh [extra megapre.pretrain flags]
#
# Variables (defaults in brackets):
#   DATA_PATH       indexed dataset prefix(es) from tools/preprocess_data.py (PREFIX.bin/.idx), or a
#                   blend "0.7 /data/a_text_document 0.3 /data/b_text_document"        [required]
#   VOCAB_FILE      GPT-2 vocab.json             [../shared/data/gpt2/vocab.json beside this checkout]
#   MERGE_FILE      GPT-2 merges.txt             [../shared/data/gpt2/merges.txt]
#   CHECKPOINT_DIR  --save and --load: rerunning the script resumes             [./checkpoints/gpt2-124m]
#   TENSORBOARD_DIR used when the tensorboard package is installed        [$CHECKPOINT_DIR/tensorboard]
#   GPUS            processes (GPUs) on this node                                              [8]
#   TP, PP          tensor / pipeline parallel sizes; DP = GPUS / (TP * PP)                  [1, 1]
#   MICRO_BATCH     samples per GPU per micro-batch                                           [12]
#   GLOBAL_BATCH    samples per optimizer step (480 x 1024 tokens ~ 0.5M, as GPT-2 / nanoGPT)  [480]
#   TRAIN_ITERS     optimizer steps                                                       [600000]
#   DEVICE          cuda | cpu | auto                                                        [auto]
# Extra arguments are appended to the megapre.pretrain command line; a flag given twice takes the
# later value, so `bash examples/pretrain_gpt.sh --train-iters 1000` overrides the default.
#
# The hyperparameters are GPT-2 small's shape with nanoGPT's OpenWebText recipe: 12 layers,
# hidden 768, 12 heads, 1024 tokens, learned positions, tied embeddings, GELU, LayerNorm, no dropout,
# AdamW (0.9, 0.95), weight decay 0.1, lr 6e-4 -> 6e-5 cosine after 2000 warmup steps, clip 1.0,
# bf16 with fp32 master weights. GLOBAL_BATCH must be a multiple of MICRO_BATCH x DP (the program
# says which flag to change if not); gradient accumulation makes up the rest.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${DATA_PATH:?set DATA_PATH to the indexed dataset prefix (tools/preprocess_data.py --output-prefix ... gives PREFIX_text_document)}"
VOCAB_FILE="${VOCAB_FILE:-$REPO/../shared/data/gpt2/vocab.json}"
MERGE_FILE="${MERGE_FILE:-$REPO/../shared/data/gpt2/merges.txt}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$PWD/checkpoints/gpt2-124m}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}"
GPUS="${GPUS:-8}" TP="${TP:-1}" PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-12}" GLOBAL_BATCH="${GLOBAL_BATCH:-480}"
TRAIN_ITERS="${TRAIN_ITERS:-600000}" DEVICE="${DEVICE:-auto}"
for f in "$VOCAB_FILE" "$MERGE_FILE"; do
  [ -f "$f" ] || { echo "pretrain_gpt.sh: $f not found; set VOCAB_FILE / MERGE_FILE to GPT-2's vocab.json and merges.txt" >&2; exit 2; }
done

TB=()
if python -c "import tensorboard" 2>/dev/null; then
  TB=(--tensorboard-dir "$TENSORBOARD_DIR")
else
  echo "pretrain_gpt.sh: no tensorboard package: logging to the console and metrics.jsonl only (pip install tensorboard)" >&2
fi

# shellcheck disable=SC2086  # DATA_PATH may be a blend: several words on purpose
exec torchrun --standalone --nproc-per-node "$GPUS" -m megapre.pretrain \
  --model gpt \
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
  --seq-length 1024 --max-position-embeddings 1024 \
  --hidden-dropout 0 --attention-dropout 0 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" \
  --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --bf16 --device "$DEVICE" \
  --data-path $DATA_PATH --split 969,30,1 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
  --num-workers 2 \
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000 --keep-last 3 \
  --eval-interval 1000 --eval-iters 20 --log-interval 10 \
  "${TB[@]}" --metrics-path "$CHECKPOINT_DIR/metrics.jsonl" \
  "$@"
