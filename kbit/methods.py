"""One entry point for every way a spec quantizes a model: round to nearest, GPTQ, a mixed
assignment. The artifact writer and the in-process evaluation both call :func:`quantize_with`, so
what a spec means is decided in one place and the two paths give the same weights.

- round to nearest (``method: rtn``): :func:`kbit.model_quant.quantize_model`;
- GPTQ (``method: gptq``): :func:`kbit.gptq.gptq_quantize_model` on calibration tokens
  (:mod:`kbit.calibration`), sequentially block by block; its report (damping used, errors,
  timings) goes to kbit.json;
- mixed precision (``mixed_ratio`` set): the units a search chose (:mod:`kbit.mixed`) are rounded
  to nearest in the low format, the rest stays 16-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kbit.accounting import sqnr_stats, summarize
from kbit.settings import QuantizeOptions
from kbit.spec import QuantSpec


class MethodInputError(ValueError):
    """A spec whose method needs an input that was not given (calibration, an assignment)."""


@dataclass
class Quantized:
    """What a spec did to a model: per-tensor rows, the bit summary and method details."""

    rows: list[dict]
    summary: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)


def quantize_with(
    model: nn.Module,
    spec: QuantSpec | str,
    options: QuantizeOptions | None = None,
    *,
    calibration: torch.Tensor | None = None,
    gptq: Mapping[str, Any] | None = None,
    assignment: Any = None,
    on_tensor: Callable[[Any], None] | None = None,
) -> Quantized:
    """Quantize ``model`` in place as ``spec`` says; see the module docstring.

    ``calibration`` (int64 [n_samples, seq_len]) is needed by GPTQ, ``gptq`` holds its settings
    (``damp``, ``act_order``, ``batch_size``), ``assignment`` (a :class:`kbit.mixed.Assignment`)
    is needed by a mixed spec.
    """
    spec = QuantSpec.parse(spec)
    options = options or QuantizeOptions()
    if spec.is_mixed:
        from kbit.mixed import apply_assignment, mixed_summary

        if assignment is None:
            raise MethodInputError(f"{spec.id} is a mixed spec: it needs its search's assignment")
        rows = apply_assignment(model, spec, assignment, on_tensor=on_tensor, **options.kwargs())
        return Quantized(rows, mixed_summary(rows, assignment), {"mixed": assignment.to_dict()})
    if spec.method == "gptq":
        from kbit.gptq import gptq_quantize_model

        if calibration is None:
            raise MethodInputError(f"{spec.id} uses GPTQ: it needs calibration tokens")
        settings = dict(gptq or {})
        rows, report = gptq_quantize_model(
            model,
            spec,
            calibration,
            **options.kwargs(),
            damp=float(settings.get("damp", 0.01)),
            act_order=bool(settings.get("act_order", False)),
            batch_size=int(settings.get("batch_size", 8)),
            on_tensor=on_tensor,
        )
        return Quantized(rows, {**summarize(rows), **sqnr_stats(rows)}, {"gptq": report})
    from kbit.model_quant import quantize_model

    rows = quantize_model(model, spec, **options.kwargs(), on_tensor=on_tensor)
    return Quantized(rows, {**summarize(rows), **sqnr_stats(rows)})
