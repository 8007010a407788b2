"""The Triton kernels against the reference: codes, packed bytes, scales and outputs equal bit
for bit (signed zeros included).

How the kernels run without a GPU: Triton decides at decoration time whether ``@triton.jit``
functions are compiled or interpreted, from ``TRITON_INTERPRET``. Setting that variable inside
this process would leak into every test module that imports Triton after this one (and would
be too late if one imported it before). So in an ordinary run, ``test_kernels_in_interpreter``
starts a child pytest on this file with ``TRITON_INTERPRET=1``; in that child the parametrized
checks run on CPU tensors. In the parent, the same checks run on CUDA when a device is present
(marked ``gpu``) and are skipped otherwise, with the reason saying where they ran instead.

Exhaustive checks (every fp16 value through every arithmetic code path and microscaling
format, the fast division on every pair of its domains) take up to hours on two CPU cores:
they are marked ``slow`` and run only with ``KBIT_EXHAUSTIVE=1``
(``KBIT_EXHAUSTIVE=1 pytest -m slow tests/test_kernels.py``; the child interpreter run then
gets no timeout). The default run checks the same paths on subsets. Host-side proofs of the
arithmetic (``kbit.kernels.exact``, ``arith``, ``pairs``) need no Triton at all.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from kbit import kernels
from kbit.blockwise import _encode, _Plan, quantize
from kbit.codebooks import codebook, element_grid
from kbit.kernels import arith, exact, pairs
from kbit.packing import pack
from kbit.spec import QuantSpec

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EXHAUSTIVE = os.environ.get("KBIT_EXHAUSTIVE") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
#: host-side proofs run once, in the parent process (the child interpreter run repeats only
#: the device checks)
host_only = pytest.mark.skipif(INTERPRETED, reason="host-side check: runs in the parent")


def _device_params() -> list:
    if INTERPRETED:
        return ["cpu"]
    if HAS_CUDA:
        return [pytest.param("cuda", marks=pytest.mark.gpu)]
    return [
        pytest.param(
            "none",
            marks=pytest.mark.skip(
                reason="no CUDA device: these checks run on CPU in test_kernels_in_interpreter"
            ),
        )
    ]


@pytest.fixture(params=_device_params())
def device(request) -> str:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return request.param


# --------------------------------------------------------------------------- reference
def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: shape, dtype and every bit pattern (so -0 differs from +0)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


def _reference(
    x: torch.Tensor, cb: torch.Tensor, block: int | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, scales in scale_dtype, dequantized in x.dtype), straight from the
    definition: fp32, absmax per block rounded to the scale dtype, exact division, codes =
    number of midpoints strictly below the normalized value."""
    xf = x.detach().reshape(-1).to("cpu", torch.float32)
    cb = cb.to(torch.float32)
    n = xf.numel()
    b = block or max(n, 1)
    nblocks = -(-n // b)
    rows = torch.cat([xf, xf.new_zeros(nblocks * b - n)]).view(nblocks, b)
    scales = rows.abs().amax(dim=1).clamp(max=torch.finfo(scale_dtype).max).to(scale_dtype)
    s = scales.float()[:, None]
    xn = torch.where(s == 0, torch.zeros_like(rows), rows / torch.where(s == 0, 1.0, s))
    mids = (cb[:-1] + cb[1:]) / 2
    codes = torch.searchsorted(mids, xn.reshape(-1), right=False).view(nblocks, b)
    y = (cb[codes] * s).reshape(-1)[:n].to(x.dtype)
    return codes.reshape(-1)[:n].to(torch.uint8), scales, y


_SCALE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _library(
    x: torch.Tensor, name: str, k: int, block: int | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, scales, dequantized) from kbit.blockwise, the project's reference."""
    spec = QuantSpec(dtype=name, bits=k, block_size=block, scale_dtype=_SCALE_NAMES[scale_dtype])
    q = quantize(x.detach().cpu(), spec)
    return q.codes, q.scales, q.dequantize().reshape(-1)


def _codebooks() -> list[tuple[str, int, torch.Tensor]]:
    """Every codebook family at several k, plus a skewed quantile-like table (uneven gaps)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for k in range(2, 9):
        out.append(("int", k, codebook("int", k)))
        if k >= 3:
            out.append(("float", k, codebook("float", k)))
            out.append(("dynamic", k, codebook("dynamic", k)))
        out.append(("nf", k, codebook("nf", k)))
        q = torch.randn(2**k - 1, generator=gen) ** 3
        q = torch.cat([q, torch.zeros(1)]).unique()
        out.append(("quantile-like", k, (q / q.abs().max()).float()))
    return out


CODEBOOKS = _codebooks()
BLOCKS = (16, 32, 64, 4096, None)
MX_SPECS = ["mxfp4", "mxfp6", "mxfp6-e3-b32", "mxfp8", "mxfp8-e5-b32", "mxint8", "mxint4",
            "mxint2", "nvfp4"]  # fmt: skip


def _input(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).exp() * 2
    return x.to(dtype).to(device)


def _case_id(case: tuple[str, int, torch.Tensor]) -> str:
    return f"{case[0]}{case[1]}"


def _all_fp16() -> torch.Tensor:
    """Every finite fp16 value once (as float32), shuffled with a fixed seed."""
    v = exact.finite_values("fp16")
    return torch.from_numpy(v[np.random.default_rng(5).permutation(v.size)])


def _scaled_blocks(values: torch.Tensor, scales: list[float], block: int) -> torch.Tensor:
    """Blocks that each start with +-scale (so the block absmax is that scale) followed by
    ``values * scale`` with |value| <= 1: every value normalised by every scale."""
    v = values[values.abs() <= 1]
    body = block - 1
    pad = (-v.numel()) % body
    v = torch.cat([v, v[:pad]]).view(-1, body)
    parts = []
    for i, s in enumerate(scales):
        head = torch.full((v.shape[0], 1), s * (-1.0) ** i)
        parts.append(torch.cat([head, v * s], dim=1).reshape(-1))
    return torch.cat(parts)


# --------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("case", CODEBOOKS, ids=_case_id)
def test_all_paths_match_reference(device: str, case) -> None:
    """Fake quantization, packed codes, scales and dequantization for one codebook; the
    block size, dtype and odd length rotate with the case so the grid stays small."""
    name, k, cb = case
    idx = CODEBOOKS.index(case)
    block = BLOCKS[idx % len(BLOCKS)]
    dtype = (torch.float16, torch.bfloat16, torch.float32)[idx % 3]
    n = 2999 + 8 * idx
    x = _input(n, dtype, device, seed=idx).view(1, -1)
    codes, scales, y_ref = _reference(x, cb, block, torch.float16)
    if name != "quantile-like":  # the local reference is kbit.blockwise's result
        lib_packed, lib_scales, lib_y = _library(x, name, k, block, torch.float16)
        assert same(lib_packed, pack(codes, k)) and same(lib_scales, scales)
        assert same(lib_y, y_ref)

    y = kernels.fake_quantize_blockwise(x, cb, block, torch.float16)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert same(y.reshape(-1), y_ref), f"{name}{k} B={block} {dtype}"

    packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
    assert same(sc, scales)
    assert same(packed, pack(codes, k)), f"{name}{k} B={block}"

    deq = kernels.dequantize_blockwise(packed, sc, cb, block, k, n, dtype)
    assert same(deq, y_ref)


@pytest.mark.parametrize("block", [16, 24, 64, 96, 100, 1000, 5000, None])
@pytest.mark.parametrize("k", [3, 4, 8])
def test_block_sizes_and_paths(device: str, block: int | None, k: int) -> None:
    """Fused (B <= 4096, B % 8 == 0 to pack) and two-pass paths (large, odd or per-tensor
    blocks) give the reference result, on lengths that end in a partial block."""
    cb = codebook("float", k)
    n = 12_345
    x = _input(n, torch.float16, device, seed=k * 1000 + (block or 0))
    ref_packed, scales, y_ref = _library(x, "float", k, block, torch.float16)
    assert same(kernels.fake_quantize_blockwise(x, cb, block), y_ref)
    packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
    assert same(sc, scales)
    assert same(packed, ref_packed)
    assert same(kernels.dequantize_blockwise(packed, sc, cb, block, k, n), y_ref)


@pytest.mark.parametrize("block", [16, 32, 64, 96, 256, 2048])
def test_pack_chunk_kernel(device: str, block: int) -> None:
    """``fused_pack_chunk_kernel`` (blocks of a multiple of 16) against the reference and the
    one-group-per-thread kernel (16-byte and per-thread word stores; k = 6 stores int16
    pieces), on whole tiles (the unmasked variant) and a ragged tail."""
    from kbit.kernels.launch import KernelConfig

    for n in (8192, 8192 + 8 * block - 24):
        for name, k in (
            ("int", 3),
            ("nf", 4),
            ("int", 5),
            ("float", 6),
            ("int", 8),
            ("dynamic", 8),
        ):
            cb = codebook(name, k)
            x = _input(n, torch.float16, device, seed=k + block)
            ref_packed, scales, _ = _library(x, name, k, block, torch.float16)
            for cfg in (
                KernelConfig(pack_chunks=True),
                KernelConfig(),
                KernelConfig(pack_lanes=0, pack_flat=(0, 0, 0)),
                KernelConfig(pack_lanes=8, pack_flat=(0, 0, 0)),
                KernelConfig(pack_flat=(8, 8, 4096)),
                KernelConfig(pack_word_chunks=False),
                KernelConfig(pack_split=(0, 0, 0)),
            ):
                packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k, config=cfg)
                assert same(sc, scales) and same(packed, ref_packed), (name, k, block, n, cfg)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_and_input_dtypes(device: str, scale_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Every input/scale dtype pair, through the arithmetic (int) and table (nf) searches:
    the division mode differs per pair (``launch.FAST_DIVISION``)."""
    x = _input(4100, dtype, device, seed=3)
    for name, k in (("nf", 4), ("int", 8)):
        cb = codebook(name, k)
        ref_packed, scales, y_ref = _library(x, name, k, 64, scale_dtype)
        assert same(kernels.fake_quantize_blockwise(x, cb, 64, scale_dtype), y_ref)
        packed, sc = kernels.quantize_blockwise(x, cb, 64, scale_dtype, k)
        assert sc.dtype == scale_dtype and same(sc, scales)
        assert same(packed, ref_packed)
        deq = kernels.dequantize_blockwise(packed, sc, cb, 64, k, x.numel(), dtype)
        assert same(deq, y_ref)


def test_scale_rounding_edge_cases(device: str) -> None:
    """All-zero and all -0 blocks, absmax beyond fp16's max (clamped to 65504; one block far
    beyond, whose values lie past the last bucket of every table), absmax that rounds up or
    down in fp16, absmax small enough to become an fp16 subnormal or zero, and
    a bf16/fp32 subnormal absmax (the prescaled division of bf16 scales)."""
    blocks = [
        torch.zeros(32),
        torch.full((32,), -0.0),
        torch.linspace(-1e5, 7e4, 32),
        torch.linspace(-1.0, 1.0004, 32),  # 1.0004 rounds to 1.0 in fp16: |xn| > 1
        torch.linspace(-3e-6, 1e-6, 32),  # fp16 subnormal scale
        torch.linspace(-1e-9, 1e-9, 32),  # scale underflows to 0: everything maps to 0
        torch.linspace(-1e-39, 2e-39, 32),  # fp32 subnormal absmax
        torch.full((32,), -2.5),
        torch.linspace(-1e10, 3e9, 32),  # fp16 scale 65504: |xn| up to 1.5e5, past every table
    ]
    x = torch.cat(blocks).to(device)
    # dynamic4 and dynamic8: the log- and the per-binade-indexed tables
    for name, k in (("int", 4), ("nf", 4), ("float", 4), ("dynamic", 4), ("dynamic", 8)):
        cb = codebook(name, k)
        for sd in (torch.float16, torch.bfloat16):
            for xdt in (torch.float32, torch.bfloat16):
                xi = x.to(xdt)
                codes, scales, y_ref = _reference(xi, cb, 32, sd)
                if sd == torch.float16:
                    assert float(scales[2]) == 65504.0 and float(scales[5]) == 0.0
                assert same(kernels.fake_quantize_blockwise(xi, cb, 32, sd), y_ref), (name, sd)
                packed, sc = kernels.quantize_blockwise(xi, cb, 32, sd, k)
                assert same(sc, scales)
                assert same(packed, pack(codes, k))


@pytest.mark.parametrize("name", ["int", "float", "dynamic", "nf"])
def test_exact_midpoints_take_the_lower_code(device: str, name: str) -> None:
    """Values exactly on a midpoint (scale 1, so xn == x) get the lower code; the next float32
    above a midpoint gets the upper one. Division shortcuts fail exactly here."""
    for k in (4, 8):
        cb = codebook(name, k)
        mids = (cb[:-1] + cb[1:]) / 2
        above = torch.nextafter(mids, torch.tensor(math.inf))
        x = torch.cat([mids, above, -mids, torch.tensor([1.0, -1.0])]).float()
        pad = (-x.numel()) % 64
        x = torch.cat([x, torch.zeros(pad)]).to(device)
        codes, _, y_ref = _reference(x, cb, None, torch.float32)
        m = mids.numel()
        assert torch.equal(codes[:m].long(), torch.arange(m))
        assert torch.equal(codes[m : 2 * m].long(), torch.arange(1, m + 1))
        packed, _ = kernels.quantize_blockwise(x, cb, None, torch.float32, k)
        assert same(packed, pack(codes, k))
        assert same(kernels.fake_quantize_blockwise(x, cb, None, torch.float32), y_ref)


@pytest.mark.parametrize("table", [0, 255])
def test_int_packing_midpoint_table(device: str, table: int) -> None:
    """Int codebooks pack with the midpoint read from a table indexed by the arithmetic
    position (``KernelConfig.int_mid_table``) or computed from both neighbours (0): both give
    the reference codes on every midpoint, its float neighbours and every entry, in fused
    blocks of scale 1 (each block holds 1.0) and per tensor."""
    from kbit.kernels.launch import KernelConfig

    cfg = KernelConfig(int_mid_table=table)
    inf = torch.tensor(math.inf)
    for k in (2, 3, 4, 5, 8):
        cb = codebook("int", k)
        mids = (cb[:-1] + cb[1:]) / 2
        vals = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), cb])
        blocks = torch.cat([vals.view(-1, 1), torch.zeros(vals.numel(), 63)], 1)
        blocks[:, 1] = 1.0
        x = blocks.reshape(-1).float().to(device)
        for block in (64, None):
            codes, _, _ = _reference(x, cb, block, torch.float32)
            packed, _ = kernels.quantize_blockwise(x, cb, block, torch.float32, k, config=cfg)
            assert same(packed, pack(codes, k)), (k, block, table)


def test_division_is_correctly_rounded(device: str) -> None:
    """Random values around every midpoint of an 8-bit table, with scales that are not powers
    of two, for fp16 (fused, block reciprocal) and fp32 (div_rn) paths: an approximate
    division flips codes here, the IEEE one never does."""
    gen = torch.Generator().manual_seed(11)
    for name in ("dynamic", "int", "float"):
        cb = codebook(name, 8)
        mids = (cb[:-1] + cb[1:]) / 2
        scale = torch.tensor(0.7371).half().float()
        base = mids.repeat(4) * scale
        x = base * (1 + (torch.rand(base.numel(), generator=gen) - 0.5) * 1e-6)
        x = torch.cat([scale.view(1), x]).float()
        x = torch.cat([x, torch.zeros((-x.numel()) % 64)])
        for dt, block in ((torch.float32, None), (torch.float16, 64)):
            xi = x.to(dt).to(device)
            codes, _, y_ref = _reference(xi, cb, block, torch.float16)
            packed, _ = kernels.quantize_blockwise(xi, cb, block, torch.float16, 8)
            assert same(packed, pack(codes, 8)), (name, dt)
            assert same(kernels.fake_quantize_blockwise(xi, cb, block), y_ref), (name, dt)


def test_shapes_and_empty(device: str) -> None:
    cb = codebook("int", 3)
    x = _input(3 * 5 * 67, torch.bfloat16, device, seed=5).view(3, 5, 67)
    y = kernels.fake_quantize_blockwise(x, cb, 32)
    assert y.shape == x.shape
    assert same(y.reshape(-1), _reference(x, cb, 32, torch.float16)[2])
    e = torch.empty(0, 4, dtype=torch.float16, device=device)
    assert kernels.fake_quantize_blockwise(e, cb, 32).shape == (0, 4)
    packed, sc = kernels.quantize_blockwise(e, cb, 32, torch.float16, 3)
    assert packed.numel() == 0 and sc.numel() == 0


@pytest.mark.parametrize(
    ("search", "layout", "step", "reg_levels"),
    [
        ("tree", "auto", 1, 0),
        ("tree", "auto", 2, 2),
        ("tree", "auto", 4, 1),
        ("bucket", "auto", 1, 2),
        ("bucket-mid", "auto", 1, 2),
        ("bucket-smem", "auto", 1, 2),
        ("pair", "uniform", 1, 2),
        ("pair", "log", 1, 2),
        ("pair", "binade", 1, 2),
        ("pair-smem", "uniform", 1, 2),
        ("pair-smem", "log", 1, 2),
        ("pair-smem", "binade", 1, 2),
        ("arith", "auto", 1, 2),
    ],
)
def test_search_variants_agree(
    device: str, search: str, layout: str, step: int, reg_levels: int
) -> None:
    """Every search gives the reference codes on all three kernel shapes: the tree (register
    levels, one gather per level, subtree records), bucket tables of both record kinds, pair
    records in each layout from global and shared memory (a layout a codebook has no table
    for falls back to the tree), the arithmetic codes of int and float codebooks."""
    from kbit.kernels.launch import DEFAULT_CONFIG, KernelConfig

    cfg = KernelConfig(**{**DEFAULT_CONFIG.__dict__, "search": search, "pair_layout": layout,
                          "bucket_min_entries": 0, "search_step": step,
                          "reg_levels": reg_levels})  # fmt: skip
    cases = [("int", 3), ("float", 8)]
    if search != "arith":
        cases += [("dynamic", 8), ("nf", 4)]
    for name, k in cases:
        cb = codebook(name, k)
        x = _input(2051, torch.float32, device, seed=k)
        for block in (100, None) if search == "tree" else (64, None):
            ref_packed, _, y_ref = _library(x, name, k, block, torch.float16)
            y = kernels.fake_quantize_blockwise(x, cb, block, config=cfg)
            assert same(y, y_ref), (name, k, block)
            packed, _ = kernels.quantize_blockwise(x, cb, block, torch.float16, k, config=cfg)
            assert same(packed, ref_packed), (name, k, block)


def _edge_codebooks() -> list[tuple[str, int, torch.Tensor]]:
    """Every codebook of CODEBOOKS plus tables that stress the bucket layouts: a midpoint at
    exactly 0 (no zero entry), entries near fp32's smallest normal, two midpoints too close
    together for any pair layout (read as buckets of two midpoints), a subnormal midpoint."""
    extra = [
        ("sym-nozero", 2, torch.tensor([-1.0, -0.3, 0.3, 1.0])),
        ("tiny", 3, torch.tensor([-1.0, -1e-30, 0.0, 1e-37, 1.0])),
        ("close-triple", 3, torch.tensor([-1.0, 0.25, 0.25 + 2**-20, 0.25 + 2**-19, 1.0])),
        ("deep", 2, torch.tensor([-1.0, 0.0, 1e-38, 1.0])),
    ]
    return list(CODEBOOKS) + extra


@pytest.mark.parametrize("search", ["bucket", "bucket-mid", "bucket-smem", "pair-smem", "pair"])
def test_table_search_at_midpoints(device: str, search: str) -> None:
    """With scale 1 (so xn == x): every midpoint, the floats just above and below it, every
    entry, signed zeros, subnormals and tiny normals get the reference code, through the fused
    and the two-pass kernels, for every codebook family at k = 2..8 and the edge tables."""
    from kbit.kernels.launch import KernelConfig

    cfg = KernelConfig(search=search, bucket_min_entries=0)
    special = [0.0, -0.0, 1e-40, -1e-40, 2.0**-126, -(2.0**-126), 1e-20, -1e-20, 2.0**-20]
    for name, k, cb in _edge_codebooks():
        mids = (cb[:-1] + cb[1:]) / 2
        up = torch.nextafter(mids, torch.tensor(math.inf))
        down = torch.nextafter(mids, torch.tensor(-math.inf))
        x = torch.cat([mids, up, down, cb, torch.tensor([*special, 1.0, -1.0])]).float()
        x = torch.cat([x, torch.zeros((-x.numel()) % 8)]).to(device)
        codes, scales, y_ref = _reference(x, cb, None, torch.float32)
        assert float(scales[0]) == 1.0
        for block in (None, x.numel()):
            y = kernels.fake_quantize_blockwise(x, cb, block, torch.float32, config=cfg)
            assert same(y, y_ref), (name, k, block)
            packed, _ = kernels.quantize_blockwise(x, cb, block, torch.float32, k, config=cfg)
            assert same(packed, pack(codes, k)), (name, k, block)


def _arith_books(full: bool) -> list[tuple[str, int, torch.Tensor]]:
    """int at every k and float at every exponent split (``full``), or a subset."""
    ks = range(2, 9) if full else (2, 3, 4, 8)
    books = [(f"int{k}", k, codebook("int", k)) for k in ks]
    for k in ks:
        if k < 3:
            continue
        splits = range(1, k) if full else sorted({1, k - 1, QuantSpec(dtype="float", bits=k)
                                                  .exponent_bits})  # fmt: skip
        books += [(f"float{k}-e{e}", k, codebook("float", k, e)) for e in splits]
    return books


def _check_every_fp16(device: str, books, scales: list[float], dtypes) -> None:
    """Every fp16 value normalised by every scale (blocks led by the scale) through the
    arithmetic and pair-record searches, fake and packed, against the reference."""
    from kbit.kernels.launch import KernelConfig

    vals = _all_fp16()
    x32 = _scaled_blocks(vals, scales, 64)
    for label, k, cb in books:
        for search in ("arith", "pair-smem"):
            cfg = KernelConfig(search=search)
            for dt in dtypes:
                x = x32.to(dt).to(device)
                codes, _, y_ref = _reference(x, cb, 64, torch.float16)
                y = kernels.fake_quantize_blockwise(x, cb, 64, config=cfg)
                assert same(y, y_ref), (label, search, dt)
                packed, _ = kernels.quantize_blockwise(x, cb, 64, torch.float16, k, config=cfg)
                assert same(packed, pack(codes, k)), (label, search, dt)


def test_arithmetic_codes_on_every_fp16(device: str) -> None:
    """int and float codes computed in registers: every finite fp16 value (so values exactly at
    and next to every midpoint, entries, subnormals, zeros and both signs) under a
    power-of-two and a non-power-of-two scale, for a subset of the grids."""
    _check_every_fp16(device, _arith_books(False), [1.0, 0.7371], [torch.float16])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.slow
@pytest.mark.skipif(not EXHAUSTIVE, reason="exhaustive check: set KBIT_EXHAUSTIVE=1")
def test_arithmetic_codes_on_every_fp16_exhaustive(device: str, dtype: torch.dtype) -> None:
    """As above for every int width and every float exponent split, five scales and every
    input dtype."""
    _check_every_fp16(device, _arith_books(True), [1.0, 0.7371, 3.5e-5, 2.0**-20, 60000.0],
                      [dtype])  # fmt: skip


def _mx_reference(x: torch.Tensor, spec: QuantSpec):
    q = quantize(x.detach().cpu(), spec)
    return q


def _mx_adversarial(spec: QuantSpec) -> torch.Tensor:
    """Exact raw-grid ties (ties to even), entries, their neighbours and 1.75x entries
    (saturation) under three power-of-two shared scales, zero, -0 and a 2^-127 block."""
    g = element_grid(spec)
    grid = g.values
    mids = (grid[:-1] + grid[1:]) / 2
    inf = torch.tensor(math.inf)
    vals = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), grid,
                      grid * 1.75, torch.tensor([0.0, -0.0])])  # fmt: skip
    b = spec.block_size
    body = b - 1
    parts = []
    for k in (0, -5, 7):
        for start in range(0, vals.numel(), body):
            chunk = vals[start : start + body] * 2.0**k
            head = torch.tensor([2.0**g.emax * 2.0**k])
            parts.append(torch.cat([head, chunk, torch.zeros(body - chunk.numel())]))
    parts += [torch.zeros(b), torch.full((b,), -0.0), torch.linspace(-1e-38, 1e-39, b)]
    return torch.cat(parts)


@pytest.mark.parametrize("spec_id", MX_SPECS)
def test_microscaling_matches_reference(device: str, spec_id: str) -> None:
    """mxfp/mxint/nvfp kernels (fused, two-pass for a block that is not a multiple of 8 or
    larger than a tile) against ``quantize(...)``: codes, stored scales, NVFP4's global scale,
    fake quantization and dequantization, on random and adversarial inputs of every dtype.
    NVFP4 runs with div_rn here (its reciprocal division is checked per tensor on the device,
    slow in the interpreter: test_nvfp4_reciprocal_division)."""
    from kbit.kernels.launch import KernelConfig

    cfg = KernelConfig(fast_div=False)
    base = QuantSpec.parse(spec_id)
    idx = MX_SPECS.index(spec_id)
    for j, block in enumerate((base.block_size, 20, 8192)):
        spec = base.replace(block_size=block)
        dt = (torch.float16, torch.bfloat16, torch.float32)[(idx + j) % 3]
        inputs = [_input(3001, dt, "cpu", idx + 10 * j)]
        if j == 0:
            adv = _mx_adversarial(spec)
            inputs.append(adv.clamp(-6e4, 6e4).to(dt) if dt == torch.float16 else adv.to(dt))
        for x in inputs:
            q = _mx_reference(x, spec)
            xd = x.to(device)
            ref = q.dequantize()
            assert same(kernels.fake_quantize_microscaling(xd, spec, config=cfg), ref), spec.id
            packed, scales, g = kernels.quantize_microscaling(xd, spec, config=cfg)
            assert same(packed, q.codes) and same(scales, q.scales), spec.id
            if spec.dtype == "nvfp":
                assert same(g, q.extras["global_scale"])
            else:
                assert g is None
            d = kernels.dequantize_microscaling(packed, scales, spec, x.numel(), g, dt)
            assert same(d, ref.reshape(-1)), spec.id


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED and not EXHAUSTIVE, reason="the device check takes a minute "
                    "per call in the interpreter: set KBIT_EXHAUSTIVE=1")  # fmt: skip
def test_nvfp4_reciprocal_division(device: str) -> None:
    """NVFP4 with the block-reciprocal division, which a device-side check allows per tensor
    (its global scale): results equal the reference for fp16 and bf16 inputs."""
    for dt in (torch.float16, torch.bfloat16):
        x = _input(4099, dt, device, 77)
        q = _mx_reference(x, QuantSpec.parse("nvfp4"))
        assert same(kernels.fake_quantize_microscaling(x, "nvfp4"), q.dequantize())
        packed, scales, g = kernels.quantize_microscaling(x, "nvfp4")
        assert same(packed, q.codes) and same(scales, q.scales)
        assert same(g, q.extras["global_scale"])


def _nv_refusing_pairs(amax: float, dt: str, min_mid: float) -> int:
    """Host count of NVFP4's division check (``nv_scale_kernel``): non-negative values x of
    ``dt`` up to the block bound, against the 126 positive E4M3 scales times
    ``g = RN(amax / 2688)``, where the reciprocal division differs from the correctly rounded
    quotient by a quotient that reaches ``min_mid`` (float64 emulation, ``kbit.kernels.exact``)."""
    f32 = np.float32
    e4m3 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    g = exact.div32(np.array([amax], f32), np.array([2688.0], f32))[0]
    s = (e4m3 * g).astype(f32)[:, None]
    xs = exact.finite_values(dt)
    x = xs[(xs >= 0) & (xs <= f32(g * f32(2688.0025634765625)))][None, :]
    x, s = np.broadcast_arrays(x, s)
    fast = exact.kernel_divide(x, s, exact.div32(np.ones_like(s), s))
    ref = exact.div32(x, s)
    differ = ~exact._same_bits(fast, ref) & (np.maximum(abs(fast), abs(ref)) >= min_mid)
    return int(differ.sum())


def test_nvfp4_division_check_refuses_where_it_must(device: str) -> None:
    """The device-side verdict on NVFP4's reciprocal division (``launch._nv_gd``) counts
    exactly the pairs the host emulation finds, on a tensor where the shortcut is exact
    (bf16, absmax 1: none) and on one where it is not (bf16, absmax 1e-30: a few pairs with
    quotients above the grid's smallest midpoint); there the kernels fall back to div_rn and
    still equal the reference. Packing is checked in both cases (the fallback on a grid of
    one program that loops over every tile)."""
    from kbit.kernels import launch

    spec = QuantSpec.parse("nvfp4")
    fmt = launch.microscaling("nvfp", 4, spec.exponent_bits, spec.block_size)
    mid = launch._min_abs_mid(fmt.grid)
    for amax, want_refused in ((1.0, False), (1e-30, True)):
        x = (torch.linspace(-1, 1, 4096) * amax).to(torch.bfloat16)
        top = float(x.float().abs().max())
        gd, _ = launch._nv_gd(x.to(device), fmt, launch.DEFAULT_CONFIG)
        count = _nv_refusing_pairs(top, "bf16", mid)
        assert (count > 0) == want_refused, (amax, count)
        assert float(gd[2]) == count, (amax, float(gd[2]), count)
        q = _mx_reference(x, spec)
        if want_refused:  # the fake kernel's own fallback (the shortcut's: the test above)
            assert same(kernels.fake_quantize_microscaling(x.to(device), spec), q.dequantize())
        # packing runs two launches: the shortcut, or the div_rn fallback on a small grid
        # (here one program, which loops over every tile)
        cfg = launch.KernelConfig(nv_pack_split=1) if want_refused else launch.DEFAULT_CONFIG
        packed, scales, _ = kernels.quantize_microscaling(x.to(device), spec, config=cfg)
        assert same(packed, q.codes) and same(scales, q.scales), amax


@pytest.mark.parametrize("spec_id", MX_SPECS)
@pytest.mark.slow
@pytest.mark.skipif(not EXHAUSTIVE, reason="exhaustive check: set KBIT_EXHAUSTIVE=1")
def test_microscaling_every_fp16_exhaustive(device: str, spec_id: str) -> None:
    """Every finite fp16 value through every microscaling format, under scales that put them
    around the grid (shared exponents from the block heads), fused fake and pack."""
    spec = QuantSpec.parse(spec_id)
    g = element_grid(spec)
    x32 = _scaled_blocks(_all_fp16(), [2.0**g.emax, 2.0 ** (g.emax - 3)], spec.block_size)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = x32.clamp(-6e4, 6e4).to(dt)
        q = _mx_reference(x, spec)
        xd = x.to(device)
        assert same(kernels.fake_quantize_microscaling(xd, spec), q.dequantize()), dt
        packed, scales, _ = kernels.quantize_microscaling(xd, spec)
        assert same(packed, q.codes) and same(scales, q.scales), dt


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
def test_fast_division_domains_on_gpu() -> None:
    """The block-reciprocal division against div_rn on the device, on every pair of each
    domain of ``launch.FAST_DIVISION`` a block can hold: differences (bf16 inputs) only in
    quotients below the declared bound."""
    from kbit.kernels import launch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    for (xdt, sdt), (div, bound) in launch.FAST_DIVISION.items():
        sv = np.unique(exact.round_to_scale(np.abs(exact.finite_values(names[xdt])), names[sdt]))
        sv = sv[sv > 0]  # the scales an absmax of the input dtype can round to
        lim = np.minimum(exact.scale_ceiling(sv, names[sdt]), 3.0e38).astype(np.float32)
        bad, biggest = launch.division_mismatches(
            xdt, torch.from_numpy(sv).cuda(), div, torch.from_numpy(lim).cuda()
        )
        assert bad == 0 or biggest <= bound, (xdt, sdt, bad, biggest)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
def test_large_tensor_on_gpu() -> None:
    """Millions of values on the GPU: the fused path with many programs, no mask, 8-bit."""
    for name in ("dynamic", "int", "float"):
        cb = codebook(name, 8)
        x = torch.randn(1 << 22, device="cuda", dtype=torch.float16)
        for block in (64, 4096):
            codes, scales, y_ref = _reference(x, cb, block, torch.float16)
            assert same(kernels.fake_quantize_blockwise(x, cb, block), y_ref)
            packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, 8)
            assert same(packed, pack(codes, 8))
            assert same(sc, scales)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("spec_id", ["int4-b64", "float8-b128", "nf4-b64-c", "dynamic8-b256",
                                     "quantile4-b64", "mxfp4", "mxfp8-e5-b32-c", "mxint8",
                                     "nvfp4", "nvfp4-b64-c"])  # fmt: skip
def test_fake_quantize_dispatch_on_gpu(spec_id: str) -> None:
    """``kbit.blockwise.fake_quantize`` on CUDA runs the kernels for every type (centering
    included) and equals quantize().dequantize(), which never does."""
    from kbit.blockwise import fake_quantize

    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = _input(5000, dt, "cuda", 9).view(50, 100)
        assert same(fake_quantize(x, spec_id), quantize(x, spec_id).dequantize()), dt


# --------------------------------------------------------------------------- host-side proofs
@host_only
def test_arith_detects_every_int_and_float_grid() -> None:
    """Every int width and float exponent split is recognised (a float grid with one exponent
    bit is the uniform int grid), its constants reproduce every entry bit for bit through the
    kernels' division; table codebooks are not recognised."""
    for k in range(2, 9):
        fam = arith.detect(codebook("int", k))
        assert isinstance(fam, arith.IntCode) and fam.m == 2**k - 2
        for e in range(1, k) if k >= 3 else ():
            cb = codebook("float", k, e)
            fam = arith.detect(cb)
            if e == 1:
                assert isinstance(fam, arith.IntCode) and torch.equal(cb, codebook("int", k))
                continue
            assert isinstance(fam, arith.FloatCode) and fam.exponent_bits == e
            raw = arith.float_raw_grid(e, k - 1 - e)
            got = exact.divide_by_split(raw, fam.rhi, fam.rlo)
            assert np.array_equal(got.view(np.int32), cb.numpy().view(np.int32))
            assert fam.vmax2 == float(raw[-2])
        for name in ("nf", "dynamic"):
            if k >= 3 or name == "nf":
                assert arith.detect(codebook(name, k)) is None
    shifted = codebook("int", 4).clone()
    shifted[3] = torch.nextafter(shifted[3], torch.tensor(1.0))  # one entry off by an ulp
    assert arith.detect(shifted) is None


@host_only
@pytest.mark.parametrize("spec_id", MX_SPECS)
def test_element_rounding_matches_reference_on_every_fp16(spec_id: str) -> None:
    """The kernels' element rounding (``arith.round_elements``: one add and one subtract of a
    power of two taken from the value's exponent bits) gives the reference's codes (nearest,
    ties to even, saturating) for every finite fp16 value, scaled across the grid's range,
    and every exact midpoint and its neighbours."""
    spec = QuantSpec.parse(spec_id)
    g = element_grid(spec)
    fmt = arith.element_code(spec.dtype, spec.bits, spec.exponent_bits)
    grid = g.values
    mids = (grid[:-1] + grid[1:]) / 2
    inf = torch.tensor(math.inf)
    v = torch.from_numpy(exact.finite_values("fp16"))
    edges = [mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), grid,
             torch.tensor([0.0, -0.0, 3e38])]  # fmt: skip
    xs = torch.cat([v * 2.0**s for s in (-8, 0, 8)] + edges)
    plan = _Plan(grid, mids, g.even, xs.numel(), None, None, None, None)
    ref = _encode(xs, torch.ones_like(xs), plan).numpy()
    t, rank = arith.round_elements(np.abs(xs.numpy()), fmt)
    code = np.where(xs.numpy() < 0, fmt.zero - rank, fmt.zero + rank)
    assert np.array_equal(code, ref)
    assert np.array_equal(t, np.abs(grid.numpy()[ref]))


def _dense(cb: np.ndarray) -> np.ndarray:
    mids = ((cb[:-1] + cb[1:]) / np.float32(2)).astype(np.float32)
    inf = np.float32(np.inf)
    return np.concatenate([mids, np.nextafter(mids, inf), np.nextafter(mids, -inf), cb,
                           np.linspace(-1.2, 1.2, 40001, dtype=np.float32),
                           np.array([0.0, -0.0, 1e-40, -1e-40, 1e-30, -1e-30, 3e38, -3e38],
                                    np.float32)]).astype(np.float32)  # fmt: skip


@host_only
@pytest.mark.parametrize("layout", ["uniform", "log", "binade"])
def test_pair_tables_give_reference_codes(layout: str) -> None:
    """Every pair layout for every codebook family at k = 2..8 and the edge tables: the
    kernels' bucket function (emulated exactly) and one record read give the reference code
    and value at every midpoint, its neighbours, every entry, zeros, subnormals and beyond the
    ends (and so do the 4-byte cell records of the log and per-binade layouts); a codebook
    with midpoints closer than any layout resolves gets no table."""
    built = cells = 0
    for name, _, cbt in _edge_codebooks():
        cb = cbt.numpy().astype(np.float32)
        t = pairs.build(cb, layout)
        if name == "close-triple":
            assert t is None
        if t is None:
            continue
        built += 1
        xs = _dense(cb)
        mids = ((cb[:-1] + cb[1:]) / np.float32(2)).astype(np.float32)
        ref = np.searchsorted(mids, xs.astype(np.float64), side="left")
        idx = pairs.bucket_of(xs, t)
        assert idx.min() >= 0 and idx.max() < t.nb
        lo = (t.fake[idx] & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        hi = ((t.fake[idx] >> 32) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        v = np.where(xs > ((lo + hi) * np.float32(0.5)).astype(np.float32), hi, lo)
        assert np.array_equal(v.view(np.int32), cb[ref].view(np.int32)), name
        mid = (t.pack[idx] & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        assert np.array_equal((t.pack[idx] >> 32) + (xs > mid), ref), name
        if t.pack32 is not None:  # the kernel's cell-record comparison, emulated
            cells += 1
            xb = xs.view(np.int32).astype(np.int64)
            w = pairs.cell_bits(t)[idx]
            y = (xb ^ (xb >> 31)) & ((1 << w) - 1)
            rec = t.pack32[idx].view(np.uint32).astype(np.int64)
            assert np.array_equal((rec + y) >> w, ref), name
    assert built >= len(CODEBOOKS) // 2
    assert cells >= 1 if layout != "uniform" else cells == 0


@host_only
def test_pair_layout_choice() -> None:
    """``auto`` picks the layouts the H200 measurements favour: uniform for nf, quantile and
    small dynamic tables, log for float grids and dynamic4, per-binade for dynamic8."""
    data = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    choice = {
        "nf8": (codebook("nf", 8), 0),
        "nf4": (codebook("nf", 4), 0),
        "dynamic3": (codebook("dynamic", 3), 0),
        "dynamic4": (codebook("dynamic", 4), 2),
        "dynamic8": (codebook("dynamic", 8), 1),
        "float8": (codebook("float", 8), 2),
        "quantile8": (codebook("quantile", 8, data=data).half().float().unique(), 0),
    }
    for label, (cb, layout) in choice.items():
        assert pairs.build(cb.numpy()).layout == layout, label


@needs_triton
def test_auto_search_choice() -> None:
    """``search="auto"``: arithmetic codes for int codebooks, and for packing float grids
    without mantissa bits (every entry 0 or a power of two) whose pair table would not be
    uniform (float4, not float3); pair records in shared memory for every other codebook and
    direction, the tree where no pair layout exists."""
    from kbit.kernels import arith
    from kbit.kernels import launch as bw
    from kbit.kernels import triton_kernels as tk

    cfg = bw.DEFAULT_CONFIG
    for k in (3, 4, 8):
        assert bw._resolve_search(codebook("int", k), cfg, pack=False) == "arith"
        for name in ("float", "nf", "dynamic"):
            for direction in (False, True):
                want = "arith" if name == "float" and k == 4 and direction else "pair-smem"
                assert bw._resolve_search(codebook(name, k), cfg, pack=direction) == want
    pow2 = {
        (k, e): arith.pow2_magnitudes(codebook("float", k, e)) for k in (3, 4, 5) for e in (1, 2)
    }
    assert pow2 == {(3, 1): None, (3, 2): 3, (4, 1): None, (4, 2): None, (5, 1): None, (5, 2): None}
    assert arith.pow2_magnitudes(codebook("float", 4)) == 7
    _, kw = bw._code_args(codebook("float", 4), 4, torch.device("cpu"), cfg, True)
    assert kw["FAMILY"] == tk.FAMILY_POW2 and kw["AM"] == 7
    near = codebook("float", 4).clone()
    near[9] = torch.nextafter(near[9], torch.tensor(1.0))  # one entry off a power of two
    assert arith.pow2_magnitudes(near) is None
    assert arith.pow2_magnitudes(codebook("int", 2)) == 1  # {-1, 0, 1}: kept on the int path
    _, kw = bw._code_args(codebook("int", 2), 2, torch.device("cpu"), cfg, True)
    assert kw["FAMILY"] == tk.FAMILY_INT
    close = torch.tensor([-1.0, 0.25, 0.25 + 2**-20, 0.25 + 2**-19, 1.0])
    assert bw._resolve_search(close, cfg, pack=False) == "tree"
    with pytest.raises(ValueError, match="search="):
        bw._resolve_search(codebook("nf", 4), bw.KernelConfig(search="binary"), pack=False)
    with pytest.raises(ValueError, match="int or float"):
        bw._resolve_search(codebook("nf", 4), bw.KernelConfig(search="arith"), pack=False)


def _exact_rn32(q: Fraction) -> np.float32:
    f = np.float32(float(q))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.int32)) & 1))


@host_only
def test_exact_float32_emulation() -> None:
    """``exact.fma32`` and ``exact.div32`` round once, to nearest even, like the GPU: checked
    against rational arithmetic on random operands, cancellations, ties and subnormals."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(300).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    cases = [-(a.astype(np.float64) * b).astype(np.float32), rng.standard_normal(300).astype(
        np.float32) * np.float32(1e-9), np.full(300, np.float32(1e-42))]  # fmt: skip
    for c in cases:
        got = exact.fma32(a, b, c)
        want = [_exact_rn32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                for x, y, z in zip(a, b, c, strict=True)]  # fmt: skip
        assert np.array_equal(got.view(np.int32), np.array(want).view(np.int32))
    s = np.abs(rng.standard_normal(300)).astype(np.float32) + np.float32(1e-3)
    got = exact.div32(a, s)
    want = [_exact_rn32(Fraction(float(x)) / Fraction(float(y))) for x, y in zip(a, s, strict=True)]
    assert np.array_equal(got.view(np.int32), np.array(want).view(np.int32))
    assert np.array_equal(exact.is_correctly_rounded(got, a, s), np.ones(300, bool))
    off = np.nextafter(got, np.float32(np.inf))
    assert not exact.is_correctly_rounded(off, a, s).any()


@host_only
def test_fast_division_on_sampled_scales() -> None:
    """The block-reciprocal division on every value of each fast domain against 60 random
    scales (all scales: the exhaustive test): exact for fp16 inputs; for bf16 inputs only
    quotients below the declared bound differ. The check catches a plain multiplication by
    the reciprocal (no FMA correction), which is not correctly rounded."""
    from kbit.kernels import launch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    rng = np.random.default_rng(2)
    for (xdt, sdt), (div, bound) in launch.FAST_DIVISION.items():
        sv = np.unique(exact.round_to_scale(np.abs(exact.finite_values(names[xdt])), names[sdt]))
        sv = rng.choice(sv[sv > 0], 60, replace=False)
        res = exact.check_fast_division(names[xdt], names[sdt], prescale=div == 2, scales=sv)
        assert res["pairs"] > 0 and res["bound"] <= bound, (xdt, sdt, res)
        if xdt == torch.float16 and sdt == torch.float16:
            assert res["differ"] == 0
    x = exact.finite_values("fp16")
    s = np.full_like(x, np.float32(0.7371))
    r = exact.div32(np.ones(1, np.float32), np.array([0.7371], np.float32))
    naive = (x.astype(np.float64) * np.float64(r[0])).astype(np.float32)
    assert not exact.is_correctly_rounded(naive, x, s).all()
    assert exact.is_correctly_rounded(exact.kernel_divide(x, s, np.full_like(x, r[0])), x, s).all()


@pytest.mark.slow
@pytest.mark.skipif(not EXHAUSTIVE, reason="exhaustive check: set KBIT_EXHAUSTIVE=1")
@pytest.mark.parametrize("domain", ["fp16/fp16", "bf16/fp16", "fp16/bf16", "bf16/bf16"])
def test_fast_division_every_pair(domain: str) -> None:
    """Every pair of every fast-division domain (about 10^9 each; minutes per domain): the
    numbers behind ``launch.FAST_DIVISION``'s bounds."""
    from kbit.kernels import launch

    xd, sd = domain.split("/")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}
    div, bound = launch.FAST_DIVISION[(dt[xd], dt[sd])]
    res = exact.check_fast_division(xd, sd, prescale=div == 2, chunk=32)
    assert res["bound"] <= bound, res
    if domain == "fp16/fp16":
        assert res["differ"] == 0


# --------------------------------------------------------------------------- API behaviour
@needs_triton
def test_bad_inputs_name_the_problem() -> None:
    x = torch.randn(64)
    cb = codebook("int", 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        kernels.quantize_blockwise(x, cb.flip(0), 64, torch.float16, 4)
    with pytest.raises(ValueError, match=r"1\.\.256 entries"):
        kernels.fake_quantize_blockwise(x, torch.linspace(-1, 1, 300), 64)
    with pytest.raises(ValueError, match="more than 2\\*\\*bits"):
        kernels.quantize_blockwise(x, cb, 64, torch.float16, 3)
    with pytest.raises(ValueError, match="block_size"):
        kernels.fake_quantize_blockwise(x, cb, 0)
    with pytest.raises(ValueError, match="scale_dtype"):
        kernels.fake_quantize_blockwise(x, cb, 64, torch.float64)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize_blockwise(x, cb, 64, torch.float16, 9)
    with pytest.raises(ValueError, match="dtype"):
        kernels.fake_quantize_blockwise(x.double(), cb, 64)
    with pytest.raises(ValueError, match="scales has"):
        kernels.dequantize_blockwise(
            torch.zeros(32, dtype=torch.uint8), torch.ones(3), cb, 64, 4, 64
        )
    with pytest.raises(ValueError, match="not a microscaling spec"):
        kernels.fake_quantize_microscaling(x, "int4-b64")


def test_available_reflects_device_and_mode() -> None:
    cpu = torch.zeros(1)
    assert kernels.available(cpu) == (HAS_TRITON and INTERPRETED)
    if HAS_CUDA:
        assert kernels.available(cpu.cuda()) == HAS_TRITON


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_in_interpreter() -> None:
    """Run this file's device checks on CPU tensors through Triton's interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    marks = "not gpu" if EXHAUSTIVE else "not gpu and not slow"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marks]
    proc = subprocess.run(
        [*cmd, __file__], env=env, capture_output=True, text=True,
        timeout=None if EXHAUSTIVE else 600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout


def test_pack_layout_choices() -> None:
    """The packing kernel's layout follows ``KernelConfig`` as documented: blocks of 64..256
    split into 32-value rows in one-warp programs (up to 1024 in 4-warp programs of
    arithmetic codes, never for table codebooks there); the [rows, B] load for table codes in
    4-warp programs from B = 32, otherwise from 64 (in one-warp programs up to 128 and not
    for element codes whose groups are stored as whole words); per-thread word stores in
    one-warp programs from rows of 256, never with the [rows, B] load; 32 codes as whole
    words for k = 3 and 6."""
    from kbit.kernels import launch as L
    from kbit.kernels import triton_kernels as tk

    cfg = L.DEFAULT_CONFIG
    smem = L._SEARCH_MODES["pair-smem"]
    one_warp = ({64, 128, 256}, {4096}, {1024})
    cases = {  # (FAMILY, SEARCH, NTAB, bits): blocks split / with the flat load / lane stores
        (tk.FAMILY_INT, 5, 16, 4): one_warp,
        (tk.FAMILY_INT, 5, 8, 3): one_warp,
        (tk.FAMILY_INT, 5, 255, 8): ({64, 128, 256, 1024}, {4096}, set()),
        (tk.FAMILY_TABLE, smem, 512, 8): (set(), {32, 64, 128, 256, 1024, 4096}, set()),
        (tk.FAMILY_TABLE, smem, 23, 4): one_warp,
        (tk.FAMILY_ELEMENT, 0, 0, 4): one_warp,
        (tk.FAMILY_ELEMENT, 0, 0, 6): one_warp,
    }
    blocks = (32, 64, 128, 256, 1024, 4096)
    for (fam, search, ntab, bits), (split, flat, lanes) in cases.items():
        kw = dict(FAMILY=fam, SEARCH=search, NTAB=ntab)
        lay = {b: L._pack_layout(cfg, b, kw, bits) for b in blocks}
        assert {b for b, (s, *_) in lay.items() if s > 1} == split, (fam, ntab, bits)
        assert all(s in (1, b // 32) for b, (s, *_) in lay.items())
        assert {b for b, (_, _, f, _) in lay.items() if f} == flat, (fam, ntab, bits)
        assert {b for b, (*_, la) in lay.items() if la} == lanes, (fam, ntab, bits)
        assert all(c == (bits in (3, 6)) for _, c, _, _ in lay.values()), (fam, bits)
    off = L.KernelConfig(
        pack_flat=(0, 0, 0), pack_lanes=0, pack_split=(0, 0, 0), pack_word_chunks=False
    )
    for fam, search, ntab, bits in cases:
        kw = dict(FAMILY=fam, SEARCH=search, NTAB=ntab)
        assert all(L._pack_layout(off, b, kw, bits) == (1, False, False, False) for b in blocks)
