"""SmoothQuant (megapre/compress/smoothquant.py): the factors follow the paper's formula, folding
them into the norms is an identity transform of the float model (to 1e-5), and on a model with a
planted activation outlier channel its W8A8 logits are closer to the float model's than plain
W8A8's."""
from __future__ import annotations

import pytest
import torch

from megapre.compress import QuantConfig
from megapre.compress.calib import activation_absmax
from megapre.compress.quantize import relative_error
from megapre.compress.smoothquant import smooth_model, smoothing_factors
from megapre.compress.structure import quantize_model
from megapre.errors import ConfigError
from quant_cases import tiny_gpt

OUTLIER, GAIN = 5, 40.0


def _ids() -> torch.Tensor:
    return torch.randint(0, 39, (8, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _plant_outlier(model) -> None:
    """Channel OUTLIER of every norm output x GAIN, the weights reading it / GAIN: the same
    float function, with an activation outlier in front of qkv, fc1 and gate."""
    for layer in model.decoder.layers.values():
        for norm, linears in ((layer.norm1, [layer.attention.qkv]),
                              (layer.norm2, [layer.mlp.fc1])):
            norm.weight[OUTLIER] *= GAIN
            norm.bias[OUTLIER] *= GAIN
            for lin in linears:
                lin.weight[:, OUTLIER] /= GAIN


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model.gathered_logits(model(input_ids=ids)).float()


def test_factors_formula():
    x = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = [torch.tensor([[1.0, 2.0, 0.0, 1.0]]), torch.tensor([[-2.0, 1.0, 0.0, 0.5]])]
    s = smoothing_factors(x, w, 0.5)
    assert torch.allclose(s, torch.tensor([4.0 ** 0.5 / 2.0 ** 0.5, 1.0, 1.0, 3.0]))
    assert torch.allclose(smoothing_factors(x, w, 1.0), torch.tensor([4.0, 1.0, 1.0, 9.0]))


def test_smoothing_is_identity_in_float(tmp_path):
    rt = tiny_gpt(tmp_path)
    try:
        model = rt.model.models[0]
        model.eval()
        _plant_outlier(model)
        ids = _ids()
        before = _logits(model, ids)
        assert smooth_model(model, activation_absmax(model, ids), 0.5) == 4
        after = _logits(model, ids)
        assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)
        gain = model.decoder.layers["0"].norm1.weight
        assert gain[OUTLIER].abs() < GAIN * 0.5  # the outlier moved into the weights
    finally:
        rt.close()


def _w8a8_error(tmp_path, smooth: bool) -> float:
    rt = tiny_gpt(tmp_path)
    try:
        model = rt.model.models[0]
        model.eval()
        _plant_outlier(model)
        ids = _ids()
        want = _logits(model, ids)
        method = "smoothquant" if smooth else "w8a8"
        if smooth:
            smooth_model(model, activation_absmax(model, ids), 0.5)
        quantize_model(model, QuantConfig(method), rt.mesh)
        return relative_error(_logits(model, ids), want)
    finally:
        rt.close()


def test_smoothquant_beats_plain_w8a8_on_an_outlier(tmp_path):
    plain, smooth = _w8a8_error(tmp_path, False), _w8a8_error(tmp_path, True)
    print(f"relative logit error with an outlier channel: w8a8 {plain:.4g}, "
          f"smoothquant {smooth:.4g}")
    assert smooth < plain * 0.7


def test_post_ln_refused(tmp_path):
    rt = tiny_gpt(tmp_path, "--post-layernorm")
    try:
        with pytest.raises(ConfigError, match="pre-LN"):
            smooth_model(rt.model.models[0], {}, 0.5)
    finally:
        rt.close()
