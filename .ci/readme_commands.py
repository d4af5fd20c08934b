"""Print the README's quick-start commands, one per line, exactly as written there.

``.ci/run`` runs what this prints, so CI runs the README's commands verbatim and the two cannot drift
(``tests/test_readme_ci.py`` checks both ends). Standard library only: it runs before anything is
installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart(text: str) -> list[str]:
    """The commands of the first ```bash block under the ``## Quick start`` heading (comments dropped)."""
    m = re.search(r"^## Quick start\s*$(.*?)^## ", text, flags=re.M | re.S)
    if not m:
        raise SystemExit("README.md has no '## Quick start' section")
    block = re.search(r"```bash\n(.*?)```", m.group(1), flags=re.S)
    if not block:
        raise SystemExit("README.md's quick start has no ```bash block")
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


if __name__ == "__main__":
    cmds = quickstart(README.read_text())
    if len(cmds) != 2:
        raise SystemExit(f"README.md's quick start must be two commands, found {len(cmds)}: {cmds}")
    sys.stdout.write("\n".join(cmds) + "\n")
