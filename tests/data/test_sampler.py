"""Pretraining batch sampler: rank shards tile the global order; resuming at consumed_samples
replays exactly the uninterrupted run's remaining batches; batch-size validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megapre.data.sampler import BatchLayout, PretrainingSampler, build_data_loader


def micro_batches(total, consumed, micro, gbs, dp):
    """Per rank, the list of micro batches it yields."""
    return [list(PretrainingSampler(total, consumed, micro, gbs, r, dp)) for r in range(dp)]


@pytest.mark.parametrize("total,micro,gbs,dp", [(100, 2, 8, 2), (97, 3, 18, 3), (64, 4, 16, 1), (50, 1, 4, 4)])
def test_rank_shards_concatenate_to_the_global_order(total, micro, gbs, dp):
    per_rank = micro_batches(total, 0, micro, gbs, dp)
    steps = len(per_rank[0])
    assert all(len(r) == steps for r in per_rank)
    order = [i for step in range(steps) for r in range(dp) for i in per_rank[r][step]]
    end = total // gbs * gbs  # the incomplete last global batch is dropped
    assert order == list(range(end))
    assert steps == len(PretrainingSampler(total, 0, micro, gbs, 0, dp)) == end // (micro * dp)


@pytest.mark.parametrize("total,micro,gbs,dp", [(100, 2, 8, 2), (97, 3, 18, 3)])
def test_resume_equals_the_tail_of_the_uninterrupted_run(total, micro, gbs, dp):
    full = micro_batches(total, 0, micro, gbs, dp)
    step = micro * dp
    for consumed in range(0, total // gbs * gbs + 1, step):
        resumed = micro_batches(total, consumed, micro, gbs, dp)
        for r in range(dp):
            assert resumed[r] == full[r][consumed // step:], (consumed, r)


def test_validation_errors():
    with pytest.raises(ValueError, match="--global-batch-size 10 must be a multiple of --micro-batch-size 2 x "
                                         "data-parallel size 4 = 8 .nearest valid: 8, 16"):
        BatchLayout(2, 10, 4)
    with pytest.raises(ValueError, match="--micro-batch-size must be a positive integer"):
        BatchLayout(0, 8, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2 is outside"):
        PretrainingSampler(100, 0, 2, 8, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples 6 must be a non-negative multiple of .* = 4"):
        PretrainingSampler(100, 6, 2, 8, 0, 2)
    with pytest.raises(ValueError, match="consumed_samples 104 is past the 96 samples"):
        PretrainingSampler(100, 104, 2, 8, 0, 2)
    assert BatchLayout(2, 16, 4).accumulation_steps == 2
    assert list(PretrainingSampler(100, 96, 2, 8, 1, 2)) == []  # finished run: nothing left


class Squares:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"tokens": np.array([i, i * i], dtype=np.int64)}


def test_data_loader_batches():
    loader = build_data_loader(Squares(), consumed_samples=8, micro_batch_size=2, global_batch_size=8,
                               data_parallel_rank=1, data_parallel_size=2, num_workers=0)
    batches = [b["tokens"] for b in loader]
    assert len(batches) == len(loader) == (40 - 8) // 4
    assert isinstance(batches[0], torch.Tensor) and batches[0].shape == (2, 2)
    assert batches[0][:, 0].tolist() == [10, 11] and batches[-1][:, 0].tolist() == [38, 39]
