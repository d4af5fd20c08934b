"""The one exception that means "this cannot run here", raised by kernels and methods alike.

The harness turns it into a ``skipped`` row carrying the message as the reason; it is never a reason
to fall back silently to another implementation.
"""

from __future__ import annotations

__all__ = ["Unsupported"]


class Unsupported(RuntimeError):
    """A backend, dtype, head_dim, device or shape this code path cannot handle; the message says why."""
