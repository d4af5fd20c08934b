"""Command line: parse arguments and hand them to :mod:`salad_bench.harness.cli` (no logic here).

``salad-bench run`` (the console script) is the same command from any directory.
"""

import sys

from salad_bench.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
