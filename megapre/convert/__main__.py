import sys

from megapre.cli.convert import main

sys.exit(main())
