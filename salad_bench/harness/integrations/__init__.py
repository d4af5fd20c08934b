"""Integrations of the registered attention methods into real models (diffusers' Wan2.1 first).

Modules here import diffusers lazily: importing the package costs nothing on a machine without it.
"""

from __future__ import annotations


def require_diffusers():
    """Import and return the ``diffusers`` module, or raise an ``ImportError`` that says how to get it."""
    try:
        import diffusers
    except ImportError as exc:  # the GPU image has no diffusers: it travels as a wheel
        raise ImportError(
            "the DiT integration needs diffusers (>=0.33) but it is not installed here. Install it with "
            "`pip install 'salad-bench[diffusers]'` or `pip install diffusers transformers`; on an offline "
            "machine carry the wheel and `pip install --no-deps diffusers-*.whl`."
        ) from exc
    return diffusers
