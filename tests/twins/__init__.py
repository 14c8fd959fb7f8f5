"""Compiled extensions against their pure-Python twins."""

from __future__ import annotations

from typing import Any

import pytest

from fastscp.dicom.backend import NO_EXTENSIONS


def compiled_twin(twin: Any, module: str) -> Any:
    """``twin`` (a compiled class or function, None if not loaded): skipped under
    FASTSCP_NO_EXTENSIONS=1, a failure if ``module`` is not built."""
    if twin is None:
        if NO_EXTENSIONS:
            pytest.skip("FASTSCP_NO_EXTENSIONS=1")
        pytest.fail(f"{module} is not built: run `python setup.py build_ext --inplace`")
    return twin
