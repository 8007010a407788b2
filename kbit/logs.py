"""Logging of the workflow's jobs: one log file per job that says, on its first line, what went
wrong and what to do, and holds the full exception below.

On a cluster the log file Snakemake points to is all a user has, so :func:`job` makes sure it
contains the whole story: every record of kbit and lm-eval while the job runs and, if the job
fails, the traceback, with the log rewritten so that its first line is the one to read.

Jobs also watch the workflow process that started them: if it is killed (SIGKILL leaves its
children running, re-parented to init), the job stops too, so that no job keeps writing results
that the next run of the workflow would race with. A GPU job first claims its own GPUs
(:mod:`kbit.devices`), so that jobs running side by side on one machine never share a device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: seconds between checks that the workflow process that started a job is still alive
WATCH_INTERVAL_S = 2.0


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send kbit's (and lm-eval's) log records to ``log_file`` and stderr; return kbit's logger."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger("kbit")


def advice(err: BaseException) -> str:
    """What a user should do about ``err``, in one sentence (the first line of a failed log)."""
    name = type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else name
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return (
            f"out of memory ({text}): set a smaller eval.batch_size (or the model's batch_size) "
            "or eval.max_length, or give the job more memory"
        )
    if isinstance(err, KeyboardInterrupt):
        return "interrupted: run the same command again to resume"
    if name in ("ModelLoadError", "ModelSourceError", "ConfigError", "DataFileError",
                "DataFormatError", "ArtifactError", "GpuSlotError", "CalibrationError",
                "MethodInputError", "GPTQError"):  # fmt: skip
        return text  # these messages already say what to do
    return f"{name}: {text} (the traceback below says where; fix the cause and rerun)"


def _ancestors() -> list[int]:
    """PIDs of this process's ancestors up to the top-most snakemake process (or the parent)."""
    chain: list[int] = []
    pid = os.getppid()
    seen_snakemake = False
    while pid > 1 and len(chain) < 32:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        is_snakemake = "snakemake" in cmd
        if chain and seen_snakemake and not is_snakemake:
            break
        chain.append(pid)
        seen_snakemake = seen_snakemake or is_snakemake
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain if seen_snakemake else chain[:1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: the ancestors when this module was first imported: a workflow script imports it before
#: anything heavy (torch, lm-eval: seconds), so that a workflow process killed during those
#: imports is still known, and missed, when the watch starts (asked only then, the chain would
#: already end at init and nothing would be watched)
_START_CHAIN = _ancestors()  # [] where there is no /proc
_START_PID = os.getpid()


def watch_parent(log: logging.Logger, interval_s: float = WATCH_INTERVAL_S) -> threading.Thread:
    """Stop this process when the workflow process that started it is gone.

    A daemon thread checks the ancestors (up to the top-most snakemake process, as they were
    when this module was imported) every ``interval_s``; when one has died, it logs why and
    exits at once with status 1, leaving no late output (every output is written atomically,
    so nothing half-written stays either).
    """
    chain = _START_CHAIN if _START_CHAIN and os.getpid() == _START_PID else _ancestors()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            gone = [p for p in chain if not _alive(p)]
            if gone or (chain and os.getppid() != chain[0]):
                log.error(
                    "the workflow process that started this job (pid %s) is gone: stopping, so "
                    "that no late output races with a new run",
                    gone[0] if gone else chain[0],
                )
                logging.shutdown()
                os._exit(1)

    thread = threading.Thread(target=watch, name="kbit-parent-watch", daemon=True)
    thread.start()
    return thread


def _prepend(log_file: Path, first_line: str) -> None:
    body = log_file.read_text(errors="replace") if log_file.is_file() else ""
    log_file.write_text(first_line.rstrip() + "\n" + body)


@contextlib.contextmanager
def job(smk: Any, *, watch: bool = True) -> Iterator[logging.Logger]:
    """The frame of every workflow script: logging to the job's log file, the parent watch, and on
    failure the full traceback in the log with a first line that says what to do.

    ``smk`` is the ``snakemake`` object Snakemake injects into a script.
    """
    log_file = Path(smk.log[0]) if len(smk.log) else None
    log = setup_logging(log_file)
    if watch:
        watch_parent(log)
    try:
        from kbit.devices import claim_for_job

        claim_for_job(smk, log)  # this job's own GPUs, before anything starts CUDA
        yield log
    except BaseException as err:
        log.error("job failed:\n%s", "".join(traceback.format_exception(err)))
        logging.shutdown()
        first = f"FAILED: {advice(err)}"
        if log_file is not None:
            _prepend(log_file, first)
        print(first, file=sys.stderr)
        raise
