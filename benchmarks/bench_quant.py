"""Throughput of kbit's Triton kernels against a device copy and against bitsandbytes.

One run measures, on one 2^28-element fp16 tensor of randn:

* the anchor: a device-to-device copy (bytes read + written / time), the practical ceiling for
  any one-pass elementwise kernel;
* ``fake_quantize_blockwise`` (read fp16, write fp16) for int/float/nf/dynamic at k = 3, 4, 8
  and B = 32..4096, as GB/s and as % of the copy bandwidth, with each code search
  (``KernelConfig.search``: the midpoint tree, one-read bucket records, a 1-byte bucket table
  + midpoint and codebook reads, the same with the tables in shared memory); the default
  configuration (``search="auto"``) picks one of them per codebook;
* 4-bit quantize-to-packed and dequantize against bitsandbytes ``quantize_4bit`` /
  ``dequantize_4bit`` (fp4, nf4), and 8-bit against bitsandbytes ``quantize_blockwise`` /
  ``dequantize_blockwise``, at B = 64..4096.

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first). GB/s counts the
bytes each implementation must move (its input once, its outputs once, scales included), so
numbers of different implementations are comparable as speed, and speedups are time ratios.

Usage: python benchmarks/bench_quant.py --out DIR [--numel N] [--sweep]
       [--bits 3,4,8] [--searches tree,bucket,...] [--no-bnb]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kbit import kernels
from kbit.codebooks import codebook
from kbit.kernels.launch import DEFAULT_CONFIG

FQ_TYPES = ("int", "float", "nf", "dynamic")
FQ_BITS = (3, 4, 8)
FQ_BLOCKS = (32, 64, 128, 256, 1024, 4096)
#: code searches timed for every codebook (``KernelConfig.search``)
FQ_SEARCHES = ("tree", "bucket", "bucket-mid", "bucket-smem")
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)


def _bench(fn, warmup_ms: int = 25, rep_ms: int = 150) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # a broken install must not stop the kbit numbers
        print(f"bitsandbytes unavailable: {e!r}", flush=True)
        return None, None
    return bnb, bnbf


def _auto_search(cb: torch.Tensor, pack: bool = False) -> str:
    """The search ``search="auto"`` runs for this codebook (as ``launch._search_args``)."""
    from kbit.kernels import launch

    kw = launch._search_args(cb, torch.device("cpu"), DEFAULT_CONFIG, pack)["kw"]
    return {v: k for k, v in launch._SEARCH_MODES.items()}[kw["SEARCH"]]


def sweep(x: torch.Tensor, copy_gbs: float) -> list[dict]:
    """Launch-parameter variants on representative cases (results never change, only speed).

    A variant that fails to compile is recorded with its error instead of stopping the run.
    """
    rows = []
    fake_vars = [
        dict(fast_div=False),
        dict(tile=4096, per_thread=16),
        dict(tile=1024, per_thread=8),
        dict(per_thread=8),
    ]
    pack_vars = [
        dict(search="tree"),
        dict(search="bucket-mid"),
        dict(search="bucket-smem"),
        dict(fast_div=False),
        dict(pack_tile=2048, pack_per_thread=16),
    ]
    cases = (("dynamic", 8, 64), ("nf", 8, 128), ("int", 8, 4096), ("nf", 4, 1024), ("int", 3, 64))
    for op, variants in (("fake_quantize", fake_vars), ("quantize", pack_vars)):
        for var in variants:
            cfg = replace(DEFAULT_CONFIG, **var)
            for name, k, block in cases:
                cb = codebook(name, k)
                if op == "fake_quantize":
                    fn = partial(kernels.fake_quantize_blockwise, x, cb, block, config=cfg)
                else:
                    fn = partial(kernels.quantize_blockwise, x, cb, block, torch.float16, k,
                                 config=cfg)  # fmt: skip
                search = _auto_search(cb, pack=op == "quantize")
                row = dict(kernel=op, case=f"{name}{k}-b{block}", search=search)
                row.update(var)
                try:
                    row["ms"] = _bench(fn)
                    if op == "fake_quantize":
                        row["pct_copy"] = 100 * _gbs(4 * x.numel(), row["ms"]) / copy_gbs
                except Exception as e:  # keep the other measurements
                    row["error"] = repr(e)[:300]
                rows.append(row)
                print(f"sweep {row}", flush=True)
    return rows


def bench_fake_quantize(x: torch.Tensor, copy_gbs: float) -> list[dict]:
    n = x.numel()
    rows = []
    for name in FQ_TYPES:
        for k in FQ_BITS:
            cb = codebook(name, k)
            auto = _auto_search(cb)
            for search in FQ_SEARCHES:
                cfg = replace(DEFAULT_CONFIG, search=search, bucket_min_entries=0)
                for block in FQ_BLOCKS:
                    ms = _bench(partial(kernels.fake_quantize_blockwise, x, cb, block, config=cfg))
                    gbs = _gbs(4 * n, ms)
                    pct = 100 * gbs / copy_gbs
                    rows.append(dict(dtype=name, bits=k, block=block, search=search,
                                     default=search == auto, codebook_size=cb.numel(), ms=ms,
                                     gbs=gbs, pct_copy=pct))  # fmt: skip
                    print(f"fake_quantize {name}{k} search={search} B={block}: {ms:.3f} ms "
                          f"{gbs:.0f} GB/s ({pct:.0f}% of copy)", flush=True)  # fmt: skip
    return rows


def bench_vs_bnb(x: torch.Tensor, bnbf) -> tuple[list[dict], dict]:
    """4-bit and 8-bit quantize/dequantize, kbit against bitsandbytes, same tensor."""
    n = x.numel()
    rows: list[dict] = []
    agreement: dict = {}
    kinds = [("nf4", "nf", 4), ("fp4", "float", 4), ("dynamic8", "dynamic", 8)]
    for label, name, k in kinds:
        cb = codebook(name, k) if label != "fp4" else codebook("float", 4, 2)
        for block in BNB_BLOCKS:
            nblocks = -(-n // block)
            packed, sc = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
            q_ms = _bench(lambda cb=cb, b=block, k=k: kernels.quantize_blockwise(
                x, cb, b, torch.float16, k))  # fmt: skip
            d_ms = _bench(lambda p=packed, s=sc, cb=cb, b=block, k=k: kernels.dequantize_blockwise(
                p, s, cb, b, k, n, torch.float16))  # fmt: skip
            moved = 2 * n + n * k // 8 + 2 * nblocks
            row = dict(kind=label, block=block, kbit_quant_ms=q_ms, kbit_dequant_ms=d_ms,
                       kbit_quant_gbs=_gbs(moved, q_ms),
                       kbit_dequant_gbs=_gbs(moved, d_ms))  # fmt: skip
            if bnbf is not None:
                if k == 4:
                    qt = label
                    bq, st = bnbf.quantize_4bit(x, blocksize=block, quant_type=qt)
                    bq_ms = _bench(lambda b=block, qt=qt: bnbf.quantize_4bit(
                        x, blocksize=b, quant_type=qt))  # fmt: skip
                    bd_ms = _bench(lambda bq=bq, st=st: bnbf.dequantize_4bit(bq, st))
                else:
                    bq, st = bnbf.quantize_blockwise(x, blocksize=block)
                    bq_ms = _bench(lambda b=block: bnbf.quantize_blockwise(x, blocksize=b))
                    bd_ms = _bench(lambda bq=bq, st=st: bnbf.dequantize_blockwise(bq, st))
                bmoved = 2 * n + n * k // 8 + 4 * nblocks  # bitsandbytes keeps fp32 absmax
                row.update(bnb_quant_ms=bq_ms, bnb_dequant_ms=bd_ms,
                           bnb_quant_gbs=_gbs(bmoved, bq_ms), bnb_dequant_gbs=_gbs(bmoved, bd_ms),
                           quant_speedup=bq_ms / q_ms, dequant_speedup=bd_ms / d_ms)  # fmt: skip
                if block == 64:
                    agreement[label] = _agreement(x, cb, block, k, bnbf, bq, st)
            rows.append(row)
            print(" ".join(f"{key}={v:.3f}" if isinstance(v, float) else f"{key}={v}"
                           for key, v in row.items()), flush=True)  # fmt: skip
    return rows, agreement


def _agreement(x, cb, block, k, bnbf, bq, st) -> dict:
    """How close kbit (fp32 scales, same codebook) and bitsandbytes dequantized values are.

    Not expected to be identical: bitsandbytes multiplies by 1/absmax (one more rounding) and
    its fp4 uses a different exponent bias; the fraction shows that both compute the same
    quantizer up to those rounding-level differences."""
    ours = kernels.fake_quantize_blockwise(x, cb, block, torch.float32).float()
    theirs = bnbf.dequantize_4bit(bq, st) if k == 4 else bnbf.dequantize_blockwise(bq, st)
    theirs = theirs.reshape(-1).float()
    diff = (ours - theirs).abs()
    return dict(equal_fraction=float((diff == 0).float().mean()),
                max_abs_diff=float(diff.max()),
                rel_l2=float(diff.norm() / theirs.norm()))  # fmt: skip


def self_check(x: torch.Tensor) -> dict:
    """On the full tensor: dequantize(quantize(x)) equals fake_quantize(x), bit for bit, and
    every 8-bit codebook gives the same result with each code search."""
    out = {}
    for name, k, block in (("nf", 4, 64), ("float", 3, 128), ("dynamic", 8, 4096)):
        cb = codebook(name, k)
        y = kernels.fake_quantize_blockwise(x, cb, block)
        p, s = kernels.quantize_blockwise(x, cb, block, torch.float16, k)
        d = kernels.dequantize_blockwise(p, s, cb, block, k, x.numel(), torch.float16)
        out[f"{name}{k}-b{block}"] = bool(torch.equal(y, d))
    for name in FQ_TYPES:
        cb = codebook(name, 8)
        ys = []
        for search in FQ_SEARCHES:
            cfg = replace(DEFAULT_CONFIG, search=search)
            ys.append(kernels.fake_quantize_blockwise(x, cb, 64, config=cfg))
        out[f"{name}8-b64-searches-equal"] = all(torch.equal(ys[0], y) for y in ys[1:])
        ys = None
    return out


def markdown(res: dict) -> str:
    lines = [f"Device: {res['device']} ({res['numel']:,} fp16 values, medians)", ""]
    lines.append(f"Copy (read + write): {res['copy_gbs']:.0f} GB/s")
    lines.append("")
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    by = {(r["dtype"], r["bits"], r["search"], r["block"]): r for r in res["fake_quantize"]}
    head = " | ".join(f"B={b}" for b in FQ_BLOCKS)
    lines.append("fake_quantize_blockwise with the default configuration, GB/s (% of copy):")
    lines.append("")
    lines.append(f"| type | k | search | {head} | min % |")
    lines.append("|---|---|---|" + "---|" * (len(FQ_BLOCKS) + 1))
    for name in FQ_TYPES:
        for k in FQ_BITS:
            rs = [r for r in res["fake_quantize"]
                  if r["dtype"] == name and r["bits"] == k and r["default"]]  # fmt: skip
            rs.sort(key=lambda r: r["block"])
            if not rs:  # the default search was not timed (--searches)
                continue
            cells = [f"{r['gbs']:.0f} ({r['pct_copy']:.0f}%)" for r in rs]
            low = min(r["pct_copy"] for r in rs)
            lines.append(f"| {name} | {k} | {rs[0]['search']} | " + " | ".join(cells)
                         + f" | {low:.0f}% |")  # fmt: skip
    lines.append("")
    lines.append("Every search, % of copy (default marked *):")
    lines.append("")
    lines.append(f"| type | k | search | {head} |")
    lines.append("|---|---|---|" + "---|" * len(FQ_BLOCKS))
    for name in FQ_TYPES:
        for k in FQ_BITS:
            for search in FQ_SEARCHES:
                rs = [by[(name, k, search, b)] for b in FQ_BLOCKS]
                mark = "*" if rs[0]["default"] else ""
                cells = [f"{r['pct_copy']:.0f}%" for r in rs]
                lines.append(f"| {name} | {k} | {search}{mark} | " + " | ".join(cells) + " |")
    if res.get("sweep"):
        lines.append("")
        lines.append("Launch-parameter sweep, ms:")
        lines.append("")
        lines.append("| kernel | case | variant | ms | % of copy |")
        lines.append("|---|---|---|---|---|")
        for r in res["sweep"]:
            skip = ("kernel", "case", "ms", "pct_copy", "error")
            var = ", ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
            ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
            pct = f"{r['pct_copy']:.0f}%" if "pct_copy" in r else ""
            lines.append(f"| {r['kernel']} | {r['case']} | {var} | {ms} | {pct} |")
    check = res.get("bucket_mid_tile_check")
    if check:
        lines += ["", f"bucket-mid launch variants, % of copy ({check['note']}):", ""]
        lines.append("| case | " + " | ".join(check["variants"]) + " |")
        lines.append("|---|" + "---|" * len(check["variants"]))
        for case, pcts in check["pct_copy"].items():
            lines.append(f"| {case} | " + " | ".join(f"{p:.1f}%" for p in pcts) + " |")
    lines.append("")
    lines.append("Quantize / dequantize vs bitsandbytes, ms (speedup = bnb time / kbit time):")
    lines.append("")
    lines.append("| kind | B | kbit quant | bnb quant | speedup | kbit dequant | bnb dequant | "
                 "speedup |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in res["vs_bnb"]:
        bq = r.get("bnb_quant_ms")
        if bq is None:
            lines.append(f"| {r['kind']} | {r['block']} | {r['kbit_quant_ms']:.3f} | n/a | | "
                         f"{r['kbit_dequant_ms']:.3f} | n/a | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['kind']} | {r['block']} | {r['kbit_quant_ms']:.3f} | {bq:.3f} | "
            f"{r['quant_speedup']:.2f}x | {r['kbit_dequant_ms']:.3f} | "
            f"{r['bnb_dequant_ms']:.3f} | {r['dequant_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for quant_*.json/.md")
    ap.add_argument("--numel", type=int, default=1 << 28, help="values in the test tensor")
    ap.add_argument("--sweep", action="store_true", help="also time launch-parameter variants")
    ap.add_argument("--bits", default=None, help="fake-quantize rows for these k only (3,4,8)")
    ap.add_argument("--searches", default=None, help="code searches to time (comma list)")
    ap.add_argument("--no-bnb", action="store_true", help="skip quantize/dequantize vs bnb")
    args = ap.parse_args(argv)
    global FQ_BITS, FQ_SEARCHES
    if args.bits:
        FQ_BITS = tuple(int(b) for b in args.bits.split(","))
    if args.searches:
        FQ_SEARCHES = tuple(args.searches.split(","))
    if not torch.cuda.is_available():
        print("bench_quant needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    bnb, bnbf = _load_bnb()
    torch.manual_seed(0)
    x = torch.randn(args.numel, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(x)
    copy_ms = _bench(lambda: dst.copy_(x))
    copy_gbs = _gbs(4 * x.numel(), copy_ms)
    dst = None
    print(f"copy: {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s", flush=True)
    t0 = time.time()
    res: dict = dict(
        device=torch.cuda.get_device_name(),
        numel=x.numel(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        bitsandbytes=getattr(bnb, "__version__", None),
        python=platform.python_version(),
        config=asdict(DEFAULT_CONFIG),
        copy_ms=copy_ms,
        copy_gbs=copy_gbs,
    )
    res["self_check"] = self_check(x)
    print(f"self check: {res['self_check']}", flush=True)
    if args.sweep:
        res["sweep"] = sweep(x, copy_gbs)
    res["fake_quantize"] = bench_fake_quantize(x, copy_gbs)
    res["vs_bnb"], res["bnb_agreement"] = ([], {}) if args.no_bnb else bench_vs_bnb(x, bnbf)
    res["seconds"] = time.time() - t0
    slug = re.sub(r"[^a-z0-9]+", "_", res["device"].lower()).strip("_")
    _write_atomic(args.out / f"quant_{slug}.json", json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    _write_atomic(args.out / f"quant_{slug}.md", md)
    print(json.dumps(res["bnb_agreement"]), flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
