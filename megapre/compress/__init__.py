"""Model compression on top of a trained checkpoint: post-training int8 quantization that runs
megapre's own int8 kernels (weight-only, W8A8, SmoothQuant). Library code only; the command line
is megapre/cli/compress.py (`python -m megapre.compress`, `megapre-compress`)."""
from .config import METHODS, QuantConfig

__all__ = ["METHODS", "QuantConfig"]
