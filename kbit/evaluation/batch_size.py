"""The evaluation batch size of a model: searched once, written to a file every job reads.

Padded shapes change the last bits of the matrix products, so one model is evaluated with one
batch size everywhere, and that size is the one lm-eval's own command line can use too.
:func:`find_batch_size` picks the largest batch that fits a full-length forward pass plus the
log-softmax lm-eval's own HFLM (the command line) takes over it on CUDA, with some memory left
free; on the CPU, where memory is rarely the limit and larger batches only add padding, a
configured default capped by the host memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kbit.io import write_json
from kbit.loading import load_model, resolve_device
from kbit.settings import EvalSettings

log = logging.getLogger("kbit.evaluation")

#: batch size used on the CPU (and whenever no search is possible)
DEFAULT_CPU_BATCH_SIZE = 8
#: fraction of the host memory the logits of one CPU batch (and their log-softmax) may take
CPU_MEMORY_FRACTION = 0.4
#: upper end of the batch-size search on CUDA
MAX_BATCH_SIZE = 512
#: fraction of the device memory a batch-size candidate may leave unused at its peak
MEMORY_HEADROOM = 0.10


def choose_batch_size(
    model_dir: str | os.PathLike,
    requested: int | str = "auto",
    settings: EvalSettings | None = None,
    trust_remote_code: bool = False,
    what: str | None = None,
) -> dict[str, Any]:
    """The batch size of one model (``requested`` integer, or ``auto``).

    ``auto`` sizes full-length sequences (the context window lm-eval uses, what WikiText's rolling
    windows fill), so the result fits every task: a search on CUDA, the CPU default capped by the
    host memory elsewhere. Returns the JSON the evaluation jobs read.
    """
    from kbit.evaluation.lm import make_lm

    settings = settings or EvalSettings.from_config()
    dev = resolve_device(settings.device)
    info: dict[str, Any] = {"device": str(dev), "requested": requested}
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"batch_size={requested!r}: allowed are 'auto' or an integer >= 1")
        return info | {"batch_size": requested, "source": "config"}
    model, tok = load_model(model_dir, settings.dtype, settings.device, trust_remote_code, what)
    lm = make_lm(model, tok, 1, settings.softmax_dtype, max_length=settings.max_length, fast=False)
    probes: list[dict[str, Any]] = []
    bs = find_batch_size(model, lm.max_length, dev, softmax_dtype=lm.softmax_dtype, probes=probes)
    source = "search" if dev.type == "cuda" else "cpu default, memory-capped"
    out = info | {"batch_size": bs, "source": source, "max_length": lm.max_length}
    return out | ({"probes": probes} if probes else {})


def find_batch_size(
    model: torch.nn.Module,
    max_length: int,
    device: str | torch.device,
    default: int = DEFAULT_CPU_BATCH_SIZE,
    max_batch_size: int = MAX_BATCH_SIZE,
    headroom: float = MEMORY_HEADROOM,
    softmax_dtype: torch.dtype | None = None,
    probes: list[dict[str, Any]] | None = None,
) -> int:
    """Largest batch of ``max_length`` tokens that lm-eval's own scoring fits on ``device``.

    On CUDA each candidate runs the model on a full ``[batch, max_length]`` input and the
    full-vocabulary log-softmax (in ``softmax_dtype``) HFLM applies to the logits (the command
    line's peak, which is above :class:`ReusingHFLM`'s); a candidate fits if it neither runs out
    of memory nor leaves less than ``headroom`` of the device memory unused at its peak. Powers
    of two are tried first, then the gap to the next one in quarter steps. On any other device
    see :func:`cpu_batch_size`. ``probes`` (a list) receives every measurement in order
    (batch size, peak GiB or None after an out-of-memory error, fits), for the record.
    """
    device = torch.device(device)
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be a positive number of tokens")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if device.type != "cuda":
        return cpu_batch_size(max_length, vocab, default)
    limit = (1.0 - headroom) * torch.cuda.get_device_properties(device).total_memory

    def fits(bs: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                inp = torch.randint(0, vocab, (bs, max_length), device=device)
                logits = model(inp).logits
                F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
                del logits, inp
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_reserved(device)
        except torch.cuda.OutOfMemoryError:
            if probes is not None:
                probes.append({"batch_size": bs, "peak_gib": None, "fits": False})
            return False
        finally:
            torch.cuda.empty_cache()
        log.info("batch %d x %d tokens: peak %.1f GiB", bs, max_length, peak / 2**30)
        if probes is not None:
            probes.append({"batch_size": bs, "peak_gib": peak / 2**30, "fits": peak <= limit})
        return peak <= limit

    best = search_batch_size(fits, max_batch_size)
    if best == 0:
        raise RuntimeError(
            f"a batch of 1 x {max_length} tokens does not fit on {device}; "
            "lower the model's max_length or use a larger device"
        )
    log.info("batch size %d fits %d tokens on %s", best, max_length, device)
    return best


def search_batch_size(fits: Callable[[int], bool], max_batch_size: int = MAX_BATCH_SIZE) -> int:
    """Largest batch size that ``fits`` accepts, measured and confirmed (0 if not even 1).

    Peak memory is not monotonic in the batch size. The caching allocator rounds every block to
    its size classes and reuses (or is left fragmented by) what earlier candidates freed; SDPA and
    cuBLAS choose other kernels, tilings and workspaces for other shapes (a batch that is a
    multiple of the tile can need less than a smaller one). On an H200 the 1.4B model peaked at
    115.0 GiB with 128 sequences, 112.3 GiB with 160 and 134.2 GiB with 192. So no size is
    inferred from another: powers of two until the first that does not fit (1, 2, 4, ...), then
    every quarter step between the last power that fit and the next (all of them, also past a
    failure), then the largest size that fit is measured once more, from a fresh allocator, and
    must fit again (else the next largest that fits twice is taken). Each probe is one
    full-length forward pass; memoised, so no size is probed twice except to confirm it.
    """
    seen: dict[int, bool] = {}

    def probe(bs: int) -> bool:
        if bs not in seen:
            seen[bs] = bool(fits(bs))
        return seen[bs]

    power, bs = 0, 1
    while bs <= max_batch_size and probe(bs):
        power = bs
        bs *= 2
    step = power // 4
    if step > 0 and bs <= max_batch_size:  # stopped by memory, not by max_batch_size
        for cand in (power + step, power + 2 * step, power + 3 * step):
            probe(cand)
    for cand in sorted((b for b, ok in seen.items() if ok), reverse=True):
        if fits(cand):  # the confirmation: measured again, not taken from the memo
            return cand
    return 0


def host_memory_bytes() -> int:
    """Physical memory of this machine (the cgroup limit where one is set and lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap.isdigit():
            total = min(total, int(cap))
    except OSError:
        pass
    return total


def cpu_batch_size(
    max_length: int,
    vocab: int,
    default: int = DEFAULT_CPU_BATCH_SIZE,
    memory_bytes: int | None = None,
) -> int:
    """``default``, lowered so that a full-length batch's float32 logits and the log-softmax
    HFLM takes over them stay within :data:`CPU_MEMORY_FRACTION` of the host memory.

    Why: long-context models make this the limit on the CPU: 8 rolling windows of 8192 tokens
    over a 49k vocabulary (SmolLM2) are 13 GB of logits, 26 GB with their log-softmax.
    """
    if memory_bytes is None:
        memory_bytes = host_memory_bytes()
    per_row = 2 * max_length * vocab * 4
    fits = int(CPU_MEMORY_FRACTION * memory_bytes // per_row)
    bs = max(1, min(int(default), fits))
    if bs < default:
        log.info(
            "batch size %d on the CPU: %d x %d-token rows of %d logits fit in %.0f%% of %.1f GiB",
            bs, bs, max_length, vocab, 100 * CPU_MEMORY_FRACTION, memory_bytes / 2**30,
        )  # fmt: skip
    return bs


# ---------------------------------------------------------------------- memory estimates
#: bytes per gigabyte in messages (GB, as device and host memory are usually quoted)
GB = 1e9


def memory_total_bytes(device: str | torch.device) -> int:
    """All memory of ``device``: the GPU's on CUDA, the host's (cgroup-capped) elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_memory_bytes()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def usable_memory_bytes(
    model: torch.nn.Module, device: str | torch.device, headroom: float = MEMORY_HEADROOM
) -> int:
    """Bytes a forward pass and its scoring may plan to fill: all of ``device``'s memory less
    ``headroom`` and less the weights (on the same device).

    From totals, not from what happens to be free now, so that the same model, batch and
    machine always take the same scoring path (and so get the same bits).
    """
    return int((1.0 - headroom) * memory_total_bytes(device)) - model_bytes(model)


def _config_int(model: torch.nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def activation_bytes(model: torch.nn.Module, batch: int, length: int) -> int:
    """A lean estimate of a forward pass's live activations for ``batch`` x ``length`` tokens.

    Two hidden states (the residual stream and one block's output) and one MLP intermediate
    per token, in the model's dtype. It leaves out attention scores and allocator slack on
    purpose: it decides when the full logits no longer fit, and an estimate above what a
    batch-size search measured would move batches that fit off the exact scoring path.
    """
    head = model.get_output_embeddings()
    hidden = int(head.weight.shape[1])
    inter = _config_int(model, ("intermediate_size", "ffn_dim", "n_inner")) or 4 * hidden
    item = head.weight.element_size()
    return batch * length * (2 * hidden + inter) * item


def logit_row_bytes(vocab: int, logits_item: int, softmax_item: int, copy: bool) -> int:
    """Bytes one scored row of logits takes while its log-softmax is taken: the row itself when
    it is gathered (``copy``, not a view), the log-softmax, and the upcast copy that
    ``log_softmax(..., dtype=)`` makes first when the dtypes differ."""
    upcast = softmax_item if softmax_item != logits_item else 0
    return vocab * ((logits_item if copy else 0) + upcast + softmax_item)


def gigabytes(n_bytes: float) -> str:
    """``n_bytes`` for a message, three significant digits, e.g. ``34.4 GB``."""
    return f"{n_bytes / GB:.3g} GB"


def write_batch_size(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write the batch-size JSON the evaluation jobs read (atomically)."""
    if int(info.get("batch_size", 0)) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {info.get('batch_size')!r}")
    write_json(dict(sorted(info.items())), path, indent=2)


def read_batch_size(path: str | os.PathLike | None, default: int = DEFAULT_CPU_BATCH_SIZE) -> int:
    """The batch size stored by :func:`write_batch_size` (``default`` when ``path`` is None)."""
    if path is None:
        return int(default)
    with open(path) as fh:
        info = json.load(fh)
    bs = info.get("batch_size")
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"{path}: 'batch_size' must be a positive integer, got {bs!r}")
    return bs
