"""Plain-JSON conversion of result trees (metrics files of reports, the demo and benchmarks)."""
from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays turned into Python numbers/lists, dict keys into strings,
    paths into strings, and non-finite floats into ``None`` (JSON has no NaN or inf)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, PurePath):
        return str(value)
    return value
