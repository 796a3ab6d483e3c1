"""Fine-tuning batches: collate pads right to the longest member, epoch orders depend on (seed, epoch)
only, train(k) resumes exactly, data-parallel ranks tile each global batch, evaluate() sees every
example once (fillers weighted 0), and bucketing by length keeps SST-2 padding under 15%."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from megapre.data.task_batches import BatchPlan, TaskBatches, collate
from megapre.data.tasks import EncodedTask, LabelSet, TaskColumns, encode_examples, read_task_file
from megapre.errors import ConfigError

PAD = 0


def toy_task(n: int = 53, regression: bool = False, seed: int = 0) -> EncodedTask:
    """n examples of lengths 2..40; token ids encode the example number so batches can be traced."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 41, n)
    tokens = [np.full(L, 100 + i, dtype=np.int32) for i, L in enumerate(lengths)]
    types = [np.r_[np.zeros(L // 2, np.int8), np.ones(L - L // 2, np.int8)] for L in lengths]
    labels = rng.random(n).astype(np.float32) if regression else rng.integers(0, 3, n)
    return EncodedTask(tokens, types, labels, [f"f:{i + 1}" for i in range(n)], 0)


def plan(micro=2, gbs=8, rank=0, dp=1, seed=5, **kw) -> BatchPlan:
    return BatchPlan(micro, gbs, rank, dp, seed, **kw)


def take(it, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(count)]


def indices(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ collate
def test_collate_pads_right_to_the_longest_sample():
    samples = [{"tokens": np.array([5, 6, 7], np.int32), "types": np.array([0, 0, 1], np.int8), "label": 2,
                "weight": 1.0},
               {"tokens": np.array([8], np.int32), "types": np.array([0], np.int8), "label": 0, "weight": 0.0}]
    b = collate(samples, pad_id=9)
    assert b["tokens"].tolist() == [[5, 6, 7], [8, 9, 9]] and b["tokens"].dtype == torch.long
    assert b["types"].tolist() == [[0, 0, 1], [0, 0, 0]] and b["types"].dtype == torch.long
    assert b["padding_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and b["padding_mask"].dtype == torch.long
    assert b["lengths"].tolist() == [3, 1] and b["labels"].tolist() == [2, 0] and b["labels"].dtype == torch.long
    assert b["weight"].tolist() == [1.0, 0.0] and b["weight"].dtype == torch.float32 and "index" not in b
    fixed = collate(samples, pad_id=9, pad_to=5)
    assert fixed["tokens"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    assert fixed["padding_mask"].sum().item() == 4
    reg = collate([{**s, "label": 0.5, "index": i} for i, s in enumerate(samples)], pad_id=9)
    assert reg["labels"].dtype == torch.float32 and reg["index"].tolist() == [0, 1]
    with pytest.raises(ConfigError, match=r"a sample of 3 tokens does not fit the padded length 2 \(--seq-length\)"):
        collate(samples, pad_id=9, pad_to=2)
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], pad_id=9)


def test_batch_plan_validation():
    with pytest.raises(ConfigError, match=r"--global-batch-size 10 must be a multiple of --micro-batch-size 2 x "
                                          r"data-parallel size 2 = 4"):
        plan(micro=2, gbs=10, dp=2)
    with pytest.raises(ConfigError, match=r"--micro-batch-size must be a positive integer, got 0"):
        plan(micro=0)
    with pytest.raises(ConfigError, match=r"data-parallel rank 2 is outside \[0, 2\)"):
        plan(rank=2, dp=2)
    with pytest.raises(ConfigError, match=r"--seed -1"):
        plan(seed=-1)
    p = plan(micro=2, gbs=12, dp=3)
    assert (p.per_rank, p.accumulation_steps) == (4, 2)
    with pytest.raises(ConfigError, match=r"--global-batch-size 64 is larger than the 53 training examples"):
        TaskBatches(toy_task(), plan(gbs=64), PAD).train()


# -------------------------------------------------------------------------------------------- order
@pytest.mark.parametrize("bucket", [False, True])
def test_epoch_order_depends_on_seed_and_epoch_only(bucket):
    data = toy_task(500)
    a, b = TaskBatches(data, plan(bucket_by_length=bucket), PAD), TaskBatches(data, plan(bucket_by_length=bucket), PAD)
    orders = [a.epoch_order(e).copy() for e in range(3)]
    b.epoch_order(7)
    assert all(np.array_equal(b.epoch_order(e), orders[e]) for e in (2, 0, 1))
    assert all(np.array_equal(np.sort(o), np.arange(500)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    other = TaskBatches(data, plan(seed=6, bucket_by_length=bucket), PAD)
    assert not np.array_equal(other.epoch_order(0), orders[0])
    assert a.steps_per_epoch == 62  # 500 // 8: the last 4 of each shuffle are dropped


def test_bucketing_sorts_chunks_of_50_global_batches():
    data = toy_task(2000)
    batches = TaskBatches(data, plan(micro=4, gbs=8, bucket_by_length=True), PAD)
    order, lengths = batches.epoch_order(0), data.lengths()
    plain = np.random.default_rng([5, 0]).permutation(2000)  # the unbucketed shuffle it starts from
    chunk_of = np.empty(2000, np.int64)
    chunk_of[plain] = np.arange(2000) // 400  # 50 global batches of 8 per chunk
    assert (chunk_of[order.reshape(250, 8)] == chunk_of[order.reshape(250, 8)[:, :1]]).all()
    per_batch = lengths[order].reshape(250, 8)
    assert (np.diff(per_batch, axis=1) >= 0).all()  # sorted within each global batch
    assert not (np.diff(chunk_of[order[::8]]) >= 0).all()  # global batches shuffled across chunks
    spread = per_batch[:, -1] - per_batch[:, 0]
    assert spread.mean() < 1.0  # 400 lengths 2..40 sorted: batches of 8 nearly one length


# ------------------------------------------------------------------------------------ train, resume
@pytest.mark.parametrize("bucket,pad_to", [(False, None), (True, None), (True, 48)])
def test_train_resumes_exactly_across_epochs(bucket, pad_to):
    data = toy_task()  # 53 examples, G = 8: 6 steps per epoch
    p = plan(micro=2, gbs=8, dp=2, rank=1, bucket_by_length=bucket, pad_to=pad_to)
    accum = p.accumulation_steps
    full = take(TaskBatches(data, p, PAD).train(), 20 * accum)
    for k in (0, 1, 5, 6, 13):
        resumed = take(TaskBatches(data, p, PAD).train(k), (20 - k) * accum)
        assert all(same(x, y) for x, y in zip(resumed, full[k * accum:])), k
    assert all(b["tokens"].shape == (2, pad_to or b["lengths"].max().item()) for b in full)


def test_resume_reads_only_the_batches_it_yields(monkeypatch):
    data = toy_task()
    calls = []
    original = data.sample
    monkeypatch.setattr(data, "sample", lambda i, weight=1.0: calls.append(i) or original(i, weight))
    it = TaskBatches(data, plan(micro=2, gbs=8), PAD).train(10**9)
    take(it, 4)
    assert len(calls) == 8  # one global batch of step 10**9, nothing before it


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("micro,gbs,dp", [(2, 8, 2), (1, 12, 3), (3, 12, 4), (2, 16, 1)])
def test_data_parallel_ranks_tile_each_global_batch(bucket, micro, gbs, dp):
    data = toy_task(101)
    ranks = [TaskBatches(data, plan(micro, gbs, r, dp, bucket_by_length=bucket), PAD) for r in range(dp)]
    accum = ranks[0].plan.accumulation_steps
    steps = 2 * ranks[0].steps_per_epoch + 3
    per_rank = [take(r.train(), steps * accum) for r in ranks]
    assert all(b["tokens"].shape[0] == micro for rank in per_rank for b in rank)
    order = [ranks[0].epoch_order(e) for e in range(3)]
    for step in range(steps):
        epoch, g = divmod(step, ranks[0].steps_per_epoch)
        got = [i for rank in per_rank for i in indices(rank[step * accum:(step + 1) * accum])]
        assert got == order[epoch][g * gbs:(g + 1) * gbs].tolist(), step
    epoch0 = [i for rank in per_rank for b in rank[:ranks[0].steps_per_epoch * accum] for i in b["index"].tolist()]
    assert len(set(epoch0)) == len(epoch0) == ranks[0].steps_per_epoch * gbs  # no example twice in an epoch


def test_train_batches_carry_the_examples():
    data = toy_task()
    batch = next(TaskBatches(data, plan(), PAD).train())
    for row, i in enumerate(batch["index"].tolist()):
        n = int(data.lengths()[i])
        assert batch["tokens"][row, :n].tolist() == data.tokens[i].tolist()
        assert (batch["tokens"][row, n:] == PAD).all() and batch["padding_mask"][row].sum() == n
        assert batch["types"][row, :n].tolist() == data.types[i].tolist() and batch["labels"][row] == data.labels[i]
    assert batch["weight"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------ evaluate
@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("n,micro,gbs,dp", [(53, 2, 8, 2), (48, 2, 8, 2), (5, 1, 12, 3), (7, 4, 4, 1)])
def test_evaluate_sees_every_example_once_in_file_order(regression, n, micro, gbs, dp):
    data = toy_task(n, regression=regression)
    ranks = [TaskBatches(data, plan(micro, gbs, r, dp, pad_to=None), PAD) for r in range(dp)]
    steps = {r.eval_steps() for r in ranks}
    assert steps == {-(-n // gbs)}
    per_rank = [list(r.evaluate()) for r in ranks]
    accum = ranks[0].plan.accumulation_steps
    assert all(len(b) == ranks[0].eval_steps() * accum for b in per_rank)
    ordered = [b for step in range(ranks[0].eval_steps()) for rank in per_rank
               for b in rank[step * accum:(step + 1) * accum]]
    idx = torch.cat([b["index"] for b in ordered])
    weight = torch.cat([b["weight"] for b in ordered])
    labels = torch.cat([b["labels"] for b in ordered])
    assert idx[weight > 0].tolist() == list(range(n)) and (idx[weight == 0] == -1).all()
    assert len(idx) == ranks[0].eval_steps() * gbs
    assert (labels[weight == 0] == 0).all() and labels.dtype == (torch.float32 if regression else torch.long)
    assert torch.equal(labels[weight > 0], torch.as_tensor(data.labels))
    shortest = int(data.lengths().min())
    assert all((b["lengths"][b["weight"] == 0] == shortest).all() for b in ordered)
    real, computed = ranks[0].token_counts("eval")
    assert real == sum(int(b["lengths"][b["weight"] > 0].sum()) for b in per_rank[0])
    assert computed == sum(b["tokens"].numel() for b in per_rank[0])
    assert ranks[0].padding_fraction("eval") == pytest.approx(1 - real / computed)
    assert ranks[0].padding_fraction("train") == 0.0 and ranks[0].token_counts("train") == (0, 0)


# ------------------------------------------------------------------------------------ padding, SST-2
def test_padding_fraction_counts_what_was_yielded():
    data = toy_task()
    batches = TaskBatches(data, plan(micro=8, gbs=8, pad_to=40), PAD)
    yielded = take(batches.train(), 6)
    real = sum(int(b["lengths"].sum()) for b in yielded)
    assert batches.padding_fraction() == pytest.approx(1 - real / (6 * 8 * 40))
    assert batches.padding_fraction("all") == batches.padding_fraction()
    with pytest.raises(ValueError, match="mode"):
        batches.padding_fraction("test")


def test_sst2_padding_with_and_without_bucketing():
    train_path, vocab = SHARED_DATA / "sst2" / "train.tsv", SHARED_DATA / "bert" / "vocab.txt"
    for path in (train_path, vocab):
        if not path.is_file():
            pytest.skip(f"{path} is absent (shared test data)")
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=str(vocab)))
    examples = read_task_file(train_path, TaskColumns()).examples
    data = encode_examples(examples, LabelSet.build(examples, None, None), tok, "bert", 128)
    fractions = {}
    for bucket in (False, True):
        batches = TaskBatches(data, plan(micro=32, gbs=32, seed=1234, bucket_by_length=bucket), tok.pad)
        for batch in take(batches.train(), batches.steps_per_epoch):
            assert batch["tokens"].shape[0] == 32
        fractions[bucket] = batches.padding_fraction()
    print(f"\nSST-2 train, BERT WordPiece, micro 32, one epoch: padding fraction {fractions[False]:.1%} "
          f"unbucketed, {fractions[True]:.1%} with --bucket-by-length (mean length "
          f"{data.lengths().mean():.1f}, max {data.lengths().max()}, {data.truncated} truncated)")
    assert fractions[True] < 0.15 and fractions[True] < fractions[False]
