"""megapre.ops in export mode (megapre.ops.export_mode): the one-operator plain-torch forms
agree with the reference definitions, and the mode is scoped to its context."""
from __future__ import annotations

import torch

from megapre import ops
from megapre.ops import export_mode, reference


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            _close(x, y)
        return
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_norms_match_reference_with_and_without_residual():
    x, r, w, b = _rand(3, 4, 16), _rand(3, 4, 16, seed=1), _rand(16, seed=2), _rand(16, seed=3)
    with export_mode.exporting():
        for residual in (None, r):
            _close(ops.layer_norm(x, w, b, 1e-5, residual),
                   reference.layer_norm(x, w, b, 1e-5, residual))
            _close(ops.rms_norm(x, w, 1e-6, residual), reference.rms_norm(x, w, 1e-6, residual))


def test_softmax_matches_reference_masked_and_causal():
    scores = _rand(2, 3, 4, 6)
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    mask[1, ..., 4:] = True  # the second sample's last two keys are padding
    with export_mode.exporting():
        for m in (None, mask):
            for causal in (False, True):  # causal with sq < sk: aligned bottom-right
                _close(ops.scale_mask_softmax(scores, m, 0.5, causal),
                       reference.scale_mask_softmax(scores, m, 0.5, causal))


def test_softmax_fully_masked_row_stays_finite():
    with export_mode.exporting():
        p = ops.scale_mask_softmax(_rand(1, 1, 2, 3), torch.ones(1, 1, 2, 3, dtype=torch.bool))
    assert torch.isfinite(p).all()


def test_bias_gelu_matches_reference():
    x, b = _rand(5, 8), _rand(8, seed=1)
    with export_mode.exporting():
        _close(ops.bias_gelu(x, b), reference.bias_gelu(x, b))
        _close(ops.bias_gelu(x), reference.bias_gelu(x))


def test_mode_is_scoped_and_nests():
    assert not export_mode.active()
    with export_mode.exporting():
        with export_mode.exporting():
            assert export_mode.active()
        assert export_mode.active()
    assert not export_mode.active()
