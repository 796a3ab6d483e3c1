#!/usr/bin/env bash
# From raw books to a measured task result: pretrain a small BERT on the Gutenberg corpus, then
# fine-tune it on SST-2 (GLUE sentiment) and print the report. Under 30 minutes on a 2-core CPU.
#
#   bash examples/finetune_sst2.sh [WORK_DIR]             # default WORK_DIR: ./finetune_sst2_run
#
# Steps: train an 8,192-word WordPiece vocabulary on the corpus (megapre-train-tokenizer),
# tokenize it sentence by sentence (tools/preprocess_data.py --split-sentences), pretrain a
# 4-layer, 128-wide BERT (masked LM + sentence order) for PRETRAIN_MINUTES, fine-tune it on
# sst2/train.tsv with validation on sst2/dev.tsv after every epoch, test on sst2/test.tsv (the
# official GLUE dev set: "SST-2 dev accuracy"), and score the fine-tuned checkpoint again with
# `megapre.evaluate --task-data`. Re-running reuses what WORK_DIR holds: the vocabulary, the
# dataset and a finished pretraining run (an unfinished one resumes).
#
# Environment overrides:
#   DATA_DIR=DIR          the shared data (gutenberg/, sst2/)      [../shared/data beside the repo]
#   PRETRAINED=DIR        fine-tune this megapre BERT checkpoint instead of pretraining one
#   PRETRAIN_MINUTES=N    wall-clock budget of pretraining                                  [15]
#   EPOCHS=N              fine-tuning epochs                                                  [2]
#   LORA_RANK=N           fine-tune with LoRA adapters of this rank instead of all weights
#   TINY=1                a seconds-scale smoke run: a slice of the corpus and of SST-2
#   PYTHON=python3        the interpreter to use
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
WORK="${1:-$PWD/finetune_sst2_run}"
DATA_DIR="${DATA_DIR:-$REPO/../shared/data}"
TINY="${TINY:-0}"
PRETRAIN_MINUTES="${PRETRAIN_MINUTES:-15}"
EPOCHS="${EPOCHS:-2}"
T0=$SECONDS

step() { printf '\n[finetune_sst2 %s | %4ss] %s\n' "$1" "$(( SECONDS - T0 ))" "$2"; }
die() { echo "finetune_sst2.sh: error: $*" >&2; exit 1; }

case "$PRETRAIN_MINUTES$EPOCHS${LORA_RANK:-1}" in
  *[!0-9.]*) die "PRETRAIN_MINUTES ($PRETRAIN_MINUTES), EPOCHS ($EPOCHS) and LORA_RANK (${LORA_RANK:-}) must be positive numbers";;
esac
CORPUS="$DATA_DIR/gutenberg/gutenberg_en_24MiB.txt"
for f in "$DATA_DIR/sst2/train.tsv" "$DATA_DIR/sst2/dev.tsv" "$DATA_DIR/sst2/test.tsv"; do
  [ -f "$f" ] || die "$f not found; set DATA_DIR to the folder holding sst2/ and gutenberg/"
done
[ -n "${PRETRAINED:-}" ] || [ -f "$CORPUS" ] || die "$CORPUS not found; set DATA_DIR (or PRETRAINED=CKPT)"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$TINY" = 1 ]; then
  LAYERS=2 HIDDEN=64 HEADS=2 PRE_ITERS=12 PRE_MICRO=8 PRE_BATCH=8 VOCAB=2000 FT_ROWS=400
  head -c 400000 "$CORPUS" > "$WORK/corpus.txt" 2>/dev/null || true
  CORPUS="$WORK/corpus.txt"
  for split in train dev test; do head -n "$FT_ROWS" "$DATA_DIR/sst2/$split.tsv" > "$WORK/sst2_$split.tsv"; done
  TRAIN="$WORK/sst2_train.tsv" DEV="$WORK/sst2_dev.tsv" TEST="$WORK/sst2_test.tsv"
else
  LAYERS=4 HIDDEN=128 HEADS=2 PRE_ITERS=400 PRE_MICRO=32 PRE_BATCH=64 VOCAB=8192
  TRAIN="$DATA_DIR/sst2/train.tsv" DEV="$DATA_DIR/sst2/dev.tsv" TEST="$DATA_DIR/sst2/test.tsv"
fi

CKPT="${PRETRAINED:-$WORK/bert}"
if [ -z "${PRETRAINED:-}" ]; then
  step 1/4 "WordPiece vocabulary ($VOCAB) on $CORPUS"
  VOCAB_FILE="$WORK/tok/tokenizer-vocab.txt"
  [ -f "$VOCAB_FILE" ] || "$PY" -m megapre.cli.train_tokenizer --kind wordpiece --input "$CORPUS" \
      --text-mode blank-line --vocab-size "$VOCAB" --output-dir "$WORK/tok"

  step 2/4 "tokenize the corpus sentence by sentence"
  [ -f "$WORK/books_text_sentence.idx" ] || "$PY" "$REPO/tools/preprocess_data.py" --input "$CORPUS" \
      --text-mode blank-line --split-sentences --tokenizer-type BertWordPieceLowerCase \
      --vocab-file "$VOCAB_FILE" --output-prefix "$WORK/books" --workers 1

  step 3/4 "pretrain BERT ${LAYERS}x${HIDDEN} for at most $PRETRAIN_MINUTES minutes (resumes $CKPT)"
  "$PY" -m megapre.pretrain --model bert --num-layers "$LAYERS" --hidden-size "$HIDDEN" \
      --num-attention-heads "$HEADS" --seq-length 128 --micro-batch-size "$PRE_MICRO" \
      --global-batch-size "$PRE_BATCH" --train-iters "$PRE_ITERS" --lr 1e-3 --min-lr 1e-4 \
      --lr-decay-style linear --lr-warmup-iters $(( PRE_ITERS / 10 )) --weight-decay 0.01 \
      --data-path "$WORK/books_text_sentence" --split 98,2,0 --eval-interval 200 --eval-iters 4 \
      --tokenizer-type BertWordPieceLowerCase --vocab-file "$VOCAB_FILE" --device cpu \
      --num-workers 1 --save "$CKPT" --load "$CKPT" --save-interval 100 --log-interval 20 \
      --exit-duration-in-mins "$PRETRAIN_MINUTES" --metrics-path "$CKPT/metrics.jsonl"
else
  step 1/4 "reusing the pretrained checkpoint $PRETRAINED (steps 1-3 skipped)"
fi

step 4/4 "fine-tune on SST-2 ($EPOCHS epochs), report on the GLUE dev set"
FT="$WORK/sst2${LORA_RANK:+-lora$LORA_RANK}"
ADAPT=()
[ -n "${LORA_RANK:-}" ] && ADAPT=(--lora-rank "$LORA_RANK" --lora-alpha $(( 2 * LORA_RANK )))
"$PY" -m megapre.finetune --pretrained-checkpoint "$CKPT" --train-data "$TRAIN" \
    --valid-data "$DEV" --test-data "$TEST" --epochs "$EPOCHS" --micro-batch-size 32 \
    --lr 1e-4 --seq-length 64 --bucket-by-length --device cpu --log-interval 100 \
    --save "$FT" --metrics-path "$FT/metrics.jsonl" --predictions-path "$FT/predictions.tsv" \
    "${ADAPT[@]}"
"$PY" -m megapre.evaluate --load "$FT" --task-data "$TEST" --device cpu --output-json "$FT/test.json" \
    | tail -n 1 > /dev/null
"$PY" - "$FT" <<'EOF'
import json, sys
r = json.load(open(f"{sys.argv[1]}/test.json"))
print(f"\nSST-2 dev accuracy {100 * r['accuracy']:.2f}% | macro-F1 {100 * r['macro_f1']:.2f}% "
      f"| {r['examples']} sentences | checkpoint {r['checkpoint']}")
EOF
printf '[finetune_sst2] done in %ss: report %s/report.json, predictions %s/predictions.tsv\n' \
  "$(( SECONDS - T0 ))" "$FT" "$FT"
