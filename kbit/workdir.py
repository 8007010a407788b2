"""One live run per working directory; what a killed run leaves behind is cleared by the next.

Snakemake locks the working directory while it runs. A run killed with SIGKILL cannot release
that lock, and the next run refuses to start ("can be removed with the --unlock argument"), while
``--unlock`` during a live run lets two runs write the same files. This module tells the two cases
apart: the main Snakemake process records itself (pid and start time) in ``.snakemake/``; at the
next start, a lock whose recorded owner is no longer running is stale and is removed, together
with the temporary files and folders the killed jobs left (every output is written under a
temporary name and renamed when complete, so such leftovers are never finished work); a lock whose
owner is alive stops the new run with a message naming that process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

OWNER_FILE = "kbit-owner.json"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live process from a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", 0))
    return pid > 0 and _start_time(pid) is not None and _start_time(pid) == owner.get("start")


def _leftovers(roots: list[Path]) -> list[Path]:
    """Temporary files and folders of atomic writes (``.<name>.<random>.tmp*``) under ``roots``."""
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob(".*.tmp*") if ".tmp" in p.name]
    # a temporary folder's contents go with it
    return [p for p in found if not any(q in p.parents for q in found)]


def claim(workdir: str | os.PathLike, output_roots: list[str | os.PathLike]) -> list[str]:
    """Make this process the owner of ``workdir``'s Snakemake state; returns what was cleared.

    Raises RuntimeError when another live run owns the working directory and holds its lock.
    """
    state = Path(workdir) / ".snakemake"
    locks = state / "locks"
    owner_file = state / OWNER_FILE
    owner = {}
    if owner_file.is_file():
        try:
            owner = json.loads(owner_file.read_text())
        except ValueError:
            owner = {}
    held = locks.is_dir() and any(locks.iterdir())
    me = {"pid": os.getpid(), "start": _start_time(os.getpid())}
    if owner and owner.get("pid") != me["pid"] and _alive(owner):
        if held:
            raise RuntimeError(
                f"another run of this workflow (pid {owner['pid']}) is working in "
                f"{Path(workdir).resolve()}: wait for it to finish or stop it. Do not use "
                "--unlock while it runs: two runs would write the same files"
            )
        return []  # alive but not locked: a dry run or an idle shell; leave its record
    cleared = []
    if held:
        shutil.rmtree(locks, ignore_errors=True)
        cleared.append(f"stale lock of a killed run (pid {owner.get('pid', '?')}) removed")
    for path in _leftovers([Path(r) for r in output_roots]):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        cleared.append(f"partial file of a killed job removed: {path}")
    state.mkdir(parents=True, exist_ok=True)
    owner_file.write_text(json.dumps(me) + "\n")
    return cleared
