"""`python -m flowkit.bench NAME [--quick]`."""

import sys

from flowkit.cli.bench import main

sys.exit(main())
