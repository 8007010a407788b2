"""Registers and SASS instruction mix of the kernels a kbit call launches, compiled for an
H100/H200 (sm_90) on a machine without a GPU.

    python benchmarks/sass_counts.py pack:nf8:64 pack:nf8:1024 "pack:nf8:64:pack_tile=8192"

A case is ``fake|pack:<int|float|nf|dynamic><k>:<block>[:field=value;field=value...]``
over ``KernelConfig`` fields (values as Python literals, e.g. ``pair_wide=(512,8192,32)``);
2^14 fp16 values. Each launch the call makes is captured instead of run and compiled with the
specialization a GPU launch of the same arguments gets: Triton marks pointers and integer
arguments divisible by 16 (``tt.divisibility``), which lets it vectorize loads and address
arithmetic. Compiled without it a kernel can differ completely (nf8 packing at B = 64: 194
registers and 2692 instructions per thread against the 60 registers Nsight Compute reports on
an H200). With Triton 3.6, the H200's, this reproduces the device's register counts (nf8
packing at B = 64: 60; at 1024: 55, quantile8 56 on the device). Run it with the Triton
version of the GPU machine: another version lays out the same tile differently.

Printed per launch: registers (``cuobjdump --dump-resource-usage``), static shared memory,
SASS instructions (NOPs excluded; every path of the kernel, not the executed count) and the
most frequent opcodes.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kbit.codebooks import codebook
from kbit.kernels import launch
from kbit.kernels import triton_kernels as tk

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_KERNELS = [name for name in dir(tk) if isinstance(getattr(tk, name), triton.JITFunction)]
#: options a launch passes that are compile options, not kernel arguments
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class _Capture:
    """Stands in for a kernel: records each launch (function, arguments) instead of running."""

    def __init__(self, fn: triton.JITFunction, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))

        return launch_


def captured_launches(call) -> list[tuple[triton.JITFunction, tuple, dict]]:
    """The kernel launches ``call()`` makes (nothing runs; device-side results are not read)."""
    launches: list = []
    saved = {name: getattr(tk, name) for name in _KERNELS}
    try:
        for name, fn in saved.items():
            setattr(tk, name, _Capture(fn, launches))
        call()
    finally:
        for name, fn in saved.items():
            setattr(tk, name, fn)
    return launches


def _divisible(v) -> bool:
    """Whether a GPU launch marks this argument ``tt.divisibility = 16``: a tensor whose data
    pointer is 16-byte aligned, an integer divisible by 16 (``bool`` is not an integer here).
    Tensors captured on the CPU are taken as aligned, as the CUDA allocator's are."""
    if isinstance(v, torch.Tensor):
        return v.device.type == "cpu" or v.data_ptr() % 16 == 0
    return isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0


def compile_launch(fn: triton.JITFunction, args: tuple, kwargs: dict):
    """Compile one captured launch for sm_90 with the launch's own options and the
    specialization its arguments get on a GPU; returns Triton's compiled kernel."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        signature[p.name] = mangle_type(v)  # Triton's name of the type: "*fp16", "i32", ...
        if _divisible(v):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_summary(cubin: bytes, top: int = 12) -> dict:
    """Registers, instruction count and the ``top`` most frequent opcodes of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = Path(f.name)
    try:
        res = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", str(path)],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    finally:
        path.unlink()
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9_]+)", sass, re.M)
    ops = [op for op in ops if op != "NOP"]
    return dict(
        registers=int(re.search(r"REG:(\d+)", res).group(1)),
        instructions=len(ops),
        opcodes=Counter(ops).most_common(top),
    )


def case_call(case: str):
    """A callable making the launches of one case (module docstring)."""
    op, name, block, *rest = case.split(":")
    m = re.fullmatch(r"(int|float|nf|dynamic)(\d)", name)
    if op not in ("fake", "pack") or m is None:
        raise ValueError(f"case {case!r}: want fake|pack:<int|float|nf|dynamic><k>:<block>")
    fields = {}
    for item in filter(None, ":".join(rest).split(";")):
        key, _, val = item.partition("=")
        fields[key] = ast.literal_eval(val)
    cfg = launch.KernelConfig(**fields)
    bits = int(m.group(2))
    cb = codebook(m.group(1), bits)
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0)).half()
    if op == "pack":
        return lambda: launch.quantize_blockwise(x, cb, int(block), torch.float16, bits, config=cfg)
    return lambda: launch.fake_quantize_blockwise(x, cb, int(block), torch.float16, config=cfg)


def main() -> None:
    cases = sys.argv[1:] or ["pack:nf8:64"]
    print(f"Triton {triton.__version__}, sm_90")
    for case in cases:
        for fn, args, kwargs in captured_launches(case_call(case)):
            compiled = compile_launch(fn, args, kwargs)
            s = sass_summary(compiled.asm["cubin"])
            mix = " ".join(f"{op} {n}" for op, n in s["opcodes"])
            print(f"{case} {fn.__name__}: {s['registers']} registers, "
                  f"{compiled.metadata.shared} B shared, {s['instructions']} instructions "
                  f"({mix})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
