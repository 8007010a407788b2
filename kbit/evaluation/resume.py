"""Resumable batched evaluation: finished (quant, task) files survive a killed job.

Snakemake deletes every output of a job it (re)starts, so a batched job that evaluates dozens
of quantization configs of one model would redo all of them after being killed at the last.
The batched job therefore writes each finished file into a cache directory that Snakemake does
not track, keyed by everything that determines its content, and only then copies it to the
declared output. A restarted job finds the finished files in the cache and evaluates the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kbit.io import copy_file


def _tree_digest(root: Path, h: Any) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def cache_key(settings: Mapping[str, Any], tasks_dir: str | os.PathLike | None = None) -> str:
    """A short digest of the evaluation settings and of the prepared task files' content.

    ``settings`` must hold everything else that changes a result (model, revision, dtype,
    batch size, document limit, quantization options); a change gives a fresh cache entry.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if tasks_dir is not None and Path(tasks_dir).is_dir():
        _tree_digest(Path(tasks_dir), h)
    return h.hexdigest()[:16]


def publish(cached: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy a finished cache file to its declared output atomically."""
    return copy_file(cached, out)
