"""QuantSpec: one quantization configuration and its canonical, filesystem-safe id.

The id is what names directories (``results/quantized/{model}/{quant}``) and rows in every
table, so ``QuantSpec.parse(str(spec)) == spec`` must hold for every valid spec. Grammar::

    fp16
    {dtype}{bits}[-e{E}]-b{B|t}[-s{scale}][-o{p}][-c][-q{estimator}][-{method}]

``-e`` (exponent bits) appears for float-like types only; ``-bt`` means one block constant
per tensor; the optional parts appear only when they differ from their defaults, so each
spec has exactly one id. Aliases such as ``mxfp4`` or ``nvfp4`` parse to their full spec.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

#: absmax-normalised codebook types of the paper (and NF from QLoRA)
ABSMAX_DTYPES = ("int", "float", "dynamic", "quantile", "nf")
#: microscaling types: a shared power-of-two (MX) or E4M3 (NV) scale per block
MICROSCALING_DTYPES = ("mxfp", "mxint", "nvfp")
DTYPES = ("fp16", *ABSMAX_DTYPES, *MICROSCALING_DTYPES)
SCALE_DTYPES = {"fp16": 16, "bf16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8}
METHODS = ("rtn", "gptq")
QUANTILE_ESTIMATORS = ("sram", "exact")
EXPONENT_RULES = ("paper", "half")

_DEFAULT_SCALE = {"mxfp": "e8m0", "mxint": "e8m0", "nvfp": "e4m3"}
_DEFAULT_BLOCK = {"mxfp": 32, "mxint": 32, "nvfp": 16}
_ALLOWED_BITS = {
    "mxfp": (4, 6, 8),
    "mxint": (8,),
    "nvfp": (4,),
}
_MX_DEFAULT_EXPONENT = {4: 2, 6: 2, 8: 4}
_ALIASES = {
    "mxfp4": "mxfp4-e2-b32",
    "mxfp6": "mxfp6-e2-b32",
    "mxfp8": "mxfp8-e4-b32",
    "mxint8": "mxint8-b32",
    "nvfp4": "nvfp4-e2-b16",
}

_ID_RE = re.compile(
    r"^(?P<dtype>[a-z]+?)(?P<bits>\d+)"
    r"(?:-e(?P<e>\d+))?"
    r"-b(?P<block>\d+|t)"
    r"(?:-s(?P<scale>[a-z0-9]+))?"
    r"(?:-o(?P<outlier>\d*\.?\d+))?"
    r"(?P<center>-c)?"
    r"(?:-q(?P<est>[a-z]+))?"
    r"(?:-(?P<method>gptq))?$"
)


class SpecError(ValueError):
    """A quantization spec that names a value outside what is allowed."""


def default_exponent_bits(bits: int, rule: str = "paper") -> int:
    """Exponent bits of the float data type for ``bits`` total bits.

    ``paper``: E=2 at 3 bits and E=3 at 4..8 bits (the paper's main experiments; E=1 at 2 bits,
    the only split left). ``half``: Appendix C.4's heuristic E = ceil(k/2).
    """
    if rule not in EXPONENT_RULES:
        raise SpecError(f"exponent rule {rule!r} is not one of {EXPONENT_RULES}")
    if rule == "half":
        return max(1, math.ceil(bits / 2))
    return {2: 1, 3: 2}.get(bits, 3)


@dataclass(frozen=True)
class QuantSpec:
    """A k-bit weight quantization configuration.

    ``bits`` counts code bits only; block constants, outlier columns and parameters left in
    16 bits are counted by the bit accounting, never folded into ``bits``.
    """

    dtype: str = "fp16"
    bits: int = 16
    exponent_bits: int | None = None
    block_size: int | None = 64
    scale_dtype: str | None = None
    outlier_fraction: float = 0.0
    center: bool = False
    quantile_estimator: str = "sram"
    method: str = "rtn"

    def __post_init__(self) -> None:
        d = self.dtype
        if d not in DTYPES:
            raise SpecError(f"dtype {d!r} is not one of {DTYPES}")
        if d == "fp16":
            # the baseline has no quantization fields: normalise them so fp16 has one id
            for f in fields(QuantSpec):
                if f.name != "dtype":
                    object.__setattr__(self, f.name, f.default)
            object.__setattr__(self, "bits", 16)
            object.__setattr__(self, "block_size", None)
            object.__setattr__(self, "scale_dtype", None)
            return
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SpecError(f"bits={self.bits!r} for dtype {d!r}: allowed are integers 2..8")
        if d in _ALLOWED_BITS and self.bits not in _ALLOWED_BITS[d]:
            raise SpecError(f"bits={self.bits} for dtype {d!r}: allowed are {_ALLOWED_BITS[d]}")
        # exponent bits: float-like types only
        if d in ("float", "mxfp", "nvfp"):
            e = self.exponent_bits
            if e is None:
                e = default_exponent_bits(self.bits) if d == "float" else 2
                if d == "mxfp":
                    e = _MX_DEFAULT_EXPONENT[self.bits]
                object.__setattr__(self, "exponent_bits", e)
            if not isinstance(e, int) or not 1 <= e <= self.bits - 1:
                raise SpecError(
                    f"exponent_bits={e!r} for {self.bits}-bit {d}: allowed are 1..{self.bits - 1}"
                )
            if d == "nvfp" and e != 2:
                raise SpecError("exponent_bits for nvfp4 must be 2 (E2M1)")
            if d == "mxfp" and (self.bits, e) not in {(4, 2), (6, 2), (6, 3), (8, 4), (8, 5)}:
                raise SpecError(
                    f"mxfp{self.bits} with exponent_bits={e}: allowed are "
                    "mxfp4 e2, mxfp6 e2/e3, mxfp8 e4/e5 (OCP MX v1.0)"
                )
        elif self.exponent_bits is not None:
            raise SpecError(f"exponent_bits is only meaningful for float types, not {d!r}")
        if d in MICROSCALING_DTYPES:
            if self.block_size is None:
                object.__setattr__(self, "block_size", _DEFAULT_BLOCK[d])
            if self.scale_dtype is None:
                object.__setattr__(self, "scale_dtype", _DEFAULT_SCALE[d])
            if self.scale_dtype != _DEFAULT_SCALE[d]:
                raise SpecError(
                    f"{d} stores its scale as {_DEFAULT_SCALE[d]}, not {self.scale_dtype}"
                )
        else:
            if self.scale_dtype is None:
                object.__setattr__(self, "scale_dtype", "fp16")
            if self.scale_dtype not in ("fp16", "bf16", "fp32"):
                raise SpecError(
                    f"scale_dtype={self.scale_dtype!r} for {d}: allowed are fp16, bf16, fp32"
                )
        b = self.block_size
        if b is not None and (not isinstance(b, int) or b < 2):
            raise SpecError(f"block_size={b!r}: allowed are integers >= 2, or None (per tensor)")
        if not 0.0 <= float(self.outlier_fraction) < 1.0:
            raise SpecError(f"outlier_fraction={self.outlier_fraction!r}: allowed is 0 <= p < 1")
        object.__setattr__(self, "outlier_fraction", float(self.outlier_fraction))
        if self.quantile_estimator not in QUANTILE_ESTIMATORS:
            raise SpecError(
                f"quantile_estimator={self.quantile_estimator!r}: allowed are {QUANTILE_ESTIMATORS}"
            )
        if d != "quantile" and self.quantile_estimator != "sram":
            raise SpecError("quantile_estimator applies to dtype 'quantile' only")
        if self.method not in METHODS:
            raise SpecError(f"method={self.method!r}: allowed are {METHODS}")

    # ------------------------------------------------------------------ identity
    @property
    def is_baseline(self) -> bool:
        """True for the unquantized 16-bit baseline."""
        return self.dtype == "fp16"

    @property
    def scale_bits(self) -> int:
        """Bits stored per block constant (0 for the baseline)."""
        return 0 if self.is_baseline else SCALE_DTYPES[self.scale_dtype]

    @property
    def id(self) -> str:
        """The canonical id, e.g. ``float4-e3-b64``; see the module docstring."""
        if self.is_baseline:
            return "fp16"
        parts = [f"{self.dtype}{self.bits}"]
        if self.exponent_bits is not None:
            parts.append(f"e{self.exponent_bits}")
        parts.append("bt" if self.block_size is None else f"b{self.block_size}")
        default_scale = _DEFAULT_SCALE.get(self.dtype, "fp16")
        if self.scale_dtype != default_scale:
            parts.append(f"s{self.scale_dtype}")
        if self.outlier_fraction:
            parts.append(f"o{self.outlier_fraction:g}")
        if self.center:
            parts.append("c")
        if self.quantile_estimator != "sram":
            parts.append(f"q{self.quantile_estimator}")
        if self.method != "rtn":
            parts.append(self.method)
        return "-".join(parts)

    def __str__(self) -> str:
        return self.id

    @classmethod
    def parse(cls, text: str | QuantSpec) -> QuantSpec:
        """Parse a canonical id (or an alias such as ``mxfp4``) into a spec."""
        if isinstance(text, QuantSpec):
            return text
        s = str(text).strip().lower()
        if s in ("fp16", "16bit", "baseline"):
            return cls()
        s = _ALIASES.get(s, s)
        m = _ID_RE.match(s)
        if not m:
            raise SpecError(
                f"cannot parse quant spec {text!r}: expected 'fp16' or "
                "'{dtype}{bits}[-e{E}]-b{B|t}[-s{scale}][-o{p}][-c][-q{est}][-gptq]' "
                f"with dtype in {DTYPES[1:]}, e.g. 'float4-e3-b64', 'int8-bt', 'mxfp4'"
            )
        g = m.groupdict()
        if g["dtype"] not in DTYPES[1:]:
            raise SpecError(f"quant spec {text!r}: dtype {g['dtype']!r} is not one of {DTYPES[1:]}")
        spec = cls(
            dtype=g["dtype"],
            bits=int(g["bits"]),
            exponent_bits=int(g["e"]) if g["e"] else None,
            block_size=None if g["block"] == "t" else int(g["block"]),
            scale_dtype=g["scale"],
            outlier_fraction=float(g["outlier"]) if g["outlier"] else 0.0,
            center=bool(g["center"]),
            quantile_estimator=g["est"] or "sram",
            method=g["method"] or "rtn",
        )
        return spec

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Build a spec from a mapping of field names (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        bad = set(d) - names
        if bad:
            raise SpecError(f"unknown quant spec fields {sorted(bad)}; allowed are {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``quant`` (the id) and ``scale_bits``, for table columns."""
        d = asdict(self)
        d["quant"] = self.id
        d["scale_bits"] = self.scale_bits
        return d

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def expand_grid(grid: dict[str, Any]) -> list[QuantSpec]:
    """All specs of a sweep: each field maps to a value or a list of values.

    ``exponent_bits`` may be an int, None (the paper default) or ``"half"`` (ceil(k/2)).
    Combinations that are invalid for a dtype (e.g. exponent bits for int) are an error,
    so a sweep never silently drops points.
    """
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    specs: list[QuantSpec] = []
    for combo in itertools.product(*values):
        d = dict(zip(keys, combo, strict=True))
        if d.get("exponent_bits") in EXPONENT_RULES:
            d["exponent_bits"] = default_exponent_bits(int(d["bits"]), d["exponent_bits"])
        if d.get("block_size") in ("tensor", "t"):
            d["block_size"] = None
        spec = QuantSpec.from_dict(d)
        if spec not in specs:
            specs.append(spec)
    return specs
