"""Finished evaluations survive anything: a cache of (quant, task) files and a manifest per job.

Snakemake deletes every output of a job that fails or is killed, and reruns a job whose params or
inputs changed. If the per-(model, quant, task) Parquet files were the outputs of an evaluation
job that covers many of them, one failure (a bad task, an out-of-memory error in the last spec)
would delete all the finished ones. So an evaluation job writes each finished file into a cache
that Snakemake does not track, under a key made of everything that determines its content, and
its only declared output is a manifest listing those files; a local rule publishes each file
from the cache. A rerun (after a failure, a kill or a config change) finds every finished file
under its key and computes only the rest; a file whose settings changed gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kbit.io import copy_file, write_json

MANIFEST_FORMAT = "kbit-eval-manifest"


def _tree_digest(root: Path, h: Any) -> None:
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def cache_key(settings: Mapping[str, Any], *inputs: str | os.PathLike | None) -> str:
    """A short digest of the settings and of the content of the given input files/folders.

    ``settings`` must hold everything else that changes a result (model, revision, spec, dtype,
    batch size, the task's document limit, quantization options); a change gives a new key.
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in inputs:
        if path is not None and Path(path).exists():
            _tree_digest(Path(path), h)
    return h.hexdigest()[:16]


def cache_path(root: str | os.PathLike, quant: str, task: str, key: str) -> Path:
    """Where the cached file of one (quant, task) under ``key`` lives."""
    return Path(root) / quant / f"{task}-{key}.parquet"


def write_manifest(
    path: str | os.PathLike, model: str, files: Mapping[tuple[str, str], Path]
) -> Path:
    """The job's declared output: (quant, task) -> cached file."""
    entries = {f"{q}/{t}": str(p) for (q, t), p in sorted(files.items())}
    return write_json({"format": MANIFEST_FORMAT, "model": model, "files": entries}, path)


def publish(manifest: str | os.PathLike, quant: str, task: str, out: str | os.PathLike) -> Path:
    """Copy the cached file of (quant, task) named in ``manifest`` to ``out`` atomically."""
    data = json.loads(Path(manifest).read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest} is not an evaluation manifest")
    entry = data["files"].get(f"{quant}/{task}")
    if entry is None:
        raise KeyError(f"{manifest} lists no file for {quant}/{task}")
    if not Path(entry).is_file():
        raise FileNotFoundError(
            f"{entry} (listed in {manifest}) is gone: the evaluation cache was deleted; delete "
            f"{manifest} and run the workflow again to recompute it"
        )
    return copy_file(entry, out)
