"""fp16 dynamic loss scaling: overflow halves the scale and skips the step, clean runs double
it, and a scaled step gives the unscaled step's update."""
from __future__ import annotations

import copy

import torch

from megapre.parallel import ParallelMesh
from megapre.train.loss_scale import DynamicLossScaler
from megapre.train.parallel_model import ParallelModel
from megapre.train.step import StepConfig, TrainStep
from layout_cases import micro_batches, model_config


def test_scaler_schedule():
    s = DynamicLossScaler(scale=1024.0, growth_interval=3)
    s.update(overflow=True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 1024.0
    s2 = DynamicLossScaler()
    s2.load_state_dict(s.state_dict())
    assert s2 == s
    tiny = DynamicLossScaler(scale=1.0)
    tiny.update(overflow=True)
    assert tiny.scale == 1.0  # never below min_scale


def test_hysteresis_and_static_scale_as_megatron():
    """megatron-core's DynamicGradScaler with hysteresis 2: the first overflow only spends the
    hysteresis, later ones halve the scale until a growth refills it; --loss-scale is fixed."""
    s = DynamicLossScaler(scale=2.0 ** 32, growth_interval=2, hysteresis=2)
    s.update(overflow=True)
    assert s.scale == 2.0 ** 32
    s.update(overflow=True)
    s.update(overflow=True)
    assert s.scale == 2.0 ** 30
    s.update(overflow=False)
    s.update(overflow=False)  # growth: doubles and refills the hysteresis
    assert s.scale == 2.0 ** 31
    s.update(overflow=True)
    assert s.scale == 2.0 ** 31
    fixed = DynamicLossScaler.static(512.0)
    for overflow in (True, False, False, True):
        fixed.update(overflow)
    assert fixed.scale == 512.0


def _step(scaler):
    mesh = ParallelMesh.single(device="cpu")
    model = ParallelModel.build("gpt", model_config(), mesh, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = TrainStep(model, opt, StepConfig(2, 4), loss_scaler=scaler)
    result = step(iter(micro_batches("gpt", 0, 4, 2, 0, 1)))
    return result, [p.detach().clone() for p in model.parameters()]


def test_scaled_step_equals_unscaled_step():
    plain, w_plain = _step(None)
    scaler = DynamicLossScaler(scale=2.0 ** 12)
    scaled, w_scaled = _step(scaler)
    assert scaled.loss == plain.loss and not scaled.skipped
    assert abs(scaled.grad_norm - plain.grad_norm) <= 1e-6 * plain.grad_norm
    for a, b in zip(w_plain, w_scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaler.clean_steps == 1


def test_overflow_skips_the_step_and_halves_the_scale():
    scaler = DynamicLossScaler(scale=2.0 ** 140)  # loss * scale overflows float32
    result, after = _step(scaler)
    _, before = _step(DynamicLossScaler(scale=2.0 ** 140))
    assert result.skipped and scaler.scale == 2.0 ** 139
    mesh = ParallelMesh.single(device="cpu")
    fresh = [p.detach() for p in ParallelModel.build("gpt", model_config(), mesh, seed=5).parameters()]
    for a, b in zip(after, fresh):
        assert torch.equal(a, b)  # no optimizer update happened
