"""FLOP counting (SwiGLU, GQA), throughput/MFU arithmetic and the metrics sinks."""
from __future__ import annotations

import io
import json

import pytest
import torch

from megapre.model.config import TransformerConfig
from megapre.model.gpt import GPTModel
from megapre.parallel import ParallelMesh
from megapre.train.metrics import MetricsLogger, flops_per_token, format_train_line, throughput


def _matmul_params(model) -> int:
    """Weights of every 2-D matrix that multiplies activations (not position/type tables)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "position" not in n)


@pytest.mark.parametrize("kw", [dict(), dict(activation="swiglu", num_query_groups=2,
                                             add_bias_linear=False)])
def test_flops_equal_six_times_matmul_weights_plus_attention(kw):
    cfg = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=8, vocab_size=1000,
                            seq_length=32, max_position_embeddings=32,
                            make_vocab_size_divisible_by=8, **kw)
    model = GPTModel(cfg, ParallelMesh.single(device="cpu"))
    weights = _matmul_params(model)  # includes the tied word table once (the logits matmul)
    attention = 3 * cfg.num_layers * 2 * 2 * 32 * cfg.num_attention_heads * cfg.head_dim
    assert flops_per_token(cfg, 32) == pytest.approx(6 * weights + attention)
    assert flops_per_token(cfg, 32, training=False) == pytest.approx((6 * weights + attention) / 3)


def test_throughput_arithmetic():
    t = throughput(tokens=1000, seconds=2.0, flops_token=1e9, world_size=2, peak_tflops=0.5)
    assert t.tokens_per_s == 500 and t.tflops_per_device == pytest.approx(0.25)
    assert t.mfu == pytest.approx(0.5)


def test_logger_writes_jsonl_and_console(tmp_path):
    out = io.StringIO()
    path = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLogger(True, metrics_path=str(path), stream=out)
    rec = dict(iteration=10, train_iters=100, consumed_samples=80, loss=2.5, lr=1e-3, grad_norm=0.7,
               tokens_per_s=1234.0, tflops_per_device=0.1, mfu=0.05)
    log.log(rec, console=format_train_line(rec))
    log.log(dict(iteration=10, split="valid", loss=2.6))
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["loss"] == 2.5 and lines[1]["split"] == "valid"
    assert "iteration  10/100" in out.getvalue() and "MFU 5.0%" in out.getvalue()
    silent = MetricsLogger(False, metrics_path=str(tmp_path / "x.jsonl"))
    silent.log(rec, console="never")
    assert not (tmp_path / "x.jsonl").exists()
