#!/usr/bin/env bash
# BERT-base (110M) pretraining on one node with many GPUs: torchrun --nproc-per-node $GPUS.
#
#   DATA_PATH=/data/wiki_text_sentence VOCAB_FILE=bert/vocab.txt CHECKPOINT_DIR=/ckpt/bert-base \
#   bash examples/pretrain_bert.sh [extra megapre.pretrain flags]
#
# The data must be sentence-split (BERT's sentence-order task needs sentence boundaries):
#   python tools/preprocess_data.py --input corpus.jsonl --split-sentences \
#     --tokenizer-type BertWordPieceLowerCase --vocab-file bert/vocab.txt --output-prefix /data/wiki
# which writes /data/wiki_text_sentence.bin/.idx.
#
# Variables (defaults in brackets):
#   DATA_PATH       sentence-split indexed dataset prefix(es), or a weighted blend       [required]
#   VOCAB_FILE      BERT WordPiece vocab.txt (uncased)  [../shared/data/bert/vocab.txt beside this checkout]
#   CHECKPOINT_DIR  --save and --load: rerunning the script resumes             [./checkpoints/bert-base]
#   TENSORBOARD_DIR used when the tensorboard package is installed        [$CHECKPOINT_DIR/tensorboard]
#   GPUS            processes (GPUs) on this node                                              [8]
#   TP, PP          tensor / pipeline parallel sizes; DP = GPUS / (TP * PP)                  [1, 1]
#   MICRO_BATCH     samples per GPU per micro-batch                                           [32]
#   GLOBAL_BATCH    samples per optimizer step (BERT's 256 x 512 tokens)                     [256]
#   TRAIN_ITERS     optimizer steps (BERT: 1M)                                           [1000000]
#   DEVICE          cuda | cpu | auto                                                        [auto]
# Extra arguments are appended to the megapre.pretrain command line; a flag given twice takes the
# later value, so `bash examples/pretrain_bert.sh --train-iters 1000` overrides the default.
#
# The hyperparameters are BERT-base's (Devlin et al.): 12 layers, hidden 768, 12 heads, 512 tokens,
# GELU, LayerNorm, dropout 0.1, masked LM with 15% masking plus the sentence-order head, AdamW
# (0.9, 0.999), weight decay 0.01, lr 1e-4 with 10,000 warmup steps then linear decay, clip 1.0;
# bf16 with fp32 master weights.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${DATA_PATH:?set DATA_PATH to the sentence-split dataset prefix (tools/preprocess_data.py --split-sentences ... gives PREFIX_text_sentence)}"
VOCAB_FILE="${VOCAB_FILE:-$REPO/../shared/data/bert/vocab.txt}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$PWD/checkpoints/bert-base}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}"
GPUS="${GPUS:-8}" TP="${TP:-1}" PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-32}" GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
TRAIN_ITERS="${TRAIN_ITERS:-1000000}" DEVICE="${DEVICE:-auto}"
[ -f "$VOCAB_FILE" ] || { echo "pretrain_bert.sh: $VOCAB_FILE not found; set VOCAB_FILE to BERT's uncased vocab.txt" >&2; exit 2; }

TB=()
if python -c "import tensorboard" 2>/dev/null; then
  TB=(--tensorboard-dir "$TENSORBOARD_DIR")
else
  echo "pretrain_bert.sh: no tensorboard package: logging to the console and metrics.jsonl only (pip install tensorboard)" >&2
fi

# shellcheck disable=SC2086  # DATA_PATH may be a blend: several words on purpose
exec torchrun --standalone --nproc-per-node "$GPUS" -m megapre.pretrain \
  --model bert \
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
  --seq-length 512 --max-position-embeddings 512 \
  --hidden-dropout 0.1 --attention-dropout 0.1 --mask-prob 0.15 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" \
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style linear --lr-warmup-iters 10000 \
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.999 --clip-grad 1.0 \
  --bf16 --device "$DEVICE" \
  --data-path $DATA_PATH --split 949,50,1 \
  --tokenizer-type BertWordPieceLowerCase --vocab-file "$VOCAB_FILE" \
  --num-workers 2 \
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000 --keep-last 3 \
  --eval-interval 1000 --eval-iters 20 --log-interval 10 \
  "${TB[@]}" --metrics-path "$CHECKPOINT_DIR/metrics.jsonl" \
  "$@"
