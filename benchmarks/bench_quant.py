"""Throughput of kbit's Triton quantization kernels against a device copy (and bitsandbytes).

One run writes ONE table for the GPU it runs on (``quant_<gpu name>.json`` / ``.md`` in
``--out``; other GPUs' files are left alone). On one fp16 randn tensor of 2^28 values it
measures:

* the anchor: a device-to-device copy (bytes read + written / time), the ceiling for any
  one-pass elementwise kernel;
* ``fake_quantize`` (read fp16, write fp16) and quantize-to-packed (read fp16, write k-bit codes
  and block scales) for every codebook family at k = 3, 4, 8 (int, float, nf, dynamic,
  quantile) and the microscaling types (mxfp4/6/8 in both exponent splits, mxint8, mxint4,
  nvfp4), at B = 32 .. 4096 (``--quick``: 64 and 1024; nvfp4 also at its own 16), as GB/s and
  % of the copy; dequantize too (without ``--quick``); ``--variants`` times every code
  search on the absmax codebooks;
* against bitsandbytes when it imports: ``quantize_4bit`` / ``dequantize_4bit`` (nf4, fp4)
  and 8-bit ``quantize_blockwise`` / ``dequantize_blockwise`` at B = 64 .. 4096.

``--check`` first compares every kernel path with ``kbit.blockwise`` on the GPU, bit for bit
(random and adversarial inputs: exact midpoints and ties, every fp16 value, zeros and -0,
subnormals, saturation, zero and subnormal scales, partial blocks, every input and scale dtype)
and the fast division with ``div_rn`` on every pair of its domains; any difference prints the
case and exits with status 1 before anything is timed. ``--check-only`` stops after it.

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first). GB/s counts the
bytes each implementation must move (its input once, its outputs once, scales included).

Usage (each command well inside 10 minutes on an H200):
    python benchmarks/bench_quant.py --out DIR --check-only      # full self-check, ~5 min
    python benchmarks/bench_quant.py --out DIR                   # the full table, ~6 min
    python benchmarks/bench_quant.py --out DIR --quick --check   # both reduced, ~4 min
Options: --variants [--variant-blocks 64,1024], --families int,float,nf,dynamic,quantile,mx,
--bits 3,4,8, --blocks 32,..., --numel N, --no-bnb, --check-parts absmax,microscaling,...
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kbit import kernels
from kbit.blockwise import (
    fake_quantize,
    fake_quantize_blockwise_reference,
    quantize,
    quantize_blockwise_reference,
)
from kbit.codebooks import codebook, element_grid
from kbit.io import write_json, write_text
from kbit.kernels.launch import DEFAULT_CONFIG, KernelConfig
from kbit.packing import pack
from kbit.spec import QuantSpec

FAMILIES = ("int", "float", "nf", "dynamic", "quantile")
BITS = (3, 4, 8)
BLOCKS = (32, 64, 128, 256, 1024, 4096)
MX_SPECS = (
    "mxfp4", "mxfp6", "mxfp6-e3-b32", "mxfp8", "mxfp8-e5-b32", "mxint8", "mxint4", "nvfp4",
)  # fmt: skip
QUICK_BLOCKS = (64, 1024)
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)
#: where the checks run: "cuda", or "cpu" under TRITON_INTERPRET=1 (a slow local smoke run)
DEVICE = "cuda"
#: code searches timed by --variants (label -> KernelConfig fields), for table codebooks and
#: for int/float
TABLE_VARIANTS = {
    "pair-smem": dict(search="pair-smem"),
    "pair-smem/uniform": dict(search="pair-smem", pair_layout="uniform"),
    "pair-smem/log": dict(search="pair-smem", pair_layout="log"),
    "pair-smem/binade": dict(search="pair-smem", pair_layout="binade"),
    "pair/binade": dict(search="pair", pair_layout="binade"),
    "bucket-mid": dict(search="bucket-mid"),
}
ARITH_VARIANTS = {
    "arith": dict(search="arith"),
    "pair-smem": dict(search="pair-smem"),
    "pair-smem/log": dict(search="pair-smem", pair_layout="log"),
}


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One row: an absmax codebook (``name``/``bits``) or a microscaling spec (``spec``)."""

    label: str
    family: str
    bits: int
    spec: str | None = None  # microscaling spec id without the block suffix

    @property
    def microscaling(self) -> bool:
        return self.spec is not None


def cases(families: tuple[str, ...], bits: tuple[int, ...]) -> list[Case]:
    out = [Case(f"{f}{k}", f, k) for f in families if f != "mx" for k in bits]
    if "mx" in families:
        for s in MX_SPECS:
            sp = QuantSpec.parse(s)
            out.append(Case(s.removesuffix("-b32"), sp.dtype, sp.bits, s))
    return out


def mx_spec(case: Case, block: int) -> QuantSpec:
    return QuantSpec.parse(case.spec).replace(block_size=block)


def case_codebook(case: Case, x: torch.Tensor) -> torch.Tensor:
    if case.family == "quantile":
        return codebook("quantile", case.bits, data=x).to(torch.float16).float().unique()
    return codebook(case.family, case.bits)


def auto_search(cb: torch.Tensor, pack_: bool = False, cfg: KernelConfig = DEFAULT_CONFIG) -> str:
    from kbit.kernels import launch

    return launch._resolve_search(cb, cfg, pack_)


# ----------------------------------------------------------------------------- timing
def _bench(fn, warmup_ms: int, rep_ms: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events).

    ``fn`` runs once first (compilation, table uploads), then ``do_bench`` warms up for
    ``warmup_ms``: long enough for the clocks to come back up after the host-side pause, which
    otherwise makes the first measurements after a compilation run at idle clocks."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _scale_bytes(case: Case) -> int:
    return 1 if case.microscaling else 2


def time_case(
    x: torch.Tensor, case: Case, block: int, copy_gbs: float, reps: tuple[int, int], dequant: bool,
    cfg: KernelConfig = DEFAULT_CONFIG, pack_compare: bool = False,
) -> dict:  # fmt: skip
    """fake quantize, quantize-to-packed (and dequantize) of one case at one block size;
    ``pack_compare``: also the other packing kernel (``pack_chunks`` flipped), and whether its
    bytes are the same."""
    n = x.numel()
    nblocks = -(-n // block)
    row = dict(case=case.label, family=case.family, bits=case.bits, block=block)
    if case.microscaling:
        spec = mx_spec(case, block)
        fake = partial(kernels.fake_quantize_microscaling, x, spec, config=cfg)
        quant = partial(kernels.quantize_microscaling, x, spec, config=cfg)
        row["search"] = "arith"
    else:
        cb = case_codebook(case, x)
        fake = partial(kernels.fake_quantize_blockwise, x, cb, block, config=cfg)
        quant = partial(kernels.quantize_blockwise, x, cb, block, torch.float16, case.bits,
                        config=cfg)  # fmt: skip
        row["search"] = auto_search(cb, False, cfg)
        row["pack_search"] = auto_search(cb, True, cfg)
    # NVFP4's global scale needs the tensor's absmax before any block: one more read of x
    extra = 2 * n if case.family == "nvfp" else 0
    ms = _bench(fake, *reps)
    row.update(fake_ms=ms, fake_gbs=_gbs(4 * n + extra, ms))
    row["fake_pct"] = 100 * row["fake_gbs"] / copy_gbs
    moved = extra + 2 * n + math.ceil(n * case.bits / 8) + _scale_bytes(case) * nblocks
    ms = _bench(quant, *reps)
    row.update(quant_ms=ms, quant_gbs=_gbs(moved, ms))
    row["quant_pct"] = 100 * row["quant_gbs"] / copy_gbs
    if pack_compare:  # the other packing kernel side by side, and the same bytes from it
        old = replace(cfg, pack_chunks=not cfg.pack_chunks)
        prev = partial(quant.func, *quant.args, **{**quant.keywords, "config": old})
        row["pack_same_as_prev"] = all(
            a is b or _same(a, b) for a, b in zip(quant(), prev(), strict=True)
        )
        ms = _bench(prev, *reps)
        row.update(quant_prev_ms=ms, quant_prev_gbs=_gbs(moved, ms))
        row["quant_prev_pct"] = 100 * row["quant_prev_gbs"] / copy_gbs
    if dequant:
        out = quant()
        if case.microscaling:
            packed, scales, g = out
            fn = partial(kernels.dequantize_microscaling, packed, scales, spec, n, g)
        else:
            packed, scales = out
            fn = partial(kernels.dequantize_blockwise, packed, scales, cb, block, case.bits, n)
        ms = _bench(fn, *reps)
        row.update(dequant_ms=ms, dequant_gbs=_gbs(moved - extra, ms))  # no absmax pass
        row["dequant_pct"] = 100 * row["dequant_gbs"] / copy_gbs
    return row


def bench_rows(
    x, case_list, blocks, copy_gbs, reps, dequant, on_row=None, pack_compare=False, only=None
) -> list[dict]:
    """Every case at every block size (``only``: just these (label, block) pairs);
    ``on_row(rows)`` after each (a partial result file, so a run cut short keeps what it
    measured)."""
    rows = []
    for case in case_list:
        bl = list(blocks)
        if case.spec == "nvfp4" and 16 not in bl:
            bl = [16, *bl]
        for block in bl:
            if only is not None and (case.label, block) not in only:
                continue
            try:
                row = time_case(x, case, block, copy_gbs, reps, dequant,
                                pack_compare=pack_compare)  # fmt: skip
            except Exception as e:  # keep the other measurements
                row = dict(case=case.label, family=case.family, bits=case.bits, block=block,
                           error=repr(e)[:300])  # fmt: skip
            rows.append(row)
            print(_fmt_row(row), flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """One row per (case, block) from the rows of several timing rounds: each timing field
    (``*_ms``, ``*_gbs``, ``*_pct``) the median over the rounds that measured it, the rounds'
    percentages kept as ``*_pct_rounds``. Percentages are taken within each round, against
    that round's copy, before the median. A row that failed in a round keeps the other rounds'
    timings; one that failed in every round keeps its first error."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            by_key.setdefault((row["case"], row["block"]), []).append(row)
    out = []
    for got in by_key.values():
        ok = [r for r in got if "error" not in r]
        if not ok:
            out.append(got[0])
            continue
        row = dict(ok[0])
        for field in ok[0]:
            if field.endswith(("_ms", "_gbs", "_pct")):
                vals = [r[field] for r in ok if field in r]
                row[field] = statistics.median(vals)
                if field.endswith("_pct"):
                    row[f"{field}_rounds"] = vals
        out.append(row)
    return out


def unsettled(rows: list[dict], spread: float) -> set[tuple[str, int]]:
    """(case, block) of the rows (``median_rows``) whose rounds differ by more than
    ``spread`` points of copy in any operation: a slow episode in more than one round moves
    the median, so those rows are timed again."""
    out = set()
    for row in rows:
        for field, vals in row.items():
            if field.endswith("_pct_rounds") and max(vals) - min(vals) > spread:
                out.add((row["case"], row["block"]))
    return out


def _fmt_row(row: dict) -> str:
    if "error" in row:
        return f"{row['case']} B={row['block']}: ERROR {row['error']}"
    s = (
        f"{row['case']} B={row['block']} [{row.get('search')}]: fake {row['fake_ms']:.3f} ms "
        f"({row['fake_pct']:.0f}%), quant {row['quant_ms']:.3f} ms ({row['quant_pct']:.0f}%)"
    )
    if "dequant_ms" in row:
        s += f", dequant {row['dequant_ms']:.3f} ms ({row['dequant_pct']:.0f}%)"
    return s


def variants(x: torch.Tensor, copy_gbs: float, blocks, reps) -> list[dict]:
    """Every code search on the table and arithmetic codebooks (speed only; results equal)."""
    rows = []
    for case in cases(FAMILIES, BITS):
        cb = case_codebook(case, x)
        names = ARITH_VARIANTS if case.family in ("int", "float") else TABLE_VARIANTS
        for search, fields in names.items():
            cfg = replace(DEFAULT_CONFIG, bucket_min_entries=0, **fields)
            for block in blocks:
                row = dict(case=case.label, search=search, block=block)
                try:
                    ms = _bench(partial(kernels.fake_quantize_blockwise, x, cb, block,
                                        config=cfg), *reps)  # fmt: skip
                    row.update(fake_ms=ms, fake_pct=100 * _gbs(4 * x.numel(), ms) / copy_gbs)
                    q = partial(kernels.quantize_blockwise, x, cb, block, torch.float16,
                                case.bits, config=cfg)  # fmt: skip
                    ms = _bench(q, *reps)
                    moved = 2 * x.numel() + x.numel() * case.bits / 8 + 2 * x.numel() / block
                    row.update(quant_ms=ms, quant_pct=100 * _gbs(moved, ms) / copy_gbs)
                except Exception as e:
                    row["error"] = repr(e)[:300]
                rows.append(row)
                print("variant", row, flush=True)
    return rows


# ----------------------------------------------------------------------------- bitsandbytes
def _load_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # a missing or broken install must not stop the kbit numbers
        print(f"bitsandbytes unavailable: {e!r}", flush=True)
        return None, None
    return bnb, bnbf


def bench_vs_bnb(x: torch.Tensor, bnbf, reps) -> list[dict]:
    """nf4/fp4 ``quantize_4bit`` and 8-bit dynamic ``quantize_blockwise``, kbit vs bnb."""
    n = x.numel()
    rows: list[dict] = []
    for label, name, k in (("nf4", "nf", 4), ("fp4", "float", 4), ("dynamic8", "dynamic", 8)):
        cb = codebook(name, k) if label != "fp4" else codebook("float", 4, 2)
        for block in BNB_BLOCKS:
            row = dict(kind=label, block=block)
            try:
                packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
                row["kbit_quant_ms"] = _bench(
                    partial(kernels.quantize_blockwise, x, cb, block, torch.float16, k), *reps
                )
                row["kbit_dequant_ms"] = _bench(
                    partial(kernels.dequantize_blockwise, packed, sc, cb, block, k, n), *reps
                )
                if k == 4:
                    bq, st = bnbf.quantize_4bit(x, blocksize=block, quant_type=label)
                    row["bnb_quant_ms"] = _bench(
                        partial(bnbf.quantize_4bit, x, blocksize=block, quant_type=label), *reps
                    )
                    row["bnb_dequant_ms"] = _bench(partial(bnbf.dequantize_4bit, bq, st), *reps)
                else:
                    bq, st = bnbf.quantize_blockwise(x, blocksize=block)
                    row["bnb_quant_ms"] = _bench(
                        partial(bnbf.quantize_blockwise, x, blocksize=block), *reps
                    )
                    row["bnb_dequant_ms"] = _bench(
                        partial(bnbf.dequantize_blockwise, bq, st), *reps
                    )
                row["quant_speedup"] = row["bnb_quant_ms"] / row["kbit_quant_ms"]
                row["dequant_speedup"] = row["bnb_dequant_ms"] / row["kbit_dequant_ms"]
            except Exception as e:
                row["error"] = repr(e)[:300]
            rows.append(row)
            print("bnb", row, flush=True)
    return rows


# ----------------------------------------------------------------------------- GPU self-check
class Mismatch(AssertionError):
    pass


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so -0 and +0 differ, and a NaN never passes)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 1: torch.uint8}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def _expect(ok: bool, what: str, failures: list[str]) -> None:
    if not ok:
        failures.append(what)
        print(f"MISMATCH {what}", flush=True)


def random_input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, generator=gen, device=DEVICE)
    x = x * torch.randn(n, generator=gen, device=DEVICE).exp() * 0.5
    return x.to(dtype)


def adversarial_absmax(cb: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Blocks whose values sit exactly on, just above and below every midpoint and entry,
    with scales that are powers of two (so x / s is exact), plus zero, -0, subnormal and
    saturating blocks. Exact for fp32 inputs; rounded to fp16/bf16 otherwise."""
    cb = cb.float().to(DEVICE)
    mids = (cb[:-1] + cb[1:]) / 2
    up = torch.nextafter(mids, torch.tensor(math.inf, device=DEVICE))
    down = torch.nextafter(mids, torch.tensor(-math.inf, device=DEVICE))
    vals = torch.cat([mids, up, down, cb, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0],
                                                       device=DEVICE)])  # fmt: skip
    body = max(1, block - 1)
    parts = []
    for scale in (1.0, 2.0**-7, 2.0**9):
        for start in range(0, vals.numel(), body):
            chunk = vals[start : start + body] * scale
            head = torch.tensor([scale], device=DEVICE)  # absmax = scale exactly
            blk = torch.cat([head, chunk, torch.zeros(body - chunk.numel(), device=DEVICE)])
            parts.append(blk[:block])
    extra = [
        torch.zeros(block, device=DEVICE),  # zero scale
        torch.full((block,), -0.0, device=DEVICE),
        torch.linspace(-1e5, 7e4, block, device=DEVICE),  # clamped fp16 scale
        torch.linspace(-3e-6, 1e-6, block, device=DEVICE),  # fp16 subnormal scale
        torch.linspace(-1e-9, 1e-9, block, device=DEVICE),  # fp16 scale rounds to 0
        torch.linspace(-1e-39, 2e-39, block, device=DEVICE),  # fp32/bf16 subnormal scale
        torch.linspace(-1.0, 1.0004, block, device=DEVICE),  # absmax rounds down in fp16
    ]
    x = torch.cat(parts + extra)
    if dtype == torch.float16:
        x = x.clamp(-65504, 65504)
    return x.to(dtype)


def adversarial_mx(spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Blocks with exact raw-grid ties (ties to even), entries, neighbours, saturation and
    tiny or zero blocks, under power-of-two shared scales."""
    g = element_grid(spec)
    grid = g.values.to(DEVICE)
    mids = (grid[:-1] + grid[1:]) / 2
    inf = torch.tensor(math.inf, device=DEVICE)
    vals = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), grid,
                      grid * 1.75, torch.tensor([0.0, -0.0], device=DEVICE)])  # fmt: skip
    b = spec.block_size
    body = max(1, b - 1)
    parts = []
    top = 2.0**g.emax  # absmax 2^emax: shared exponent 0, x / s == x
    for k in (0, -5, 7):
        for start in range(0, vals.numel(), body):
            chunk = vals[start : start + body] * 2.0**k
            head = torch.tensor([top * 2.0**k], device=DEVICE)
            parts.append(
                torch.cat([head, chunk, torch.zeros(body - chunk.numel(), device=DEVICE)])[:b]
            )
    parts += [
        torch.zeros(b, device=DEVICE),
        torch.full((b,), -0.0, device=DEVICE),
        torch.linspace(-1e-38, 1e-39, b, device=DEVICE),  # 2^-127 scale (fp32/bf16)
        torch.linspace(-1.0, 1.0, b, device=DEVICE) * 3e38,
    ]
    x = torch.cat(parts)
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


def all_fp16(dtype: torch.dtype) -> torch.Tensor:
    """Every finite fp16 value once, in a fixed shuffled order."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    v = bits.view(torch.float16)
    v = v[torch.isfinite(v)]
    perm = torch.randperm(v.numel(), generator=torch.Generator().manual_seed(3))
    return v[perm].to(DEVICE).to(dtype)


def check_absmax(failures: list[str], quick: bool = False) -> int:
    """Kernels vs kbit.blockwise for every codebook family at k = 2..8 (``quick``: k = 2, 3, 4,
    8 and three exponent splits), rotating block sizes, input and scale dtypes over random,
    adversarial and all-fp16 inputs."""
    dts = (torch.float16, torch.bfloat16, torch.float32)
    blocks = (32, 64, 100, 4096, 5000, None)
    count = 0
    books = []
    data = random_input(1 << 16, torch.float32, 0)
    for k in (2, 3, 4, 8) if quick else range(2, 9):
        books.append((f"int{k}", k, codebook("int", k)))
        splits = sorted({1, k - 1, QuantSpec(dtype="float", bits=k).exponent_bits or 1})
        for e in (splits if quick else range(1, k)) if k >= 3 else ():
            books.append((f"float{k}-e{e}", k, codebook("float", k, e)))
        books.append((f"nf{k}", k, codebook("nf", k)))
        if k >= 3:
            books.append((f"dynamic{k}", k, codebook("dynamic", k)))
        books.append((f"quantile{k}", k, codebook("quantile", k, data=data)))
    for i, (label, k, cb) in enumerate(books):
        for j in range(2 if quick else 3):
            dt = dts[(i + j) % 3]
            sdt = dts[(i + 2 * j) % 3]
            block = blocks[(i + j) % len(blocks)]
            b = block or 256
            inputs = [random_input(12_347, dt, 7 * i + j), adversarial_absmax(cb, b, dt)]
            if j == 0 and (not quick or i % 3 == 0):
                inputs.append(all_fp16(dt))
            for x in inputs:
                what = f"{label} B={block} x={dt} scale={sdt} n={x.numel()}"
                y = kernels.fake_quantize_blockwise(x, cb, block, sdt)
                _expect(_same(y, fake_quantize_blockwise_reference(x, cb, block, sdt)),
                        f"fake {what}", failures)  # fmt: skip
                packed, sc = kernels.quantize_blockwise(x, cb, block, sdt, k)
                codes, scales = quantize_blockwise_reference(x, cb, block, sdt)
                _expect(_same(packed, pack(codes, k)) and _same(sc, scales), f"pack {what}",
                        failures)  # fmt: skip
                d = kernels.dequantize_blockwise(packed, sc, cb, block, k, x.numel(), dt)
                _expect(_same(d, y.reshape(-1)), f"dequant {what}", failures)
                count += 1
    return count


def check_microscaling(failures: list[str], quick: bool = False) -> int:
    """Microscaling kernels vs ``quantize(...).dequantize()`` (torch) bit for bit."""
    count = 0
    for i, s in enumerate(MX_SPECS):
        base = QuantSpec.parse(s)
        blocks = (base.block_size, 20) if quick else (base.block_size, 64, 20, 8192)
        for j, block in enumerate(blocks):
            spec = base.replace(block_size=block)
            dt = (torch.float16, torch.bfloat16, torch.float32)[(i + j) % 3]
            for x in (random_input(12_345, dt, i + 10 * j), adversarial_mx(spec, dt),
                      all_fp16(dt)):  # fmt: skip
                what = f"{spec.id} x={dt} n={x.numel()}"
                q = quantize(x, spec)
                ref = q.dequantize()
                _expect(_same(kernels.fake_quantize_microscaling(x, spec), ref), f"fake {what}",
                        failures)  # fmt: skip
                packed, scales, g = kernels.quantize_microscaling(x, spec)
                ok = _same(packed, q.codes) and _same(scales, q.scales)
                if spec.dtype == "nvfp":
                    ok = ok and _same(g, q.extras["global_scale"])
                _expect(ok, f"pack {what}", failures)
                d = kernels.dequantize_microscaling(packed, scales, spec, x.numel(), g, dt)
                _expect(_same(d, ref.reshape(-1)), f"dequant {what}", failures)
                count += 1
    return count


def check_dispatch(failures: list[str]) -> int:
    """``kbit.blockwise.fake_quantize`` on CUDA (kernel path) vs quantize().dequantize()."""
    specs = ["int4-b64", "float8-b128", "nf4-b64-c", "dynamic8-b256", "quantile4-b64",
             "int3-bt", "mxfp4", "mxfp8-e5-b32-c", "mxint8", "nvfp4", "nvfp4-b64-c"]  # fmt: skip
    count = 0
    for i, s in enumerate(specs):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = random_input(5000, dt, 100 + i).view(50, 100)
            _expect(_same(fake_quantize(x, s), quantize(x, s).dequantize()),
                    f"dispatch {s} {dt}", failures)  # fmt: skip
            count += 1
    return count


def check_division(failures: list[str]) -> int:
    """The block-reciprocal division against div_rn on every pair of each fast domain that a
    block can hold: any difference must stay within the domain's declared bound."""
    import numpy as np

    from kbit.kernels import exact, launch

    count = 0
    names = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    for (xdt, sdt), (div, bound) in launch.FAST_DIVISION.items():
        sv = np.unique(exact.round_to_scale(np.abs(exact.finite_values(names[xdt])), names[sdt]))
        sv = sv[sv > 0]  # the scales an absmax of the input dtype can round to
        lim = exact.scale_ceiling(sv, names[sdt])
        lim = np.minimum(lim, 3.0e38).astype(np.float32)
        scales = torch.from_numpy(sv).to(DEVICE)
        bad, biggest = launch.division_mismatches(
            xdt, scales, div, torch.from_numpy(lim).to(DEVICE)
        )
        _expect(bad == 0 or biggest <= bound,
                f"division {xdt}/{sdt}: {bad} pairs differ, up to |q| = {biggest:g} "
                f"(bound {bound:g})", failures)  # fmt: skip
        print(f"division {xdt}/{sdt}: {bad} differing pairs, largest |q| {biggest:g}", flush=True)
        count += int(sv.size) * 65536
    return count


CHECK_PARTS = ("absmax", "microscaling", "dispatch", "division")


def self_check(quick: bool = False, parts: tuple[str, ...] = CHECK_PARTS) -> dict:
    """The checks in ``parts``; returns counts and the list of failures (empty when everything
    matched)."""
    failures: list[str] = []
    t0 = time.time()
    runs = {
        "absmax": lambda: check_absmax(failures, quick),
        "microscaling": lambda: check_microscaling(failures, quick),
        "dispatch": lambda: check_dispatch(failures),
        "division": lambda: check_division(failures),
    }
    out = {f"{p}_cases": runs[p]() for p in parts}
    out.update(failures=failures, seconds=time.time() - t0)
    return out


# ----------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    rounds = res.get("rounds", 1)
    how = "medians of do_bench" + (f", median of {rounds} rounds" if rounds > 1 else "")
    if res.get("settled"):
        n, spread, extra = len(res["settled"]), res["settle_spread"], res["settle_rounds"]
        how += f"; {n} rows whose rounds differed by > {spread:g} points timed up to {extra} more"
    lines = [f"Device: {res['device']} ({res['numel']:,} fp16 values, {how})", ""]
    lines.append(f"Copy (read + write): {res['copy_gbs']:.0f} GB/s; torch {res['torch']}, "
                 f"triton {res['triton']}, mode {res['mode']}")  # fmt: skip
    lines.append("")
    lines.append(
        "GB/s counts the bytes an implementation must move: fp16 in and out for fake "
        "quantization, fp16 in and codes + scales out for quantize (dequantize the "
        "reverse); NVFP4 also reads the tensor once more for its global absmax."
    )
    lines.append("")
    chk = res.get("self_check")
    if chk:
        verdict = "passed" if not chk["failures"] else f"FAILED ({len(chk['failures'])})"
        counts = ", ".join(f"{k.removesuffix('_cases')} {v:,}" for k, v in chk.items()
                           if k.endswith("_cases"))  # fmt: skip
        lines += [f"GPU self-check {verdict} ({counts}; {chk['seconds']:.0f} s).", ""]
    rows = [r for r in res["rows"] if "error" not in r]
    blocks = sorted({r["block"] for r in rows})
    head = " | ".join(f"B={b}" for b in blocks)
    for key, title in (("fake", "fake_quantize (read fp16, write fp16)"),
                       ("quant", "quantize to packed codes + scales"),
                       ("quant_prev", "quantize to packed, the other packing kernel "
                                      "(pack_chunks flipped) in the same run"),
                       ("dequant", "dequantize")):  # fmt: skip
        if not any(f"{key}_pct" in r for r in rows):
            continue
        lines += [f"{title}, % of copy bandwidth (GB/s in the JSON):", ""]
        lines.append(f"| type | search | {head} | min |")
        lines.append("|---|---|" + "---|" * (len(blocks) + 1))
        for label in dict.fromkeys(r["case"] for r in rows):
            by = {r["block"]: r for r in rows if r["case"] == label}
            cells = [f"{by[b][f'{key}_pct']:.0f}%" if f"{key}_pct" in by.get(b, {}) else ""
                     for b in blocks]  # fmt: skip
            pcts = [by[b][f"{key}_pct"] for b in by if f"{key}_pct" in by[b]]
            if not pcts:
                continue
            search = next(iter(by.values())).get("pack_search" if key == "quant" else "search", "")
            lines.append(f"| {label} | {search} | " + " | ".join(cells) + f" | {min(pcts):.0f}% |")
        lines.append("")
    differ = [f"{r['case']} B={r['block']}" for r in rows if r.get("pack_same_as_prev") is False]
    if any("pack_same_as_prev" in r for r in rows):
        lines += [("Packed bytes and scales of the two packing kernels: identical on every row."
                   if not differ else "PACKED OUTPUTS DIFFER between the two kernels: "
                   + ", ".join(differ)), ""]  # fmt: skip
    errors = [r for r in res["rows"] if "error" in r]
    if errors:
        lines += ["Errors:", ""] + [f"- {r['case']} B={r['block']}: {r['error']}" for r in errors]
        lines.append("")
    if res.get("variants"):
        lines += ["Code searches (fake / quantize, % of copy):", ""]
        vb = sorted({r["block"] for r in res["variants"]})
        lines.append("| type | search | " + " | ".join(f"B={b}" for b in vb) + " |")
        lines.append("|---|---|" + "---|" * len(vb))
        keyed = {}
        for r in res["variants"]:
            keyed.setdefault((r["case"], r["search"]), {})[r["block"]] = r
        for (label, search), by in keyed.items():
            cells = [(f"{by[b]['fake_pct']:.0f} / {by[b]['quant_pct']:.0f}"
                      if b in by and "fake_pct" in by[b] else "err") for b in vb]  # fmt: skip
            lines.append(f"| {label} | {search} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("vs_bnb"):
        lines += ["kbit vs bitsandbytes, ms (speedup = bnb time / kbit time):", ""]
        lines.append("| kind | B | kbit quant | bnb quant | speedup | kbit dequant | bnb dequant "
                     "| speedup |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in res["vs_bnb"]:
            if "error" in r:
                lines.append(f"| {r['kind']} | {r['block']} | error: {r['error'][:60]} |||||| ")
                continue
            lines.append(f"| {r['kind']} | {r['block']} | {r['kbit_quant_ms']:.3f} | "
                         f"{r['bnb_quant_ms']:.3f} | {r['quant_speedup']:.2f}x | "
                         f"{r['kbit_dequant_ms']:.3f} | {r['bnb_dequant_ms']:.3f} | "
                         f"{r['dequant_speedup']:.2f}x |")  # fmt: skip
        lines.append("")
    elif res.get("bitsandbytes") is None:
        lines += ["bitsandbytes was not importable: no comparison.", ""]
    return "\n".join(lines) + "\n"


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for quant_<gpu>.json/.md")
    ap.add_argument("--quick", action="store_true", help="B in 64/1024 only, short timing, no "
                    "dequantize column, a smaller self-check (about 2 minutes)")  # fmt: skip
    ap.add_argument("--check", action="store_true", help="GPU self-check first; stop on mismatch")
    ap.add_argument("--check-only", action="store_true", help="only the GPU self-check")
    ap.add_argument("--check-parts", default=",".join(CHECK_PARTS),
                    help=f"comma list of self-check parts ({', '.join(CHECK_PARTS)})")  # fmt: skip
    ap.add_argument("--variants", action="store_true", help="also time every code search")
    ap.add_argument("--variant-blocks", default="64,1024", help="block sizes for --variants")
    ap.add_argument("--numel", type=int, default=None, help="values in the test tensor")
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes comparison")
    ap.add_argument("--rounds", type=int, default=None, help="time the grid N times over and "
                    "report each row's median round (default 3, 1 with --quick)")  # fmt: skip
    ap.add_argument("--settle-rounds", type=int, default=None, help="extra rounds (default 2, "
                    "0 with --quick) that time again only the rows whose rounds differ by more "
                    "than --settle-spread points of copy")  # fmt: skip
    ap.add_argument("--settle-spread", type=float, default=5.0)
    ap.add_argument("--pack-compare", action="store_true", help="also time the other packing "
                    "kernel (KernelConfig.pack_chunks flipped) and compare its bytes")  # fmt: skip
    ap.add_argument("--families", default=None, help="comma list of int,float,nf,dynamic,"
                    "quantile,mx (default: all)")  # fmt: skip
    ap.add_argument("--bits", default=None, help="comma list of k for the absmax families")
    ap.add_argument("--blocks", default=None, help="comma list of block sizes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    res: dict = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        config=asdict(DEFAULT_CONFIG),
        mode="quick" if args.quick else "full",
    )
    if args.check or args.check_only:
        parts = tuple(args.check_parts.split(","))
        res["self_check"] = chk = self_check(args.quick, parts)
        print(f"self-check: {len(chk['failures'])} failures, {chk['seconds']:.0f} s", flush=True)
        if chk["failures"]:
            print("\n".join(chk["failures"][:50]), file=sys.stderr)
            write_json(res, args.out / f"check_{slug(res['device'])}.json")
            return 1
        if args.check_only:
            write_json(res, args.out / f"check_{slug(res['device'])}.json")
            return 0
    fams = tuple(args.families.split(",")) if args.families else (*FAMILIES, "mx")
    bits = tuple(int(b) for b in args.bits.split(",")) if args.bits else BITS
    blocks = tuple(int(b) for b in args.blocks.split(",")) if args.blocks else (
        QUICK_BLOCKS if args.quick else BLOCKS)  # fmt: skip
    numel = args.numel or 1 << 28  # smaller tensors under-report: launch and tail costs
    reps = (60, 60) if args.quick else (100, 200)
    torch.manual_seed(0)
    x = torch.randn(numel, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(x)
    res["numel"] = numel
    partial_file = args.out / f"quant_{slug(res['device'])}.partial.json"
    runs, copies = [], []
    # the grid is timed ``--rounds`` times over, each round against its own copy: on an H200
    # timings slow down in episodes of a fraction of a second (single do_bench medians 15-25%
    # slow, kernels_notes "v11"), so the tables report every row's median round; rows whose
    # rounds still disagree (two slow rounds of three happen: "v13") get settle rounds
    rounds = args.rounds or (1 if args.quick else 3)
    settle = args.settle_rounds if args.settle_rounds is not None else (0 if args.quick else 2)
    settled: set = set()
    for r in range(rounds + settle):
        only = None
        if r >= rounds:
            only = unsettled(median_rows(runs), args.settle_spread)
            if not only:
                break
            settled |= only
        copy_ms = _bench(partial(dst.copy_, x), 25, 200)
        copies.append(copy_ms)
        copy_gbs = _gbs(4 * numel, copy_ms)
        what = f"round {r + 1}/{rounds}"
        if only is not None:
            what = f"settle round {r + 1 - rounds} ({len(only)} rows)"
        print(f"{what} copy: {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s", flush=True)
        done = runs[:]
        runs.append(bench_rows(
            x, cases(fams, bits), blocks, copy_gbs, reps, not args.quick,
            on_row=lambda rows, done=done: write_json(
                res | {"rows": median_rows([*done, rows])}, partial_file),
            pack_compare=args.pack_compare, only=only,
        ))  # fmt: skip
    res.update(settled=sorted(settled), settle_spread=args.settle_spread, settle_rounds=settle)
    del dst
    res["copy_ms"] = copy_ms = statistics.median(copies)
    res["copy_gbs"] = copy_gbs = _gbs(4 * numel, copy_ms)
    res["rounds"] = rounds
    res["rows"] = median_rows(runs)
    if args.variants:
        vblocks = tuple(int(b) for b in args.variant_blocks.split(","))
        res["variants"] = variants(x, copy_gbs, vblocks, reps)
    bnb, bnbf = (None, None) if args.no_bnb else _load_bnb()
    res["bitsandbytes"] = getattr(bnb, "__version__", None)
    if bnbf is not None:
        res["vs_bnb"] = bench_vs_bnb(x, bnbf, reps)
    res["seconds"] = time.time() - t0
    name = slug(res["device"])
    write_json(res, args.out / f"quant_{name}.json")
    partial_file.unlink(missing_ok=True)
    md = markdown(res)
    write_text(md, args.out / f"quant_{name}.md")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
