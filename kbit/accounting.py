"""Bit accounting: the x axis of every scaling plot ("total model bits").

PAPER.md: total model bits = sum over quantized tensors of (k * n + 16 * ceil(n / B)) + outlier
columns at 16 bits + 16 * (parameters left unquantized); the 16-bit baseline is 16 * N.
Block constants cost ``spec.scale_bits`` each (16 for the paper's fp16 absmax, 8 for MX/NV
scales), and a data type that must store something per tensor (the quantile type's codebook,
centering's mean, NVFP4's second-level scale) adds those "extras".

``summarize`` adds up the per-parameter rows of :func:`kbit.model_quant.quantize_model` (what was
actually stored); ``predict_tensor_bits`` gives the same number from the spec alone, so analysis
code can place points on the bits axis without quantizing anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from kbit.spec import QuantSpec


def n_blocks(spec: QuantSpec, n: int) -> int:
    """Block constants stored for ``n`` quantized values (one per tensor when B is None)."""
    if n <= 0:
        return 0
    return 1 if spec.block_size is None else math.ceil(n / spec.block_size)


def extra_bits(spec: QuantSpec) -> int:
    """Per-tensor storage beyond codes and block constants, as ``kbit.blockwise`` stores it.

    The quantile type's codebook (2^k entries at 16 bits), a centering mean (16 bits) and the
    NVFP4 global scale (fp32). Fixed codebooks are part of the data type and cost nothing.
    """
    extra = 0
    if spec.dtype == "quantile":
        extra += 16 * 2**spec.bits
    if spec.center:
        extra += 16
    if spec.dtype == "nvfp":
        extra += 32
    return extra


def predict_tensor_bits(
    spec: QuantSpec | str, n: int, outlier_cols: int = 0, out_features: int = 0
) -> int:
    """Storage bits of one tensor of ``n`` parameters under ``spec``.

    With proxy quantization ``outlier_cols`` input columns of an ``[out_features, in]`` matrix
    are kept at 16 bit and the remaining ``n - outlier_cols * out_features`` values are quantized
    (blocking runs over those only): k * n_q + scale_bits * ceil(n_q / B) + extras
    + 16 * outlier_cols * out_features. The baseline is 16 * n.
    """
    spec = QuantSpec.parse(spec)
    if n < 0 or outlier_cols < 0 or out_features < 0:
        raise ValueError(
            f"n={n}, outlier_cols={outlier_cols}, out_features={out_features}: all must be >= 0"
        )
    if spec.is_baseline:
        return 16 * n
    kept = outlier_cols * out_features
    if kept > n:
        raise ValueError(
            f"{outlier_cols} outlier columns x {out_features} outputs = {kept} values "
            f"exceed the tensor's {n} parameters"
        )
    n_q = n - kept
    return spec.bits * n_q + spec.scale_bits * n_blocks(spec, n_q) + extra_bits(spec) + 16 * kept


def _counted(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of distinct tensors: aliases of a tied tensor (``tied_to`` set) are counted once."""
    return [r for r in rows if not r.get("tied_to")]


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Model-level totals of per-parameter rows (tied weights once).

    Returns n_params, n_params_quantized, total_bits, bits_per_param, baseline_bits (16 * N),
    fraction_quantized (quantized params / all params, the Q_r of mixed-precision scaling laws)
    and total_gb (total_bits / 8 / 1e9).
    """
    rows = _counted(rows)
    n_params = sum(int(r["n_params"]) for r in rows)
    n_quant = sum(int(r["n_params"]) for r in rows if r["quantized"])
    total = sum(int(r["bits"]) for r in rows)
    return {
        "n_params": n_params,
        "n_params_quantized": n_quant,
        "total_bits": total,
        "bits_per_param": total / n_params if n_params else float("nan"),
        "baseline_bits": 16 * n_params,
        "fraction_quantized": n_quant / n_params if n_params else float("nan"),
        "total_gb": total / 8 / 1e9,
    }


def sqnr_stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean and min SQNR (dB) of quantized tensors; exact ones (inf) are left out of the mean."""
    vals = [float(r["sqnr_db"]) for r in _counted(rows) if r.get("sqnr_db") is not None]
    finite = [v for v in vals if math.isfinite(v)]
    return {
        "sqnr_db_mean": sum(finite) / len(finite) if finite else float("nan"),
        "sqnr_db_min": min(vals) if vals else float("nan"),
    }
