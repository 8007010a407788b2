r"""GPTQ (Frantar et al., ICLR 2023) for every kbit data type, block size and scale dtype.

GPTQ quantizes a linear layer's weight ``W`` [out, in] one input column at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by the inverse of the
layer's input Hessian ``H = 2 X X^T`` (summed over the calibration tokens), so that the layer
output ``W X`` changes as little as possible. The steps follow the reference implementation
(IST-DASLab/gptq, ``gptq.py``), all in float32:

1. dead inputs (``diag H == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``;
2. optional act-order: columns are processed in order of decreasing ``diag H`` (stable sort);
3. ``lambda = damp * mean(diag H)`` is added to the diagonal; if a Cholesky factorisation fails,
   ``damp`` is multiplied by 10 (a zero damp first becomes :data:`DEFAULT_DAMP`) up to
   :data:`MAX_ESCALATIONS` times, and what was used is recorded;
4. ``U`` = upper Cholesky factor of ``H^-1``; row ``i`` of ``U`` divided by ``U[i, i]`` is the
   direction in which column ``i``'s error ``w - q`` is subtracted from the later columns
   (the OBS update, exact in exact arithmetic);
5. lazy batches: inside a group of :data:`LAZY_COLUMNS` columns the update is applied at once,
   to the columns beyond the group only when the group is done (one matrix product).

kbit's blockwise formats (see :mod:`kbit.blockwise`) enter as follows. Blocks are B consecutive
values of the row-major flattened [out, in] matrix, the packed layout :func:`kbit.quantize`
writes, so a block may straddle rows when B does not divide ``in``. A block's constant is fixed
from the *current* (error-updated) values of all its elements at the moment the column loop first
reaches any of its columns in processing order; values beyond the current lazy group get their
pending in-group updates applied before the absmax is taken, so the result equals the non-lazy
algorithm up to float rounding. ``block_size=None`` is one constant per tensor, fixed from the
original weights. Per-tensor parts are fixed from the original tensor before anything else: the
quantile codebook, the centering mean (GPTQ then runs on ``W - mean``; dead columns are zeroed
in that centered space, so they cost no error) and nvfp's global scale. Codes are chosen exactly
as :mod:`kbit.blockwise` chooses them: divide by the block's fp32 divisor, count the fp32
midpoints below (ties to the lower code for absmax types; microscaling types break exact ties
to the even element, done here by moving those midpoints one float down). The result is a
:class:`~kbit.blockwise.QTensor` in the ordinary packed layout, codes and scales in the original
column order, with ``spec.method == "gptq"``: its storage bits are those of round-to-nearest.

:func:`gptq_quantize_model` runs GPTQ over a transformers model block by block with calibration
token ids, each block seeing the inputs produced by the already-quantized blocks before it.

Speed: the column loop costs five small kernels per column (divide, bucketize, codebook gather,
``w - q * s``, rank-1 update of the group), so it is bound by launch overhead; on CUDA a run of
columns between two block fixes that recurs (the same offsets in every lazy group, as in the
natural order) is replayed from a captured CUDA graph, same kernels and results. On one H200 a
Pythia-1.4B-shaped model (344,064 columns, 128 x 2048 calibration tokens) takes about 18 s per
spec at 4 bits, B=64, and 23 s with act-order (``benchmarks/bench_gptq.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kbit import packing
from kbit.blockwise import QTensor, block_scales, center_mean, quantize
from kbit.codebooks import codebook_for, element_grid
from kbit.model_quant import (
    LINEAR_TYPES,
    QuantizedWeight,
    TensorPlan,
    _sqnr_db,
    find_blocks,
    make_plans,
    parameter_rows,
    quantize_weight,
    select_parameters,
    sixteen_bit_dtype,
    untie_partially_selected,
)
from kbit.spec import MICROSCALING_DTYPES, QuantSpec, SpecError

logger = logging.getLogger(__name__)

#: relative dampening: lambda = damp * mean(diag H) (the reference's percdamp)
DEFAULT_DAMP = 0.01
#: columns per lazy batch (the reference's blocksize)
LAZY_COLUMNS = 128
#: factor applied to damp when a Cholesky factorisation fails, and how often at most
DAMP_ESCALATION = 10.0
MAX_ESCALATIONS = 4
#: calibration sequences per forward pass (model level)
DEFAULT_BATCH_SIZE = 8
#: elements x pending columns gathered at once when correcting straddling blocks
_GATHER_LIMIT = 1 << 22


class GPTQError(RuntimeError):
    """GPTQ could not run: e.g. the Hessian stays singular however much it is dampened."""


# ----------------------------------------------------------------------------- small helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gptq_spec(spec: QuantSpec | str) -> QuantSpec:
    """The spec with ``method="gptq"`` (an rtn or gptq spec is accepted)."""
    spec = QuantSpec.parse(spec)
    if getattr(spec, "mixed_ratio", None) is not None:
        raise SpecError(
            f"spec {spec.id} is a mixed-precision spec: GPTQ quantizes every tensor it is given; "
            "quantize the chosen units with the low format (spec.low_spec()) instead"
        )
    return spec if spec.method == "gptq" else spec.replace(method="gptq")


def _check_layer_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"GPTQ needs a non-empty 2-D weight [out, in], got {tuple(weight.shape)}")
    if not torch.is_floating_point(weight) or not torch.is_floating_point(hessian):
        raise TypeError(
            f"weight and hessian must be floating point, got {weight.dtype} and {hessian.dtype}"
        )
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"hessian must be [{n}, {n}] for a weight of shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("the weight contains NaN or inf")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the hessian contains NaN or inf")
    if bool((hessian.diagonal() < 0).any()):
        raise ValueError("the hessian has negative diagonal entries: it is not a sum of 2 x x^T")


# ----------------------------------------------------------------------------- codebook
@dataclass
class _Grid:
    """What the code search needs: values a code decodes to, search midpoints, tensor extras."""

    values: torch.Tensor  # fp32, the QTensor's codebook
    mids: torch.Tensor  # fp32 midpoints, those resolved upwards moved one float down
    mean: torch.Tensor | None  # fp16 scalar (spec.center)
    global_scale: torch.Tensor | None  # fp32 scalar (nvfp)


def _grid(x_flat: torch.Tensor, spec: QuantSpec) -> tuple[_Grid, torch.Tensor]:
    """Codebook and per-tensor constants of the original flat fp32 tensor, and the data to
    quantize (centered when the spec says so)."""
    mean = None
    if spec.center:
        mean = center_mean(x_flat)
        x_flat = x_flat - mean.float()
    global_scale = None
    if spec.dtype in MICROSCALING_DTYPES:
        eg = element_grid(spec)
        values, even = eg.values.to(x_flat.device), eg.even.to(x_flat.device)
        if spec.dtype == "nvfp":
            global_scale = block_scales(x_flat.view(1, -1), spec)[2]
    else:
        values = codebook_for(spec, x_flat if spec.dtype == "quantile" else None).to(x_flat.device)
        if spec.dtype == "quantile":  # stored as fp16: search with exactly the stored values
            values = values.to(torch.float16).float().unique()
        even = None
    mids = (values[:-1] + values[1:]) / 2
    if even is not None:
        # kbit.blockwise resolves an exact tie at mids[j] upwards iff values[j + 1] is even;
        # counting "mid < xn" against the next float below mids[j] does exactly that
        down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
        mids = torch.where(even[1:], down, mids)
    return _Grid(values, mids, mean, global_scale), x_flat


# ----------------------------------------------------------------------------- block layouts
def _divisor_pair(div: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(divisor for the code search, multiplier for the value): a zero scale divides as inf,
    so ``x / s`` is 0 there, as kbit.blockwise's ``xn = 0 where s == 0``."""
    return torch.where(div == 0, torch.full_like(div, math.inf), div), div


class _TensorLayout:
    """``block_size=None``: one constant, fixed from the original tensor before the loop."""

    def __init__(self, x_flat: torch.Tensor, spec: QuantSpec, out: int, grid: _Grid) -> None:
        scales, div, _ = block_scales(x_flat.view(1, -1), spec, grid.global_scale)
        self.scales = scales
        sdiv, smul = _divisor_pair(div)
        self.sdiv, self.smul = sdiv.expand(out), smul.expand(out)
        self.events: dict[int, Any] = {}

    def load_divisors(self, a: int, b: int, sdiv: torch.Tensor, smul: torch.Tensor) -> None:
        sdiv.copy_(self.sdiv.expand(b - a, -1))
        smul.copy_(self.smul.expand(b - a, -1))

    def fix(self, *args: Any) -> None:  # pragma: no cover - there are no events
        raise AssertionError("a per-tensor constant has no fix events")

    def stored_scales(self) -> torch.Tensor:
        return self.scales


@dataclass
class _GroupEvent:
    """Column groups fixed at one processing position, with their indices on the device."""

    groups: torch.Tensor  # group ids
    positions: torch.Tensor  # processing positions of their columns, group by group
    pending_rows: torch.Tensor  # entries of ``positions`` beyond the lazy group (need updates)
    pending_pos: torch.Tensor  # ... and their positions


class _AlignedLayout:
    """B divides ``in``: block (r, g) is row r, columns [g B, (g + 1) B); all rows of a column
    group are fixed together, when the loop reaches the group's first column."""

    def __init__(
        self,
        spec: QuantSpec,
        grid: _Grid,
        out: int,
        perm: torch.Tensor,
        lazy: int,
        device: torch.device,
    ) -> None:
        n = perm.numel()
        b = spec.block_size
        self.spec, self.grid, self.block = spec, grid, b
        self.n_groups = n // b
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(n)
        pos_by_group = pos.view(self.n_groups, b)  # processing position of each column
        by_time: dict[int, list[int]] = {}
        for g, t in enumerate(pos_by_group.amin(dim=1).tolist()):
            by_time.setdefault(t, []).append(g)
        self.events: dict[int, _GroupEvent] = {}
        for t, groups in by_time.items():  # index tensors go to the device before the loop
            positions = pos_by_group[groups].reshape(-1)
            beyond = (positions >= min((t // lazy + 1) * lazy, n)).nonzero().squeeze(1)
            self.events[t] = _GroupEvent(
                *(
                    v.to(device)
                    for v in (torch.tensor(groups), positions, beyond, positions[beyond])
                )
            )
        self.group_of = (perm // b).to(device)  # column group of each processing position
        self.scales: torch.Tensor | None = None
        self.sdiv = torch.full((self.n_groups, out), math.nan, device=device)
        self.smul = torch.full((self.n_groups, out), math.nan, device=device)

    def load_divisors(self, a: int, b: int, sdiv: torch.Tensor, smul: torch.Tensor) -> None:
        torch.index_select(self.sdiv, 0, self.group_of[a:b], out=sdiv)
        torch.index_select(self.smul, 0, self.group_of[a:b], out=smul)

    def fix(
        self, t: int, xt: torch.Tensor, err: torch.Tensor, hn: torch.Tensor, i1: int, i2: int
    ) -> None:
        ev = self.events[t]
        vals = xt.index_select(0, ev.positions)  # [groups * B, out]
        if err.shape[0] and ev.pending_rows.numel():
            pending = hn[i1:t].index_select(1, ev.pending_pos)
            vals[ev.pending_rows] -= pending.t() @ err
        ng, out = ev.groups.numel(), xt.shape[1]
        blocks = vals.view(ng, self.block, out).transpose(1, 2).reshape(ng * out, self.block)
        scales, div, _ = block_scales(blocks, self.spec, self.grid.global_scale)
        if self.scales is None:
            self.scales = torch.empty((self.n_groups, out), dtype=scales.dtype, device=xt.device)
        self.scales[ev.groups] = scales.view(ng, out)
        sdiv, smul = _divisor_pair(div.view(ng, out))
        self.sdiv[ev.groups] = sdiv
        self.smul[ev.groups] = smul

    def stored_scales(self) -> torch.Tensor:
        assert self.scales is not None
        return self.scales.t().reshape(-1)  # block id r * n_groups + g


def _flat_first_positions(out: int, n: int, block: int, pos: torch.Tensor) -> torch.Tensor:
    """For every block of the flattened matrix, the first processing position among its columns.

    A block covers a cyclic run of columns starting at ``start % n``; blocks with the same start
    and length share the answer, so only the distinct runs (at most ``n``) are evaluated.
    """
    total = out * n
    starts = torch.arange(0, total, block, dtype=torch.int64)
    spans = (total - starts).clamp(max=block).clamp(max=n)
    key = (starts % n) * (n + 1) + spans
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.empty(uniq.numel(), dtype=torch.int64)
    width = int(spans.max())
    step = max(1, _GATHER_LIMIT // width)
    offsets = torch.arange(width, dtype=torch.int64)
    for c0 in range(0, uniq.numel(), step):
        u = uniq[c0 : c0 + step]
        a, span = u // (n + 1), u % (n + 1)
        p = pos[(a[:, None] + offsets[None]) % n]
        p = torch.where(offsets[None] < span[:, None], p, torch.full_like(p, n))
        first[c0 : c0 + step] = p.amin(dim=1)
    return first[inverse]


class _FlatLayout:
    """B does not divide ``in``: blocks straddle rows; each block is fixed on its own, when the
    loop reaches the first of its columns (gathered from the current values of all its rows)."""

    def __init__(
        self, spec: QuantSpec, grid: _Grid, out: int, perm: torch.Tensor, device: torch.device
    ) -> None:
        n = perm.numel()
        self.spec, self.grid, self.block = spec, grid, spec.block_size
        self.n, self.total = n, out * n
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(n)
        first = _flat_first_positions(out, n, self.block, pos)
        order = torch.argsort(first, stable=True)
        times, counts = torch.unique_consecutive(first[order], return_counts=True)
        self.events = {
            t: ids.to(device)
            for t, ids in zip(times.tolist(), order.split(counts.tolist()), strict=True)
        }
        self.n_blocks = first.numel()
        self.pos = pos.to(device)
        self.offsets = torch.arange(self.block, device=device)
        self.scales: torch.Tensor | None = None
        self.sdiv = torch.full((n, out), math.nan, device=device)
        self.smul = torch.full((n, out), math.nan, device=device)

    def load_divisors(self, a: int, b: int, sdiv: torch.Tensor, smul: torch.Tensor) -> None:
        sdiv.copy_(self.sdiv[a:b])
        smul.copy_(self.smul[a:b])

    def fix(
        self, t: int, xt: torch.Tensor, err: torch.Tensor, hn: torch.Tensor, i1: int, i2: int
    ) -> None:
        ids = self.events[t]
        idx = (ids[:, None] * self.block + self.offsets[None]).clamp(max=self.total - 1)
        rows, p = idx // self.n, self.pos[idx % self.n]  # a short last block repeats its end
        vals = xt[p, rows]
        m = err.shape[0]
        if m:
            step = max(1, _GATHER_LIMIT // (m * self.block))
            h = hn[i1:t]
            for c0 in range(0, ids.numel(), step):
                pc, rc = p[c0 : c0 + step], rows[c0 : c0 + step]
                pending = (h[:, pc] * err[:, rc]).sum(dim=0)
                vals[c0 : c0 + step] -= torch.where(pc >= i2, pending, torch.zeros_like(pending))
        scales, div, _ = block_scales(vals, self.spec, self.grid.global_scale)
        if self.scales is None:
            self.scales = torch.empty(self.n_blocks, dtype=scales.dtype, device=xt.device)
        self.scales[ids] = scales
        sdiv, smul = _divisor_pair(div)
        self.sdiv[p, rows] = sdiv[:, None].expand_as(p)
        self.smul[p, rows] = smul[:, None].expand_as(p)

    def stored_scales(self) -> torch.Tensor:
        assert self.scales is not None
        return self.scales


def _layout(
    spec: QuantSpec, grid: _Grid, x_flat: torch.Tensor, out: int, perm: torch.Tensor, lazy: int
):
    n = perm.numel()
    if spec.block_size is None:
        return _TensorLayout(x_flat, spec, out, grid)
    if n % spec.block_size == 0:
        return _AlignedLayout(spec, grid, out, perm, lazy, x_flat.device)
    return _FlatLayout(spec, grid, out, perm, x_flat.device)


# ----------------------------------------------------------------------------- factorisation
def _inverse_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, float, int]:
    """Upper Cholesky factor of (H + lambda I)^-1, escalating damp until it exists.

    Returns (U, relative damp used, lambda, escalations).
    """
    mean_diag = float(h.diagonal().mean())
    rel = float(damp)
    for escalations in range(MAX_ESCALATIONS + 1):
        lam = rel * mean_diag
        hd = h.clone()
        hd.diagonal().add_(lam)
        low, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, rel, lam, escalations
        if escalations < MAX_ESCALATIONS:
            logger.info("GPTQ: Cholesky failed at damp %g, retrying dampened more", rel)
        rel = rel * DAMP_ESCALATION if rel > 0 else DEFAULT_DAMP
    raise GPTQError(
        f"the Hessian is not positive definite even with damp {rel / DAMP_ESCALATION:g} "
        f"({MAX_ESCALATIONS} escalations from {damp:g}); check the calibration inputs"
    )


# ----------------------------------------------------------------------------- column loop
class _Workspace:
    """Static buffers of one lazy group and the in-group loop over a segment of its columns.

    A segment is a run of columns with no block fixed inside it. Per column: one division,
    one bucketize, one codebook gather, one fused ``w - q * s`` and one rank-1 update of the
    group's later columns; five small kernels. On CUDA a segment seen before is replayed from
    a captured CUDA graph (the kernels are too small for the launch overhead otherwise); the
    buffers stay in place, so the graphs of one layer are reused group after group.
    """

    def __init__(self, lazy: int, out: int, grid: _Grid, device: torch.device, graphs: bool):
        def buf(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.w, self.h, self.err = buf(lazy, out), buf(lazy, lazy), buf(lazy, out)
        self.sdiv, self.smul = buf(lazy, out), buf(lazy, out)
        self.codes = buf(lazy, out, dtype=torch.int64)
        self.values, self.mids = grid.values, grid.mids
        self.graphs = graphs and device.type == "cuda"
        self._seen: dict[tuple[int, int, int], int] = {}
        self._captured: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def run(self, size: int, k0: int, k1: int) -> None:
        """Columns ``k0 .. k1 - 1`` of a group of ``size`` columns."""
        key = (size, k0, k1)
        graph = self._captured.get(key)
        if graph is None and self.graphs and self._seen.get(key, 0) >= 1:
            graph = self._capture(key)
        if graph is not None:
            graph.replay()
            return
        self._seen[key] = self._seen.get(key, 0) + 1
        self._segment(size, k0, k1)

    def _segment(self, size: int, k0: int, k1: int) -> None:
        w, h, err, sdiv, smul, codes = self.w, self.h, self.err, self.sdiv, self.smul, self.codes
        values, mids = self.values, self.mids
        for k in range(k0, k1):
            x, c, e = w[k], codes[k], err[k]
            torch.bucketize(torch.div(x, sdiv[k]), mids, out=c)
            torch.addcmul(x, values.take(c), smul[k], value=-1, out=e)
            if k + 1 < size:
                w[k + 1 : size].addcmul_(h[k, k + 1 : size, None], e, value=-1)

    def _capture(self, key: tuple[int, int, int]) -> torch.cuda.CUDAGraph:
        # the plain capture API: torch.cuda.graph() would also run gc.collect() every time
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=self.w.device)
        stream.wait_stream(torch.cuda.current_stream(self.w.device))
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                self._segment(*key)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.w.device).wait_stream(stream)
        self._captured[key] = graph
        return graph


def _segments(events: dict, i1: int, i2: int) -> list[int]:
    """Group offsets where a segment starts: 0 and every position that fixes blocks."""
    return [0, *(i - i1 for i in range(i1 + 1, i2) if i in events)]


def _column_loop(
    xt: torch.Tensor, hn: torch.Tensor, layout: Any, grid: _Grid, lazy: int, graphs: bool
) -> torch.Tensor:
    """GPTQ over the rows of ``xt`` ([in, out], processing order), updated in place.

    ``hn`` is U with each row divided by its diagonal. A lazy group is copied into the
    workspace, processed segment by segment (blocks are fixed between segments, from ``xt``
    brought up to date), and its errors update the later columns with one matrix product.
    Returns the int64 codes, [in, out] in processing order.
    """
    n, out = xt.shape
    lazy = min(lazy, n)
    ws = _Workspace(lazy, out, grid, xt.device, graphs)
    codes = torch.empty((n, out), dtype=torch.int64, device=xt.device)
    events = layout.events
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        size = i2 - i1
        ws.w[:size].copy_(xt[i1:i2])
        ws.h[:size, :size].copy_(hn[i1:i2, i1:i2])
        starts = _segments(events, i1, i2)
        for k0, k1 in zip(starts, [*starts[1:], size], strict=True):
            if i1 + k0 in events:
                if k0:
                    xt[i1:i2].copy_(ws.w[:size])  # the in-group updates so far
                layout.fix(i1 + k0, xt, ws.err[:k0], hn, i1, i2)
            layout.load_divisors(i1 + k0, i1 + k1, ws.sdiv[k0:k1], ws.smul[k0:k1])
            ws.run(size, k0, k1)
        codes[i1:i2].copy_(ws.codes[:size])
        if i2 < n:
            xt[i2:].addmm_(hn[i1:i2, i2:].t(), ws.err[:size], alpha=-1)
    return codes


# ----------------------------------------------------------------------------- layer level
@dataclass
class GPTQResult:
    """One layer's GPTQ: the quantized tensor and how it was obtained.

    ``error_gptq`` / ``error_rtn``: tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T) with the
    Hessian as given (undamped) for GPTQ and for round-to-nearest of the same weight; NaN when
    ``errors=False`` or when tr(W H W^T) is 0 (nothing to be relative to).
    """

    qtensor: QTensor
    damp: float  # relative damp used (after escalations)
    damp_abs: float  # lambda added to diag H
    escalations: int
    dead_inputs: int
    error_gptq: float
    error_rtn: float
    seconds_factorize: float
    seconds_columns: float
    act_order: bool
    shape: tuple[int, int] = field(default=(0, 0))

    def summary(self) -> dict[str, Any]:
        """JSON-able fields (the QTensor left out)."""
        return {
            "shape": list(self.shape),
            "damp": self.damp,
            "damp_abs": self.damp_abs,
            "escalations": self.escalations,
            "dead_inputs": self.dead_inputs,
            "error_gptq": self.error_gptq,
            "error_rtn": self.error_rtn,
            "seconds_factorize": self.seconds_factorize,
            "seconds_columns": self.seconds_columns,
            "act_order": self.act_order,
        }


def _relative_errors(
    weight: torch.Tensor, hessian: torch.Tensor, w_hats: list[torch.Tensor]
) -> list[float]:
    """tr(E H E^T) / tr(W H W^T) for each E = W - W_hat, in float64."""
    h = hessian.to(weight.device, torch.float64)
    w = weight.to(torch.float64)
    ref = float(((w @ h) * w).sum())
    out = []
    for w_hat in w_hats:
        e = w - w_hat.to(torch.float64)
        out.append(float(((e @ h) * e).sum()) / ref if ref > 0 else math.nan)
    return out


def gptq_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | str,
    *,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    lazy_columns: int = LAZY_COLUMNS,
    errors: bool = True,
    cuda_graphs: bool = True,
) -> GPTQResult:
    """GPTQ of one linear layer with everything recorded (see the module docstring).

    ``weight`` [out, in] (any float dtype; the QTensor dequantizes to it), ``hessian`` [in, in]
    = 2 X X^T summed over calibration tokens. Runs on ``weight``'s device. ``lazy_columns``
    changes only float rounding (the lazy updates are exact); ``errors`` computes the relative
    reconstruction errors of GPTQ and round-to-nearest (costs a few matrix products).
    ``cuda_graphs`` replays repeated column segments from CUDA graphs on a CUDA device (same
    kernels, same results, several times faster).
    """
    spec = _gptq_spec(spec)
    if spec.is_baseline:
        raise SpecError("fp16 is the unquantized baseline: there is nothing to quantize")
    if not isinstance(lazy_columns, int) or lazy_columns < 1:
        raise ValueError(f"lazy_columns={lazy_columns!r}: allowed are integers >= 1")
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp={damp!r}: allowed are finite numbers >= 0")
    _check_layer_inputs(weight, hessian)
    device = weight.device
    out, n = weight.shape
    x_orig = weight.detach().to(torch.float32).contiguous()
    grid, x_flat = _grid(x_orig.reshape(-1), spec)

    _sync(device)
    t0 = time.perf_counter()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    n_dead = int(dead.sum())
    x = x_flat.view(out, n).clone()
    if n_dead:
        h[dead, dead] = 1.0
        x[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
    else:
        perm = torch.arange(n, device=device)
    u, rel, lam, escalations = _inverse_factor(h, damp)
    del h
    hn = u.div_(u.diagonal().clone()[:, None])
    xt = x[:, perm].t().contiguous()
    del x
    perm = perm.cpu()
    _sync(device)
    t1 = time.perf_counter()

    layout = _layout(spec, grid, x_flat, out, perm, lazy_columns)
    codes_p = _column_loop(xt, hn, layout, grid, lazy_columns, cuda_graphs)
    _sync(device)
    t2 = time.perf_counter()
    del xt, hn

    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    codes = codes_p[inverse.to(device)].t().reshape(-1).to(torch.uint8)
    extras: dict[str, torch.Tensor] = {}
    if grid.mean is not None:
        extras["mean"] = grid.mean
    if grid.global_scale is not None:
        extras["global_scale"] = grid.global_scale
    qtensor = QTensor(
        packing.pack(codes, spec.bits),
        layout.stored_scales(),
        grid.values,
        tuple(weight.shape),
        weight.dtype,
        spec,
        extras,
    )
    err_gptq = err_rtn = math.nan
    if errors:
        rtn = quantize(weight, spec.replace(method="rtn")).dequantize()
        err_gptq, err_rtn = _relative_errors(x_orig, hessian, [qtensor.dequantize(), rtn])
    return GPTQResult(
        qtensor=qtensor,
        damp=rel,
        damp_abs=lam,
        escalations=escalations,
        dead_inputs=n_dead,
        error_gptq=err_gptq,
        error_rtn=err_rtn,
        seconds_factorize=t1 - t0,
        seconds_columns=t2 - t1,
        act_order=bool(act_order),
        shape=(out, n),
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | str,
    *,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
) -> QTensor:
    """GPTQ of one linear layer: a QTensor whose ``dequantize()`` is the GPTQ weight.

    ``weight`` [out, in], ``hessian`` [in, in] = 2 X X^T summed over calibration tokens. The
    QTensor has the packed layout of :func:`kbit.quantize` and ``spec.method == "gptq"``.
    """
    return gptq_layer(weight, hessian, spec, damp=damp, act_order=act_order, errors=False).qtensor


# ----------------------------------------------------------------------------- model level
class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


@dataclass
class _Inputs:
    """The first block's inputs per calibration batch; ``hidden`` is replaced block by block."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class _Timer:
    """Seconds per phase; synchronises the device around each measured span."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def start(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def stop(self, phase: str, t0: float) -> None:
        _sync(self.device)
        self.add(phase, time.perf_counter() - t0)


def _output_hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _capture_inputs(
    model: nn.Module, first: nn.Module, calibration: torch.Tensor, batch_size: int
) -> _Inputs:
    """Run the model up to the first block on every batch and keep that block's arguments."""
    inputs = _Inputs()

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not args:
            raise GPTQError("the first decoder block was called without positional hidden states")
        inputs.hidden.append(args[0])
        inputs.args.append(tuple(args[1:]))
        inputs.kwargs.append(dict(kwargs))
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                continue
            raise GPTQError("the forward pass never reached the first decoder block")
    finally:
        handle.remove()
    return inputs


def _run_block(block: nn.Module, inputs: _Inputs, j: int) -> torch.Tensor:
    return _output_hidden(block(inputs.hidden[j], *inputs.args[j], **inputs.kwargs[j]))


def _add_hessian(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += 2 x^T x over all tokens of x, accumulated in float32.

    16-bit activations on CUDA go through the tensor-core 16-bit product with a float32 result:
    the products are exact, the sums float32 (on an H200 the result is within 2e-5, relative
    norm, of a float64 product, against 2e-7 for a plain float32 product; Pythia-1.4B's
    calibration is about 1 PFLOP of products, 1.6 s measured this way, some 20 s at the plain
    float32 rate). Other activations are upcast to float32 first.
    """
    x2 = x.detach().reshape(-1, x.shape[-1])
    if x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16):
        try:
            h.add_(torch.mm(x2.t(), x2, out_dtype=torch.float32), alpha=2.0)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    x2 = x2.to(torch.float32)
    h.addmm_(x2.t(), x2, alpha=2.0)


class _Hessians:
    """Forward hooks accumulating H = 2 X X^T per linear module of one block.

    Modules fed the very same input tensor (q/k/v projections, gate/up) share one accumulation;
    the sharing must be the same in every batch.
    """

    _UNSET = object()

    def __init__(self, modules: dict[str, nn.Module], timer: _Timer) -> None:
        self.modules = modules
        self.timer = timer
        self.h: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict.fromkeys(modules, 0)
        self.owner: dict[str, Any] = dict.fromkeys(modules, self._UNSET)
        self._batch: list[tuple[torch.Tensor, str]] = []

    def hook(self, name: str) -> Callable:
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            owner = next((o for seen, o in self._batch if seen is x), None)
            if self.owner[name] is self._UNSET:
                self.owner[name] = owner
            elif self.owner[name] != owner:
                raise GPTQError(f"{name}: its input is shared with other layers in some batches")
            if owner is not None:
                return
            self._batch.append((x, name))
            t0 = self.timer.start()
            if name not in self.h:
                n = x.shape[-1]
                self.h[name] = torch.zeros((n, n), dtype=torch.float32, device=x.device)
            _add_hessian(self.h[name], x)
            self.tokens[name] += x.numel() // x.shape[-1]
            self.timer.stop("hessian", t0)

        return fn

    def new_batch(self) -> None:
        self._batch.clear()

    def result(self, name: str) -> tuple[torch.Tensor | None, int]:
        """(H, tokens seen) of a module; H is None when it never ran."""
        owner = self.owner[name]
        key = name if owner in (None, self._UNSET) else owner
        return self.h.get(key), self.tokens[key]


def _block_index(module_name: str, prefix: str) -> int | None:
    if not module_name.startswith(prefix + "."):
        return None
    head = module_name[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _split_plans(
    model: nn.Module, plans: dict[str, TensorPlan], prefix: str
) -> tuple[dict[int, list[TensorPlan]], list[TensorPlan]]:
    """GPTQ plans per block (weights of linear layers inside a block) and the rest (RTN)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_block: dict[int, list[TensorPlan]] = {}
    rest: list[TensorPlan] = []
    for plan in plans.values():
        i = _block_index(plan.module, prefix)
        is_linear = isinstance(modules[plan.module], LINEAR_TYPES)
        if i is not None and is_linear and plan.name == f"{plan.module}.weight":
            by_block.setdefault(i, []).append(plan)
        else:
            rest.append(plan)
    return by_block, rest


def _restricted(h: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """H without the rows/columns of the inputs kept in 16 bit (proxy quantization)."""
    if cols is None or cols.numel() == 0:
        return h
    keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    keep[cols.to(h.device)] = False
    return h[keep][:, keep]


def _gptq_weight(
    param: nn.Parameter,
    plan: TensorPlan,
    h: torch.Tensor,
    spec: QuantSpec,
    damp: float,
    act_order: bool,
) -> tuple[QuantizedWeight, GPTQResult]:
    """GPTQ of one parameter (any layout) following its plan; kept columns stay 16-bit."""
    w = param.detach()
    w2 = (w.t() if plan.transpose else w).to(torch.float32)
    kept = None
    cols = plan.outlier_columns
    if cols is not None and cols.numel():
        mask = torch.zeros(w2.shape[1], dtype=torch.bool, device=w2.device)
        mask[cols.to(w2.device)] = True
        kept = w2[:, mask].to(sixteen_bit_dtype(param.dtype))
        w2 = w2[:, ~mask]
    result = gptq_layer(w2.contiguous(), _restricted(h, cols), spec, damp=damp, act_order=act_order)
    return QuantizedWeight(plan, result.qtensor, kept, tuple(w.shape)), result


def _layer_entry(plan: TensorPlan, method: str, **fields: Any) -> dict[str, Any]:
    cols = plan.outlier_columns
    return {
        "name": plan.name,
        "module": plan.module,
        "method": method,
        "outlier_columns": 0 if cols is None else int(cols.numel()),
        **fields,
    }


def gptq_quantize_model(
    model: nn.Module,
    spec: QuantSpec | str,
    calibration: torch.Tensor,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = False,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_tensor: Callable[[QuantizedWeight], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """GPTQ of a transformers causal LM in place, block by block; returns (rows, report).

    ``calibration``: int64 token ids [n_samples, seq_len]. The selection, plans (outlier
    columns, transposes), rows and ``on_tensor`` callbacks are those of
    :func:`kbit.model_quant.quantize_model` for the same spec, so bit accounting and artifacts
    do not change; rows carry the SQNR of the GPTQ weights. Selected tensors that are not the
    weight of a linear layer inside a decoder block (embeddings, LM head, biases chosen by
    ``include``) are rounded to nearest first, so the blocks see them quantized; so is a block
    linear that received no calibration input. Then for each block: the Hessians of its
    selected linears are accumulated over all calibration tokens from the block's current
    inputs (outputs of the already-quantized blocks before it), each linear is quantized with
    GPTQ (proxy quantization: on the remaining columns, with H restricted to them), the weights
    are written in place and the block is run again to give the next block's inputs. Only one
    block's activations are kept. ``log`` receives progress lines (default: this module's
    logger). The report holds the calibration shape, settings, one entry per quantized tensor
    (method, damp used, escalations, dead inputs, relative errors of GPTQ and RTN) and the
    seconds spent per phase.
    """
    spec = _gptq_spec(spec)
    say = log or logger.info
    _check_calibration(calibration, batch_size)
    report: dict[str, Any] = {
        "quant": spec.id,
        "method": "gptq",
        "calibration": {
            "n_samples": int(calibration.shape[0]),
            "seq_len": int(calibration.shape[1]),
            "tokens": int(calibration.numel()),
            "batch_size": int(batch_size),
        },
        "damp": float(damp),
        "damp_escalation": DAMP_ESCALATION,
        "max_escalations": MAX_ESCALATIONS,
        "act_order": bool(act_order),
        "lazy_columns": LAZY_COLUMNS,
        "layers": [],
    }
    if spec.is_baseline:
        report["timing"] = {}
        return parameter_rows(model, {}), report
    prefix, blocks = find_blocks(model)
    device = next(blocks[0].parameters()).device
    timer = _Timer(device)
    t_all = timer.start()
    selected = select_parameters(
        model,
        include=include,
        exclude=exclude,
        quantize_embeddings=quantize_embeddings,
        quantize_lm_head=quantize_lm_head,
    )
    untied = untie_partially_selected(model, selected)
    plans = make_plans(model, spec, selected)
    by_block, rest = _split_plans(model, plans, prefix)
    results: dict[str, tuple[TensorPlan, int, float]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            t0 = timer.start()
            for plan in rest:
                reason = "not a block linear"
                _round_to_nearest(model, plan, spec, results, report, on_tensor, reason)
            timer.stop("rtn", t0)
            if by_block:
                _sequential(model, blocks, by_block, calibration, batch_size, spec, damp,
                            act_order, results, report, on_tensor, timer, say)  # fmt: skip
    finally:
        model.train(was_training)
    timer.stop("total", t_all)
    s = timer.seconds
    s.setdefault("calibration_forward", 0.0)
    s.setdefault("hessian", 0.0)
    s.setdefault("factorize", 0.0)
    s.setdefault("columns", 0.0)
    s["other"] = s["total"] - sum(v for k, v in s.items() if k != "total")
    report["timing"] = s
    report["device"] = str(device)
    return parameter_rows(model, results, untied), report


def _check_calibration(calibration: torch.Tensor, batch_size: int) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dtype != torch.int64:
        got = getattr(calibration, "dtype", type(calibration).__name__)
        raise TypeError(f"calibration must be an int64 tensor of token ids, got {got}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(
            "calibration must be [n_samples, seq_len] with both > 0, "
            f"got {tuple(calibration.shape)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: allowed are integers >= 1")


def _round_to_nearest(
    model: nn.Module,
    plan: TensorPlan,
    spec: QuantSpec,
    results: dict,
    report: dict,
    on_tensor: Callable[[QuantizedWeight], None] | None,
    reason: str,
) -> None:
    param = model.get_parameter(plan.name)
    qw = quantize_weight(param, spec.replace(method="rtn"), plan, param.dtype)
    _apply(param, plan, qw, results, on_tensor)
    report["layers"].append(_layer_entry(plan, "rtn", reason=reason))


def _apply(
    param: nn.Parameter,
    plan: TensorPlan,
    qw: QuantizedWeight,
    results: dict,
    on_tensor: Callable[[QuantizedWeight], None] | None,
) -> None:
    w_hat = qw.dequantize(param.dtype).to(param.device)
    sqnr = _sqnr_db(param, w_hat)
    param.copy_(w_hat)
    if on_tensor is not None:
        on_tensor(qw)
    results[plan.name] = (plan, qw.bits, sqnr)


def _sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    by_block: dict[int, list[TensorPlan]],
    calibration: torch.Tensor,
    batch_size: int,
    spec: QuantSpec,
    damp: float,
    act_order: bool,
    results: dict,
    report: dict,
    on_tensor: Callable[[QuantizedWeight], None] | None,
    timer: _Timer,
    say: Callable[[str], None],
) -> None:
    """The block-by-block part of :func:`gptq_quantize_model`."""
    t0 = timer.start()
    inputs = _capture_inputs(model, blocks[0], calibration, batch_size)
    timer.stop("calibration_forward", t0)
    modules = dict(model.named_modules(remove_duplicate=False))
    last = max(by_block)
    for i in range(last + 1):
        block = blocks[i]
        plans = by_block.get(i, [])
        if plans:
            hessians = _Hessians({p.module: modules[p.module] for p in plans}, timer)
            handles = [
                modules[p.module].register_forward_hook(hessians.hook(p.module)) for p in plans
            ]
            t0 = timer.start()
            before = timer.seconds.get("hessian", 0.0)
            try:
                for j in range(len(inputs.hidden)):
                    hessians.new_batch()
                    _run_block(block, inputs, j)
            finally:
                for handle in handles:
                    handle.remove()
            timer.stop("calibration_forward", t0)
            timer.add("calibration_forward", -(timer.seconds["hessian"] - before))
            for plan in plans:
                _quantize_block_linear(model, plan, hessians, spec, damp, act_order, results,
                                       report, on_tensor, timer, i)  # fmt: skip
            del hessians
            say(f"GPTQ block {i + 1}/{len(blocks)}: {len(plans)} tensors quantized")
        if i < last:
            t0 = timer.start()
            for j in range(len(inputs.hidden)):
                inputs.hidden[j] = _run_block(block, inputs, j)
            timer.stop("calibration_forward", t0)


def _quantize_block_linear(
    model: nn.Module,
    plan: TensorPlan,
    hessians: _Hessians,
    spec: QuantSpec,
    damp: float,
    act_order: bool,
    results: dict,
    report: dict,
    on_tensor: Callable[[QuantizedWeight], None] | None,
    timer: _Timer,
    block_index: int,
) -> None:
    h, tokens = hessians.result(plan.module)
    if h is None or tokens == 0:
        logger.warning("%s received no calibration input: rounded to nearest", plan.module)
        _round_to_nearest(model, plan, spec, results, report, on_tensor, "no calibration input")
        return
    param = model.get_parameter(plan.name)
    qw, res = _gptq_weight(param, plan, h, spec, damp, act_order)
    timer.add("factorize", res.seconds_factorize)
    timer.add("columns", res.seconds_columns)
    _apply(param, plan, qw, results, on_tensor)
    report["layers"].append(
        _layer_entry(plan, "gptq", block=block_index, tokens=tokens, **res.summary())
    )
