"""Corpus preprocessing: files (JSONL, gz/zst, text, Parquet) -> tokenized Megatron indexed
datasets, streamed through worker processes in bounded memory (pipeline.py). The command line is
megapre/cli/preprocess_data.py (tools/preprocess_data.py, `python -m megapre.data.preprocess`)."""
from __future__ import annotations

from megapre.data.preprocess.errors import EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE

__all__ = ["EXIT_OK", "EXIT_SKIPPED", "EXIT_FAILURE", "EXIT_USAGE"]
