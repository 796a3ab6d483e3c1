"""`python -m megapre.data.preprocess ...` = tools/preprocess_data.py (for installed packages)."""
import sys

from megapre.data.preprocess import main

sys.exit(main())
