"""A small English corpus that exists on every machine with Python: the docstrings of the
standard library, torch and numpy, read from their source files with `ast` (nothing is imported,
so no module side effects). One JSONL document per source module, in sorted path order, so the
corpus is identical wherever the same versions are installed. It is the built-in default of the
quickstart; real runs use real corpora.

    python tools/make_demo_corpus.py --output demo.jsonl [--sources stdlib,torch,numpy] [--max-mb 8]

(front end: megapre/cli/make_demo_corpus.py)
"""
from __future__ import annotations

import ast
import importlib.util
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
