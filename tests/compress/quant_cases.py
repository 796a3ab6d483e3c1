"""Shared pieces of the quantization tests: a trained counting checkpoint with its corpus and a
text file of counting documents, a random-weight tiny GPT built in this process, and the
quantize / evaluate command lines."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from inference.tiny_checkpoints import counting_checkpoint


def counting_case(work: Path) -> dict:
    """A 2-layer GPT trained 10 steps on counting sequences, its corpus prefix (calibration
    data) and 12 counting documents as text (perplexity)."""
    ckpt = counting_checkpoint(work)
    rng = torch.Generator().manual_seed(3)
    lines = []
    for _ in range(12):
        start, k, n = (int(torch.randint(lo, hi, (1,), generator=rng))
                       for lo, hi in ((0, 39), (1, 4), (15, 40)))
        lines.append(" ".join(str((start + k * i) % 39) for i in range(n)))
    text = work / "counting.txt"
    text.write_text("\n".join(lines) + "\n")
    return {"ckpt": ckpt, "text": text, "work": work, "corpus": str(work / "count_text_document")}


def quantize(case: dict, out: Path, method: str, *flags: str) -> dict:
    """Run `megapre.compress quantize` (in this process); returns its summary."""
    from megapre.cli.compress import main

    summary = out.with_suffix(".json")
    code = main(["quantize", "--load", case["ckpt"], "--method", method, "--calib-data",
                 case["corpus"], "--calib-samples", "8", "--save", str(out), "--output-json",
                 str(summary), *flags])
    assert code == 0
    return json.loads(summary.read_text())


def perplexity_argv(ckpt: str, text: Path, out_json: Path, *flags: str) -> list[str]:
    return ["--load", ckpt, "--text-file", str(text), "--stride", "24", "--micro-batch-size",
            "3", "--output-json", str(out_json), *flags]


def evaluate(argv: list[str]) -> dict:
    from megapre.cli.evaluate import main

    assert main(argv) == 0
    return json.loads(Path(argv[argv.index("--output-json") + 1]).read_text())


def tiny_gpt(work: Path, *extra: str):
    """A runtime holding a random-weight 2-layer GPT (hidden 32) in one process."""
    from conftest import tiny_gpt_flags
    from megapre.cli.flags import parse_config
    from megapre.train.runtime import build_runtime

    cfg = parse_config(tiny_gpt_flags(str(work / "none"), work, *extra))
    return build_runtime(cfg)
