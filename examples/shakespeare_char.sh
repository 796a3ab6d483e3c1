#!/usr/bin/env bash
# nanoGPT's CPU Shakespeare-character run, through megapre's own pipeline.
#
#   bash examples/shakespeare_char.sh [TEXT_FILE] [WORK_DIR]
#     TEXT_FILE  default: ../shared/data/tinyshakespeare.txt beside this checkout (any UTF-8 text works)
#     WORK_DIR   default: ./shakespeare_char_run
#
# The setting is nanoGPT's laptop command (config/train_shakespeare_char.py with --device=cpu
# --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
# --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0), in Megatron flags:
#   4 layers, 4 heads, hidden 128, sequence 64, batch 12, 2000 steps, lr 1e-3 with 100 warmup steps
#   and cosine decay to 1e-4 over 2000 steps, AdamW beta2 0.99, weight decay 0.1, clip 1.0,
#   no dropout, no biases in the linear layers, tied embeddings, learned positions, fp32.
# nanoGPT reports a validation loss of 1.88 for it.
#
# The data follows nanoGPT's prepare.py: a character vocabulary of the whole text, and a
# contiguous cut: the first 90% of the characters train, the last 10% validate. Each part is one
# document of its own indexed dataset (--train-data-path / --valid-data-path), so no sample
# crosses the cut and no separator token is added. The final line evaluates the whole validation
# part (every non-overlapping 64-token window), which is steadier than the 20 random batches of
# nanoGPT's estimate (which the training log's "valid" lines mirror: 20 batches of 12).
#
# Environment: SHAKESPEARE_ITERS (default 2000), SHAKESPEARE_DEVICE (cpu|cuda|auto, default cpu),
# PYTHON. Threads: torch's default (one per core), as nanoGPT.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
TEXT="${1:-$REPO/../shared/data/tinyshakespeare.txt}"
WORK="${2:-$PWD/shakespeare_char_run}"
ITERS="${SHAKESPEARE_ITERS:-2000}"
DEVICE="${SHAKESPEARE_DEVICE:-cpu}"
T0=$SECONDS

step() { printf '\n[shakespeare %s | %4ss] %s\n' "$1" "$(( SECONDS - T0 ))" "$2"; }
die() { echo "shakespeare_char: error: $*" >&2; exit 1; }

[ -f "$TEXT" ] || die "text file $TEXT not found; pass the path of tinyshakespeare.txt (or any UTF-8 text) as the first argument"
case "$ITERS" in ''|*[!0-9]*) die "SHAKESPEARE_ITERS=$ITERS must be a positive integer";; esac
[ "$ITERS" -ge 200 ] || die "SHAKESPEARE_ITERS=$ITERS: use at least 200 (evaluation every 250, warmup 100)"
mkdir -p "$WORK" || die "cannot create $WORK"
WORK="$(cd "$WORK" && pwd)"

step 1/5 "cut $TEXT 90/10 (contiguous, as nanoGPT's prepare.py)"
"$PY" - "$TEXT" "$WORK" <<'EOF'
import json, os, sys
text_path, work = sys.argv[1:]
try:
    text = open(text_path, encoding="utf-8").read()
except UnicodeDecodeError as e:
    sys.exit(f"shakespeare_char: {text_path} is not UTF-8 text ({e})")
if len(text) < 10_000:
    sys.exit(f"shakespeare_char: {text_path} has {len(text)} characters; need at least 10,000")
cut = int(len(text) * 0.9)
for name, part in (("all", text), ("train", text[:cut]), ("val", text[cut:])):
    tmp = os.path.join(work, f".{name}.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": part}) + "\n")
    os.replace(tmp, os.path.join(work, f"{name}.jsonl"))
print(f"{len(text):,} characters: train {cut:,}, val {len(text) - cut:,}")
EOF

step 2/5 "character vocabulary"
"$PY" "$REPO/tools/train_tokenizer.py" --kind char --input "$WORK/all.jsonl" --output-dir "$WORK" \
  --output-prefix chars --char-specials eod --overwrite
VOCAB="$WORK/chars.json"
[ -s "$VOCAB" ] || VOCAB="$(ls "$WORK"/chars*.json | grep -v train.json | head -1)"

step 3/5 "tokenize train and val"
for part in train val; do
  "$PY" "$REPO/tools/preprocess_data.py" --input "$WORK/$part.jsonl" --tokenizer-type CharacterTokenizer \
    --vocab-file "$VOCAB" --output-prefix "$WORK/$part" --workers 1 --overwrite
done

step 4/5 "pretrain ($ITERS steps, $DEVICE)"
rm -f "$WORK/metrics.jsonl"
rm -rf "$WORK/checkpoints"   # this run's own output, rewritten each time
"$PY" -m megapre.pretrain --model gpt \
  --num-layers 4 --num-attention-heads 4 --hidden-size 128 --seq-length 64 \
  --max-position-embeddings 64 --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 \
  --micro-batch-size 12 --global-batch-size 12 --train-iters "$ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 100 --lr-decay-iters "$ITERS" \
  --adam-beta1 0.9 --adam-beta2 0.99 --weight-decay 0.1 --clip-grad 1.0 \
  --train-data-path "$WORK/train_text_document" --valid-data-path "$WORK/val_text_document" \
  --tokenizer-type CharacterTokenizer --vocab-file "$VOCAB" --make-vocab-size-divisible-by 1 \
  --eval-interval 250 --eval-iters 20 --log-interval 50 --num-workers 0 --device "$DEVICE" \
  --data-cache-path "$WORK/index-cache" --metrics-path "$WORK/metrics.jsonl" \
  --save "$WORK/checkpoints" --seed 1337 2>&1 | tee "$WORK/train.log"

step 5/5 "summary"
"$PY" - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [r for r in rows if "split" not in r]
valid = [r for r in rows if r.get("split") == "valid"]
ms = [12 * 64 / r["tokens_per_s"] * 1e3 for r in train[1:]]  # first interval includes start-up
print(f"  valid loss (20 batches of 12) at " +
      ", ".join(f"{r['iteration']}: {r['loss']:.4f}" for r in valid))
print(f"  train loss {train[-1]['loss']:.4f} at {train[-1]['iteration']}")
print(f"  ms/iter median {statistics.median(ms):.1f} (from tokens/s of each logged interval after the first)")
print("  nanoGPT anchor: val 1.8857 at 2000, 49.3 ms/iter on a 2-core machine (ANCHORS.md)")
EOF
"$PY" -m megapre.evaluate --load "$WORK/checkpoints" --device "$DEVICE" \
  --data-path "$WORK/val_text_document" --eval-split all --micro-batch-size 12 \
  --global-batch-size 12 --data-cache-path "$WORK/index-cache" --output-json "$WORK/eval_val.json"
printf '[shakespeare] done in %ss; outputs in %s\n' "$(( SECONDS - T0 ))" "$WORK"
