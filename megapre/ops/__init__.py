"""megapre's fused kernels: functional ops, modules, and the pure-torch reference.

Compiled C++/CUDA kernels run when built (see backend()); otherwise every op falls back to
megapre.ops.reference with one warning.
"""
from ._loader import backend, backend_info, cpu_isa, set_cpu_isa
from .activation import bias_gelu
from .modules import FusedScaleMaskSoftmax, Int8Linear, LayerNorm, RMSNorm
from .norm import layer_norm, rms_norm
from .quant import (int8_gemm, int8_linear, quantize_per_channel, quantize_per_token,
                    weight_only_int8_linear)
from .softmax import scale_mask_softmax
from . import reference

__all__ = [
    "backend", "backend_info", "cpu_isa", "set_cpu_isa",
    "layer_norm", "rms_norm", "scale_mask_softmax", "bias_gelu",
    "quantize_per_channel", "quantize_per_token", "int8_gemm", "int8_linear",
    "weight_only_int8_linear",
    "LayerNorm", "RMSNorm", "FusedScaleMaskSoftmax", "Int8Linear", "reference",
]
