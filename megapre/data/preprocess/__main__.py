"""`python -m megapre.data.preprocess ...` = tools/preprocess_data.py (for installed packages)."""
import sys

from megapre.cli.preprocess_data import main

sys.exit(main())
