import sys

from salad_bench.cli import main

sys.exit(main())
