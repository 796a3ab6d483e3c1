"""How far `optimizer.step()` sits from the command line: runs `megapre.pretrain` in this process
for one step of a tiny GPT on a synthetic dataset and prints, at the first optimizer.step() call,
the megapre frames on the stack (the hops a reader follows from the command line to the update)
and how many distinct megapre functions and files ran from main() to that point (the code a reader
must open to follow one step). Kernels (megapre/ops) and the data path (megapre/data) are left out:
they are the same before and after an architecture change to the training step.

    python benchmarks/step_hops.py [--repo DIR] [-- --fp16]   # DIR: a checkout (default: this one)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np


def _dataset(prefix: str) -> None:
    from megapre.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(64):
            b.add_document(rng.integers(0, 100, 40).tolist())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("extra", nargs="*", help="more pretrain flags after --, e.g. -- --fp16")
    args = ap.parse_args()
    sys.path.insert(0, str(args.repo))
    import torch

    import megapre
    pkg = str(Path(megapre.__file__).parent)
    skip = (os.path.join(pkg, "ops"), os.path.join(pkg, "data"))
    ours = lambda f: f.startswith(pkg) and not f.startswith(skip)  # noqa: E731
    seen: set[tuple[str, str]] = set()
    in_step: set[tuple[str, str]] = set()  # called inside the training step
    stack: list[str] = []
    done = []
    step_file = os.path.join(pkg, "train", "step.py")

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and ours(code.co_filename) and not done:
            seen.add((code.co_filename, code.co_name))
            if (step_file, "__call__") in in_step or \
                    (code.co_filename, code.co_name) == (step_file, "__call__"):
                in_step.add((code.co_filename, code.co_name))

    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        if not done:
            done.append(True)
            stack.extend(f"{Path(f.filename).relative_to(Path(pkg).parent)}:{f.name}"
                         for f in traceback.extract_stack() if ours(f.filename))
        return real_step(self, *a, **kw)

    torch.optim.AdamW.step = step
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "d")
        _dataset(prefix)
        if (args.repo / "megapre" / "cli").is_dir():
            from megapre.cli.pretrain import main as pretrain
        else:  # before the front ends moved to megapre/cli
            from megapre.pretrain import main as pretrain
        flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
                 "--train-iters", "1", "--data-path", prefix, "--split", "100,0,0",
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--num-workers", "0",
                 "--device", "cpu", "--eval-iters", "0", "--data-cache-path", tmp, *args.extra]
        sys.setprofile(profile)
        try:
            pretrain(flags)
        finally:
            sys.setprofile(None)
    print(f"megapre {args.repo}")
    print(f"stack at optimizer.step(): {len(stack)} megapre frames")
    for line in stack:
        print("   ", line)
    files = {f for f, _ in seen}
    print(f"main() to optimizer.step(): {len(seen)} megapre functions in {len(files)} files")
    step_files = sorted({str(Path(f).relative_to(Path(pkg).parent)) for f, _ in in_step})
    print(f"inside the step (TrainStep.__call__ to optimizer.step()): {len(in_step)} functions in "
          f"{len(step_files)} files: {', '.join(step_files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
