"""The JSON files of a workdir: strict JSON, written atomically.

Strict: ``NaN`` and infinities (a metric that could not be measured, a diverged
loss) are written as ``null``, so every file parses with any JSON reader.
Atomic: a file is written beside its path and renamed into place, so a process
stopped while writing leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def strict(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats as None, tuples and arrays as lists."""
    if isinstance(value, dict):
        return {str(key): strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text of ``value`` (``json.dumps`` with ``allow_nan=False``)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write(path: str | os.PathLike, value: Any) -> None:
    """Writes ``value`` to ``path`` as indented strict JSON, atomically."""
    path = os.fspath(path)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        f.write(dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def read(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def append_line(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends ``record`` to a JSON-lines file."""
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")


def read_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; none when there is no such file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_lines(path: str | os.PathLike, *, last_step: int) -> None:
    """Drops the records of a JSON-lines file whose ``"step"`` is after ``last_step``."""
    if not os.path.exists(path):
        return
    records = [record for record in read_lines(path) if record["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(dumps(record) + "\n" for record in records)
