"""GPU slots for local runs, and how many GPUs a model needs.

Snakemake counts GPUs (``--resources gpu=N``; every GPU rule asks for ``resources.gpu``) but never
says *which* device a job should use, so on an N-GPU workstation N jobs would all run on cuda:0.
:func:`claim_gpus` closes that gap: a job takes ``n`` free devices, each under an exclusive
``flock`` on its own lock file, and sets ``CUDA_VISIBLE_DEVICES`` to them before CUDA starts, so
the job sees its devices as cuda:0..n-1 and nothing else. ``flock`` locks belong to the open file:
when the process ends, however it ends (crash, ``kill -9``), the kernel releases them, so a dead
job never keeps a GPU. A claim waits (up to ``KBIT_GPU_WAIT_S`` seconds) while too few devices are
free, which only happens when something outside this workflow's resource count holds them.

Rules of the claim:

- an existing ``CUDA_VISIBLE_DEVICES`` is respected and nothing is claimed (SLURM, or a user who
  chose the devices, already decided); the choice is only logged;
- the devices claimed from are ``KBIT_GPU_POOL`` (comma-separated ids, e.g. ``0,1,2,3``) when set,
  else every GPU of the machine (``nvidia-smi -L``); ids are nvidia-smi's numbers (a claim sets
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` unless it is set), so the logged ids are the ones
  ``nvidia-smi`` shows;
- the lock files live in one directory per user and machine (``KBIT_GPU_LOCK_DIR``, else
  ``/tmp/kbit-gpus-<uid>``): not in the working directory, because two workflows started from
  different directories share the same GPUs;
- CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when the driver starts: a claim after that could not
  take effect, so it is refused with an error instead of silently sharing cuda:0.

:func:`gpus_needed` is the arithmetic the rules use to ask for ``resources.gpu`` and the loader
uses to decide whether a model is spread over several GPUs (:mod:`kbit.loading`). This module does
not import torch, so the workflow can use it while it builds its job graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("kbit.devices")

#: set by SLURM (``--gpus``) or by a user: the devices a process may use
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
#: CUDA numbers devices fastest first unless told otherwise; claims number them as nvidia-smi does
ORDER_ENV = "CUDA_DEVICE_ORDER"
#: the devices local jobs claim from (default: every GPU of the machine)
POOL_ENV = "KBIT_GPU_POOL"
#: where the per-device lock files live (default: ``/tmp/kbit-gpus-<uid>``)
LOCK_DIR_ENV = "KBIT_GPU_LOCK_DIR"
#: seconds a claim waits for free devices before it gives up
WAIT_ENV = "KBIT_GPU_WAIT_S"
DEFAULT_WAIT_S = 3600.0
#: seconds between two looks at the locks while waiting, and between two "still waiting" logs
POLL_S = 1.0
LOG_EVERY_S = 60.0

#: fraction of every GPU kept free of weights: activations, the CUDA context, allocator slack
HEADROOM_FRACTION = 0.2
#: fraction of the first GPU kept free in addition: it receives the logits and their log-softmax
OUTPUT_RESERVE_FRACTION = 0.15
#: weight copies an evaluation job holds: the loaded weights and the snapshot it restores them
#: from between quantization configs (``kbit.model_quant.WeightSnapshot``)
EVAL_WEIGHT_COPIES = 2
#: bytes per value of the dtype names the study uses ("auto" evaluates in float16 on CUDA)
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "auto": 2}


class GpuSlotError(RuntimeError):
    """No GPU could be claimed; the message says why and what to do."""


# ----------------------------------------------------------------------------- how many GPUs
def dtype_bytes(dtype: Any) -> int:
    """Bytes per value of a dtype name (:data:`DTYPE_BYTES`) or of a torch dtype."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r}: allowed are {sorted(DTYPE_BYTES)} or a torch dtype")
        return DTYPE_BYTES[name]
    size = getattr(dtype, "itemsize", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"dtype {dtype!r} has no size in bytes")
    return size


def gpus_needed(
    n_params: int,
    dtype: Any,
    per_gpu_bytes: int,
    *,
    weight_copies: int = EVAL_WEIGHT_COPIES,
    headroom: float = HEADROOM_FRACTION,
    output_reserve: float = OUTPUT_RESERVE_FRACTION,
) -> int:
    """GPUs of ``per_gpu_bytes`` each that hold a model of ``n_params`` values of ``dtype``.

    Each GPU gives ``(1 - headroom) * per_gpu_bytes`` to weights; the model needs
    ``weight_copies`` copies of its weights plus ``output_reserve * per_gpu_bytes`` on the first
    GPU, where the logits arrive. Whole blocks go to a device
    (:func:`kbit.loading.plan_device_map`), so a model just at the limit may take one more GPU
    when it is placed; the loader says so. Always at least 1.
    """
    if n_params < 0 or per_gpu_bytes <= 0 or weight_copies < 1:
        raise ValueError(
            f"n_params={n_params}, per_gpu_bytes={per_gpu_bytes}, weight_copies={weight_copies}: "
            "need n_params >= 0, per_gpu_bytes > 0 and weight_copies >= 1"
        )
    if not (0 <= headroom < 1 and 0 <= output_reserve < 1 - headroom):
        raise ValueError(
            f"headroom={headroom}, output_reserve={output_reserve}: need 0 <= headroom < 1 and "
            "0 <= output_reserve < 1 - headroom"
        )
    usable = (1.0 - headroom) * per_gpu_bytes
    need = n_params * dtype_bytes(dtype) * weight_copies + output_reserve * per_gpu_bytes
    return max(1, math.ceil(need / usable - 1e-9))


# ----------------------------------------------------------------------------- which devices
def physical_gpus() -> list[str]:
    """Indices of the machine's GPUs (``nvidia-smi -L``; the driver's list as a fallback).

    Neither way starts CUDA in this process, which would freeze ``CUDA_VISIBLE_DEVICES``.
    """
    exe = shutil.which("nvidia-smi")
    if exe is not None:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
            n = sum(line.startswith("GPU ") for line in out.splitlines())
            if n:
                return [str(i) for i in range(n)]
        except (OSError, subprocess.SubprocessError):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    n = len(list(proc.iterdir())) if proc.is_dir() else 0
    return [str(i) for i in range(n)]


def gpu_pool(env: MutableMapping[str, str] | None = None) -> list[str]:
    """The devices jobs claim from: ``KBIT_GPU_POOL`` when set, else every GPU of the machine."""
    env = os.environ if env is None else env
    listed = env.get(POOL_ENV, "").strip()
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return physical_gpus()


def lock_dir(env: MutableMapping[str, str] | None = None) -> Path:
    """The per-user directory of the lock files (created private to the user if missing)."""
    env = os.environ if env is None else env
    path = Path(env.get(LOCK_DIR_ENV) or f"/tmp/kbit-gpus-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid != os.getuid():
        raise GpuSlotError(
            f"the GPU lock directory {path} belongs to another user; set {LOCK_DIR_ENV} to a "
            "directory of your own"
        )
    return path


def cuda_driver_initialized() -> bool:
    """True if the CUDA driver already started in this process (it has read the device list).

    Asks the driver library only if it is loaded: ``cuDeviceGetCount`` answers
    ``CUDA_ERROR_NOT_INITIALIZED`` (3) before ``cuInit`` and success after it, without starting it.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    try:
        lib = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False  # not loaded: not started
    count = ctypes.c_int(0)
    return lib.cuDeviceGetCount(ctypes.byref(count)) == 0


# ----------------------------------------------------------------------------- claims
@dataclass
class Claim:
    """The GPUs a process uses and how they were chosen.

    ``source``: ``claimed`` (locked here), ``environment`` (``CUDA_VISIBLE_DEVICES`` was set
    already) or ``none`` (a job that needs no GPU). The locks are held while the claim lives (and
    in any case until the process ends); :meth:`release` gives them back early.
    """

    devices: tuple[str, ...]
    source: str
    files: list[IO[str]] = field(default_factory=list, repr=False)
    env: MutableMapping[str, str] | None = field(default=None, repr=False)
    previous: dict[str, str | None] = field(default_factory=dict, repr=False)

    def release(self) -> None:
        """Unlock the devices and restore ``CUDA_VISIBLE_DEVICES`` as it was before the claim."""
        for fh in self.files:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        if self.files and self.env is not None:
            for key, value in self.previous.items():
                if value is None:
                    self.env.pop(key, None)
                else:
                    self.env[key] = value
        self.files.clear()
        with contextlib.suppress(ValueError):
            _HELD.remove(self)


#: live claims of this process: their open lock files must not be garbage-collected (closing the
#: last descriptor of a lock file releases its lock)
_HELD: list[Claim] = []


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock"


@contextlib.contextmanager
def _claim_lock(directory: Path) -> Iterator[None]:
    """Serialise claimers, so that two jobs never each hold part of what both need."""
    with open(directory / "claim.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _try_lock(path: Path) -> IO[str] | None:
    fh = open(path, "a+")  # noqa: SIM115 - kept open for as long as the device is held
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _stamp(fh: IO[str], label: str) -> None:
    """Write who holds the device into its lock file (read by waiting claimers' messages)."""
    fh.seek(0)
    fh.truncate()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "job": label, "since": time.time()}
    fh.write(json.dumps(holder))
    fh.flush()


def holders(directory: Path, devices: Sequence[str]) -> dict[str, str]:
    """Device -> who holds it (from its lock file), for the devices that are locked now."""
    out: dict[str, str] = {}
    for dev in devices:
        path = directory / _lock_name(dev)
        if not path.exists():
            continue
        fh = _try_lock(path)
        if fh is not None:  # free
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
            continue
        try:
            info = json.loads(path.read_text() or "{}")
            since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
            out[dev] = f"pid {info.get('pid')} ({info.get('job') or 'no job name'}, since {since})"
        except (OSError, ValueError):
            out[dev] = "unknown holder"
    return out


def _take(
    directory: Path, pool: Sequence[str], n: int, label: str
) -> tuple[list[tuple[str, IO[str]]], dict[str, str]]:
    """Lock ``n`` free devices of ``pool`` (in pool order), or none at all and say who holds
    the others (looked up under the same lock, so the look itself disturbs no other claimer)."""
    taken: list[tuple[str, IO[str]]] = []
    with _claim_lock(directory):
        for dev in pool:
            fh = _try_lock(directory / _lock_name(dev))
            if fh is not None:
                taken.append((dev, fh))
                if len(taken) == n:
                    break
        if len(taken) < n:
            for _, fh in taken:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return [], holders(directory, pool)
        for _, fh in taken:
            _stamp(fh, label)
    return taken, {}


def _wait_limit(timeout_s: float | None, env: MutableMapping[str, str]) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    raw = env.get(WAIT_ENV)
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise GpuSlotError(f"{WAIT_ENV}={raw!r}: must be a number of seconds") from None


def claim_gpus(
    n: int,
    *,
    label: str = "",
    pool: Sequence[str] | None = None,
    directory: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    poll_s: float = POLL_S,
    env: MutableMapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> Claim:
    """Claim ``n`` GPUs for this process and make them its only visible devices.

    Call it before anything starts CUDA (it refuses otherwise). ``label`` names the job in the
    lock files, so that a waiting job can say who holds the devices. ``pool``, ``directory``,
    ``timeout_s`` default to :func:`gpu_pool`, :func:`lock_dir` and ``KBIT_GPU_WAIT_S``
    (:data:`DEFAULT_WAIT_S`); ``env`` is the environment to read and set (``os.environ``).
    """
    env = os.environ if env is None else env
    logger = logger or log
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: the number of GPUs must be an integer >= 0")
    if n == 0:
        return Claim((), "none")
    if VISIBLE_ENV in env:
        visible = tuple(d for d in env[VISIBLE_ENV].split(",") if d.strip())
        logger.info(
            "GPUs: %s=%s was set before the job started (SLURM or the user chose them): "
            "using them as they are", VISIBLE_ENV, env[VISIBLE_ENV],
        )  # fmt: skip
        if len(visible) < n:
            logger.warning("the job asks for %d GPU(s) but %d are visible", n, len(visible))
        return Claim(visible, "environment")
    if cuda_driver_initialized():
        raise GpuSlotError(
            "CUDA started in this process before its GPUs were claimed, so CUDA_VISIBLE_DEVICES "
            "can no longer choose them: claim the GPUs (kbit.devices.claim_gpus) before anything "
            "uses CUDA, or set CUDA_VISIBLE_DEVICES before the job starts"
        )
    pool = list(gpu_pool(env) if pool is None else pool)
    if not pool:  # no GPU here at all: a study with eval.device auto runs on the CPU
        logger.info("GPUs: none on this machine; the job runs on the CPU")
        return Claim((), "none")
    if len(pool) < n:
        raise GpuSlotError(
            f"the job needs {n} GPU(s) but the pool has {len(pool)} ({','.join(pool) or 'none'}; "
            f"set by {POOL_ENV} or the GPUs nvidia-smi lists): run on a machine with more GPUs "
            "or lower the job's GPU count"
        )
    directory = Path(directory) if directory is not None else lock_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _wait_limit(timeout_s, env)
    start = time.monotonic()
    last_log = None
    while True:
        taken, busy = _take(directory, pool, n, label)
        if taken:
            break
        waited = time.monotonic() - start
        if waited >= limit:
            held = "; ".join(f"GPU {d}: {h}" for d, h in busy.items()) or "none held right now"
            raise GpuSlotError(
                f"no {n} free GPU(s) among {','.join(pool)} after waiting {waited:.0f} s "
                f"(held: {held}): wait for those jobs, stop them, run fewer GPU jobs at once "
                f"(snakemake --resources gpu=N), or raise {WAIT_ENV}"
            )
        if last_log is None or time.monotonic() - last_log >= LOG_EVERY_S:
            last_log = time.monotonic()
            logger.info(
                "waiting for %d free GPU(s) of %s (held: %s)", n, ",".join(pool),
                ", ".join(f"{d} by {h}" for d, h in busy.items()) or "none",
            )  # fmt: skip
        time.sleep(min(poll_s, max(0.0, limit - waited)))
    devices = tuple(d for d, _ in taken)
    previous = {key: env.get(key) for key in (VISIBLE_ENV, ORDER_ENV)}
    claim = Claim(devices, "claimed", [fh for _, fh in taken], env, previous)
    env[VISIBLE_ENV] = ",".join(devices)
    env.setdefault(ORDER_ENV, "PCI_BUS_ID")
    _HELD.append(claim)
    logger.info(
        "GPUs: claimed %s of %s (locks in %s); %s=%s, so the job sees them as cuda:0..%d",
        ",".join(devices), ",".join(pool), directory, VISIBLE_ENV, env[VISIBLE_ENV], n - 1,
    )  # fmt: skip
    return claim


def job_gpus(smk: Any) -> int:
    """The GPUs a Snakemake job asked for (``resources.gpu``; 0 when the rule names none)."""
    value = getattr(getattr(smk, "resources", None), "gpu", 0) or 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GpuSlotError(f"resources.gpu={value!r}: must be a whole number of GPUs") from None


def claim_for_job(smk: Any, logger: logging.Logger | None = None) -> Claim:
    """Claim the GPUs of a workflow job (``snakemake`` object) for the rest of its process.

    Called once per job, before any CUDA work (``kbit.logs.job`` does it as the job starts).
    A second call in the same process returns the first claim.
    """
    if _HELD:
        return _HELD[0]
    rule = str(getattr(smk, "rule", "job"))
    items = getattr(getattr(smk, "wildcards", None), "items", None)
    wildcards = ",".join(f"{k}={v}" for k, v in items()) if items is not None else ""
    label = f"{rule}[{wildcards}]" if wildcards else rule
    return claim_gpus(job_gpus(smk), label=label, logger=logger)
