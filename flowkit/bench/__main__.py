"""`python -m flowkit.bench NAME [--quick]`: the same as `flowkit bench NAME [--quick]`
(bad input: one line on stderr, exit status 2)."""

import sys

from flowkit.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
