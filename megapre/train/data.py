"""The run's datasets and loaders, from the config: a thin adapter from PretrainConfig to the data
layer, which builds GPT samples over a blend of indexed datasets or BERT sentence pairs
(megapre.data.blend), train/valid/test by --split or separate paths, sized by
megapre.data.split.samples_per_split, and a loader per split (megapre.data.sampler) that starts at
consumed_samples so a resumed run sees exactly the batches it would have seen.

Only the pipeline stages that consume data (first: tokens; last: labels and masks) need real
batches, but every rank of a stage builds the same loader so DP ranks split the global batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megapre.data.bert_dataset import BertDatasetConfig, bert_special_ids
from megapre.data.blend import build_bert_datasets, build_gpt_datasets
from megapre.data.errors import DataError
from megapre.data.fim import FIMDataset, FIMTransform
from megapre.data.gpt_dataset import GPTDatasetConfig
from megapre.data.mock import mock_directory, write_mock_corpus
from megapre.data.notify import warn
from megapre.data.sampler import build_data_loader
from megapre.data.split import samples_per_split as _samples_per_split
from megapre.data.tokenizer_check import CheckedOpener, DataCheckConfig
from megapre.data.tokenizers import Tokenizer

from .args import PretrainConfig


@dataclass
class Splits:
    train: Any
    valid: Any | None
    test: Any | None


def samples_per_split(cfg: PretrainConfig) -> list[int]:
    """Megatron's train_valid_test_num_samples: enough for every step and every evaluation."""
    t = cfg.train
    return _samples_per_split(t.train_iters, t.eval_interval, t.eval_iters, t.global_batch_size,
                              t.eval_global_batch_size)


def build_splits(cfg: PretrainConfig, tokenizer: Tokenizer, group: Any = None) -> Splits:
    """The run's datasets; each --data-path prefix is checked against the tokenizer when opened
    (megapre.data.tokenizer_check). Data problems raise DataError (one line, exit 2)."""
    counts = samples_per_split(cfg)
    d = cfg.data
    cache = d.cache()
    bert = cfg.model.model != "gpt"
    if bert:
        bert_special_ids(tokenizer)      # before any index is built
    # Sentence order prediction pairs sentences: document-level data has none to pair.
    pairs = bert and cfg.model.bert_binary_head
    # The data was made with the tokenizer before any FIM sentinels were appended to it.
    opener = CheckedOpener(getattr(tokenizer, "base", tokenizer),
                           DataCheckConfig(d.allow_tokenizer_mismatch, need_sentences=pairs))
    if not bert:
        gpt = GPTDatasetConfig(seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                               eod_token=tokenizer.eod, eod_mask_loss=d.eod_mask_loss,
                               reset_position_ids=d.reset_position_ids,
                               reset_attention_mask=d.reset_attention_mask, cache=cache,
                               vocab_size=tokenizer.vocab_size)
        found = build_gpt_datasets(_blend(cfg, tokenizer), gpt, counts, open_dataset=opener,
                                   group=group, wrap=_fim_wrapper(cfg, tokenizer))
    else:
        bert_cfg = BertDatasetConfig(seq_length=cfg.model.seq_length, mask_prob=d.mask_prob,
                                     short_seq_prob=d.short_seq_prob,
                                     binary_head=cfg.model.bert_binary_head, seed=cfg.train.seed,
                                     cache=cache)
        found = build_bert_datasets(d.blend(), bert_cfg, tokenizer, counts, open_dataset=opener,
                                    group=group)
    if found.get("train") is None:
        raise DataError("the training split is empty: give it a share in --split "
                        f"(now {d.split!r}) or pass --train-data-path")
    _say_if_validation_off(cfg, found.get("valid"), counts[1])
    return Splits(found["train"], found.get("valid"), found.get("test"))


def _fim_wrapper(cfg: PretrainConfig, tokenizer: Tokenizer) -> Any:
    """--fim-data: each corpus's GPT samples become FIM samples (megapre.data.fim); else None."""
    if not cfg.data.fim_data:
        return None
    transform = FIMTransform(tokenizer, cfg.data.fim(cfg.train.seed))
    return lambda dataset: FIMDataset(dataset, transform)


def _blend(cfg: PretrainConfig, tokenizer: Tokenizer) -> Any:
    """--data-path's blend, or under --mock-data the synthetic corpus split by --split."""
    if not cfg.data.mock_data:
        return cfg.data.blend()
    prefix = write_mock_corpus(mock_directory(cfg.data.data_cache_path), tokenizer.vocab_size,
                               tokenizer.eod)
    return dataclasses.replace(cfg.data.blend(), data_path=[prefix])


def _say_if_validation_off(cfg: PretrainConfig, valid: Any, wanted: int) -> None:
    """--split 100,0,0 with evaluations asked for: no error (Megatron allows it), but say so."""
    if valid is None and wanted > 0:
        warn(f"--split {cfg.data.split} gives the validation split no share and no "
             f"--valid-data-path is set: validation is off (no evaluation every --eval-interval "
             f"{cfg.train.eval_interval}); give validation a share in --split to evaluate")


def batches(dataset: Any, consumed_samples: int, cfg: PretrainConfig, dp_rank: int, dp_size: int,
            device: torch.device, num_workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless-by-construction iterator of this DP rank's micro-batches (tensors on `device`),
    starting after `consumed_samples` global samples."""
    loader = build_data_loader(dataset, consumed_samples, cfg.train.micro_batch_size,
                               cfg.train.global_batch_size, dp_rank, dp_size,
                               num_workers=cfg.data.num_workers if num_workers is None else num_workers)
    for batch in loader:
        yield {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}
