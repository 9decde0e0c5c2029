"""`python -m flowkit`: the `flowkit` command line."""

import sys

from flowkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
