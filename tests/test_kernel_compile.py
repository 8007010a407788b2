"""The Triton kernels compile for an H100/H200 (sm_90) without a GPU.

The kernel tests run in Triton's interpreter, which executes the kernels as Python: it
accepts code the compiler rejects (a module-level constant read inside a jit function, a
shape the layout passes cannot handle). Here each launch a public entry point makes is
captured instead of run and compiled to a cubin with the ptxas bundled in Triton's wheel, with
the specialization the same launch gets on a GPU (benchmarks/sass_counts.py), so a kernel that
would fail on the GPU fails here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton

from kbit.codebooks import codebook
from kbit.kernels import _format, launch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from sass_counts import captured_launches, compile_launch

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles, does not interpret"
    ),
    pytest.mark.skipif(
        not _PTXAS.is_file() and shutil.which("ptxas") is None, reason="no ptxas to compile with"
    ),
]


def _compile(fn: triton.JITFunction, args: tuple, kwargs: dict) -> None:
    """Compile one captured launch for sm_90 (cubin) with the launch's own options and the
    specialization a GPU launch of the same arguments gets (``sass_counts.compile_launch``)."""
    # every launch pins FMA contraction (``launch._COMPILE``): Triton 3.10 changes the default
    assert kwargs.get("enable_fp_fusion") is True, fn.__name__
    compiled = compile_launch(fn, args, kwargs)
    assert compiled.asm["cubin"], fn.__name__


def _x(n: int = 1 << 14, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)


def _blockwise(name: str, bits: int, block: int | None, pack: bool, dtype=torch.float16, **cfg):
    cb, config = codebook(name, bits), launch.KernelConfig(**cfg)
    if pack:
        return lambda: launch.quantize_blockwise(
            _x(dtype=dtype), cb, block, torch.float16, bits, config=config
        )
    return lambda: launch.fake_quantize_blockwise(
        _x(dtype=dtype), cb, block, torch.float16, config=config
    )


CASES = {
    # packing: whole-word chunks (k = 3), 32-value rows (B = 64..256), lane stores (1024)
    "pack-int3-b32": _blockwise("int", 3, 32, True),
    "pack-int4-b64": _blockwise("int", 4, 64, True),
    "pack-int4-b1024": _blockwise("int", 4, 1024, True),
    "pack-int8-b256": _blockwise("int", 8, 256, True),
    "pack-float4-b128": _blockwise("float", 4, 128, True),  # exponent bits (FAMILY_POW2)
    "pack-nf8-b4096": _blockwise("nf", 8, 4096, True),  # shared-memory pair table
    "pack-dynamic8-b64": _blockwise("dynamic", 8, 64, True),  # per-binade index
    "pack-int3-b96": _blockwise("int", 3, 96, True),  # padded rows
    "pack-float4-b64-bf16": _blockwise("float", 4, 64, True, torch.bfloat16),
    "fake-float4-b64": _blockwise("float", 4, 64, False),
    "fake-float4-b64-bits": _blockwise("float", 4, 64, False, search="arith"),
    "fake-float8-b64-arith": _blockwise("float", 8, 64, False, search="arith"),
    "pack-int4-b64-chunks": _blockwise("int", 4, 64, True, pack_chunks=True),
    "fake-nf8-b1024": _blockwise("nf", 8, 1024, False),
    "fake-int4-b8192": _blockwise("int", 4, 8192, False),  # two-pass kernels
    "pack-mxfp6": lambda: launch.quantize_microscaling(_x(), _format("mxfp6")),
    "fake-mxfp4": lambda: launch.fake_quantize_microscaling(_x(), _format("mxfp4")),
    # NVFP4: absmax and division-check passes, the shortcut and fallback packing launches
    "pack-nvfp4": lambda: launch.quantize_microscaling(_x(), _format("nvfp4")),
    "fake-nvfp4-bf16": lambda: launch.fake_quantize_microscaling(
        _x(dtype=torch.bfloat16), _format("nvfp4")
    ),
    "pack-nvfp4-fp32": lambda: launch.quantize_microscaling(  # div_rn: no division check
        _x(dtype=torch.float32), _format("nvfp4")
    ),
    "dequant-int3-b64": lambda: launch.dequantize_blockwise(
        torch.zeros(3 * (1 << 14) // 8, dtype=torch.uint8),
        torch.ones((1 << 14) // 64, dtype=torch.float16),
        codebook("int", 3),
        64,
        3,
        1 << 14,
        torch.float16,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_compile_for_sm90(case: str) -> None:
    launches = captured_launches(CASES[case])
    assert launches, case
    for fn, args, kwargs in launches:
        _compile(fn, args, dict(kwargs))


def test_a_kernel_the_interpreter_accepts_can_fail_to_compile(tmp_path: Path) -> None:
    """The check itself: a jit function that reads a plain module global (fine in the
    interpreter) does not compile."""
    import importlib.util

    path = tmp_path / "probe_kernel.py"
    path.write_text(
        "import triton\nimport triton.language as tl\nLIMIT = 3\n\n\n"
        "@triton.jit\ndef probe(x_ptr):\n    tl.store(x_ptr, tl.load(x_ptr) + LIMIT)\n"
    )
    spec = importlib.util.spec_from_file_location("probe_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Exception, match="LIMIT"):
        _compile(module.probe, (torch.zeros(1),), {"enable_fp_fusion": True})


def test_sass_counts_of_a_launch() -> None:
    """benchmarks/sass_counts.py: a case's launches compile with the GPU's specialization
    (integers divisible by 16 and aligned pointers marked, booleans not) and report their
    registers and opcode mix; a malformed case names the form it wants."""
    import sass_counts

    assert sass_counts._divisible(4096) and not sass_counts._divisible(4100)
    assert not sass_counts._divisible(True) and sass_counts._divisible(torch.zeros(4))
    launches = captured_launches(sass_counts.case_call("pack:int4:64:pack_tile=2048"))
    assert [fn.__name__ for fn, _, _ in launches] == ["fused_pack_kernel"]
    summary = sass_counts.sass_summary(compile_launch(*launches[0]).asm["cubin"], top=5)
    assert 16 <= summary["registers"] <= 255
    assert len(summary["opcodes"]) == 5
    assert sum(n for _, n in summary["opcodes"]) <= summary["instructions"]
    with pytest.raises(ValueError, match="fake\\|pack"):
        sass_counts.case_call("pack:quantile8:64")
