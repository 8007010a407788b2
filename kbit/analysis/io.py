"""Atomic writers: a reader never sees a half-written table, figure or report."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def atomic_write(path: str | Path, writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``writer(tmp)`` on a temp file beside ``path``, then rename it onto ``path``.

    The temporary file lives in the same directory so that ``os.replace`` is a same-filesystem
    rename (atomic on POSIX); it is removed when the writer fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to Parquet atomically (no index column)."""
    return atomic_write(path, lambda p: df.to_parquet(p, index=False))


def write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
