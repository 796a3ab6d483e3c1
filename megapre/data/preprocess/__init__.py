"""Corpus preprocessing: files (JSONL, gz/zst, text, Parquet) -> tokenized Megatron indexed
datasets, streamed through worker processes in bounded memory. `main(argv)` is the CLI
(tools/preprocess_data.py); see cli.py for flags and exit codes."""
from __future__ import annotations

from megapre.data.preprocess.errors import EXIT_FAILURE, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the preprocess CLI; returns the exit code (0 clean, 3 skips, 1 failure, 2 usage)."""
    from megapre.data.preprocess.cli import main as _main

    return _main(argv)


__all__ = ["main", "EXIT_OK", "EXIT_SKIPPED", "EXIT_FAILURE", "EXIT_USAGE"]
