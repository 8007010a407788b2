"""Kernel variants side by side, and one profiled launch of each for Nsight Compute.

    python benchmarks/profile_kernels.py --out OUT --cases pack:int4:64,fake:dynamic8:64 \
        --variants "base=;nomid=int_mid_table:0;t2048=pack_tile:2048,pack_per_thread:16"

A case is ``fake|pack:<codebook or microscaling spec>:<block>`` (``pack:int4:64``,
``fake:nvfp4:16``). A variant is ``name=field:value,...`` over ``KernelConfig`` fields (empty:
the defaults). ``--time`` (default) times every case under every variant against the device
copy in one run (medians of ``do_bench``; with ``--rounds N`` the variants take turns N
times and the median round is reported) and checks that each variant's output equals the
first variant's bit for bit. ``--profile`` runs each (case, variant) once between
``cudaProfilerStart``/``Stop`` after a warm-up, for

    ncu --profile-from-start off --clock-control none --section ... python profile_kernels.py \
        --profile ...

``--trace`` writes a torch profiler table of one call per case (every launch a call makes,
e.g. NVFP4's global absmax and division check). Results: OUT/profile_<gpu>.json and a
markdown table on stdout.

The kernels a run compiled: ``TRITON_CACHE_DIR=DIR`` keeps each one's ``.ttgir`` (the layouts
Triton chose), ``.ptx`` and ``.cubin`` (``nvdisasm -c``). Read those from the GPU machine's own
run: another Triton version may lay out the same tile differently (``kernels_notes.md``, "v9").
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_quant import Case, _bench, _same, case_codebook

from kbit import kernels
from kbit.kernels.launch import DEFAULT_CONFIG, KernelConfig
from kbit.spec import QuantSpec


def parse_variants(text: str) -> dict[str, KernelConfig]:
    """``name=field:value,...;name2=...`` -> configs (values parsed as int, else str; tuple
    fields as ``a/b/c``)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, fields = part.partition("=")
        kw: dict = {}
        for item in filter(None, fields.split(",")):
            key, _, val = item.partition(":")
            if key not in DEFAULT_CONFIG.__dataclass_fields__:
                known = ", ".join(DEFAULT_CONFIG.__dataclass_fields__)
                raise ValueError(
                    f"variant {name!r}: no KernelConfig field {key!r}; fields: {known}"
                )
            default = getattr(DEFAULT_CONFIG, key)
            if isinstance(default, tuple):  # pack_warp:1024/32 -> (1024, 32)
                kw[key] = tuple(int(v) for v in val.split("/"))
            else:
                kw[key] = type(default)(int(val)) if isinstance(default, bool | int) else val
        out[name] = replace(DEFAULT_CONFIG, **kw)
    return out


def make_call(case: str, x: torch.Tensor, cfg: KernelConfig):
    """(callable, bytes it must move) of one case under one config."""
    op, name, block_s = case.split(":")
    block = int(block_s)
    n = x.numel()
    m = re.fullmatch(r"(int|float|nf|dynamic|quantile)(\d)", name)
    if m:
        fam, k = m.group(1), int(m.group(2))
        cb = case_codebook(Case(name, fam, k), x)
        if op == "fake":
            return partial(kernels.fake_quantize_blockwise, x, cb, block, config=cfg), 4 * n
        fn = partial(kernels.quantize_blockwise, x, cb, block, torch.float16, k, config=cfg)
        return fn, 2 * n + -(-n * k // 8) + 2 * -(-n // block)
    spec = QuantSpec.parse(name).replace(block_size=block)
    extra = 2 * n if spec.dtype == "nvfp" else 0
    if op == "fake":
        return partial(kernels.fake_quantize_microscaling, x, spec, config=cfg), 4 * n + extra
    fn = partial(kernels.quantize_microscaling, x, spec, config=cfg)
    return fn, extra + 2 * n + -(-n * spec.bits // 8) + -(-n // block)


def same_outputs(a, b) -> bool:
    """``bench_quant._same`` over a call's outputs (a tensor, or a tuple with Nones)."""
    if isinstance(a, tuple | list):
        return all(same_outputs(u, v) for u, v in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    return _same(a, b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--variants", default="base=")
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument(
        "--rounds", type=int, default=1, help="variants timed in turn N times; median reported"
    )
    a = ap.parse_args()
    import triton

    torch.manual_seed(0)
    x = torch.randn(a.numel, dtype=torch.float16, device="cuda")
    variants = parse_variants(a.variants)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    gpu = torch.cuda.get_device_name().lower().replace(" ", "_")

    def bench(fn) -> float:
        return _bench(fn, 100, a.rep_ms)

    if a.profile:
        calls = [(c, v, make_call(c, x, cfg)[0]) for c in cases for v, cfg in variants.items()]
        for _, _, fn in calls:  # compile and upload tables outside the profiled range
            fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for c, v, fn in calls:
            torch.cuda.nvtx.range_push(f"{c}/{v}")
            fn()
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print("profiled:", ", ".join(f"{c}/{v}" for c, v, _ in calls))
        return
    if a.trace:
        from torch.profiler import ProfilerActivity, profile

        for c in cases:
            fn = make_call(c, x, DEFAULT_CONFIG)[0]
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            print(f"## trace {c} (3 calls)")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    copy_gbs = 4 * a.numel / copy_ms / 1e6
    rows = []
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s, {a.numel} fp16 values")
    print("| case | " + " | ".join(variants) + " | same |")
    print("|---|" + "---|" * (len(variants) + 1))
    for c in cases:
        ref, same, calls = None, True, {}
        nbytes = make_call(c, x, DEFAULT_CONFIG)[1]  # what the case must move, any variant
        for v, cfg in variants.items():
            fn = make_call(c, x, cfg)[0]
            out = fn()
            if ref is None:
                ref = out
            else:
                same = same and same_outputs(ref, out)
            calls[v] = fn
            del out
        del ref
        # the variants take turns, round after round: a drift of the clocks during the run
        # (run-to-run spread of up to 15 points was seen on an H200) hits them alike
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(a.rounds):
            for v, fn in calls.items():
                times[v].append(bench(fn))
        pct = []
        for v, ms_all in times.items():
            ms = statistics.median(ms_all)
            p = 100 * nbytes / ms / 1e6 / copy_gbs
            pct.append(p)
            rows.append(dict(case=c, variant=v, ms=ms, pct=p, ms_rounds=ms_all))
        print(f"| {c} | " + " | ".join(f"{p:.1f}" for p in pct) + f" | {same} |", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    res = dict(gpu=torch.cuda.get_device_name(), copy_gbs=copy_gbs, numel=a.numel,
               variants={k: str(v) for k, v in variants.items()}, rows=rows,
               torch=torch.__version__, triton=triton.__version__)  # fmt: skip
    (a.out / f"profile_{gpu}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
