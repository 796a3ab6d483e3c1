"""Knowledge distillation, measured: a character-level GPT teacher (4 layers x 128) trained on a
slice of the shared Gutenberg text, then a half-depth student (2 layers x 128) trained twice on
the same tokens in the same order, alone and distilled from the teacher (--teacher-checkpoint,
--kd-alpha, --kd-temperature). The validation text (the last 10% of the slice, contiguous, as
nanoGPT's prepare.py cuts) is scored whole by megapre.evaluate for the three models; the line
to read is the share of the student-alone-to-teacher perplexity gap that distillation closes.

    python benchmarks/bench_distill.py [--chars 2000000] [--iters 600] [--alpha 0.5]
                                       [--temperature 2] [--work DIR]

Everything runs on the CPU through the public entry points (tools/train_tokenizer.py,
tools/preprocess_data.py, megapre.pretrain, megapre.evaluate).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "gutenberg" / "gutenberg_en_24MiB.txt"
sys.path.insert(0, str(ROOT))


def prepare(text_path: Path, chars: int, work: Path) -> tuple[Path, str, str]:
    """Character vocabulary and train/valid indexed datasets of the first `chars` characters."""
    text = text_path.read_text(encoding="utf-8")[:chars]
    cut = int(len(text) * 0.9)
    for name, part in (("all", text), ("train", text[:cut]), ("val", text[cut:])):
        (work / f"{name}.jsonl").write_text(json.dumps({"text": part}) + "\n", encoding="utf-8")
    _run([ROOT / "tools" / "train_tokenizer.py", "--kind", "char", "--input", work / "all.jsonl",
          "--output-dir", work, "--output-prefix", "chars", "--char-specials", "eod",
          "--overwrite"])
    vocab = work / "chars.json"
    for part in ("train", "val"):
        _run([ROOT / "tools" / "preprocess_data.py", "--input", work / f"{part}.jsonl",
              "--tokenizer-type", "CharacterTokenizer", "--vocab-file", vocab, "--output-prefix",
              work / part, "--workers", "1", "--overwrite"])
    return vocab, str(work / "train_text_document"), str(work / "val_text_document")


def _run(cmd: list) -> None:
    subprocess.run([sys.executable, *map(str, cmd)], check=True, stdout=subprocess.DEVNULL)


def pretrain(layers: int, save: Path, vocab: Path, train: str, iters: int, *extra: str) -> float:
    """Train one model (same data order for every call: same seed and batches); seconds."""
    from megapre.cli.pretrain import main

    flags = ["--model", "gpt", "--num-layers", str(layers), "--num-attention-heads", "4",
             "--hidden-size", "128", "--seq-length", "64", "--disable-bias-linear",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "12",
             "--global-batch-size", "12", "--train-iters", str(iters), "--lr", "1e-3",
             "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters",
             str(iters // 20), "--adam-beta2", "0.99", "--weight-decay", "0.1",
             "--train-data-path", train, "--tokenizer-type", "CharacterTokenizer",
             "--vocab-file", str(vocab), "--make-vocab-size-divisible-by", "1",
             "--eval-iters", "0", "--log-interval", str(iters), "--num-workers", "0",
             "--device", "cpu", "--data-cache-path", str(save.parent / "cache"),
             "--save", str(save), "--seed", "1337", *extra]
    t0 = time.perf_counter()
    if main(flags) != 0:
        raise SystemExit(f"bench_distill: pretraining {save.name} failed")
    return time.perf_counter() - t0


def perplexity(save: Path, valid: str, work: Path) -> float:
    """Per-character perplexity of the whole validation text."""
    from megapre.cli.evaluate import main

    out = work / f"{save.name}.eval.json"
    if main(["--load", str(save), "--device", "cpu", "--data-path", valid, "--eval-split", "all",
             "--micro-batch-size", "12", "--global-batch-size", "12", "--data-cache-path",
             str(work / "cache"), "--output-json", str(out)]) != 0:
        raise SystemExit(f"bench_distill: evaluating {save.name} failed")
    return math.exp(json.loads(out.read_text())["loss"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chars", type=int, default=2_000_000)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    if not CORPUS.is_file():
        raise SystemExit(f"bench_distill: {CORPUS} is absent (the shared Gutenberg text)")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_distill_"))
    work.mkdir(parents=True, exist_ok=True)
    vocab, train, valid = prepare(CORPUS, a.chars, work)
    runs = [("teacher (4 layers)", "teacher", 4, ()),
            ("student alone (2 layers)", "alone", 2, ()),
            (f"student distilled (2 layers, alpha {a.alpha}, T {a.temperature})", "distilled", 2,
             ("--teacher-checkpoint", str(work / "teacher"), "--kd-alpha", str(a.alpha),
              "--kd-temperature", str(a.temperature)))]
    rows = []
    for title, name, layers, extra in runs:
        seconds = pretrain(layers, work / name, vocab, train, a.iters, *extra)
        rows.append((title, perplexity(work / name, valid, work), seconds))
    print(f"\n{a.iters} steps x 12 x 64 characters of {CORPUS.name} (first {a.chars:,} chars, "
          "90/10 cut); validation perplexity per character, whole validation text")
    print(f"| model | valid ppl | train s |\n|---|---|---|")
    for title, ppl, seconds in rows:
        print(f"| {title} | {ppl:.4f} | {seconds:.0f} |")
    teacher, alone, distilled = (ppl for _, ppl, _ in rows)
    if alone > teacher:
        print(f"gap closed by distillation: {100 * (alone - distilled) / (alone - teacher):.1f}% "
              f"of {alone - teacher:.4f}")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
