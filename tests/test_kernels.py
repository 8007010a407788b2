"""The Triton kernels against the CPU reference: codes, packed bytes, scales and outputs equal.

How the kernels run without a GPU: Triton decides at decoration time whether ``@triton.jit``
functions are compiled or interpreted, from ``TRITON_INTERPRET``. Setting that variable inside
this process would leak into every test module that imports Triton after this one (and would
be too late if one imported it before). So in an ordinary run, ``test_kernels_in_interpreter``
starts a child pytest on this file with ``TRITON_INTERPRET=1``; in that child the parametrized
checks run on CPU tensors. In the parent, the same checks run on CUDA when a device is present
(marked ``gpu``) and are skipped otherwise, with the reason saying where they ran instead.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from kbit import kernels
from kbit.blockwise import quantize
from kbit.codebooks import codebook
from kbit.packing import pack
from kbit.spec import QuantSpec

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


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


def _input(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).exp() * 2
    return x.to(dtype).to(device)


def _case_id(case: tuple[str, int, torch.Tensor]) -> str:
    return f"{case[0]}{case[1]}"


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
        assert torch.equal(lib_packed, pack(codes, k)) and torch.equal(lib_scales, scales)
        assert torch.equal(lib_y, y_ref)

    y = kernels.fake_quantize_blockwise(x, cb, block, torch.float16)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y.cpu().reshape(-1), y_ref), f"{name}{k} B={block} {dtype}"

    packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
    assert torch.equal(sc.cpu(), scales)
    assert torch.equal(packed.cpu(), pack(codes, k)), f"{name}{k} B={block}"

    deq = kernels.dequantize_blockwise(packed, sc, cb, block, k, n, dtype)
    assert torch.equal(deq.cpu(), y_ref)


@pytest.mark.parametrize("block", [16, 24, 32, 64, 100, 128, 1000, 4096, 5000, None])
@pytest.mark.parametrize("k", [3, 4, 8])
def test_block_sizes_and_paths(device: str, block: int | None, k: int) -> None:
    """Fused (B <= 4096, B % 8 == 0 to pack) and two-pass paths (large, odd or per-tensor
    blocks) give the reference result, on lengths that end in a partial block."""
    cb = codebook("float", k)
    n = 12_345
    x = _input(n, torch.float16, device, seed=k * 1000 + (block or 0))
    ref_packed, scales, y_ref = _library(x, "float", k, block, torch.float16)
    assert torch.equal(kernels.fake_quantize_blockwise(x, cb, block).cpu(), y_ref)
    packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
    assert torch.equal(sc.cpu(), scales)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(kernels.dequantize_blockwise(packed, sc, cb, block, k, n).cpu(), y_ref)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_and_input_dtypes(device: str, scale_dtype: torch.dtype, dtype: torch.dtype) -> None:
    cb = codebook("nf", 4)
    x = _input(4100, dtype, device, seed=3)
    ref_packed, scales, y_ref = _library(x, "nf", 4, 64, scale_dtype)
    assert torch.equal(kernels.fake_quantize_blockwise(x, cb, 64, scale_dtype).cpu(), y_ref)
    packed, sc = kernels.quantize_blockwise(x, cb, 64, scale_dtype, 4)
    assert sc.dtype == scale_dtype and torch.equal(sc.cpu(), scales)
    assert torch.equal(packed.cpu(), ref_packed)
    deq = kernels.dequantize_blockwise(packed, sc, cb, 64, 4, x.numel(), dtype)
    assert torch.equal(deq.cpu(), y_ref)


def test_scale_rounding_edge_cases(device: str) -> None:
    """All-zero blocks, absmax beyond fp16's max (clamped to 65504), absmax that rounds up or
    down in fp16, and absmax small enough to become an fp16 subnormal or zero."""
    cb = codebook("int", 4)
    blocks = [
        torch.zeros(32),
        torch.linspace(-1e5, 7e4, 32),
        torch.linspace(-1.0, 1.0004, 32),  # 1.0004 rounds to 1.0 in fp16: |xn| > 1
        torch.linspace(-3e-6, 1e-6, 32),  # fp16 subnormal scale
        torch.linspace(-1e-9, 1e-9, 32),  # scale underflows to 0: everything maps to 0
        torch.full((32,), -2.5),
    ]
    x = torch.cat(blocks).to(device)
    for sd in (torch.float16, torch.bfloat16):
        codes, scales, y_ref = _reference(x, cb, 32, sd)
        if sd == torch.float16:
            assert float(scales[1]) == 65504.0 and float(scales[4]) == 0.0
        assert torch.equal(kernels.fake_quantize_blockwise(x, cb, 32, sd).cpu(), y_ref)
        packed, sc = kernels.quantize_blockwise(x, cb, 32, sd, 4)
        assert torch.equal(sc.cpu(), scales)
        assert torch.equal(packed.cpu(), pack(codes, 4))


@pytest.mark.parametrize("name", ["int", "float", "dynamic", "nf"])
def test_exact_midpoints_take_the_lower_code(device: str, name: str) -> None:
    """Values exactly on a midpoint (scale 1, so xn == x) get the lower code; the next float32
    above a midpoint gets the upper one. Division shortcuts fail exactly here."""
    cb = codebook(name, 4)
    mids = (cb[:-1] + cb[1:]) / 2
    above = torch.nextafter(mids, torch.tensor(math.inf))
    x = torch.cat([mids, above, torch.tensor([1.0, -1.0])]).float()
    pad = (-x.numel()) % 64
    x = torch.cat([x, torch.zeros(pad)]).to(device)
    codes, _, y_ref = _reference(x, cb, None, torch.float32)
    m = mids.numel()
    assert torch.equal(codes[:m].long(), torch.arange(m))
    assert torch.equal(codes[m : 2 * m].long(), torch.arange(1, m + 1))
    packed, _ = kernels.quantize_blockwise(x, cb, None, torch.float32, 4)
    assert torch.equal(packed.cpu(), pack(codes, 4))
    assert torch.equal(kernels.fake_quantize_blockwise(x, cb, None, torch.float32).cpu(), y_ref)


def test_division_is_correctly_rounded(device: str) -> None:
    """Random values around every midpoint of an 8-bit table, with scales that are not powers
    of two: an approximate division flips codes here, the IEEE one never does."""
    cb = codebook("dynamic", 8)
    gen = torch.Generator().manual_seed(11)
    mids = (cb[:-1] + cb[1:]) / 2
    scale = torch.tensor(0.7371).half().float()
    base = mids.repeat(16) * scale
    x = base * (1 + (torch.rand(base.numel(), generator=gen) - 0.5) * 1e-6)
    x = torch.cat([x, scale.view(1)]).float().to(device)
    codes, _, y_ref = _reference(x, cb, None, torch.float16)
    packed, _ = kernels.quantize_blockwise(x, cb, None, torch.float16, 8)
    assert torch.equal(packed.cpu(), pack(codes, 8))
    assert torch.equal(kernels.fake_quantize_blockwise(x, cb, None).cpu(), y_ref)


def test_shapes_and_empty(device: str) -> None:
    cb = codebook("int", 3)
    x = _input(3 * 5 * 67, torch.bfloat16, device, seed=5).view(3, 5, 67)
    y = kernels.fake_quantize_blockwise(x, cb, 32)
    assert y.shape == x.shape
    assert torch.equal(y.cpu().reshape(-1), _reference(x, cb, 32, torch.float16)[2])
    e = torch.empty(0, 4, dtype=torch.float16, device=device)
    assert kernels.fake_quantize_blockwise(e, cb, 32).shape == (0, 4)
    packed, sc = kernels.quantize_blockwise(e, cb, 32, torch.float16, 3)
    assert packed.numel() == 0 and sc.numel() == 0


@pytest.mark.parametrize(
    ("search", "step", "reg_levels"),
    [
        ("tree", 1, 0),
        ("tree", 1, 3),
        ("tree", 2, 0),
        ("tree", 2, 2),
        ("tree", 3, 2),
        ("tree", 4, 1),
        ("bucket", 1, 2),
        ("bucket-mid", 1, 2),
        ("bucket-smem", 1, 2),
    ],
)
def test_search_variants_agree(device: str, search: str, step: int, reg_levels: int) -> None:
    """Every search (tree: register levels, one gather per level, subtree records read several
    levels at a time; bucket tables of both record kinds, also for small codebooks) gives the
    reference codes, on all three kernel shapes."""
    from kbit.kernels.launch import DEFAULT_CONFIG, KernelConfig

    cfg = KernelConfig(
        **{
            **DEFAULT_CONFIG.__dict__,
            "search": search,
            "bucket_min_entries": 0,
            "search_step": step,
            "reg_levels": reg_levels,
        }
    )
    for name, k in (("dynamic", 8), ("nf", 4), ("float", 5), ("int", 3)):
        cb = codebook(name, k)
        x = _input(2051, torch.float32, device, seed=k)
        for block in (64, 100, None):
            ref_packed, _, y_ref = _library(x, name, k, block, torch.float16)
            y = kernels.fake_quantize_blockwise(x, cb, block, config=cfg)
            assert torch.equal(y.cpu(), y_ref), (name, k, block)
            packed, _ = kernels.quantize_blockwise(x, cb, block, torch.float16, k, config=cfg)
            assert torch.equal(packed.cpu(), ref_packed), (name, k, block)


def _edge_codebooks() -> list[tuple[str, int, torch.Tensor]]:
    """Every codebook of CODEBOOKS plus tables that stress the bucket layout: a midpoint at
    exactly 0 (no zero entry), entries near fp32's smallest normal, two midpoints too close
    together for any bucket layout to separate (read as buckets of two midpoints)."""
    extra = [
        ("sym-nozero", 2, torch.tensor([-1.0, -0.3, 0.3, 1.0])),
        ("tiny", 3, torch.tensor([-1.0, -1e-30, 0.0, 1e-37, 1.0])),
        ("close-triple", 3, torch.tensor([-1.0, 0.25, 0.25 + 2**-20, 0.25 + 2**-19, 1.0])),
    ]
    return list(CODEBOOKS) + extra


@pytest.mark.parametrize("search", ["bucket", "bucket-mid", "bucket-smem"])
def test_bucket_search_at_midpoints(device: str, search: str) -> None:
    """With scale 1 (so xn == x): every midpoint, the floats just above and below it, every
    entry, signed zeros, subnormals and tiny normals get the reference code, through the fused
    and the two-pass kernels, for every codebook family at k = 2..8."""
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
            assert torch.equal(y.cpu(), y_ref), (name, k, block)
            packed, _ = kernels.quantize_blockwise(x, cb, block, torch.float32, k, config=cfg)
            assert torch.equal(packed.cpu(), pack(codes, k)), (name, k, block)


@needs_triton
def test_bucket_layouts() -> None:
    """Every codebook up to 8 bits gets a bucket table (so ``auto`` never falls back to the
    tree for them); no bucket holds more than ``refine`` midpoints; each bucket's first code is
    the number of midpoints below it, and its records hold that midpoint and codebook entries.
    The standard types get one-read records. A codebook with midpoints below fp32's normal
    range has no layout and falls back to the tree."""
    from kbit.kernels import launch as bw

    for name, k, cb in _edge_codebooks():
        cb = cb.float().contiguous()
        mids = ((cb[:-1] + cb[1:]) / 2).numpy()
        for mode in (1, 2, 3):
            bt = bw._bucket_tables(cb, torch.device("cpu"), mode)
            assert bt is not None, (name, k)
            if name in ("int", "float", "nf", "dynamic"):
                assert bt.mode == mode and bt.refine == 1, (name, k, mode)
            if name == "close-triple":
                assert bt.mode == max(mode, 2) and bt.refine == 2
            if bt.mode == 3:
                assert bt.ntab >= max(cb.numel(), mids.size + bt.refine)
                assert torch.equal(bt.cb[: cb.numel()], cb) and bt.mids.numel() == bt.ntab
            idx = bw._bucket_index(mids, bt.layout)
            assert idx.size == 0 or int(torch.bincount(torch.from_numpy(idx)).max()) <= bt.refine
            lows = bt.pack.long() >> 32 if bt.mode == 1 else bt.pack.long()
            assert torch.equal(lows, torch.from_numpy(bw._bucket_lows(mids, bt.layout)))
            assert bool((lows[1:] >= lows[:-1]).all()) and int(lows.max()) <= cb.numel() - 1
            for j in range(mids.size):  # the bucket of midpoint j starts above j of them
                assert int(lows[idx[j]]) <= j
            if bt.mode == 1:
                fake = bt.fake.numpy()
                mid = (fake & 0xFFFFFFFF).astype("uint32").view("float32")
                lo = (fake >> 32).astype("uint32").view("float32")
                pad = torch.cat([torch.from_numpy(mids), torch.tensor([math.inf])])
                assert torch.equal(torch.from_numpy(mid), pad[lows])
                assert torch.equal(torch.from_numpy(lo), cb[lows])
                assert torch.equal(bt.hi, cb[(lows + 1).clamp(max=cb.numel() - 1)])
    deep = torch.tensor([-1.0, 0.0, 1e-38, 1.0])
    assert bw._bucket_tables(deep, torch.device("cpu"), 1) is None
    if INTERPRETED:
        x = torch.tensor([0.5e-38, 1e-38, 2e-38, 0.2, -0.2, 1.0] + [0.0] * 58)
        cfg = bw.KernelConfig(search="bucket", bucket_min_entries=0)
        _, _, y_ref = _reference(x, deep, None, torch.float32)
        assert torch.equal(kernels.fake_quantize_blockwise(x, deep, None, config=cfg), y_ref)


@needs_triton
def test_auto_search_choice() -> None:
    """``search="auto"``: the tree up to 8 entries, one-read bucket records up to 16, the
    1-byte bucket table above for fake quantization; bucket records for packing above 8."""
    from kbit.kernels import launch as bw

    cfg = bw.DEFAULT_CONFIG
    for k, fake, packed in (
        (3, "tree", "tree"),
        (4, "bucket", "bucket"),
        (8, "bucket-mid", "bucket"),
    ):
        for name in ("int", "nf", "dynamic"):
            cb = codebook(name, k)
            assert bw._resolve_search(cb, cfg, pack=False) == fake, (name, k)
            assert bw._resolve_search(cb, cfg, pack=True) == packed, (name, k)
    with pytest.raises(ValueError, match="search="):
        bw._resolve_search(codebook("nf", 4), bw.KernelConfig(search="binary"), pack=False)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
def test_fast_division_is_exact_on_fp16() -> None:
    """The fused kernels' fast division (fp16 inputs, fp16 scales) equals ``div_rn`` for every
    finite fp16 value divided by every positive finite fp16 scale: 2 * 10^9 pairs, all of the
    domain it is used on."""
    import triton
    import triton.language as tl

    from kbit.kernels import triton_kernels as tk

    @triton.jit
    def _compare(x_ptr, s_ptr, bad_ptr, NX: tl.constexpr):
        s = tl.load(s_ptr + tl.program_id(0) + tl.zeros([1, 1], tl.int32))
        x = tl.load(x_ptr + tl.program_id(1) * NX + tl.arange(0, NX)[None, :]).to(tl.float32)
        fast = tk._scaled(x, s, True)
        ref = tk._scaled(x, s, False)
        diff = fast.to(tl.int32, bitcast=True) != ref.to(tl.int32, bitcast=True)
        # -0 and +0 may differ in sign: the same value, the same code
        diff = diff & ((fast != 0.0) | (ref != 0.0))
        tl.atomic_add(bad_ptr, tl.sum(tl.sum(diff.to(tl.int32), axis=1), axis=0))

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    allh = bits.view(torch.float16)
    xs = allh[torch.isfinite(allh)].cuda()
    scales = allh[torch.isfinite(allh) & (allh > 0)].float().cuda()
    xs = torch.cat([xs, xs[: (1 << 16) - xs.numel()]])  # pad with repeats to 2**16
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    _compare[(scales.numel(), 16)](xs, scales, bad, NX=4096, num_warps=4)
    assert xs.numel() == 1 << 16 and scales.numel() == 31743
    assert int(bad.item()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
def test_large_tensor_on_gpu() -> None:
    """Millions of values on the GPU: the fused path with many programs, no mask, 8-bit."""
    cb = codebook("dynamic", 8)
    x = torch.randn(1 << 22, device="cuda", dtype=torch.float16)
    for block in (64, 4096):
        codes, scales, y_ref = _reference(x, cb, block, torch.float16)
        assert torch.equal(kernels.fake_quantize_blockwise(x, cb, block).cpu(), y_ref)
        packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, 8)
        assert torch.equal(packed.cpu(), pack(codes, 8))
        assert torch.equal(sc.cpu(), scales)


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
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu"]
    proc = subprocess.run(
        [*cmd, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout
