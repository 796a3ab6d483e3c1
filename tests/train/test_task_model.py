"""Task heads on GPT and BERT (single process): padding never changes a result, the pretrained
BERT pooler keeps its name, regression has one output, and the task loss learns."""
from __future__ import annotations

import pytest
import torch

from megapre.parallel import ParallelMesh
from megapre.train.task_stages import Adaptation

from task_cases import SEQ, build, collate, task_samples, train


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_padding_does_not_change_logits(kind):
    model = build(kind, ParallelMesh.single(device="cpu"))
    chunk = model.chunks[0]
    chunk.eval()
    samples = task_samples(0, 6)
    tight = [collate([s]) for s in samples]
    padded = collate(samples, pad_to=SEQ)
    adapter = model.adapter
    with torch.no_grad():
        one = torch.cat([chunk(*adapter.split(b).first_args, **adapter.split(b).kwargs)
                         for b in tight])
        mb = adapter.split(padded)
        many = chunk(*mb.first_args, **mb.kwargs)
    assert many.shape == (6, 3)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_gpt_pooling_reads_real_tokens_only(pooling):
    from megapre.model.heads import ClassificationHead, HeadConfig

    head = ClassificationHead(HeadConfig(2, pooling, 0.0), 4, ParallelMesh.single(device="cpu"),
                              1, 0.02)
    h = torch.randn(5, 2, 4)
    lengths = torch.tensor([3, 5])
    pooled = head.pool(h, lengths)
    if pooling == "last":
        torch.testing.assert_close(pooled, torch.stack([h[2, 0], h[4, 1]]))
    else:
        torch.testing.assert_close(pooled, torch.stack([h[:3, 0].mean(0), h[:, 1].mean(0)]))


def test_bert_head_names_match_pretraining():
    model = build("bert", ParallelMesh.single(device="cpu"))
    names = {n for n, _ in model.models[0].named_parameters()}
    assert {"heads.pooler.weight", "heads.pooler.bias", "heads.classifier.weight"} <= names
    assert not any(n.startswith("heads.dense") or n == "heads.bias" for n in names)
    gpt = {n for n, _ in build("gpt", ParallelMesh.single(device="cpu")).models[0]
           .named_parameters()}
    assert "heads.classifier.weight" in gpt and "heads.pooler.weight" not in gpt
    assert "output_layer.weight" not in gpt


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_task_loss_falls(kind):
    out = train(kind, ParallelMesh.single(device="cpu"), 24, 2, 8)
    losses = [l for l, _ in out[:-1]]  # three batches in turn: compare whole rounds
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_regression_head_trains():
    out = train("bert", ParallelMesh.single(device="cpu"), 12, 2, 8, classes=1)
    assert out[-2][0] < out[0][0]


def test_linear_probe_trains_only_the_head():
    model = build("bert", ParallelMesh.single(device="cpu"),
                  adaptation=Adaptation(freeze_backbone=True))
    trainable = [n for n, p in model.models[0].named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("heads.") for n in trainable)
