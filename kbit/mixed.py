r"""Mixed precision: a fraction Q_r of the quantizable weights in a low format, the rest 16-bit.

Cao et al. (arXiv 2410.06722) ask how large a share of a model's linear weights can go to a
low-precision format (MXINT4, FP4 E2M1) for a given loss budget. This module makes one such
model:

Units
    The quantizable weights are those :func:`kbit.model_quant.select_parameters` selects (by
    default the linear weights inside the transformer blocks). They are grouped into units, the
    pieces an assignment moves between precisions: ``matmul`` granularity makes each tensor a
    unit (named by its parameter name); ``layer`` granularity makes each transformer block a unit
    (named by the block, e.g. ``gpt_neox.layers.3``), holding all selected tensors of that block.
    A selected tensor outside the blocks (an embedding, the LM head, when the selection asks for
    them) is its own unit at either granularity. Aliases of a tied tensor belong to one unit and
    count once.

Ratio
    Q_r = (parameters of the low units) / (parameters of all units), counted exactly. Units
    differ in size, so a target Q_r is met by a fill rule (:func:`fill_to_ratio`): walk the units
    in an order (random, or by increasing loss) and add a unit iff adding it does not move the
    low fraction farther from the target than it is (a tie adds). Then the achieved Q_r is
    within half of the largest unit's fraction of the target, Q_r 0 selects nothing and Q_r 1
    everything. The achieved value is recorded in every :class:`Assignment`.

Selection (``spec.selection``)
    ``random``: ``n_trials`` orders drawn from ``numpy.random.default_rng(spec.seed)`` (one
    ``permutation`` per trial, so the trials are reproducible from the seed on any machine), each
    filled to the target and scored by the mean token negative log-likelihood (NLL) of the model
    on a fixed token tensor (:func:`kbit.features.mean_nll`, int64 ``[n_seq, seq_len]`` in
    batches, no grad); the lowest NLL is kept (ties: the earlier trial). A subset drawn
    twice is scored once. ``loss``: deterministic; each unit is quantized alone and scored (one
    pass per unit); the increase of the NLL over the 16-bit model orders the units (smallest
    first, ties in model order, a non-finite increase last) and the fill rule picks them.
    Neither method retrains anything.

Cost
    The model is loaded once. Every unit is quantized once (one :func:`quantize_model` call over
    all units) and its packed weights are kept, beside a 16-bit copy of the original weights;
    between trials only the units whose assignment changes are written (dequantized from the
    packed cache, or restored). Memory: the quantizable weights once more in their dtype plus
    their packed low-precision codes.

Applying an assignment (:func:`apply_assignment`) is one ordinary
``quantize_model(model, low_spec, include=[exact names])`` call, so the rows and total bits
come from the existing accounting; the search writes exactly the same weights (both go
through :meth:`kbit.model_quant.QuantizedWeight.dequantize`), so an assignment's recorded score
is what the applied model scores on the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kbit.accounting import sqnr_stats, summarize
from kbit.features import DEFAULT_BATCH, calibration_tokens, mean_nll
from kbit.io import write_json
from kbit.model_quant import (
    QuantizedWeight,
    find_blocks,
    parameter_aliases,
    quantize_model,
    select_parameters,
)
from kbit.spec import ACHIEVED_COLUMN, GRANULARITIES, QuantSpec, SpecError

log = logging.getLogger(__name__)

ASSIGNMENT_FORMAT = "kbit-mixed-assignment"
ASSIGNMENT_VERSION = 1
#: keyword arguments of :func:`kbit.model_quant.select_parameters` that define the quantizable set
SELECTION_OPTIONS = ("include", "exclude", "quantize_embeddings", "quantize_lm_head")

Logger = Callable[[str], None] | logging.Logger | None


# ----------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """A group of parameters that is quantized or kept 16-bit together."""

    name: str
    params: tuple[str, ...]  # every selected parameter name (tied aliases included)
    n_params: int  # distinct parameters (a tied tensor once)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": list(self.params), "n_params": self.n_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(str(d["name"]), tuple(str(p) for p in d["params"]), int(d["n_params"]))


def _check_options(options: dict[str, Any]) -> None:
    bad = sorted(set(options) - set(SELECTION_OPTIONS))
    if bad:
        raise TypeError(f"unknown selection options {bad}; allowed are {list(SELECTION_OPTIONS)}")


def _unit_key(name: str, granularity: str, block_prefix: str) -> str:
    if granularity == "matmul" or not name.startswith(block_prefix + "."):
        return name
    index = name[len(block_prefix) + 1 :].split(".", 1)[0]
    return f"{block_prefix}.{index}"


def model_units(model: nn.Module, granularity: str, **selection_options: Any) -> list[Unit]:
    """The units of ``model`` at ``granularity`` (``layer`` or ``matmul``), in model order.

    ``selection_options`` are those of :func:`kbit.model_quant.select_parameters` (``include``,
    ``exclude``, ``quantize_embeddings``, ``quantize_lm_head``); the defaults select the linear
    weights of the transformer blocks, the paper's quantizable set.
    """
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity={granularity!r}: allowed are {GRANULARITIES}")
    _check_options(selection_options)
    selected = select_parameters(model, **selection_options)
    if not selected:
        raise ValueError(f"{type(model).__name__}: the selection options select no parameter")
    prefix, _ = find_blocks(model)
    first_of = {n: first for first, names in parameter_aliases(model).items() for n in names}
    params = dict(model.named_parameters(remove_duplicate=False))
    unit_of_tensor: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name in selected:
        tensor = first_of[name]
        if tensor not in unit_of_tensor:  # a tied tensor goes where its first alias goes
            unit_of_tensor[tensor] = _unit_key(name, granularity, prefix)
            key = unit_of_tensor[tensor]
            sizes[key] = sizes.get(key, 0) + params[name].numel()
        members.setdefault(unit_of_tensor[tensor], []).append(name)
    return [Unit(k, tuple(v), sizes[k]) for k, v in members.items()]


def exact_patterns(names: Iterable[str]) -> list[str]:
    """``include`` regular expressions matching exactly these parameter names."""
    return [f"^{re.escape(n)}$" for n in names]


def fill_to_ratio(sizes: Sequence[int], order: Sequence[int], target: float) -> list[int]:
    """Indices of the units chosen for ``target`` Q_r by walking ``order`` (sorted result).

    A unit is added iff the low fraction after adding it is no farther above the target than it
    is below the target before (``2 * low + size <= 2 * target * total``), so the achieved ratio
    differs from the target by at most half of the largest unit's fraction.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target Q_r {target!r}: allowed is 0 <= Q_r <= 1")
    if sorted(order) != list(range(len(sizes))):
        raise ValueError("order must be a permutation of the unit indices")
    total = sum(int(s) for s in sizes)
    low = 0
    chosen = []
    for i in order:
        size = int(sizes[i])
        if 2 * low + size <= 2 * target * total:
            chosen.append(int(i))
            low += size
    return sorted(chosen)


def random_orders(n_units: int, n_trials: int, seed: int) -> list[list[int]]:
    """The unit orders of the random search: one ``permutation`` per trial from ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n_units).tolist() for _ in range(n_trials)]


# ----------------------------------------------------------------------------- assignment
def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _none_to_nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


@dataclass
class Assignment:
    """Which units of a model hold the low format, how they were chosen and how they scored.

    ``score_nll`` is the mean token NLL (nats) of the chosen assignment on the search tokens and
    ``baseline_nll`` that of the 16-bit model (NaN when not scored). ``trials`` holds, for
    ``random``, one record per trial ``{"trial", "low" (unit indices), "ratio", "nll",
    "perplexity", "repeat_of"}`` and, for ``loss``, one per unit ``{"unit", "nll",
    "perplexity", "delta_nll"}``. ``search`` records the scoring data (``n_seq``, ``seq_len``,
    ``tokens_sha256``), the number of scoring passes and the wall time.
    """

    quant: str
    units: list[Unit]
    low: list[str]
    score_nll: float = float("nan")
    baseline_nll: float = float("nan")
    trials: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = self.spec
        if not spec.is_mixed:
            raise SpecError(f"an assignment needs a mixed-precision spec, not {spec.id!r}")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")
        unknown = sorted(set(self.low) - set(names))
        if unknown:
            raise ValueError(f"low units {unknown[:3]} are not units of this assignment")
        position = {n: i for i, n in enumerate(names)}
        self.low = sorted(set(self.low), key=position.__getitem__)

    # -------------------------------------------------------------- derived
    @property
    def spec(self) -> QuantSpec:
        """The mixed-precision spec the assignment was made for."""
        return QuantSpec.parse(self.quant)

    @property
    def low_spec(self) -> QuantSpec:
        """The low-precision format."""
        return self.spec.low_spec()

    @property
    def granularity(self) -> str:
        return str(self.spec.granularity)

    @property
    def target_ratio(self) -> float:
        return float(self.spec.mixed_ratio)  # type: ignore[arg-type]

    @property
    def n_params_total(self) -> int:
        """Parameters of all units (the quantizable parameters)."""
        return sum(u.n_params for u in self.units)

    @property
    def n_params_low(self) -> int:
        """Parameters of the low-precision units."""
        low = set(self.low)
        return sum(u.n_params for u in self.units if u.name in low)

    @property
    def achieved_ratio(self) -> float:
        """Q_r actually reached: low parameters / quantizable parameters."""
        total = self.n_params_total
        return self.n_params_low / total if total else float("nan")

    @property
    def score_perplexity(self) -> float:
        return math.exp(self.score_nll) if math.isfinite(self.score_nll) else float("nan")

    def low_parameters(self) -> list[str]:
        """Every parameter name of the low units (tied aliases included), in unit order."""
        low = set(self.low)
        return [p for u in self.units if u.name in low for p in u.params]

    def include_patterns(self) -> list[str]:
        """``quantize_model(include=...)`` patterns selecting exactly the low units' weights."""
        return exact_patterns(self.low_parameters())

    def unit_of(self) -> dict[str, str]:
        """Parameter name -> unit name."""
        return {p: u.name for u in self.units for p in u.params}

    # -------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite scores become null)."""
        spec = self.spec
        trials = [
            {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in t.items()}
            for t in self.trials
        ]
        return {
            "format": ASSIGNMENT_FORMAT,
            "version": ASSIGNMENT_VERSION,
            "quant": self.quant,
            "low_quant": spec.low_spec().id,
            "granularity": spec.granularity,
            "selection": spec.selection,
            "n_trials": spec.n_trials,
            "seed": spec.seed,
            "mixed_ratio": spec.mixed_ratio,
            ACHIEVED_COLUMN: self.achieved_ratio,
            "n_params_quantizable": self.n_params_total,
            "n_params_low": self.n_params_low,
            "n_units": len(self.units),
            "n_units_low": len(self.low),
            "score_nll": _finite_or_none(self.score_nll),
            "baseline_nll": _finite_or_none(self.baseline_nll),
            "low": list(self.low),
            "units": [u.to_dict() for u in self.units],
            "trials": trials,
            "search": dict(self.search),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assignment:
        """Rebuild from :meth:`to_dict` output; the recorded Q_r must match the units."""
        if d.get("format") != ASSIGNMENT_FORMAT or d.get("version") != ASSIGNMENT_VERSION:
            raise ValueError(
                f"not a {ASSIGNMENT_FORMAT} v{ASSIGNMENT_VERSION} file "
                f"(format {d.get('format')!r}, version {d.get('version')!r})"
            )
        trials = [
            {
                k: (float("nan") if v is None and k in ("nll", "perplexity", "delta_nll") else v)
                for k, v in t.items()
            }
            for t in d.get("trials", [])
        ]
        a = cls(
            quant=str(d["quant"]),
            units=[Unit.from_dict(u) for u in d["units"]],
            low=[str(n) for n in d["low"]],
            score_nll=_none_to_nan(d.get("score_nll")),
            baseline_nll=_none_to_nan(d.get("baseline_nll")),
            trials=trials,
            search=dict(d.get("search", {})),
        )
        recorded = d.get(ACHIEVED_COLUMN)
        if recorded is not None and not math.isclose(recorded, a.achieved_ratio, abs_tol=1e-12):
            raise ValueError(
                f"assignment records Q_r {recorded} but its units give {a.achieved_ratio}"
            )
        return a

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Assignment:
        return cls.from_dict(json.loads(text))

    def write(self, path: str | Path) -> Path:
        """Write the JSON file atomically."""
        return write_json(self.to_dict(), path)

    @classmethod
    def read(cls, path: str | Path) -> Assignment:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"assignment file {path} does not exist")
        return cls.from_json(path.read_text())


def make_assignment(
    model: nn.Module, spec: QuantSpec | str, low: Iterable[str], **selection_options: Any
) -> Assignment:
    """An assignment of ``model``'s units at ``spec``'s granularity with the named low units."""
    spec = _mixed_spec(spec)
    units = model_units(model, str(spec.granularity), **selection_options)
    return Assignment(spec.id, units, list(low))


def _mixed_spec(spec: QuantSpec | str) -> QuantSpec:
    spec = QuantSpec.parse(spec)
    if not spec.is_mixed:
        raise SpecError(
            f"{spec.id} is not a mixed-precision spec: set mixed_ratio (e.g. 'mxint4-r0.9-matmul')"
        )
    return spec


# ----------------------------------------------------------------------------- applying
def _check_units(model_units_: list[Unit], assignment: Assignment) -> None:
    got = [(u.name, u.n_params) for u in model_units_]
    want = [(u.name, u.n_params) for u in assignment.units]
    if got != want:
        diff = next(
            (f"{g} vs {w}" for g, w in zip(got, want, strict=False) if g != w),
            f"{len(got)} vs {len(want)} units",
        )
        raise ValueError(
            "the assignment was made for other units than this model and selection options "
            f"give (first difference, model vs assignment: {diff})"
        )


def apply_assignment(
    model: nn.Module,
    spec: QuantSpec | str,
    assignment: Assignment,
    *,
    on_tensor: Callable[[Any], None] | None = None,
    **selection_options: Any,
) -> list[dict]:
    """Quantize the assignment's low units of an unquantized ``model`` in place; return rows.

    ``spec`` must be the assignment's spec (its id is checked). ``selection_options`` must be
    those the assignment was made with (the units are rebuilt and compared). The rows are those
    of :func:`kbit.model_quant.quantize_model` plus ``unit`` (the parameter's unit, None outside
    the quantizable set); with no low unit the model is left unchanged. ``on_tensor`` receives
    every quantized weight (the artifact writer stores them).
    """
    spec = _mixed_spec(spec)
    if spec.id != assignment.quant:
        raise SpecError(f"spec {spec.id} does not match the assignment's {assignment.quant}")
    _check_units(model_units(model, assignment.granularity, **selection_options), assignment)
    if assignment.low:
        rows = quantize_model(
            model, spec.low_spec(), include=assignment.include_patterns(), on_tensor=on_tensor
        )
    else:
        rows = quantize_model(model, QuantSpec())  # the 16-bit rows, nothing changed
    unit_of = assignment.unit_of()
    for r in rows:
        r["unit"] = unit_of.get(r["name"])
    return rows


def mixed_summary(rows: list[dict], assignment: Assignment) -> dict[str, Any]:
    """The bit summary of applied rows plus the assignment's columns (for kbit.json and tables).

    Raises when the rows' quantized parameters are not the assignment's low parameters: the
    achieved Q_r in the tables must be the one the model really has.
    """
    s = {**summarize(rows), **sqnr_stats(rows)}
    if s["n_params_quantized"] != assignment.n_params_low:
        raise ValueError(
            f"rows quantize {s['n_params_quantized']} parameters, the assignment's low units "
            f"hold {assignment.n_params_low}"
        )
    spec = assignment.spec
    return {
        **s,
        "quant": spec.id,
        "low_quant": spec.low_spec().id,
        "mixed_ratio": spec.mixed_ratio,
        ACHIEVED_COLUMN: assignment.achieved_ratio,
        "granularity": spec.granularity,
        "selection": spec.selection,
        "n_units": len(assignment.units),
        "n_units_low": len(assignment.low),
        "n_params_quantizable": assignment.n_params_total,
        "n_params_low": assignment.n_params_low,
        "search_nll": assignment.score_nll,
        "search_perplexity": assignment.score_perplexity,
        "baseline_nll": assignment.baseline_nll,
    }


# ----------------------------------------------------------------------------- scoring
def check_tokens(tokens: torch.Tensor) -> None:
    """A scoring tensor is int64 ``[n_seq, seq_len]`` with ``seq_len >= 2``."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        raise ValueError("tokens must be an int64 tensor [n_seq, seq_len]")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: need n_seq >= 1, seq_len >= 2")


def text_tokens(tokenizer: Any, text: str, *, n_seq: int, seq_len: int) -> torch.Tensor:
    """The first ``n_seq`` consecutive windows of ``seq_len`` tokens of ``text`` (int64)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return calibration_tokens(ids, n_seq, seq_len)


def tokens_digest(tokens: torch.Tensor) -> str:
    """SHA-256 of the token ids (provenance of a search's scoring data)."""
    return hashlib.sha256(tokens.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the search
class UnitSwitch:
    """Moves units of a loaded model between their 16-bit and low-precision weights.

    Built once per search: every unit is quantized once (one ``quantize_model`` call) and its
    packed :class:`~kbit.model_quant.QuantizedWeight` kept; the 16-bit originals are copied
    first. The model is left 16-bit. :meth:`set_low` then writes only the units whose state
    changes, and returns how many did.
    """

    def __init__(self, model: nn.Module, low_spec: QuantSpec, units: list[Unit]) -> None:
        self.model = model
        self.units = units
        tensors = sorted({p for u in units for p in u.params})
        self.originals = {n: model.get_parameter(n).detach().clone() for n in tensors}
        self.packed: dict[str, QuantizedWeight] = {}
        patterns = exact_patterns(tensors)
        quantize_model(model, low_spec, include=patterns, on_tensor=self._keep)
        self.current: set[int] = set(range(len(units)))
        self.set_low(())

    def _keep(self, qw: QuantizedWeight) -> None:
        self.packed[qw.plan.name] = qw

    @torch.no_grad()
    def _write(self, unit: Unit, low: bool) -> None:
        for name in unit.params:
            if name not in self.originals:
                continue
            param = self.model.get_parameter(name)
            if low:
                qw = self.packed.get(name)
                if qw is None:  # an alias of a tensor stored under its first name
                    continue
                param.copy_(qw.dequantize(param.dtype).to(param.device))
            else:
                param.copy_(self.originals[name])

    def set_low(self, low: Iterable[int]) -> int:
        """Make exactly the units ``low`` low-precision; returns the number of units written."""
        want = set(int(i) for i in low)
        changed = (want - self.current) | (self.current - want)
        for i in sorted(changed):
            self._write(self.units[i], i in want)
        self.current = want
        return len(changed)


def _logger(log_to: Logger) -> Callable[[str], None]:
    if log_to is None:
        return log.info
    if isinstance(log_to, logging.Logger):
        return log_to.info
    return log_to


def _rank_key(nll: float) -> float:
    return nll if math.isfinite(nll) else math.inf


def _random_search(switch, units, spec, score, say) -> tuple[list[int], list[dict], float]:
    sizes = [u.n_params for u in units]
    total = sum(sizes)
    n = int(spec.n_trials)
    seen: dict[tuple[int, ...], int] = {}
    trials: list[dict[str, Any]] = []
    best = -1
    for i, order in enumerate(random_orders(len(units), n, int(spec.seed))):
        low = fill_to_ratio(sizes, order, float(spec.mixed_ratio))
        key = tuple(low)
        first = seen.get(key)
        if first is None:
            changed = switch.set_low(low)
            nll = score()
            seen[key] = i
        else:
            changed, nll = 0, trials[first]["nll"]
        ratio = sum(sizes[j] for j in low) / total
        trials.append(
            {
                "trial": i,
                "low": low,
                "ratio": ratio,
                "nll": nll,
                "perplexity": math.exp(nll) if math.isfinite(nll) else float("nan"),
                "repeat_of": first,
            }
        )
        if best < 0 or _rank_key(nll) < _rank_key(trials[best]["nll"]):
            best = i
        b = trials[best]
        say(
            f"trial {i + 1}/{n}: Q_r {ratio:.4f}, perplexity {trials[-1]['perplexity']:.4f}"
            f"{' (repeat of trial ' + str(first + 1) + ')' if first is not None else ''}; "
            f"best so far {b['perplexity']:.4f} (trial {best + 1}); {changed} units switched"
        )
    if not math.isfinite(trials[best]["nll"]):
        raise FloatingPointError(
            f"every one of the {n} random assignments scored a non-finite loss"
        )
    return trials[best]["low"], trials, trials[best]["nll"]


def _loss_search(switch, units, spec, score, base, say) -> tuple[list[int], list[dict], float]:
    trials = []
    for j, unit in enumerate(units):
        switch.set_low([j])
        nll = score()
        delta = nll - base
        trials.append(
            {
                "unit": unit.name,
                "nll": nll,
                "perplexity": math.exp(nll) if math.isfinite(nll) else float("nan"),
                "delta_nll": delta,
            }
        )
        say(f"unit {j + 1}/{len(units)} {unit.name}: loss increase {delta:+.6f} nats")
    order = sorted(
        range(len(units)),
        key=lambda j: (
            not math.isfinite(trials[j]["delta_nll"]),
            _rank_key(trials[j]["delta_nll"]),
            j,
        ),
    )
    low = fill_to_ratio([u.n_params for u in units], order, float(spec.mixed_ratio))
    switch.set_low(low)
    return low, trials, score()


def search_assignment(
    model: nn.Module,
    spec: QuantSpec | str,
    tokens: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH,
    log: Logger = None,
    **selection_options: Any,
) -> Assignment:
    """Choose the low units of ``model`` for the mixed ``spec`` by its selection method.

    ``tokens`` (int64 ``[n_seq, seq_len]``) are the fixed scoring data, ``batch_size`` the rows
    per forward pass, ``log`` a callable or logger for progress lines (default: this module's
    logger), ``selection_options`` the quantizable set (see :func:`model_units`). Scoring passes:
    ``1 + distinct subsets`` (random, at most ``1 + n_trials``) or ``2 + units`` (loss). The
    model is 16-bit again afterwards (a tied tensor that the selection splits stays untied, as
    :func:`kbit.model_quant.quantize_model` leaves it).
    """
    spec = _mixed_spec(spec)
    check_tokens(tokens)
    say = _logger(log)
    t0 = time.perf_counter()
    units = model_units(model, str(spec.granularity), **selection_options)
    passes = 0

    def score() -> float:
        nonlocal passes
        passes += 1
        return mean_nll(model, tokens, batch_size)

    say(
        f"{spec.id}: {len(units)} {spec.granularity} units, "
        f"{sum(u.n_params for u in units):,} quantizable parameters"
    )
    switch = UnitSwitch(model, spec.low_spec(), units)
    base = score()
    say(f"16-bit perplexity {math.exp(base):.4f} (nll {base:.6f})")
    try:
        if spec.selection == "random":
            low, trials, best = _random_search(switch, units, spec, score, say)
        else:
            low, trials, best = _loss_search(switch, units, spec, score, base, say)
    finally:
        switch.set_low(())
    a = Assignment(
        quant=spec.id,
        units=units,
        low=[units[i].name for i in low],
        score_nll=best,
        baseline_nll=base,
        trials=trials,
        search={
            "n_seq": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "tokens_sha256": tokens_digest(tokens),
            "scoring_passes": passes,
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    say(
        f"chose {len(a.low)}/{len(units)} units, Q_r {a.achieved_ratio:.4f} "
        f"(target {a.target_ratio}), perplexity {a.score_perplexity:.4f} "
        f"vs 16-bit {math.exp(base):.4f}; {passes} scoring passes"
    )
    return a
