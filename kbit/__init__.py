"""kbit: k-bit weight quantization for inference scaling-law studies.

The public API (``QuantSpec``, ``codebook``, ``quantize``, ``dequantize``, ``fake_quantize``,
``quantize_model``) is stable; everything else is importable from its submodule.
"""

from __future__ import annotations

from kbit.spec import QuantSpec, SpecError, expand_grid

__version__ = "0.1.0"

__all__ = [
    "QTensor",
    "QuantSpec",
    "SpecError",
    "__version__",
    "codebook",
    "dequantize",
    "expand_grid",
    "fake_quantize",
    "quantize",
    "quantize_model",
]


def __getattr__(name: str):
    # Lazy imports keep `import kbit` light (no torch import for spec parsing / the CLI help).
    if name == "codebook":
        from kbit.codebooks import codebook

        return codebook
    if name in ("quantize", "dequantize", "fake_quantize", "QTensor"):
        # import the submodule by path: `from kbit import quantize` would re-enter this hook.
        # Importing binds `kbit.quantize` to the module, which is callable (= quantize()).
        import importlib

        _q = importlib.import_module("kbit.quantize")
        return getattr(_q, name)
    if name == "quantize_model":
        from kbit.model import quantize_model

        return quantize_model
    raise AttributeError(f"module 'kbit' has no attribute {name!r}")
