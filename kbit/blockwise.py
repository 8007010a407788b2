"""Blockwise k-bit quantization: the reference every faster path must match bit for bit.

Algorithm (all arithmetic in float32; a GPU kernel reproduces exactly these steps):

1. ``x = w.reshape(-1).float()`` (row-major). With ``spec.center`` the tensor mean (float64
   mean, rounded to fp16: it is stored as one 16-bit value) is subtracted first.
2. Cut ``x`` into blocks of B consecutive values (the last block may be partial);
   ``block_size=None`` is one block for the whole tensor.
3. Block scale ``s`` (stored, see below) and ``xn = x / s`` (IEEE division; ``xn = 0`` where
   ``s == 0``).
4. ``code = #{j : xn > mid[j]}`` with ``mid = (cb[:-1] + cb[1:]) / 2`` in float32, i.e.
   ``torch.bucketize(xn, mid, right=False)``: the nearest codebook entry, an exact tie going
   to the LOWER code. Values beyond the codebook saturate at its ends.
5. Dequantize: ``y = cb[code] * s`` (+ mean) in float32, cast to the input dtype.

Scales per data type:

* absmax types (int, float, dynamic, quantile, nf): ``absmax`` of the block in float32,
  rounded to ``spec.scale_dtype`` (fp16 default, round-to-nearest-even after clamping to the
  dtype's finite max), stored in that dtype; ``s = scale.float()``. ``cb`` is the normalised
  codebook. Quantile codebooks are estimated per tensor, rounded to fp16 (they are stored and
  counted at 16 bits per entry) and stored in the :class:`QTensor`.
* mxfp / mxint (OCP Microscaling v1.0, section 6.3): ``s = 2^(floor(log2(absmax)) - emax)``
  with ``emax`` the element format's largest exponent, clamped to E8M0's range [-127, 127]
  (absmax 0 gives 2^-127) and stored as the biased exponent (uint8). ``cb`` is the raw
  element grid, so elements saturate at +-max.
* nvfp4: per-tensor float32 ``g = absmax_tensor / (448 * 6)``; block scale
  ``E4M3(min(absmax_block / (6 * g), 448))`` stored as float8_e4m3fn; ``s = scale.float() * g``;
  ``cb`` is the raw E2M1 grid.

Microscaling elements round to nearest with ties to EVEN (the OCP conversion rule): at an
exact midpoint the entry with an even last mantissa bit wins. The absmax types keep the
simpler ties-to-lower rule of step 4 (the rule the GPU kernels implement).

Bits stored (``QTensor.bits``): ``k * n + scale_bits * ceil(n / B)`` plus 16 * 2^k for a
quantile codebook, 16 for a centering mean and 32 for the nvfp4 global scale. Outlier columns
(``spec.outlier_fraction``) and GPTQ (``spec.method``) act across layers and are applied by
the model-level code; this module quantizes every value it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from kbit import packing
from kbit.accounting import extra_bits
from kbit.codebooks import codebook_for, element_grid
from kbit.spec import MICROSCALING_DTYPES, QuantSpec, SpecError

#: values processed at once; chunks hold whole blocks so memory stays bounded
CHUNK_VALUES = 1 << 22
#: QTensor serialisation format version (bump on layout changes)
FORMAT_VERSION = 1

_SCALE_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_E8M0_BIAS = 127
_E4M3_MAX = 448.0
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# ----------------------------------------------------------------------------- the plan
@dataclass
class _Plan:
    """Everything a tensor's quantization depends on, computed once before the chunk loop."""

    grid: torch.Tensor  # fp32 values a code decodes to (before the scale)
    mids: torch.Tensor  # fp32 midpoints between consecutive grid values
    even: torch.Tensor | None  # ties-to-even flags (microscaling), None = ties to lower
    block: int  # values per block (n for one block per tensor)
    scales: torch.Tensor  # stored block constants
    divisors: torch.Tensor  # fp32 per-block s
    mean: torch.Tensor | None  # fp16 scalar, spec.center
    global_scale: torch.Tensor | None  # fp32 scalar, nvfp


def _check_input(w: torch.Tensor) -> None:
    if not torch.is_floating_point(w):
        raise TypeError(f"quantize needs a floating point tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("the tensor to quantize contains NaN or inf")


def _flat_f32(w: torch.Tensor) -> torch.Tensor:
    _check_input(w)
    return w.detach().reshape(-1).to(torch.float32)


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.numel()
    full = n // block
    parts = []
    if full:
        parts.append(x[: full * block].view(full, block).abs().amax(dim=1))
    if n - full * block:
        parts.append(x[full * block :].abs().amax().reshape(1))
    return torch.cat(parts)


def round_scale(absmax: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """absmax rounded (to nearest even) to the stored scale dtype, clamped to its finite max."""
    if scale_dtype not in _SCALE_TORCH:
        raise SpecError(
            f"scale_dtype {scale_dtype!r} for absmax types: allowed are fp16, bf16, fp32"
        )
    dt = _SCALE_TORCH[scale_dtype]
    return absmax.clamp(max=torch.finfo(dt).max).to(dt)


def center_mean(x: torch.Tensor) -> torch.Tensor:
    """The stored centering constant: the float64 mean rounded to fp16."""
    return x.double().mean().to(torch.float16)


def _absmax_plan(
    x: torch.Tensor, grid: torch.Tensor, block: int, scale_dtype: str, mean: torch.Tensor | None
) -> _Plan:
    scales = round_scale(_block_absmax(x, block), scale_dtype)
    mids = (grid[:-1] + grid[1:]) / 2
    return _Plan(grid, mids, None, block, scales, scales.float(), mean, None)


def _microscaling_plan(
    x: torch.Tensor, spec: QuantSpec, block: int, mean: torch.Tensor | None
) -> _Plan:
    g = element_grid(spec)
    grid, even = g.values.to(x.device), g.even.to(x.device)
    absmax = _block_absmax(x, block)
    global_scale = None
    if spec.dtype == "nvfp":
        # Scalar arithmetic on the CPU: CUDA divides by a scalar through its reciprocal,
        # which would make the global scale (and every block scale) device-dependent.
        amax = x.abs().amax().cpu()
        global_scale = amax / torch.tensor(_E4M3_MAX * g.max, dtype=torch.float32)
        denom = torch.full_like(absmax, (g.max * global_scale).item())
        global_scale = global_scale.to(x.device)
        ratio = torch.where(denom > 0, absmax / denom, torch.zeros_like(absmax))
        scales = ratio.clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn)
        divisors = scales.float() * global_scale
    else:
        # frexp: absmax = m * 2^e with m in [0.5, 1), so floor(log2(absmax)) = e - 1 exactly
        _, e = torch.frexp(absmax)
        shared = torch.where(absmax > 0, e.to(torch.int32) - 1 - g.emax, -_E8M0_BIAS)
        scales = (shared.clamp(-_E8M0_BIAS, _E8M0_BIAS) + _E8M0_BIAS).to(torch.uint8)
        divisors = _e8m0_value(scales)
    mids = (grid[:-1] + grid[1:]) / 2
    return _Plan(grid, mids, even, block, scales, divisors, mean, global_scale)


def _e8m0_value(scales: torch.Tensor) -> torch.Tensor:
    """float32 2^(stored - 127) of E8M0 biased exponents (2^-127 is a float32 subnormal)."""
    shared = scales.to(torch.float32) - _E8M0_BIAS
    return torch.ldexp(torch.ones_like(shared), shared)


def _plan(x: torch.Tensor, spec: QuantSpec) -> tuple[_Plan, torch.Tensor]:
    """Scales, codebook and (centered) data for ``x``; returns the plan and the data to encode."""
    if spec.is_baseline:
        raise SpecError("fp16 is the unquantized baseline: there is nothing to quantize")
    n = x.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    mean = None
    if spec.center:
        mean = center_mean(x)
        x = x - mean.float()
    block = n if spec.block_size is None else spec.block_size
    if spec.dtype in MICROSCALING_DTYPES:
        return _microscaling_plan(x, spec, block, mean), x
    grid = codebook_for(spec, x if spec.dtype == "quantile" else None).to(x.device)
    if spec.dtype == "quantile":
        # stored (and counted) as fp16: quantize with exactly the stored values
        grid = grid.to(torch.float16).float().unique()
    return _absmax_plan(x, grid, block, spec.scale_dtype, mean), x


def _chunk_len(block: int, n: int) -> int:
    """Values per chunk: whole blocks, a multiple of 8 (whole packed bytes for every k)."""
    if block >= n:
        return min(n, max(8, CHUNK_VALUES - CHUNK_VALUES % 8))
    per = max(1, CHUNK_VALUES // (8 * block))
    return per * 8 * block


def _divisor_of(plan: _Plan, start: int, stop: int) -> torch.Tensor:
    """Per-value fp32 divisors for values ``[start, stop)``."""
    if plan.divisors.numel() == 1:
        return plan.divisors.expand(stop - start)
    b0 = start // plan.block
    b1 = -(-stop // plan.block)
    d = plan.divisors[b0:b1].repeat_interleave(plan.block)
    offset = start - b0 * plan.block
    return d[offset : offset + stop - start]


def _encode(xc: torch.Tensor, s: torch.Tensor, plan: _Plan) -> torch.Tensor:
    xn = torch.where(s != 0, xc / s, torch.zeros_like(xc))
    codes = torch.bucketize(xn, plan.mids, right=False)
    if plan.even is not None:
        upper = torch.bucketize(xn, plan.mids, right=True)  # differs only on an exact tie
        tie_even = (upper != codes) & plan.even[upper.clamp(max=len(plan.grid) - 1)]
        codes = torch.where(tie_even, upper, codes)
    return codes


def _decode(codes: torch.Tensor, s: torch.Tensor, plan: _Plan) -> torch.Tensor:
    y = plan.grid[codes.long()] * s
    if plan.mean is not None:
        y = y + plan.mean.float()
    return y


def _chunks(n: int, block: int):
    step = _chunk_len(block, n)
    for start in range(0, n, step):
        yield start, min(n, start + step)


# ----------------------------------------------------------------------------- QTensor
@dataclass
class QTensor:
    """A quantized tensor: packed codes, block constants, codebook and what undoes them.

    ``codes``: 1-D uint8, ``ceil(n * k / 8)`` bytes (see :mod:`kbit.packing`).
    ``scales``: one block constant per block in its storage dtype (fp16/bf16/fp32; E8M0 as
    uint8 biased exponents; E4M3 as float8_e4m3fn). ``codebook``: float32 values a code
    decodes to before scaling (raw element grid for microscaling types). ``extras``:
    ``mean`` (fp16 scalar, centered specs) and ``global_scale`` (fp32 scalar, nvfp4).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: QuantSpec
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_blocks(self) -> int:
        """Number of block constants (1 when the whole tensor is one block)."""
        b = self.spec.block_size
        return 1 if b is None else -(-self.numel // b)

    @property
    def bits(self) -> int:
        """Storage bits: codes, block constants and the per-tensor extras."""
        spec = self.spec
        return spec.bits * self.numel + spec.scale_bits * self.n_blocks + extra_bits(spec)

    def unpacked_codes(self) -> torch.Tensor:
        """The codes as a 1-D uint8 tensor of ``numel`` entries."""
        return packing.unpack(self.codes, self.spec.bits, self.numel)

    def _plan(self) -> _Plan:
        grid = self.codebook.to(self.codes.device, torch.float32)
        even = None
        if self.spec.dtype in MICROSCALING_DTYPES:
            even = element_grid(self.spec).even.to(grid.device)
        block = self.numel if self.spec.block_size is None else self.spec.block_size
        g = self.extras.get("global_scale")
        if self.spec.dtype == "nvfp":
            divisors = self.scales.float() * g
        elif self.spec.dtype in ("mxfp", "mxint"):
            divisors = _e8m0_value(self.scales)
        else:
            divisors = self.scales.float()
        mids = (grid[:-1] + grid[1:]) / 2
        return _Plan(grid, mids, even, block, self.scales, divisors, self.extras.get("mean"), g)

    def dequantize(self) -> torch.Tensor:
        """The dequantized tensor, same shape and dtype as the original."""
        plan = self._plan()
        n = self.numel
        codes = self.unpacked_codes()
        out = torch.empty(n, dtype=self.dtype, device=self.codes.device)
        for start, stop in _chunks(n, plan.block):
            s = _divisor_of(plan, start, stop)
            out[start:stop] = _decode(codes[start:stop], s, plan).to(self.dtype)
        return out.view(self.shape)

    def to(self, device: torch.device | str) -> QTensor:
        """A copy on ``device``."""
        return QTensor(
            self.codes.to(device),
            self.scales.to(device),
            self.codebook.to(device),
            self.shape,
            self.dtype,
            self.spec,
            {k: v.to(device) for k, v in self.extras.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": {name: Tensor}, "meta": JSON-able dict}``, safe for safetensors.

        Write with ``safetensors.torch.save_file(d["tensors"], path,
        metadata={"kbit": json.dumps(d["meta"])})``; no pickle is involved.
        """
        tensors = {"codes": self.codes, "scales": self.scales, "codebook": self.codebook}
        tensors.update({f"extra.{k}": v for k, v in self.extras.items()})
        meta = {
            "format": FORMAT_VERSION,
            "quant": self.spec.id,
            "spec": {
                k: v for k, v in self.spec.to_dict().items() if k not in ("quant", "scale_bits")
            },
            "shape": list(self.shape),
            "dtype": _DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "bits": self.bits,
        }
        return {"tensors": {k: v.contiguous() for k, v in tensors.items()}, "meta": meta}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> QTensor:
        """Rebuild a QTensor from :meth:`state_dict` output (``meta`` may be a JSON string)."""
        meta = d["meta"]
        if isinstance(meta, str):
            meta = json.loads(meta)
        if meta.get("format") != FORMAT_VERSION:
            got = meta.get("format")
            raise ValueError(f"QTensor format {got!r} is not supported (expected {FORMAT_VERSION})")
        if meta["dtype"] not in _NAME_DTYPES:
            raise ValueError(f"dtype {meta['dtype']!r}: allowed are {sorted(_NAME_DTYPES)}")
        tensors = d["tensors"]
        extras = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
        q = cls(
            codes=tensors["codes"],
            scales=tensors["scales"],
            codebook=tensors["codebook"],
            shape=tuple(int(s) for s in meta["shape"]),
            dtype=_NAME_DTYPES[meta["dtype"]],
            spec=QuantSpec.from_dict(meta["spec"]),
            extras=extras,
        )
        expected = packing.packed_nbytes(q.numel, q.spec.bits)
        if q.codes.numel() != expected:
            raise ValueError(f"codes has {q.codes.numel()} bytes, shape {q.shape} needs {expected}")
        if q.scales.numel() != q.n_blocks:
            raise ValueError(f"scales has {q.scales.numel()} entries, expected {q.n_blocks}")
        return q


# ----------------------------------------------------------------------------- public API
def quantize(w: torch.Tensor, spec: QuantSpec | str) -> QTensor:
    """Quantize ``w`` blockwise with ``spec`` (see the module docstring for the exact rules)."""
    spec = QuantSpec.parse(spec)
    x = _flat_f32(w)
    plan, x = _plan(x, spec)
    n = x.numel()
    packed = torch.empty(packing.packed_nbytes(n, spec.bits), dtype=torch.uint8, device=x.device)
    for start, stop in _chunks(n, plan.block):
        codes = _encode(x[start:stop], _divisor_of(plan, start, stop), plan).to(torch.uint8)
        b0 = start * spec.bits // 8  # chunk starts are multiples of 8: whole bytes
        p = packing.pack(codes, spec.bits)
        packed[b0 : b0 + p.numel()] = p
    extras: dict[str, torch.Tensor] = {}
    if plan.mean is not None:
        extras["mean"] = plan.mean
    if plan.global_scale is not None:
        extras["global_scale"] = plan.global_scale
    return QTensor(packed, plan.scales, plan.grid, tuple(w.shape), w.dtype, spec, extras)


def dequantize(q: QTensor) -> torch.Tensor:
    """Function form of :meth:`QTensor.dequantize`."""
    return q.dequantize()


def _kernel_fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The fused GPU path (every type), or None when it does not apply or is missing."""
    if not w.is_cuda or w.dtype not in _SCALE_TORCH.values():
        return None
    try:
        from kbit import kernels
    except ImportError:
        return None
    if not kernels.available(w):
        return None
    _check_input(w)
    src = w.detach().reshape(-1)  # the kernel reads fp16/bf16/fp32 and computes in fp32
    mean = None
    if spec.center:
        src = src.float()
        mean = center_mean(src)
        src = src - mean.float()
    if spec.dtype in MICROSCALING_DTYPES:
        y = kernels.fake_quantize_microscaling(src, spec)
    else:
        grid = codebook_for(spec, src if spec.dtype == "quantile" else None)
        if spec.dtype == "quantile":
            grid = grid.to(torch.float16).float().unique()
        scale_dtype = _SCALE_TORCH[spec.scale_dtype]
        y = kernels.fake_quantize_blockwise(src, grid, spec.block_size, scale_dtype)
    if mean is not None:
        y = y + mean.float()
    return y.to(w.dtype).view(w.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec | str) -> torch.Tensor:
    """``quantize(w, spec).dequantize()``, bit-exactly, without packing.

    On CUDA the fused kernels of ``kbit.kernels`` run when available (absmax types); otherwise
    the same torch reference runs chunk by chunk. The fp16 baseline returns ``w`` unchanged.
    """
    spec = QuantSpec.parse(spec)
    if spec.is_baseline:
        return w
    y = _kernel_fake_quantize(w, spec)
    if y is not None:
        return y
    plan, x = _plan(_flat_f32(w), spec)
    n = x.numel()
    out = torch.empty(n, dtype=w.dtype, device=x.device)
    for start, stop in _chunks(n, plan.block):
        s = _divisor_of(plan, start, stop)
        out[start:stop] = _decode(_encode(x[start:stop], s, plan), s, plan).to(w.dtype)
    return out.view(w.shape)


def _scale_name(scale_dtype: str | torch.dtype) -> str:
    if isinstance(scale_dtype, torch.dtype):
        names = {v: k for k, v in _SCALE_TORCH.items()}
        if scale_dtype not in names:
            raise SpecError(f"scale_dtype {scale_dtype}: allowed are {list(_SCALE_TORCH.values())}")
        return names[scale_dtype]
    return scale_dtype


def _reference_plan(
    x: torch.Tensor, codebook: torch.Tensor, block_size: int | None, scale_dtype: str | torch.dtype
) -> tuple[_Plan, torch.Tensor]:
    grid = codebook.detach().to(x.device, torch.float32).reshape(-1)
    if grid.numel() < 1 or grid.numel() > 256 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("codebook must be 1-D, strictly increasing, with 1..256 entries")
    flat = _flat_f32(x)
    if flat.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size={block_size!r}: allowed are integers >= 1, or None")
    block = flat.numel() if block_size is None else block_size
    return _absmax_plan(flat, grid, block, _scale_name(scale_dtype), None), flat


def quantize_blockwise_reference(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: str | torch.dtype = "fp16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax blockwise codes (1-D uint8, unpacked) and block scales for any sorted codebook.

    Steps 1-4 of the module docstring without a spec, so other implementations (GPU kernels,
    bitsandbytes) can be compared against exactly this function with the same codebook.
    """
    plan, flat = _reference_plan(x, codebook, block_size, scale_dtype)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    for start, stop in _chunks(flat.numel(), plan.block):
        s = _divisor_of(plan, start, stop)
        codes[start:stop] = _encode(flat[start:stop], s, plan).to(torch.uint8)
    return codes, plan.scales


def fake_quantize_blockwise_reference(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int | None,
    scale_dtype: str | torch.dtype = "fp16",
) -> torch.Tensor:
    """``codebook[code] * scale`` for :func:`quantize_blockwise_reference`, shape/dtype of x.

    The torch reference of ``kbit.kernels.fake_quantize_blockwise`` (same arguments).
    """
    plan, flat = _reference_plan(x, codebook, block_size, scale_dtype)
    out = torch.empty(flat.numel(), dtype=x.dtype, device=flat.device)
    for start, stop in _chunks(flat.numel(), plan.block):
        s = _divisor_of(plan, start, stop)
        out[start:stop] = _decode(_encode(flat[start:stop], s, plan), s, plan).to(x.dtype)
    return out.view(x.shape)


def block_scales(
    values_2d: torch.Tensor, spec: QuantSpec | str, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Block constants of the blocks given as the rows of ``values_2d``, as :func:`quantize`
    computes them: ``(stored scales, fp32 divisors s, nvfp global scale or None)``.

    For quantizers that fix blocks one at a time (GPTQ fixes a block from error-updated
    values): absmax types round the row absmax to ``spec.scale_dtype``, mxfp/mxint take the
    E8M0 exponent from ``frexp``, nvfp the E4M3 ratio to ``6 * global_scale``. nvfp needs the
    whole tensor's global scale; without ``global_scale`` it is taken from ``values_2d``, so
    ``block_scales(x.view(1, -1), spec)[2]`` is the one :func:`quantize` stores for ``x``.
    A row may repeat one of its own values (padding a short block leaves its absmax as is).
    """
    spec = QuantSpec.parse(spec)
    if spec.is_baseline:
        raise SpecError("fp16 is the unquantized baseline: it has no block constants")
    if values_2d.dim() != 2 or values_2d.numel() == 0:
        raise ValueError(f"values_2d must be a non-empty 2-D tensor, got {tuple(values_2d.shape)}")
    absmax = values_2d.detach().to(torch.float32).abs().amax(dim=1)
    if spec.dtype not in MICROSCALING_DTYPES:
        scales = round_scale(absmax, spec.scale_dtype)
        return scales, scales.float(), None
    g = element_grid(spec)
    if spec.dtype == "mxfp" or spec.dtype == "mxint":
        _, e = torch.frexp(absmax)
        shared = torch.where(absmax > 0, e.to(torch.int32) - 1 - g.emax, -_E8M0_BIAS)
        scales = (shared.clamp(-_E8M0_BIAS, _E8M0_BIAS) + _E8M0_BIAS).to(torch.uint8)
        return scales, _e8m0_value(scales), None
    if global_scale is None:  # scalar arithmetic on the CPU, as in _microscaling_plan
        amax = absmax.amax().cpu()
        global_scale = amax / torch.tensor(_E4M3_MAX * g.max, dtype=torch.float32)
    gs_cpu = global_scale.detach().cpu().to(torch.float32)
    denom = torch.full_like(absmax, (g.max * gs_cpu).item())
    ratio = torch.where(denom > 0, absmax / denom, torch.zeros_like(absmax))
    scales = ratio.clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn)
    gs = gs_cpu.to(absmax.device)
    return scales, scales.float() * gs, gs
