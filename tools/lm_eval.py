#!/usr/bin/env python
"""EleutherAI's lm-evaluation-harness on megapre checkpoints; see megapre/cli/lm_eval.py."""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# This file is named like the harness's package: drop tools/ from the path so that
# `import lm_eval` finds the harness, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if (_ROOT / "megapre" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))  # run from a source checkout: use this tree's megapre

from megapre.cli.lm_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
