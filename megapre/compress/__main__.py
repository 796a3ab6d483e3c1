import sys

from megapre.cli.compress import main

sys.exit(main())
