"""`python -m megapre.cli.bert_samples --data-path P_text_sentence --vocab-file V --show 2` (also
`python -m megapre.data.bert_dataset ...`, console `megapre-bert-samples`): build (or load from the
cache) the BERT sentence-pair mapping of one split offline, print its statistics and a few decoded
samples with their masked targets."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from megapre.data.bert_dataset import BertDataset, BertDatasetConfig
from megapre.data.index_cache import CacheConfig
from megapre.data.masking import NGRAM_DISTRIBUTIONS
from megapre.data.split import SPLIT_NAMES
from megapre.cli.common import prog_name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("megapre.data.bert_dataset"),
        description="Build (or load from the cache) the BERT sentence-pair mapping of one split and "
                    "print its statistics and a few decoded samples.")
    p.add_argument("--data-path", required=True, help="prefix of a sentence-split dataset (PREFIX_text_sentence)")
    p.add_argument("--split", default="969,30,1", help="train,valid,test shares of the documents")
    p.add_argument("--split-name", default="train", choices=SPLIT_NAMES)
    p.add_argument("--num-samples", type=int, default=None, help="samples wanted (default: one epoch)")
    p.add_argument("--tokenizer-type", default="BertWordPieceLowerCase")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--tokenizer-model", default=None, help="HF tokenizer.json (HuggingFaceTokenizer)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--bert-no-binary-head", action="store_true", help="no sentence pairs / SOP labels")
    p.add_argument("--masking-max-ngram", type=int, default=3)
    p.add_argument("--masking-ngram-distribution", default="harmonic", choices=NGRAM_DISTRIBUTIONS)
    p.add_argument("--no-whole-word-masking", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-cache-path", default=None, help="index cache directory (default: beside the data)")
    p.add_argument("--show", type=int, default=2, help="samples to print")
    return p


def _dataset_from_args(args: argparse.Namespace) -> BertDataset:
    from megapre.data.indexed import IndexedDataset
    from megapre.data.split import parse_split, split_ranges
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig(args.tokenizer_type, vocab_file=args.vocab_file,
                                                tokenizer_model=args.tokenizer_model))
    indexed = IndexedDataset(args.data_path)
    which = SPLIT_NAMES.index(args.split_name)
    document_range = split_ranges(parse_split(args.split), indexed.num_documents)[which]
    if document_range is None:
        raise ValueError(f"--split {args.split} gives the {args.split_name} split no share")
    config = BertDatasetConfig(
        seq_length=args.seq_length, mask_prob=args.mask_prob, short_seq_prob=args.short_seq_prob,
        binary_head=not args.bert_no_binary_head, whole_word=not args.no_whole_word_masking,
        max_ngrams=args.masking_max_ngram, ngram_distribution=args.masking_ngram_distribution, seed=args.seed,
        cache=CacheConfig(cache_dir=args.data_cache_path))
    return BertDataset(indexed, tokenizer, args.split_name, document_range, args.num_samples, config)


def _statistics(ds: BertDataset, limit: int = 1000) -> str:
    n = min(len(ds), limit)
    t0 = time.perf_counter()
    samples = [ds[i] for i in range(n)]
    rate = n / (time.perf_counter() - t0)
    tokens = np.array([s["padding_mask"].sum() for s in samples])
    predicted = sum(int(s["loss_mask"].sum()) for s in samples)
    special = 3 if ds.config.binary_head else 2
    return (f"first {n} samples: {tokens.mean():.1f} tokens of {ds.config.seq_length} on average, "
            f"{predicted / max(1, int(tokens.sum()) - special * n):.3f} of ordinary tokens predicted, "
            f"{np.mean([int(s['truncated']) for s in samples]):.2f} truncated, "
            f"{np.mean([int(s['is_random']) for s in samples]):.2f} swapped (SOP label 1); {rate:,.0f} samples/s")


def _render(ds: BertDataset, idx: int) -> str:
    s, tok = ds[idx], ds.tokenizer
    n = int(s["padding_mask"].sum())
    targets = " ".join(f"{tok.decode([int(t)])}" for t in s["labels"][:n][s["loss_mask"][:n] == 1])
    return (f"sample {idx} (sentences {ds.mapping[idx][0]}..{ds.mapping[idx][1] - 1}, target length "
            f"{ds.mapping[idx][2]}, is_random {int(s['is_random'])}, truncated {int(s['truncated'])}):\n"
            f"  input:   {tok.decode(s['text'][:n].tolist())}\n  targets: {targets}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        ds = _dataset_from_args(args)
    except (ValueError, OSError, TimeoutError, ImportError) as e:
        print(f"bert_dataset: error: {e}", file=sys.stderr)
        return 2
    info = ds.mapping_info
    begin, end = ds.document_range
    print(f"{args.split_name} split of {args.data_path}: documents [{begin}, {end}), {len(ds):,d} samples in "
          f"{info['epochs']} epoch(s), mapping {ds.cache_status} in {ds.build_seconds:.2f} s; documents skipped: "
          f"{info['empty_documents']} empty, {info['short_documents']} too short, "
          f"{info['long_sentence_documents']} with a sentence over {ds.config.long_sentence_len} tokens")
    print(_statistics(ds))
    for idx in range(min(args.show, len(ds))):
        print(_render(ds, idx))
    return 0



if __name__ == "__main__":
    sys.exit(main())
