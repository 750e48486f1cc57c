"""`python -m sct_edge` is the `sct-edge` command."""

import sys

from sct_edge.cli import main

sys.exit(main())
