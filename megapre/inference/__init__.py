"""Inference on trained checkpoints: sampling, text generation and forward-only evaluation,
in any tensor/pipeline layout (the CLIs are megapre.generate and megapre.evaluate)."""
