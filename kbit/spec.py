"""QuantSpec: one quantization configuration and its canonical, filesystem-safe id.

The id is what names directories (``results/quantized/{model}/{quant}``) and rows in every
table, so ``QuantSpec.parse(str(spec)) == spec`` must hold for every valid spec. Grammar::

    fp16
    {dtype}{bits}[-e{E}]-b{B|t}[-s{scale}][-o{p}][-c][-q{estimator}][-{method}][{mixed}]
    mixed := -r{Q_r}-{layer|matmul}[-loss][-n{trials}][-seed{seed}]

``-e`` (exponent bits) appears for float-like types only; ``-bt`` means one block constant
per tensor; the optional parts appear only when they differ from their defaults, so each
spec has exactly one id. Aliases such as ``mxfp4`` or ``nvfp4`` parse to their full spec, also
in front of a mixed part (``mxint4-r0.9-matmul``).

Mixed precision (Cao et al., arXiv 2410.06722): a spec with ``mixed_ratio`` set quantizes a
fraction Q_r of the quantizable linear weights (counted in parameters) with the format the other
fields describe, the *low* format, and keeps the rest in 16 bit. ``granularity`` says which
units are assigned together (``layer``: a whole transformer block, ``matmul``: one linear
weight); ``selection`` says how the units are chosen (``random``: the best of ``n_trials``
random assignments drawn from ``seed``; ``loss``: the units whose quantization alone raises the
loss least). The ratio is kept to 6 decimals, the precision its id carries.
:meth:`QuantSpec.low_spec` is the low format alone; which units were chosen is an assignment
(:mod:`kbit.mixed`), not part of the spec.
"""

from __future__ import annotations

import itertools
import math
import numbers
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
#: mixed precision: unit granularity and unit selection methods (the first of each is the default)
GRANULARITIES = ("matmul", "layer")
SELECTIONS = ("random", "loss")
#: random search: the paper's 50 trials, and the default seed
DEFAULT_TRIALS = 50
DEFAULT_SEED = 0
#: decimals of the quantization ratio kept in a spec (and written in its id)
RATIO_DECIMALS = 6
#: the mixed-precision fields, None unless ``mixed_ratio`` is set
MIXED_FIELDS = ("mixed_ratio", "granularity", "selection", "n_trials", "seed")
#: table column of the Q_r a mixed run achieved (``mixed_ratio`` is the target; units differ in
#: size, so the two differ a little; see kbit.mixed)
ACHIEVED_COLUMN = "mixed_ratio_achieved"
#: ``to_dict`` columns derived from the fields (accepted and checked by ``from_dict``)
DERIVED_KEYS = ("quant", "scale_bits", "low_quant")

_DEFAULT_SCALE = {"mxfp": "e8m0", "mxint": "e8m0", "nvfp": "e4m3"}
_DEFAULT_BLOCK = {"mxfp": 32, "mxint": 32, "nvfp": 16}
_ALLOWED_BITS = {
    "mxfp": (4, 6, 8),
    "mxint": (2, 3, 4, 5, 6, 7, 8),
    "nvfp": (4,),
}
_MX_DEFAULT_EXPONENT = {4: 2, 6: 2, 8: 4}
_ALIASES = {
    "mxfp4": "mxfp4-e2-b32",
    "mxfp6": "mxfp6-e2-b32",
    "mxfp8": "mxfp8-e4-b32",
    **{f"mxint{k}": f"mxint{k}-b32" for k in range(2, 9)},
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
_MIXED_RE = re.compile(
    r"-r(?P<ratio>\d+(?:\.\d+)?)"
    r"-(?P<granularity>layer|matmul)"
    r"(?:-(?P<selection>loss))?"
    r"(?:-n(?P<trials>\d+))?"
    r"(?:-seed(?P<seed>\d+))?$"
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
    mixed_ratio: float | None = None
    granularity: str | None = None
    selection: str | None = None
    n_trials: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        d = self.dtype
        if d not in DTYPES:
            raise SpecError(f"dtype {d!r} is not one of {DTYPES}")
        if d == "fp16":
            if any(getattr(self, f) is not None for f in MIXED_FIELDS):
                raise SpecError(
                    f"the mixed-precision fields {MIXED_FIELDS} need a quantized low-precision "
                    "format (e.g. dtype 'mxint', bits 4); fp16 is the 16-bit baseline, i.e. "
                    "mixed_ratio 0"
                )
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
        self._check_mixed()

    def _check_mixed(self) -> None:
        """Validate the mixed-precision fields and fill their defaults (see the module doc)."""
        r = self.mixed_ratio
        if r is None:
            extra = [f for f in MIXED_FIELDS[1:] if getattr(self, f) is not None]
            if extra:
                raise SpecError(
                    f"{', '.join(extra)} only apply to mixed precision: set mixed_ratio "
                    "(the quantized fraction Q_r in [0, 1]) too"
                )
            return
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r):
            raise SpecError(f"mixed_ratio={r!r}: allowed is a number 0 <= Q_r <= 1")
        if not 0.0 <= r <= 1.0:
            raise SpecError(f"mixed_ratio={r!r}: allowed is 0 <= Q_r <= 1")
        object.__setattr__(self, "mixed_ratio", round(float(r), RATIO_DECIMALS))
        if self.method != "rtn":
            raise SpecError(
                f"mixed precision quantizes by rounding to nearest; method {self.method!r} "
                "is not supported with mixed_ratio"
            )
        _set_default(self, "granularity", GRANULARITIES[0])
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"granularity={self.granularity!r}: allowed are {GRANULARITIES}")
        _set_default(self, "selection", SELECTIONS[0])
        if self.selection not in SELECTIONS:
            raise SpecError(f"selection={self.selection!r}: allowed are {SELECTIONS}")
        if self.selection != "random":
            if self.n_trials is not None or self.seed is not None:
                raise SpecError(
                    f"n_trials and seed apply to selection 'random' only, not {self.selection!r}"
                )
            return
        _set_default(self, "n_trials", DEFAULT_TRIALS)
        _set_default(self, "seed", DEFAULT_SEED)
        if not _is_int(self.n_trials) or self.n_trials < 1:
            raise SpecError(f"n_trials={self.n_trials!r}: allowed are integers >= 1")
        if not _is_int(self.seed) or self.seed < 0:
            raise SpecError(f"seed={self.seed!r}: allowed are integers >= 0")
        object.__setattr__(self, "n_trials", int(self.n_trials))
        object.__setattr__(self, "seed", int(self.seed))

    # ------------------------------------------------------------------ identity
    @property
    def is_baseline(self) -> bool:
        """True for the unquantized 16-bit baseline."""
        return self.dtype == "fp16"

    @property
    def is_mixed(self) -> bool:
        """True when only a fraction ``mixed_ratio`` of the weights gets the low format."""
        return self.mixed_ratio is not None

    def low_spec(self) -> QuantSpec:
        """The low-precision format alone (the mixed-precision fields removed)."""
        return replace(self, **dict.fromkeys(MIXED_FIELDS))

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
        if self.is_mixed:
            parts += [f"r{_ratio_text(self.mixed_ratio)}", self.granularity]
            if self.selection != SELECTIONS[0]:
                parts.append(self.selection)
            if self.n_trials not in (None, DEFAULT_TRIALS):
                parts.append(f"n{self.n_trials}")
            if self.seed not in (None, DEFAULT_SEED):
                parts.append(f"seed{self.seed}")
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
        mixed = _MIXED_RE.search(s)
        if mixed:
            s = s[: mixed.start()]
            if s in ("fp16", "16bit", "baseline"):
                raise SpecError(
                    f"quant spec {text!r}: a mixed-precision spec needs a quantized low format "
                    "before '-r', e.g. 'mxint4-r0.9-matmul'"
                )
        s = _ALIASES.get(s, s)
        m = _ID_RE.match(s)
        if not m:
            raise SpecError(
                f"cannot parse quant spec {text!r}: expected 'fp16' or "
                "'{dtype}{bits}[-e{E}]-b{B|t}[-s{scale}][-o{p}][-c][-q{est}][-gptq]"
                "[-r{Q_r}-{layer|matmul}[-loss][-n{trials}][-seed{seed}]]' "
                f"with dtype in {DTYPES[1:]}, e.g. 'float4-e3-b64', 'int8-bt', 'mxfp4', "
                "'mxint4-r0.9-matmul'"
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
            **(_mixed_fields(mixed) if mixed else {}),
        )
        return spec

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Build a spec from a mapping of field names (unknown keys are an error).

        The derived columns of :meth:`to_dict` (``quant``, ``scale_bits``, ``low_quant``) are
        accepted and must agree with the spec the fields give.
        """
        names = {f.name for f in fields(cls)}
        bad = set(d) - names - set(DERIVED_KEYS)
        if bad:
            raise SpecError(f"unknown quant spec fields {sorted(bad)}; allowed are {sorted(names)}")
        spec = cls(**{k: v for k, v in d.items() if k in names})
        derived = spec.to_dict()
        wrong = [k for k in DERIVED_KEYS if k in d and d[k] != derived[k]]
        if wrong:
            raise SpecError(
                f"quant spec fields give {', '.join(f'{k}={derived[k]!r}' for k in wrong)}, "
                f"not {', '.join(f'{k}={d[k]!r}' for k in wrong)}"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``quant`` (the id), ``scale_bits`` and ``low_quant`` (the id of
        :meth:`low_spec`, equal to ``quant`` for a spec that is not mixed), for table columns.
        The mixed-precision columns (``mixed_ratio`` = the target Q_r, ...) are None otherwise.
        """
        d = asdict(self)
        d["quant"] = self.id
        d["scale_bits"] = self.scale_bits
        d["low_quant"] = self.low_spec().id
        return d

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _set_default(spec: QuantSpec, name: str, value: Any) -> None:
    if getattr(spec, name) is None:
        object.__setattr__(spec, name, value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ratio_text(r: float) -> str:
    """A ratio in fixed notation without trailing zeros (no exponent, no '-'): ``0.95``, ``1``."""
    return f"{r:.{RATIO_DECIMALS}f}".rstrip("0").rstrip(".")


def _mixed_fields(m: re.Match[str]) -> dict[str, Any]:
    g = m.groupdict()
    out: dict[str, Any] = {
        "mixed_ratio": float(g["ratio"]),
        "granularity": g["granularity"],
        "selection": g["selection"] or SELECTIONS[0],
    }
    if g["trials"] is not None:
        out["n_trials"] = int(g["trials"])
    if g["seed"] is not None:
        out["seed"] = int(g["seed"])
    return out


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
