"""Train/valid/test splits of one indexed dataset: `--split 969,30,1` -> document ranges, and how
many samples each split needs for a run.

The boundaries follow megatron-core (cumulative fractions of the element count, each rounded), so
the same --split selects the same documents as a Megatron run on the same files.
"""
from __future__ import annotations

import re
from typing import Sequence

from megapre.data.errors import DataError

SPLIT_NAMES: tuple[str, str, str] = ("train", "valid", "test")


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """`"969,30,1"` (or `"98/2"`, a sequence of numbers) -> normalized (train, valid, test).

    Missing trailing parts are 0 (`"99,1"` has no test split), as in Megatron.
    """
    if isinstance(split, str):
        # Quotes are stripped: a launch script's "--split '99,1,0'" reaches us with them.
        parts = [p for p in re.split(r"[,/\s]+", split.strip().strip("'\"")) if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"--split {split!r}: expected up to three non-negative numbers such as 969,30,1"
            ) from None
    else:
        values = [float(v) for v in split]
    if not values or len(values) > 3:
        raise ValueError(f"--split {split!r}: expected 1 to 3 numbers (train,valid,test), got {len(values)}")
    if any(v < 0 or v != v for v in values):
        raise ValueError(f"--split {split!r}: parts must be non-negative numbers")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"--split {split!r}: parts sum to 0; give at least one positive part")
    values += [0.0] * (3 - len(values))
    return (values[0] / total, values[1] / total, values[2] / total)


def split_ranges(fractions: Sequence[float], num_elements: int) -> list[tuple[int, int] | None]:
    """Element ranges [begin, end) per split; None where the split's fraction is 0 (not requested).

    A requested split may still be empty when the dataset is small: callers turn that into an
    error naming the split (see GPTDataset), never a silent empty dataset.
    """
    ranges: list[tuple[int, int] | None] = []
    cum = 0.0
    for frac in fractions:
        lo, hi = cum, cum + frac
        cum = hi
        if frac <= 0:
            ranges.append(None)
            continue
        ranges.append((int(round(lo * num_elements)), int(round(min(hi, 1.0) * num_elements))))
    return ranges



def check_document_range(document_range: Sequence[int] | None, num_documents: int,
                         where: str) -> tuple[int, int]:
    """[begin, end) of a split's documents (None: all), checked to be a non-empty range inside the
    dataset; errors start with `where` ("the valid split of PREFIX") and say how to fix them."""
    begin, end = (0, num_documents) if document_range is None else (int(x) for x in document_range)
    if not 0 <= begin <= end <= num_documents:
        raise ValueError(f"{where}: document range [{begin}, {end}) is outside the dataset's "
                         f"{num_documents} documents")
    if begin == end:
        raise DataError(
            f"{where} is empty: documents [{begin}, {end}) of the dataset's {num_documents:,} "
            "documents (its --split share rounds to no document). Give this split a larger share "
            "in --split, use more data, or set its share (or sample count) to 0"
        )
    return begin, end

def samples_per_split(train_iters: int, eval_interval: int, eval_iters: int,
                      global_batch_size: int, eval_global_batch_size: int | None = None
                      ) -> list[int]:
    """Megatron's train_valid_test_num_samples: enough for every step and every evaluation
    (validation batches of --eval-global-batch-size, default the training batch)."""
    evals = (train_iters // eval_interval + 1) * eval_iters
    eval_gbs = eval_global_batch_size or global_batch_size
    return [train_iters * global_batch_size, evals * eval_gbs, eval_iters * eval_gbs]
