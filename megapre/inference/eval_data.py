"""The dataset megapre.evaluate scores: one split of --data-path (cut by --split, as the training
run cut it, so `valid` is the run's validation set) or the whole of it (`all`).

GPT samples use the run's sequence length, seed and loss-mask settings, so with the same data the
first batches of `valid` are the ones the Trainer validated on first (GPTDataset orders one epoch
the same way whatever number of samples is asked for).
"""
from __future__ import annotations

from typing import Any

from megapre.data.blend import build_gpt_datasets, parse_blend
from megapre.data.gpt_dataset import GPTDatasetConfig
from megapre.data.split import SPLIT_NAMES, parse_split, split_ranges
from megapre.data.tokenizers import Tokenizer
from megapre.model.config import ConfigError
from megapre.train.args import PretrainConfig

EVAL_SPLITS = ("all", *SPLIT_NAMES)


def select_data(cfg: PretrainConfig, data_path: list[str] | None, split: str | None,
                eval_split: str) -> str:
    """Point cfg.data at what to score; returns the split of it to read ('all' reads the
    whole --data-path as one 'train' split)."""
    d = cfg.data
    if data_path:
        d.data_path, d.train_data_path, d.valid_data_path, d.test_data_path = data_path, [], [], []
    if split is not None:
        d.split = split
    if eval_split not in EVAL_SPLITS:
        raise ConfigError(f"--eval-split {eval_split!r} is not one of {', '.join(EVAL_SPLITS)}")
    if eval_split != "all":
        return eval_split
    if not d.data_path:
        raise ConfigError("--eval-split all scores the whole of --data-path, but the checkpoint's "
                          "run used separate --train/valid/test-data-path: give --data-path")
    d.split = "1,0,0"
    return "train"


def eval_dataset(cfg: PretrainConfig, tokenizer: Tokenizer, split: str,
                 num_samples: int | None) -> Any:
    """The `split` dataset with num_samples samples (None: one pass over the data)."""
    d = cfg.data
    counts: list[int | None] = [0, 0, 0]
    counts[SPLIT_NAMES.index(split)] = num_samples
    if num_samples is None and cfg.model.model == "gpt":
        paths = d.data_path or getattr(d, f"{split}_data_path")
        if len(parse_blend(paths)[0]) > 1:
            raise ConfigError("--eval-iters all needs a single dataset (a blend has no single "
                              "pass); give --eval-iters N")
    if cfg.model.model == "gpt":
        gpt = GPTDatasetConfig(seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                               eod_token=tokenizer.eod, eod_mask_loss=d.eod_mask_loss,
                               reset_position_ids=d.reset_position_ids,
                               reset_attention_mask=d.reset_attention_mask,
                               cache=d.cache())
        found = build_gpt_datasets(d.blend(), gpt, counts)
    else:
        found = {split: _bert_split(cfg, tokenizer, split, num_samples)}
    dataset = found.get(split)
    if dataset is None:
        raise ConfigError(f"the {split} split is empty: --split {d.split!r} gives it no share "
                          f"of the data; pick another --eval-split or change --split")
    return dataset


def _bert_split(cfg: PretrainConfig, tokenizer: Tokenizer, split: str,
                num_samples: int | None) -> Any:
    """BERT sentence pairs from one sentence-split dataset (PREFIX_text_sentence), cut by
    --split as the training run cut it."""
    from megapre.data.bert_dataset import BertDataset, BertDatasetConfig
    from megapre.data.indexed import IndexedDataset

    d = cfg.data
    paths = d.data_path or getattr(d, f"{split}_data_path")
    prefixes = [p for p in paths if not _is_number(p)]
    if len(prefixes) != 1:
        raise ConfigError("BERT evaluation reads one sentence-split dataset: --data-path "
                          "PREFIX_text_sentence (tools/preprocess_data.py --split-sentences)")
    indexed = IndexedDataset(prefixes[0])
    fractions = parse_split(d.split) if d.data_path else (1.0, 0.0, 0.0)
    r = split_ranges(fractions, indexed.num_documents)[SPLIT_NAMES.index(split) if d.data_path else 0]
    if r is None:
        return None
    bert = BertDatasetConfig(seq_length=cfg.model.seq_length, mask_prob=d.mask_prob,
                             short_seq_prob=d.short_seq_prob,
                             binary_head=cfg.model.bert_binary_head, seed=cfg.train.seed,
                             cache=d.cache())
    return BertDataset(indexed, tokenizer, split, r, num_samples, bert)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
