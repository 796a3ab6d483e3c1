"""The data path: corpora -> indexed datasets (indexed.py) -> tokenizers, preprocessing, and the
GPT/BERT sample datasets with blending and exact-resume sampling. See DESIGN.md section 1.

The common names are importable from here (`from megapre.data import IndexedDataset`); they load
on first use so `import megapre.data` stays cheap in tools and DataLoader workers."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "errors",
    "IndexedDataset": "indexed",
    "IndexedDatasetBuilder": "indexed",
    "IndexedDatasetError": "indexed",
    "merge_datasets": "indexed",
    "optimal_dtype": "indexed",
    "TokenizerConfig": "tokenizers",
    "build_tokenizer": "tokenizers",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
