"""Train a tokenizer on a corpus: SentencePiece (unigram/BPE), byte-level BPE (GPT-2 style, HF
`tokenizers`), BERT WordPiece, or a character vocabulary. Reads what preprocessing reads, streams it, and writes the
files atomically so they load with `build_tokenizer` (the flags to use are printed at the end).

    python tools/train_tokenizer.py --kind sentencepiece --input corpus/*.jsonl.gz --vocab-size 32000 \
        --output-dir tok --output-prefix spm32k

(front end: megapre/cli/train_tokenizer.py)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megapre.data.tokenizer.corpus import (
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


@dataclass
class TrainingConfig:
    """What to train on and how (the flags of tools/train_tokenizer.py, megapre/cli/train_tokenizer.py)."""

    kind: str  # one of KINDS
    input: list[str]  # files, globs or directories
    output_dir: str
    output_prefix: str = "tokenizer"
    overwrite: bool = False
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    input_format: str = "auto"
    text_mode: str = "line"
    max_documents: int | None = None
    sample_bytes: int | None = None
    on_error: str = "skip"
    vocab_size: int | None = None  # None: 32000 (wordpiece 30522)
    model_type: str = "unigram"  # sentencepiece algorithm
    character_coverage: float = 0.9995
    byte_fallback: bool = False
    max_sentences: int = 5_000_000
    max_sentence_length: int = 4192
    min_frequency: int = 2
    cased: bool = False
    special_tokens: list[str] = field(default_factory=list)
    char_specials: list[str] = field(default_factory=list)
    threads: int = os.cpu_count() or 1
    verbose: bool = False


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


def train_sentencepiece(docs: Iterable[str], tmp: Path, prefix: str, args: TrainingConfig) -> Output:
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


def train_byte_bpe(docs: Iterable[str], tmp: Path, prefix: str, args: TrainingConfig) -> Output:
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


def train_wordpiece(docs: Iterable[str], tmp: Path, prefix: str, args: TrainingConfig) -> Output:
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


def train_char(docs: Iterable[str], tmp: Path, prefix: str, args: TrainingConfig) -> Output:
    chars: set[str] = set()
    for doc in docs:
        chars.update(doc)
    write_char_vocab(tmp / f"{prefix}.json", chars, specials=args.char_specials)
    return Output(
        files=[f"{prefix}.json"],
        configs=[TokenizerConfig("CharacterTokenizer", vocab_file=str(Path(args.output_dir) / f"{prefix}.json"))],
    )


TRAINERS: dict[str, Callable[[Iterable[str], Path, str, TrainingConfig], Output]] = {
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


def run(args: TrainingConfig) -> dict:
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
            "kind": args.kind, "arguments": asdict(args), "seconds": round(seconds, 2),
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
