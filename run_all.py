"""Command line: parse arguments and hand them to :mod:`harness.cli` (no logic here)."""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
