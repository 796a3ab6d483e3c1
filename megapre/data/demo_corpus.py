"""A small English corpus that exists on every machine with Python: the docstrings of the
standard library, torch and numpy, read from their source files with `ast` (nothing is imported,
so no module side effects). One JSONL document per source module, in sorted path order, so the
corpus is identical wherever the same versions are installed. It is the built-in default of the
quickstart; real runs use real corpora.

    python tools/make_demo_corpus.py --output demo.jsonl [--sources stdlib,torch,numpy] [--max-mb 8]

The same sources give a labelled task for fine-tuning, also present on every machine: which
library (stdlib, torch, numpy) documents a docstring paragraph (`write_task`; whole modules go to
one split, so no test paragraph comes from a module seen in training).

(front end: megapre/cli/make_demo_corpus.py)
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import random
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

SOURCES = ("stdlib", "torch", "numpy")


def source_root(name: str) -> Path | None:
    """Directory of a source; None when the package is not installed."""
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _python_files(root: Path, stdlib: bool) -> list[Path]:
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
            "lib2to3", "testing"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def module_text(path: Path, min_chars: int) -> str | None:
    """Module, class and function docstrings of one file joined by blank lines, or None when
    the file does not parse or says too little."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                docs.append(doc.strip())
    text = "\n\n".join(dict.fromkeys(docs))  # drop repeated boilerplate, keep order
    return text if len(text) >= min_chars else None


def documents(sources: list[str], min_chars: int = 200) -> Iterator[dict]:
    for name in sources:
        root = source_root(name)
        if root is None:
            print(f"make_demo_corpus: {name} is not installed; skipping it", file=sys.stderr)
            continue
        for path in _python_files(root, name == "stdlib"):
            text = module_text(path, min_chars)
            if text is not None:
                yield {"text": text, "source": f"{name}:{path.relative_to(root).as_posix()}"}


def write_corpus(output: Path, sources: list[str], max_bytes: int, min_chars: int) -> dict:
    """Write documents until max_bytes of text; temp file then rename. Returns counts."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    docs = chars = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in documents(sources, min_chars):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                docs += 1
                chars += len(doc["text"])
                if chars >= max_bytes:
                    break
        if docs == 0:
            raise RuntimeError(f"no documents found in sources {sources}")
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"documents": docs, "characters": chars, "output": str(output)}


TASK_SPLITS = (("train", 80), ("valid", 10), ("test", 10))  # percent of modules


def _split_of(module: str) -> str:
    """train / valid / test by a hash of the module's path: stable across machines and runs."""
    bucket = int(hashlib.sha256(module.encode()).hexdigest(), 16) % 100
    for name, share in TASK_SPLITS:
        if bucket < share:
            return name
        bucket -= share
    return TASK_SPLITS[-1][0]


def task_rows(sources: list[str], min_chars: int = 60, max_chars: int = 600) -> Iterator[dict]:
    """{"text", "label", "source", "split"} for the first paragraph of every docstring."""
    for doc in documents(sources, min_chars=200):
        label, module = doc["source"].split(":", 1)
        for para in dict.fromkeys(p.strip() for p in doc["text"].split("\n\n")):
            if min_chars <= len(para) <= max_chars:
                yield {"text": para, "label": label, "source": doc["source"],
                       "split": _split_of(doc["source"])}


def write_task(prefix: Path, sources: list[str], rows_per_label: int, seed: int = 0) -> dict:
    """PREFIX.{train,valid,test}.jsonl with up to `rows_per_label` training rows per library
    (valid/test: an eighth of that each), shuffled with `seed`; temp files then rename."""
    by_split: dict[str, dict[str, list[dict]]] = {name: {} for name, _ in TASK_SPLITS}
    for row in task_rows(sources):
        by_split[row.pop("split")].setdefault(row["label"], []).append(row)
    if not by_split["train"]:
        raise RuntimeError(f"no docstrings found in sources {sources}")
    rng = random.Random(seed)
    counts = {}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for name, _ in TASK_SPLITS:
        cap = rows_per_label if name == "train" else max(rows_per_label // 8, 1)
        rows = []
        for label in sorted(by_split[name]):
            group = by_split[name][label]
            rng.shuffle(group)
            rows += group[:cap]
        rng.shuffle(rows)
        out = prefix.with_name(f"{prefix.name}.{name}.jsonl")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                           encoding="utf-8")
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        counts[name] = len(rows)
    return counts
