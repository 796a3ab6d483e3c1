#!/usr/bin/env python
"""PNG of loss, lr, grad norm and tokens/s from metrics files; see megapre/cli/plot_metrics.py."""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "megapre" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))  # run from a source checkout: use this tree's megapre

from megapre.cli.plot_metrics import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
