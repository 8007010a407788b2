"""kbit: k-bit weight quantization for inference scaling-law studies.

The public API (``QuantSpec``, ``codebook``, ``quantize``, ``dequantize``, ``fake_quantize``,
``QTensor``, ``quantize_model``, ``gptq_quantize``) is stable; everything else is importable
from its submodule. The torch-backed names are imported on first use, so ``import kbit`` (spec
parsing, the workflow's start, ``kbit --help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

from kbit.spec import QuantSpec, SpecError, expand_grid

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_LAZY = {
    "codebook": "kbit.codebooks",
    "QTensor": "kbit.blockwise",
    "quantize": "kbit.blockwise",
    "dequantize": "kbit.blockwise",
    "fake_quantize": "kbit.blockwise",
    "quantize_model": "kbit.model_quant",
    "gptq_quantize": "kbit.gptq",
}

__all__ = ["QuantSpec", "SpecError", "__version__", "expand_grid", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kbit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
