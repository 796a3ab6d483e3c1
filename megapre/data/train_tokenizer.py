"""Train a tokenizer on a corpus: SentencePiece (unigram/BPE), byte-level BPE (GPT-2 style, HF
`tokenizers`), BERT WordPiece, or a character vocabulary. Reads what preprocessing reads, streams it, and writes the
files atomically so they load with `build_tokenizer` (the flags to use are printed at the end).

    python tools/train_tokenizer.py --kind sentencepiece --input corpus/*.jsonl.gz --vocab-size 32000 \
        --output-dir tok --output-prefix spm32k
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from megapre.data.tokenizer.corpus import (
    INPUT_FORMATS,
    TEXT_MODES,
    CorpusError,
    CorpusOptions,
    CorpusStats,
    iter_documents,
)
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer, write_char_vocab

KINDS = ("sentencepiece", "byte-bpe", "wordpiece", "char")
CHECK_DOCS = 1000  # documents kept aside to measure the trained tokenizer (bytes per token, round trip)


@dataclass
class Output:
    """A trained tokenizer's files (final names) and the build_tokenizer configs that load them."""

    files: list[str]
    configs: list[TokenizerConfig]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py", description=__doc__.split("\n\n")[0],
        epilog="Outputs go to OUTPUT_DIR/OUTPUT_PREFIX.* (plus OUTPUT_PREFIX.train.json, the run's summary); "
               "the flags that load them are printed. Exit codes: 0 trained, 1 bad input or failed "
               "training (message on stderr), 2 bad flags.",
    )
    p.add_argument("--kind", choices=KINDS, required=True, help="what to train")
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (JSONL, text, Parquet; .gz/.zst)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--output-prefix", default="tokenizer", help="file name stem inside --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g = p.add_argument_group("input")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL/Parquet fields holding text")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    g.add_argument("--text-mode", choices=TEXT_MODES, default="line", help="plain text: a document per line or per blank-line block")
    g.add_argument("--max-documents", type=int, help="read at most this many documents (spread over the files)")
    g.add_argument("--sample-bytes", type=_size, help="read at most this much text, e.g. 2G (spread over the files)")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="bad records: count and skip, or stop")
    g = p.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, help="vocabulary size (default 32000; wordpiece 30522)")
    g.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="sentencepiece algorithm")
    g.add_argument("--character-coverage", type=float, default=0.9995, help="sentencepiece: share of characters kept (1.0 for small alphabets)")
    g.add_argument("--byte-fallback", action="store_true", help="sentencepiece: unknown characters become UTF-8 byte pieces")
    g.add_argument("--max-sentences", type=int, default=5_000_000, help="sentencepiece: sentences sampled into memory")
    g.add_argument("--max-sentence-length", type=int, default=4192, help="sentencepiece: longer lines are cut at spaces")
    g.add_argument("--min-frequency", type=int, default=2, help="byte-bpe: minimum pair count for a merge")
    g.add_argument("--cased", action="store_true", help="wordpiece: keep case and accents (BertWordPieceCase)")
    g.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens (byte-bpe: added after <|endoftext|>; sentencepiece: user-defined symbols)")
    g.add_argument("--char-specials", nargs="*", default=[], choices=("eod", "pad", "unk"), help="char: special tokens after the characters")
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    g.add_argument("--verbose", action="store_true", help="show the trainer's own log")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.kind == "char":
        p.error("--vocab-size does not apply to --kind char (the vocabulary is the corpus's characters)")
    if args.cased and args.kind != "wordpiece":
        p.error("--cased applies to --kind wordpiece only")
    for name in ("max_documents", "sample_bytes", "vocab_size", "max_sentences", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive (got {value})")
    if not 0 < args.character_coverage <= 1:
        p.error(f"--character-coverage must be in (0, 1] (got {args.character_coverage})")
    return args


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500M, 2G, 1000000)") from None


# ------------------------------------------------------------------------------------- trainers
def _sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """SentencePiece trains on lines and silently drops lines over its length limit: cut them at spaces."""
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                cut = head.rfind(" ")
                cut = cut if cut > 0 else len(head)
                yield line[:cut]
                line = line[cut:].strip()
            if line:
                yield line


class _Remember:
    """Iterates `items`, keeping the exception that stopped it: SentencePiece re-raises errors from
    its sentence iterator as RuntimeError text, and the reader's own message is the useful one."""

    def __init__(self, items: Iterator[str]) -> None:
        self.items, self.error = items, None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.items
        except Exception as e:
            self.error = e
            raise


def train_sentencepiece(docs: Iterable[str], tmp: Path, prefix: str, args: argparse.Namespace) -> Output:
    import sentencepiece as spm

    vocab_size = args.vocab_size or 32000
    reader = _Remember(_sentences(docs, args.max_sentence_length))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(reader),
            model_prefix=str(tmp / prefix),
            model_type=args.model_type,
            vocab_size=vocab_size,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length,
            user_defined_symbols=list(args.special_tokens),
            num_threads=args.threads,
            minloglevel=0 if args.verbose else 2,
        )
    except RuntimeError as e:
        if reader.error is not None:  # our reader failed inside the trainer: report it as itself
            raise reader.error from None
        hint = " (lower --vocab-size or read more text)" if "ocab" in str(e) else ""
        raise ValueError(f"SentencePiece training failed: {e}{hint}") from e
    model = str(Path(args.output_dir) / f"{prefix}.model")
    return Output(
        files=[f"{prefix}.model", f"{prefix}.vocab"],
        configs=[TokenizerConfig("SentencePieceTokenizer", tokenizer_model=model),
                 TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=model)],
    )


def train_byte_bpe(docs: Iterable[str], tmp: Path, prefix: str, args: argparse.Namespace) -> Output:
    import tokenizers as hf

    specials = ["<|endoftext|>"] + [t for t in args.special_tokens if t != "<|endoftext|>"]
    vocab_size = args.vocab_size or 32000
    if vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size {vocab_size} is below 256 bytes + {len(specials)} special tokens")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=specials,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=args.verbose,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.model.save(str(tmp), prefix)  # {prefix}-vocab.json, {prefix}-merges.txt: GPT-2's file formats
    tok.save(str(tmp / f"{prefix}.json"))
    out = Path(args.output_dir)
    return Output(
        files=[f"{prefix}-vocab.json", f"{prefix}-merges.txt", f"{prefix}.json"],
        configs=[TokenizerConfig("GPT2BPETokenizer", vocab_file=str(out / f"{prefix}-vocab.json"),
                                 merge_file=str(out / f"{prefix}-merges.txt")),
                 TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(out / f"{prefix}.json"))],
    )


def train_wordpiece(docs: Iterable[str], tmp: Path, prefix: str, args: argparse.Namespace) -> Output:
    """A BERT vocab.txt: the normalizer and pre-tokenizer match what BertWordPiece{LowerCase,Case}
    applies when loading it, so the vocabulary is learnt on the same words it will be used on."""
    import tokenizers as hf

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    specials += [t for t in args.special_tokens if t not in specials]
    tok = hf.Tokenizer(hf.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = hf.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=not args.cased, lowercase=not args.cased
    )
    tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
    trainer = hf.trainers.WordPieceTrainer(
        vocab_size=args.vocab_size or 30522, min_frequency=args.min_frequency, special_tokens=specials,
        continuing_subword_prefix="##", show_progress=args.verbose,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.model.save(str(tmp), prefix)  # {prefix}-vocab.txt, one token per line, id = line number
    kind = "BertWordPieceCase" if args.cased else "BertWordPieceLowerCase"
    return Output(
        files=[f"{prefix}-vocab.txt"],
        configs=[TokenizerConfig(kind, vocab_file=str(Path(args.output_dir) / f"{prefix}-vocab.txt"))],
    )


def train_char(docs: Iterable[str], tmp: Path, prefix: str, args: argparse.Namespace) -> Output:
    chars: set[str] = set()
    for doc in docs:
        chars.update(doc)
    write_char_vocab(tmp / f"{prefix}.json", chars, specials=args.char_specials)
    return Output(
        files=[f"{prefix}.json"],
        configs=[TokenizerConfig("CharacterTokenizer", vocab_file=str(Path(args.output_dir) / f"{prefix}.json"))],
    )


TRAINERS: dict[str, Callable[[Iterable[str], Path, str, argparse.Namespace], Output]] = {
    "sentencepiece": train_sentencepiece,
    "byte-bpe": train_byte_bpe,
    "wordpiece": train_wordpiece,
    "char": train_char,
}
PLANNED = {
    "sentencepiece": lambda p: [f"{p}.model", f"{p}.vocab"],
    "byte-bpe": lambda p: [f"{p}-vocab.json", f"{p}-merges.txt", f"{p}.json"],
    "wordpiece": lambda p: [f"{p}-vocab.txt"],
    "char": lambda p: [f"{p}.json"],
}


# ------------------------------------------------------------------------------------ the run
def _keep_aside(docs: Iterable[str], kept: list[str]) -> Iterator[str]:
    for doc in docs:
        if len(kept) < CHECK_DOCS:
            kept.append(doc)
        yield doc


def flags_of(config: TokenizerConfig) -> str:
    parts = [f"--tokenizer-type {config.tokenizer_type}"]
    for name in ("vocab_file", "merge_file", "tokenizer_model"):
        if getattr(config, name):
            parts.append(f"--{name.replace('_', '-')} {getattr(config, name)}")
    return " ".join(parts)


def check(config: TokenizerConfig, docs: list[str]) -> dict:
    """Load the result as a user would and measure it on documents it was trained on."""
    tok = build_tokenizer(config)
    ids = tok.encode_batch(docs)
    n_tokens = sum(len(i) for i in ids)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    decoded = [tok.decode(i) for i in ids]
    exact = sum(t == d for t, d in zip(decoded, docs))
    # SentencePiece normalizes whitespace by design; count those round trips separately.
    words = sum(t.split() == d.split() for t, d in zip(decoded, docs))
    return {"tokenizer": tok.describe(), "documents": len(docs), "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3), "exact_round_trips": exact,
            "round_trips_ignoring_whitespace": words}


def run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.output_dir)
    prefix = args.output_prefix
    if "/" in prefix or prefix.startswith("."):
        raise ValueError(f"--output-prefix {prefix!r}: a plain file name stem, without directories")
    planned = PLANNED[args.kind](prefix) + [f"{prefix}.train.json"]
    existing = [str(out_dir / f) for f in planned if (out_dir / f).exists()]
    if existing and not args.overwrite:
        raise ValueError(f"output exists: {', '.join(existing)}; pass --overwrite or choose another --output-prefix")
    opts = CorpusOptions(args.input, args.json_keys, args.input_format, args.text_mode,
                         args.max_documents, args.sample_bytes, args.on_error)
    stats = CorpusStats()
    kept: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{prefix}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        docs = _keep_aside(iter_documents(opts, stats), kept)
        output = TRAINERS[args.kind](_require_some(docs, stats), tmp, prefix, args)
        seconds = time.perf_counter() - start
        summary = {
            "kind": args.kind, "arguments": vars(args), "seconds": round(seconds, 2),
            "corpus": {**asdict(stats), "skipped": dict(stats.skipped)},
            "files": [str(out_dir / f) for f in output.files],
            "flags": [flags_of(c) for c in output.configs],
        }
        (tmp / f"{prefix}.train.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        for name in output.files + [f"{prefix}.train.json"]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["check"] = [check(c, kept) for c in output.configs]
    return summary


def _require_some(docs: Iterator[str], stats: CorpusStats) -> Iterator[str]:
    first = next(docs, None)
    if first is None:
        reasons = ", ".join(f"{n} {r}" for r, n in stats.skipped.items()) or "the inputs are empty"
        raise CorpusError(f"no documents to train on ({reasons}); check --input and --json-keys")
    yield first
    yield from docs


def report(summary: dict) -> str:
    c = summary["corpus"]
    lines = [
        f"trained {summary['kind']} in {summary['seconds']:.1f} s on {c['documents']:,} documents "
        f"({c['bytes'] / 1e6:.1f} MB) from {len(c['files'])} file(s)"
        + (" (stopped at the --max-documents/--sample-bytes cap)" if c["truncated"] else ""),
    ]
    if c["skipped"]:
        lines.append("skipped: " + ", ".join(f"{n:,} {reason}" for reason, n in c["skipped"].items()))
        lines += [f"  {e}" for e in c["examples"]]
    lines.append("wrote: " + ", ".join(summary["files"]))
    for flags, chk in zip(summary["flags"], summary["check"]):
        tok = chk["tokenizer"]
        lines.append(
            f"use with: {flags}\n  vocab {tok['vocab_size']:,}, eod {tok['special_ids']['eod']}; on {chk['documents']} "
            f"training documents: {chk['bytes_per_token']} bytes/token, round trips: {chk['exact_round_trips']} exact, "
            f"{chk['round_trips_ignoring_whitespace']} ignoring whitespace"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 trained; 1 bad input or failed training (message on stderr); 2 bad flags."""
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    print(report(summary))
    return 0
