"""Which implementation runs: the compiled extensions, or their pure-Python twins.

``FASTSCP_NO_EXTENSIONS=1`` selects the twins everywhere (the compiled
modules are then not even imported); a compiled module that is not built
falls back to its twin too. Each public module exposes ``BACKEND``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Final

#: True when the environment asks for the pure-Python twins.
NO_EXTENSIONS: Final = os.environ.get("FASTSCP_NO_EXTENSIONS", "") == "1"


def compiled(module: str, name: str) -> Any | None:
    """``module.name`` from a compiled extension, or None (disabled or not built)."""
    if NO_EXTENSIONS:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # not built (e.g. a source checkout without build_ext)
        return None
