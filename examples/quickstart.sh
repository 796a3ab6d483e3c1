#!/usr/bin/env bash
# megapre quickstart: the whole path from nothing to a trained model on one machine, in minutes.
#
#   bash examples/quickstart.sh [WORK_DIR]          # default WORK_DIR: ./quickstart_run
#
# Steps: install (requirements-dev.txt + an editable build of this checkout; skipped when already
# done), build a demo corpus from the docstrings of the installed stdlib/torch/numpy, train a
# byte-level BPE tokenizer, tokenize the corpus into an indexed dataset, pretrain a small GPT with
# tensor parallelism 2 under torchrun (gloo on CPU when there is no GPU, NCCL on GPUs), with
# validation and checkpoints, evaluate the checkpoint, sample text from it, print a summary.
# Under 15 minutes on a 2-core CPU machine. Re-running reuses the corpus, tokenizer and dataset
# already in WORK_DIR and resumes WORK_DIR/run from its last checkpoint; a run without a checkpoint
# is kept and training starts in a new run-DATE directory (so does QUICKSTART_FRESH=1).
#
# Environment overrides:
#   QUICKSTART_DIR=DIR        work directory (same as the first argument)
#   QUICKSTART_STEPS=N        training steps (default 500; 20 with QUICKSTART_TINY=1)
#   QUICKSTART_TINY=1         a seconds-scale smoke run: small corpus, vocabulary and model
#   QUICKSTART_TP=N           tensor-parallel size (default 2)
#   QUICKSTART_SKIP_INSTALL=1 use the megapre that python already imports; install nothing
#   QUICKSTART_FRESH=1        new run directory instead of resuming the last one
#   PYTHON=python3            the interpreter to use
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
WORK="${1:-${QUICKSTART_DIR:-$PWD/quickstart_run}}"
TINY="${QUICKSTART_TINY:-0}"
TP="${QUICKSTART_TP:-2}"
T0=$SECONDS

step() { printf '\n[quickstart %s | %4ss] %s\n' "$1" "$(( SECONDS - T0 ))" "$2"; }
die() { echo "quickstart: error: $*" >&2; exit 1; }

STEPS="${QUICKSTART_STEPS:-$([ "$TINY" = 1 ] && echo 20 || echo 500)}"
case "$STEPS$TP" in *[!0-9]*) die "QUICKSTART_STEPS ($STEPS) and QUICKSTART_TP ($TP) must be positive integers";; esac
[ "$STEPS" -gt 0 ] && [ "$TP" -gt 0 ] || die "QUICKSTART_STEPS and QUICKSTART_TP must be > 0"
if [ "$TINY" = 1 ]; then
  CORPUS_MB=0.5 VOCAB=1000 LAYERS=2 HIDDEN=64 HEADS=4 SEQ=64 MBS=4 GBS=8
  EVAL_INTERVAL=$(( STEPS > 10 ? STEPS / 2 : STEPS )) EVAL_ITERS=2 LOG_INTERVAL=5 GEN_TOKENS=16
else
  CORPUS_MB=4 VOCAB=8000 LAYERS=4 HIDDEN=128 HEADS=4 SEQ=128 MBS=8 GBS=16
  EVAL_INTERVAL=$(( STEPS < 100 ? STEPS : 100 )) EVAL_ITERS=5 LOG_INTERVAL=10 GEN_TOKENS=48
fi
command -v "$PY" >/dev/null || die "no '$PY' on PATH; set PYTHON=/path/to/python3"
mkdir -p "$WORK" || die "cannot create the work directory $WORK"
WORK="$(cd "$WORK" && pwd)"
cd "$WORK"   # a neutral cwd: `import megapre` must resolve to the installed package

# ---------------------------------------------------------------------------------------------
step 1/7 "install (requirements-dev.txt, then megapre from $REPO)"
megapre_from_repo() {
  "$PY" - "$REPO" <<'EOF' 2>/dev/null
import os, sys
import megapre, megapre.ops
here = os.path.realpath(os.path.dirname(megapre.__file__))
ours = here == os.path.realpath(os.path.join(sys.argv[1], "megapre"))
sys.exit(0 if ours and megapre.ops.backend() != "reference" else 1)  # kernels compiled and loaded
EOF
}
if [ "${QUICKSTART_SKIP_INSTALL:-0}" = 1 ]; then
  echo "skipped (QUICKSTART_SKIP_INSTALL=1)"
else
  echo "pip install -r requirements-dev.txt (quick when already satisfied; minutes on a fresh machine)"
  "$PY" -m pip install -q -r "$REPO/requirements-dev.txt"
  if megapre_from_repo; then
    echo "megapre is already installed from $REPO with its compiled kernels: not rebuilding"
  else
    echo "pip install --no-build-isolation -e $REPO (compiles the C++ kernels: a few minutes)"
    "$PY" -m pip install -q --no-build-isolation -e "$REPO"
  fi
fi
"$PY" -c "import megapre, megapre.ops as o; print('megapre', megapre.__file__, '|', o.backend_info())"

NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")"
if [ "$NGPU" -ge "$TP" ]; then
  DEVICE=cuda WORKERS=2
  echo "device: $NGPU GPU(s); training on $TP of them (NCCL)"
elif [ "$NGPU" -gt 0 ]; then
  echo "device: $NGPU GPU(s), fewer than QUICKSTART_TP=$TP: training with TP=$NGPU on the GPU(s)"
  DEVICE=cuda WORKERS=2 TP="$NGPU"
else
  CORES="$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")"
  DEVICE=cpu WORKERS=0
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / TP > 0 ? CORES / TP : 1 ))}"
  echo "device: no GPU; $TP CPU processes (gloo), $OMP_NUM_THREADS thread(s) each, $CORES core(s)"
fi

# ---------------------------------------------------------------------------------------------
CORPUS="$WORK/corpus-${CORPUS_MB}mb.jsonl"
step 2/7 "demo corpus -> $CORPUS"
if [ -s "$CORPUS" ]; then
  echo "reusing $CORPUS"
else
  SOURCES=stdlib,torch,numpy
  [ "$TINY" = 1 ] && SOURCES=stdlib
  "$PY" "$REPO/tools/make_demo_corpus.py" --output "$CORPUS" --max-mb "$CORPUS_MB" --sources "$SOURCES"
fi

TOK="$WORK/tokenizer-bpe$VOCAB"
step 3/7 "byte-level BPE tokenizer, vocabulary $VOCAB -> $TOK"
if [ -s "$TOK/tokenizer-vocab.json" ] && [ -s "$TOK/tokenizer-merges.txt" ]; then
  echo "reusing $TOK"
else
  "$PY" "$REPO/tools/train_tokenizer.py" --kind byte-bpe --input "$CORPUS" --output-dir "$TOK" \
    --output-prefix tokenizer --vocab-size "$VOCAB" --overwrite
fi
TOKFLAGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$TOK/tokenizer-vocab.json"
          --merge-file "$TOK/tokenizer-merges.txt")

DATA="$WORK/data-bpe$VOCAB/demo_text_document"
step 4/7 "tokenize the corpus -> $DATA.{bin,idx}"
if [ -s "$DATA.bin" ] && [ -s "$DATA.idx" ]; then
  echo "reusing $DATA"
else
  "$PY" "$REPO/tools/preprocess_data.py" --input "$CORPUS" "${TOKFLAGS[@]}" --append-eod \
    --output-prefix "$WORK/data-bpe$VOCAB/demo" --workers 2 --overwrite
fi

# ---------------------------------------------------------------------------------------------
RUN="$WORK/run"
if [ -e "$RUN" ] && { [ "${QUICKSTART_FRESH:-0}" = 1 ] ||
                      [ ! -e "$RUN/checkpoints/latest_checkpointed_iteration.txt" ]; }; then
  RUN="$WORK/run-$(date +%Y%m%d-%H%M%S)"   # nothing to resume there: keep it, start beside it
fi
mkdir -p "$RUN"
CKPT="$RUN/checkpoints"
step 5/7 "pretrain GPT ($LAYERS layers, hidden $HIDDEN, seq $SEQ, $STEPS steps, TP=$TP, $DEVICE) -> $RUN"
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$TP" -m megapre.pretrain \
  --model gpt --num-layers "$LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$STEPS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters $(( STEPS / 10 )) \
  --weight-decay 0.1 --adam-beta2 0.99 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
  --tensor-model-parallel-size "$TP" --device "$DEVICE" \
  --data-path "$DATA" --split 98,1,1 "${TOKFLAGS[@]}" --num-workers "$WORKERS" \
  --data-cache-path "$WORK/index-cache" \
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
  --metrics-path "$RUN/metrics.jsonl" \
  --save "$CKPT" --load "$CKPT" --save-interval "$EVAL_INTERVAL" --keep-last 2 \
  2>&1 | tee "$RUN/train.log"

# ---------------------------------------------------------------------------------------------
step 6/7 "evaluate the checkpoint on the validation split (one process: the TP=$TP checkpoint loads as TP=1)"
"$PY" -m megapre.evaluate --load "$CKPT" --device "$DEVICE" --eval-split valid \
  --data-cache-path "$WORK/index-cache" --output-json "$RUN/eval.json"

step 7/7 "generate a sample from the checkpoint"
"$PY" -m megapre.generate --load "$CKPT" --device "$DEVICE" --prompt "The function returns" \
  --max-new-tokens "$GEN_TOKENS" --temperature 0.8 --top-k 40 --seed 1 \
  --output-json "$RUN/sample.json" | tee "$RUN/sample.txt"

# ---------------------------------------------------------------------------------------------
printf '\n[quickstart] summary (%ss in all)\n' "$(( SECONDS - T0 ))"
"$PY" - "$RUN" "$CORPUS" "$TOK" "$DATA" "$CKPT" <<'EOF'
import json, sys
from pathlib import Path
run, corpus, tok, data, ckpt = sys.argv[1:]
rows = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [r for r in rows if "split" not in r]
valid = [r for r in rows if r.get("split") == "valid"]
if not train:
    sys.exit(f"no training rows in {run}/metrics.jsonl: see {run}/train.log")
speed = [r["tokens_per_s"] for r in train[1:] or train]  # the first interval includes warm-up
print(f"  train loss   {train[-1]['loss']:.4f} at iteration {train[-1]['iteration']} "
      f"(first logged: {train[0]['loss']:.4f} at {train[0]['iteration']})")
if valid:
    print(f"  valid loss   {valid[-1]['loss']:.4f} at iteration {valid[-1]['iteration']}")
print(f"  tokens/s     {sum(speed) / len(speed):,.0f} (mean over logged intervals after the first)")
e = json.loads(Path(run, "eval.json").read_text())
print(f"  evaluate     {e['split']} loss {e['loss']:.4f}, ppl {e['ppl']:.1f} over "
      f"{e['tokens']:,} tokens (checkpoint iteration {e['iteration']}, layout {e['layout']})")
for item in json.loads(Path(run, "sample.json").read_text())["samples"][:1]:
    print(f"  sample       {(item['prompt'] + item['text'])[:300]!r}")
print(f"  corpus       {corpus}\n  tokenizer    {tok}\n  dataset      {data}.bin/.idx")
print(f"  run          {run} (train.log, metrics.jsonl)")
print(f"  checkpoints  {ckpt}")
EOF
