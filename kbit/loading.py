"""The one model loader: a local safetensors directory -> a checked causal LM and its tokenizer.

Every job that needs weights (quantize, evaluate, calibration, features) loads them here, so the
checks a result depends on run once, in one place, before any work:

- the directory is a model (``config.json``) with safetensors weights (pickles are refused: loading
  them runs arbitrary code);
- the files are readable (a truncated or corrupt safetensors file is named, not a bare
  ``SafetensorError`` deep inside transformers);
- every weight is finite: a model with NaN or Inf weights would be scored without an error (its
  log-likelihoods are NaN), so it is refused with the tensor names and counts.

``load_model`` loads the model the way lm-eval's ``HFLM`` loads a path
(``AutoModelForCausalLM.from_pretrained(dir, dtype=...)``, ``AutoTokenizer.from_pretrained(dir,
use_fast=True)``), so scores equal the command line's.

Models larger than one GPU: on a bare ``cuda`` device, a model whose weights (with the copies the
job keeps, :func:`kbit.devices.gpus_needed`) do not fit on one visible GPU is spread over as many
visible GPUs as it needs, whole decoder blocks per GPU (:func:`plan_device_map`), through
accelerate's ``device_map``. Embeddings, final norm and LM head stay on the first GPU, where
lm-eval's ``HFLM`` puts its inputs (``model.device`` is the first parameter's device) and where
accelerate returns the logits, so the scoring code sees one device. Each layer runs the same
kernels on its own GPU as it would on one, so the log-likelihoods are the same bits (checked by
``benchmarks/multi_gpu_check.py``). ``KBIT_FORCE_GPUS=N`` spreads every model over N GPUs even
when it fits on one (to check exactly that). A device with an index (``cuda:1``) is always used
alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbit.devices import (
    EVAL_WEIGHT_COPIES,
    HEADROOM_FRACTION,
    OUTPUT_RESERVE_FRACTION,
    gpus_needed,
)

log = logging.getLogger("kbit.loading")

#: dtype names accepted by ``eval.dtype`` (besides "auto")
EVAL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: spread every model loaded on a bare "cuda" device over this many GPUs, even if it fits on one
FORCE_GPUS_ENV = "KBIT_FORCE_GPUS"
#: safetensors dtype names -> torch dtypes (for sizing a checkpoint from its headers)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded as it is; the message says why and what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is used as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA (the paper's 16-bit inputs), float32 on the CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in EVAL_DTYPES:
        raise ValueError(f"eval dtype {dtype!r}: allowed are 'auto', {sorted(EVAL_DTYPES)}")
    return EVAL_DTYPES[dtype]


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The directory, if it holds a config and readable safetensors weights; else a clear error."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a model directory: config.json is missing")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f" (it has pickle weights: {', '.join(pickles[:4])})" if pickles else ""
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weights{found}. Pickle checkpoints are refused "
            "because loading them runs arbitrary code: convert them once with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)` on a trusted machine and point the config at `out`"
        )
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if keys:  # reading the last tensor touches the end of the file
                    f.get_slice(keys[-1])[:1]
        except Exception as err:
            raise ModelLoadError(
                f"{path} cannot be read ({type(err).__name__}: {err}); the file is truncated or "
                "corrupt: delete the model directory and download or convert it again"
            ) from err
    return model_dir


def nonfinite_weights(model: nn.Module) -> dict[str, int]:
    """Parameter and buffer names -> number of NaN/Inf values, for those that have any."""
    bad: dict[str, int] = {}
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        if t.is_floating_point():
            n = int(t.numel() - torch.isfinite(t).sum().item())
            if n:
                bad[name] = n
    return bad


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model whose weights hold NaN or Inf, naming ``what`` and the tensors."""
    bad = nonfinite_weights(model)
    if bad:
        listed = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:8])
        more = f" and {len(bad) - 8} more tensors" if len(bad) > 8 else ""
        raise ModelLoadError(
            f"{what} has non-finite weights: {sum(bad.values())} NaN/Inf values in {listed}"
            f"{more}; its scores would be meaningless. Fix or re-download the checkpoint"
        )


def load_causal_lm(
    model_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    what: str | None = None,
    gpus: int | None = None,
    weight_copies: int = 1,
) -> nn.Module:
    """A causal LM from a local safetensors directory, checked (see the module docstring).

    ``dtype`` is a torch dtype, a name in :data:`EVAL_DTYPES`, or ``"auto"``, which here means
    the checkpoint's own dtype (transformers' meaning; see :func:`load_model` for the
    evaluation's). ``what`` names the model in errors (the study's model key). On a bare
    ``cuda`` device the model is spread over :func:`gpus_for_model` GPUs when that is more than
    one (``gpus`` fixes the number; ``weight_copies`` is how many copies of the weights the
    caller will hold, which decides whether one GPU is enough).
    """
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = EVAL_DTYPES[dtype]
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        n = gpus_for_model(model_dir, dtype, gpus=gpus, weight_copies=weight_copies)
        if n > 1:
            return _load_on_gpus(model_dir, n, dtype, trust_remote_code, weight_copies, what)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    check_finite(model, what or str(model_dir))
    return model.to(device).eval()


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer as HFLM loads it (fast, from the model directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(model_dir), use_fast=True, trust_remote_code=trust_remote_code
    )


def load_model(
    model_dir: str | os.PathLike,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    what: str | None = None,
    *,
    gpus: int | None = None,
) -> tuple[nn.Module, Any]:
    """A checked causal LM and its tokenizer, loaded the way ``HFLM`` loads a path.

    ``dtype="auto"`` means float16 on CUDA and float32 on the CPU (:func:`resolve_dtype`), the
    evaluation's convention; give the command line the same dtype name. On a bare ``cuda``
    device a model too large for one GPU (counting the evaluation's weight copies,
    :data:`kbit.devices.EVAL_WEIGHT_COPIES`) is spread over several (see the module docstring);
    ``gpus`` fixes their number.
    """
    dev = resolve_device(device)
    model = load_causal_lm(
        model_dir,
        dtype=resolve_dtype(dtype, dev),
        device=dev,
        trust_remote_code=trust_remote_code,
        what=what,
        gpus=gpus,
        weight_copies=EVAL_WEIGHT_COPIES,
    )
    return model, load_tokenizer(model_dir, trust_remote_code)


# ----------------------------------------------------------------------------- several GPUs
def checkpoint_size(model_dir: str | os.PathLike) -> tuple[int, torch.dtype]:
    """Values stored in a model directory's safetensors files and their most common float dtype.

    Read from the file headers only (no tensor is loaded), so the placement of a model is known
    before any weight is read.
    """
    counts: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + math.prod(info["shape"])
    floats = {
        k: v for k, v in counts.items() if k in _ST_DTYPES and _ST_DTYPES[k].is_floating_point
    }
    if not floats:
        raise ModelLoadError(f"{model_dir} has no floating-point weights in its safetensors files")
    return sum(counts.values()), _ST_DTYPES[max(floats, key=floats.__getitem__)]


def _forced_gpus() -> int | None:
    raw = os.environ.get(FORCE_GPUS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{FORCE_GPUS_ENV}={raw!r}: must be a whole number of GPUs >= 1")
    return int(raw)


def gpus_for_model(
    model_dir: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    *,
    gpus: int | None = None,
    weight_copies: int = 1,
    visible: int | None = None,
    per_gpu_bytes: int | None = None,
) -> int:
    """How many of the visible GPUs a model is loaded on: ``gpus`` if given, else
    ``KBIT_FORCE_GPUS`` if set, else :func:`~kbit.devices.gpus_needed` for its checkpoint on the
    first visible GPU, at most ``visible`` (default: the GPUs this process sees).

    A model that needs more GPUs than are visible is loaded on all of them, with a warning: it
    may still fit (the estimate keeps generous headroom), and if not, the out-of-memory error
    says what to do.
    """
    if visible is None:
        visible = torch.cuda.device_count()
    wanted = gpus if gpus is not None else _forced_gpus()
    if wanted is not None:
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            raise ValueError(f"gpus={wanted!r}: must be a whole number >= 1")
        if wanted > visible:
            raise ValueError(f"{wanted} GPUs requested but {visible} are visible")
        return wanted
    if visible <= 1:
        return 1
    n_values, stored = checkpoint_size(model_dir)
    load_dtype = stored if dtype == "auto" else dtype
    if per_gpu_bytes is None:
        per_gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    need = gpus_needed(n_values, load_dtype, per_gpu_bytes, weight_copies=weight_copies)
    if need > visible:
        log.warning(
            "%s: %.2fB values in %s (x%d copies) need about %d GPUs of %.0f GiB, %d are "
            "visible: loading on all of them (ask the job for more GPUs if it runs out of memory)",
            model_dir, n_values / 1e9, load_dtype, weight_copies, need, per_gpu_bytes / 2**30,
            visible,
        )  # fmt: skip
    return min(need, visible)


def model_devices(model: nn.Module) -> list[torch.device]:
    """The devices a model's parameters and buffers live on, in order of first appearance."""
    seen: dict[torch.device, None] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(t.device, None)
    return list(seen)


def _tensor_bytes(tensors: Sequence[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _module_bytes(module: nn.Module, seen: set[int]) -> int:
    return _tensor_bytes([*module.parameters(), *module.buffers()], seen)


def _placement_units(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parts placed as a whole: everything outside the decoder blocks (modules
    beside the blocks' ancestors and their own tensors), and the blocks themselves."""
    from kbit.model_quant import find_blocks

    prefix, blocks = find_blocks(model)
    block_names = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks))]
    parts = prefix.split(".") if prefix else []
    ancestors = ["", *(".".join(parts[:i]) for i in range(1, len(parts)))]
    on_path = {*ancestors, prefix}
    others: list[str] = []
    for anc in ancestors:
        mod = model.get_submodule(anc)
        named = [
            *(n for n, _ in mod.named_children()),
            *(n for n, _ in mod.named_parameters(recurse=False)),
            *(n for n, _ in mod.named_buffers(recurse=False)),
        ]
        for name in named:
            full = f"{anc}.{name}" if anc else name
            if full not in on_path:
                others.append(full)
    return others, block_names


def _get(model: nn.Module, name: str) -> nn.Module | torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module_name)
    return getattr(owner, leaf)


def _partition(sizes: Sequence[int], fixed: Sequence[int]) -> list[int]:
    """Blocks per device: contiguous, at least one each, minimising the largest device load
    ``fixed[d] + sum(sizes of its blocks)`` (ties: fewer blocks on the earlier devices)."""
    n_dev, n_blocks = len(fixed), len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[d][j]: least largest load of devices 0..d holding blocks 0..j-1; cut[d][j]: d's first
    best = [[inf] * (n_blocks + 1) for _ in range(n_dev)]
    cut = [[0] * (n_blocks + 1) for _ in range(n_dev)]
    for j in range(1, n_blocks + 1):
        best[0][j] = fixed[0] + prefix[j]
    for d in range(1, n_dev):
        for j in range(d + 1, n_blocks + 1):
            for i in range(d, j):
                load = max(best[d - 1][i], fixed[d] + prefix[j] - prefix[i])
                if load < best[d][j]:
                    best[d][j], cut[d][j] = load, i
    counts = [0] * n_dev
    j = n_blocks
    for d in range(n_dev - 1, 0, -1):
        i = cut[d][j]
        counts[d] = j - i
        j = i
    counts[0] = j
    return counts


def plan_device_map(
    model: nn.Module,
    devices: Sequence[int | str],
    *,
    weight_copies: int = 1,
    reserve: Sequence[int] | None = None,
    capacity: Sequence[int] | None = None,
) -> dict[str, int | str]:
    """A device map (module name -> device) that puts whole decoder blocks on each of ``devices``.

    Everything outside the blocks (embeddings, final norm, LM head, rotary tables) goes to the
    first device: lm-eval's inputs arrive there, the logits are consumed there, and a tied LM
    head stays with its embedding. The blocks are split into contiguous runs, at least one per
    device, so that the largest device load (``weight_copies`` times its weights plus
    ``reserve[d]`` bytes) is as small as possible. ``model`` may live on the meta device (only
    sizes are read). With ``capacity`` (bytes per device), a plan that exceeds it raises
    :class:`ModelLoadError`.
    """
    devices = list(devices)
    n_dev = len(devices)
    reserve = list(reserve) if reserve is not None else [0] * n_dev
    if n_dev < 1 or len(reserve) != n_dev or (capacity is not None and len(capacity) != n_dev):
        raise ValueError(f"{n_dev} devices, {len(reserve)} reserves: need one of each per device")
    others, blocks = _placement_units(model)
    if len(blocks) < n_dev:
        raise ValueError(f"{len(blocks)} decoder blocks cannot be spread over {n_dev} devices")
    seen: set[int] = set()
    other_bytes = 0
    for name in others:
        part = _get(model, name)
        if isinstance(part, nn.Module):
            other_bytes += _module_bytes(part, seen)
        elif isinstance(part, torch.Tensor):
            other_bytes += _tensor_bytes([part], seen)
    owned = set(seen)
    for b in blocks:  # a weight shared across units would have to live on two devices
        ids = {
            id(t) for t in (*model.get_submodule(b).parameters(), *model.get_submodule(b).buffers())
        }
        if ids & owned:
            raise ModelLoadError(f"{b} shares weights with another part of the model, so the "
                                 "model cannot be split into whole blocks across GPUs")  # fmt: skip
        owned |= ids
    sizes = [weight_copies * _module_bytes(model.get_submodule(b), seen) for b in blocks]
    fixed = [reserve[0] + weight_copies * other_bytes, *reserve[1:]]
    counts = _partition(sizes, fixed)
    plan: dict[str, int | str] = dict.fromkeys(others, devices[0])
    loads = list(fixed)
    at = 0
    for d, count in enumerate(counts):
        for b in range(at, at + count):
            plan[blocks[b]] = devices[d]
            loads[d] += sizes[b]
        at += count
    if capacity is not None and any(ld > cap for ld, cap in zip(loads, capacity, strict=True)):
        detail = ", ".join(
            f"{dev}: {ld / 2**30:.1f} of {cap / 2**30:.1f} GiB"
            for dev, ld, cap in zip(devices, loads, capacity, strict=True)
        )
        raise ModelLoadError(
            f"the model does not fit on {n_dev} device(s) ({detail}): give the job more GPUs"
        )
    return plan


def _describe_plan(plan: dict[str, int | str]) -> str:
    """One line per device: how many blocks and which other parts it holds (for the log)."""
    by_dev: dict[Any, list[str]] = {}
    for name, dev in plan.items():
        by_dev.setdefault(dev, []).append(name)
    lines = []
    for dev, names in by_dev.items():
        blocks = [n for n in names if n.rsplit(".", 1)[-1].isdigit()]
        rest = [n for n in names if n not in blocks]
        span = f"blocks {blocks[0]}..{blocks[-1]}" if blocks else "no blocks"
        lines.append(f"{dev}: {len(blocks)} {span}" + (f" + {', '.join(rest)}" if rest else ""))
    return "; ".join(lines)


def empty_model(
    model_dir: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False
) -> nn.Module:
    """The model of ``model_dir`` without weights (meta device), tied like a loaded one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.tie_weights()
    return model


def load_across(
    model_dir: str | os.PathLike,
    devices: Sequence[int | str],
    *,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    what: str | None = None,
    weight_copies: int = 1,
    reserve: Sequence[int] | None = None,
    capacity: Sequence[int] | None = None,
) -> nn.Module:
    """A checked causal LM with its blocks spread over ``devices`` (:func:`plan_device_map`).

    Weights are read from the checkpoint straight onto their device (accelerate's
    ``device_map``; no full copy in host memory). ``dtype`` as in :func:`load_causal_lm`.
    """
    model_dir = check_model_dir(model_dir)
    dtype = EVAL_DTYPES[dtype] if isinstance(dtype, str) and dtype != "auto" else dtype
    skeleton = empty_model(model_dir, _sizing_dtype(model_dir, dtype), trust_remote_code)
    plan = plan_device_map(
        skeleton, devices, weight_copies=weight_copies, reserve=reserve, capacity=capacity
    )
    return _load_with_plan(model_dir, plan, dtype, trust_remote_code, what)


def _sizing_dtype(model_dir: Path, dtype: str | torch.dtype) -> torch.dtype:
    """The dtype the weights will have once loaded ("auto": the checkpoint's)."""
    return checkpoint_size(model_dir)[1] if dtype == "auto" else dtype


def _load_with_plan(
    model_dir: Path,
    plan: dict[str, int | str],
    dtype: str | torch.dtype,
    trust_remote_code: bool,
    what: str | None,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        device_map=plan,
    )
    check_finite(model, what or str(model_dir))
    log.info("%s placed on %d devices: %s", what or model_dir, len(set(plan.values())),
             _describe_plan(plan))  # fmt: skip
    return model.eval()


def _load_on_gpus(
    model_dir: Path,
    n: int,
    dtype: str | torch.dtype,
    trust_remote_code: bool,
    weight_copies: int,
    what: str | None,
) -> nn.Module:
    """The model on the first ``n`` visible GPUs, or on more if its whole blocks need them.

    Each GPU takes at most ``1 - HEADROOM_FRACTION`` of its memory in weights, the first one
    ``OUTPUT_RESERVE_FRACTION`` less for the logits; with ``KBIT_FORCE_GPUS``, or when even all
    visible GPUs exceed that, the plan is used anyway (the estimate is generous).
    """
    visible = torch.cuda.device_count()
    total = [torch.cuda.get_device_properties(i).total_memory for i in range(visible)]
    skeleton = empty_model(model_dir, _sizing_dtype(model_dir, dtype), trust_remote_code)
    forced = _forced_gpus() is not None
    plan = None
    for k in range(n, visible + 1):
        reserve = [int(OUTPUT_RESERVE_FRACTION * total[0])] + [0] * (k - 1)
        capacity = [int((1 - HEADROOM_FRACTION) * t) for t in total[:k]]
        last = forced or k == visible
        try:
            plan = plan_device_map(
                skeleton,
                list(range(k)),
                weight_copies=weight_copies,
                reserve=reserve,
                capacity=None if last else capacity,
            )
            break
        except ModelLoadError as err:
            log.info("%s; trying %d GPUs", err, k + 1)
    if plan is None:  # pragma: no cover - the last attempt has no capacity limit
        raise ModelLoadError(f"{model_dir}: no placement on {visible} GPUs")
    del skeleton
    return _load_with_plan(model_dir, plan, dtype, trust_remote_code, what)
