"""Inference on trained checkpoints: sampling, text generation and forward-only evaluation,
in any tensor/pipeline layout (the front ends are megapre/cli/generate.py and evaluate.py)."""
