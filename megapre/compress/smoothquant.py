"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

For a linear layer whose input X is a norm's output, y = X W^T = (X diag(1/s)) (W diag(s))^T for
any positive s; with s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel j the scaled
activations have flatter channels (easier per-token int8) and the weights absorb the outliers
(per-output-channel int8 handles those well). alpha (--alpha) sets how much difficulty moves.

1/s is folded into the norm that produces X (its gain and bias), so smoothing adds no op and the
float model computes the same function (up to float rounding). The smoothed layers are those fed
by a norm in a pre-LN block: attention qkv (after norm1) and MLP fc1 and gate (after norm2; they
share one s, as they share the input). The attention projection and fc2 take the attention
context and the MLP activation, which no norm produces, so they are left unsmoothed (plain W8A8).
Post-LN blocks feed qkv from the previous block's residual norm; they are refused here.
"""
from __future__ import annotations

import torch
from torch import nn

from megapre.errors import ConfigError

S_MIN = 1e-5  # floor of a smoothing factor (a channel never seen active keeps its scale)


def smoothing_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm name, [names of the linears it feeds]) of every block of `model`."""
    if model.cfg.post_layernorm:
        raise ConfigError("--method smoothquant folds the smoothing into the norm before each "
                          "layer, which needs pre-LN blocks; this checkpoint is post-LN: use "
                          "--method w8a8 or weight-int8")
    stack = model.decoder if hasattr(model, "decoder") else model.encoder
    prefix = "decoder" if hasattr(model, "decoder") else "encoder"
    groups = []
    for idx, layer in stack.layers.items():
        base = f"{prefix}.layers.{idx}"
        groups.append((f"{base}.norm1", [f"{base}.attention.qkv"]))
        mlp = [f"{base}.mlp.fc1"] + ([f"{base}.mlp.gate"] if layer.mlp.gate is not None else [])
        groups.append((f"{base}.norm2", mlp))
    return groups


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
                      ) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max|W_j|^(1-alpha), W_j over every row of `weights` [*, K];
    1 where either maximum is 0."""
    w_absmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    x = act_absmax.float().to(w_absmax.device)
    s = x.pow(alpha) / w_absmax.pow(1.0 - alpha)
    s = torch.where((x > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=S_MIN)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """norm gain and bias / s, each linear's weight columns * s."""
    if norm.weight is None:
        raise ConfigError("smoothquant needs norms with a gain (elementwise affine)")
    s = s.to(norm.weight.device)
    gain = norm.weight.float() + (1.0 if norm.zero_centered_gamma else 0.0)
    new_gain = gain / s - (1.0 if norm.zero_centered_gamma else 0.0)
    norm.weight.copy_(new_gain.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    for linear in linears:
        linear.weight.copy_((linear.weight.float() * s).to(linear.weight.dtype))


def smooth_model(model: nn.Module, act_absmax: dict[str, torch.Tensor], alpha: float) -> int:
    """Fold SmoothQuant's factors into `model` (one process, float weights) from the calibrated
    input maxima of its linears; returns the number of linears smoothed."""
    count = 0
    for norm_name, names in smoothing_groups(model):
        linears = [model.get_submodule(n) for n in names]
        missing = [n for n in names if n not in act_absmax]
        if missing:
            raise ConfigError(f"calibration recorded no input for {missing[0]} (did the "
                              "calibration forward run every layer?)")
        s = smoothing_factors(act_absmax[names[0]], [m.weight for m in linears], alpha)
        fold_smoothing(model.get_submodule(norm_name), linears, s)
        count += len(linears)
    return count
