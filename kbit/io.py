"""Atomic files and directories, written with the user's umask.

Every output of the project goes through here, so that two promises hold everywhere:

- a reader never sees a half-written file or directory: content goes to a temporary name in the
  same directory and is renamed onto the target (``os.replace``, atomic on POSIX) only when it is
  complete; a failure removes the temporary and leaves any previous version in place;
- permissions are the ones the user's umask gives any new file (``0666 & ~umask``) or directory
  (``0777 & ~umask``), not the private ``0600``/``0700`` of ``tempfile``: on a shared cluster the
  group can read the results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (process-wide, but nothing
    # else runs between the two calls in this single-threaded writer)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permissions of a new directory under the current umask."""
    return 0o777 & ~_umask()


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary keeps ``path``'s suffix, so writers that choose a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(data: bytes, path: str | os.PathLike, *, if_changed: bool = False) -> bool:
    """Write ``data`` atomically; with ``if_changed`` an identical file is left untouched (its
    timestamp too, so workflow managers do not rerun what depends on it). Returns whether it
    wrote."""
    path = Path(path)
    if if_changed and path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return True


def write_text(text: str, path: str | os.PathLike, *, if_changed: bool = False) -> Path:
    """Write UTF-8 text atomically."""
    write_bytes(text.encode("utf-8"), path, if_changed=if_changed)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, a final newline) atomically."""
    return write_text(json.dumps(obj, indent=indent, default=str) + "\n", path)


def write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a pyarrow table to Parquet atomically."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame to Parquet atomically (no index column)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` onto ``dst`` atomically."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir`` that replaces it only if the block succeeds.

    A killed download or conversion therefore never leaves a half-written directory that a later
    run would mistake for a finished one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        _share(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _share(root: Path) -> None:
    """Give a finished temporary tree the umask's permissions (mkdtemp made it private)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)
