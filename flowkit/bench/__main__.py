"""`python -m flowkit.bench NAME [--quick]`."""

import sys

from flowkit.bench.cli import main

sys.exit(main())
