"""Synthetic per-document evaluation tables with a known generating law.

A family of four model sizes is "evaluated" at precisions 3..8 bits plus the 16-bit baseline
(float, block 64 is the main sweep) and at extra configurations (block sizes, data types, float
exponent bits, proxy quantization, centering). The true mean zero-shot accuracy of a run is

    acc(x, config) = c0 + c1 * (x - XC) + c2 * (x - XC)**2 + offset[config],   x = log2(total bits)

so the curves are exactly parallel in log2(bits) and the precision with the largest offset is
optimal at every budget. Each document is correct iff u < acc, with u ~ Uniform(0, 1) shared
across runs for most documents: the population accuracy equals ``acc`` exactly and runs of
the same documents are correlated, as real paired evaluations are. WikiText rows carry a
cross-entropy that falls linearly with accuracy, so perplexity and accuracy correlate.

A :class:`World` says what is drawn. Three worlds exercise every finding of
``kbit.analysis.claims``: ``paper`` (every finding built to hold: 4-bit optimal, parallel
curves, the largest 3-bit model collapsing to chance, 2-bit GPTQ beating 3-bit float only with
blocks), ``flipped`` (every finding built to fail) and ``noise`` (accuracy and perplexity
independent of size and bits: no finding can be decided). ``four`` and ``eight`` are the plain
4-bit- and 8-bit-optimal worlds.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kbit.spec import QuantSpec

XC = 32.0
BASE = (0.5, 0.08, -0.004)
SIZES = (1.0e8, 3.0e8, 1.0e9, 3.0e9)
QUANTIZED_FRACTION = 0.9
TASKS = {  # task -> (output_type, n_choices)
    "lambada_openai": ("loglikelihood", 1),
    "piqa": ("multiple_choice", 2),
    "hellaswag": ("multiple_choice", 4),
    "winogrande": ("multiple_choice", 2),
    "wikitext": ("loglikelihood_rolling", 1),
}
PERPLEXITY_TASK = "wikitext"
#: mean chance accuracy of the four zero-shot tasks (0, 1/2, 1/4, 1/2)
CHANCE = 0.3125
#: offsets per main-sweep precision: 4-bit optimal, 3-bit far below (the paper's picture)
FOUR_BIT_OPTIMAL = {3: -0.08, 4: 0.0, 5: -0.008, 6: -0.016, 7: -0.024, 8: -0.032, 16: -0.09}
#: the flipped world: more bits is always better at equal total bits
EIGHT_BIT_OPTIMAL = {3: -0.16, 4: -0.09, 5: -0.06, 6: -0.035, 7: -0.015, 8: 0.0, 16: -0.01}
GPTQ_BLOCKS = (64, 256, 1024, None)


def main_spec(bits: int) -> QuantSpec:
    """The main-sweep spec at ``bits`` (float with the paper's exponent bits, block 64)."""
    return QuantSpec() if bits == 16 else QuantSpec(dtype="float", bits=bits, block_size=64)


def extra_specs(offsets: Mapping[int, float]) -> dict[QuantSpec, float]:
    """Sweep configurations beside the main one, each with its true offset.

    4 bits: blocks 256/1024 and int/dynamic lose, quantile gains a little, float E1/E2 lose
    (E3 >= ceil(4/2) best); 6 bits: every variant equals the main 6-bit curve (the null result);
    proxy quantization helps at 3 bits only; centering costs a little everywhere.
    """
    o4, o6, o3 = offsets[4], offsets[6], offsets[3]
    f4 = QuantSpec(dtype="float", bits=4, block_size=64)
    f6 = QuantSpec(dtype="float", bits=6, block_size=64)
    return {
        f4.replace(block_size=256): o4 - 0.004,
        f4.replace(block_size=1024): o4 - 0.008,
        QuantSpec(dtype="int", bits=4, block_size=64): o4 - 0.03,
        QuantSpec(dtype="dynamic", bits=4, block_size=64): o4 - 0.025,
        QuantSpec(dtype="quantile", bits=4, block_size=64): o4 + 0.005,
        f4.replace(exponent_bits=1): o4 - 0.03,
        f4.replace(exponent_bits=2): o4 - 0.006,
        f6.replace(block_size=1024): o6,
        QuantSpec(dtype="int", bits=6, block_size=64): o6,
        QuantSpec(dtype="quantile", bits=6, block_size=64): o6,
        QuantSpec(dtype="float", bits=3, block_size=64, outlier_fraction=0.02): o3 + 0.05,
        f4.replace(outlier_fraction=0.02): o4,
        f4.replace(center=True): o4 - 0.005,
    }


def flipped_extra_specs(offsets: Mapping[int, float]) -> dict[QuantSpec, float]:
    """The same configurations as :func:`extra_specs`, each built to contradict the paper:
    larger blocks, int/dynamic and E1 win at 4 bits, int helps at 6 bits, proxy quantization
    hurts at 3 bits and helps at 4, centering helps."""
    o4, o6, o3 = offsets[4], offsets[6], offsets[3]
    f4 = QuantSpec(dtype="float", bits=4, block_size=64)
    f6 = QuantSpec(dtype="float", bits=6, block_size=64)
    return {
        f4.replace(block_size=256): o4 + 0.01,
        f4.replace(block_size=1024): o4 + 0.02,
        QuantSpec(dtype="int", bits=4, block_size=64): o4 + 0.03,
        QuantSpec(dtype="dynamic", bits=4, block_size=64): o4 + 0.02,
        QuantSpec(dtype="quantile", bits=4, block_size=64): o4 - 0.02,
        f4.replace(exponent_bits=1): o4 + 0.03,
        f4.replace(exponent_bits=2): o4 - 0.01,
        f6.replace(block_size=1024): o6,
        QuantSpec(dtype="int", bits=6, block_size=64): o6 + 0.03,
        QuantSpec(dtype="quantile", bits=6, block_size=64): o6,
        QuantSpec(dtype="float", bits=3, block_size=64, outlier_fraction=0.02): o3 - 0.03,
        f4.replace(outlier_fraction=0.02): o4 + 0.04,
        f4.replace(center=True): o4 + 0.03,
    }


def gptq_specs(o3: float, blocked: float, per_tensor: float) -> dict[QuantSpec, float]:
    """The GPTQ table (perplexity task only): 3-bit float RTN at blocks 256, 1024 and per
    tensor (block 64 is the main sweep's) and 2-bit GPTQ at every block, offsets relative to
    the 3-bit float curve (``blocked`` for finite blocks, ``per_tensor`` without)."""
    f3 = QuantSpec(dtype="float", bits=3, block_size=64)
    out = {f3.replace(block_size=256): o3 - 0.01, f3.replace(block_size=1024): o3 - 0.02}
    out[f3.replace(block_size=None)] = o3 - 0.06
    for b in GPTQ_BLOCKS:
        spec = QuantSpec(dtype="int", bits=2, block_size=b, method="gptq")
        out[spec] = o3 + (blocked if b is not None else per_tensor)
    return out


@dataclass
class World:
    """What the generator draws: true offsets and the departures from the base law."""

    offsets: Mapping[int, float]
    extras: Mapping[QuantSpec, float] = field(default_factory=dict)
    #: configurations evaluated on the perplexity task only (the GPTQ table)
    ppl_only: Mapping[QuantSpec, float] = field(default_factory=dict)
    #: extra accuracy per doubling of total bits, by main-sweep precision (non-parallel curves)
    slopes: Mapping[int, float] = field(default_factory=dict)
    #: main-sweep precision -> true accuracy of the largest model (instability)
    collapse: Mapping[int, float] = field(default_factory=dict)
    #: quant id -> nats added to the WikiText cross-entropy
    ce_shift: Mapping[str, float] = field(default_factory=dict)
    #: every run's true accuracy when set: no dependence on size or bits at all
    flat: float | None = None


def _random_shift(specs, scale: float, seed: int = 123) -> dict[str, float]:
    """A fixed random cross-entropy shift per configuration (its own generator)."""
    ids = sorted(s.id for s in specs)
    rng = np.random.default_rng(seed)
    return dict(zip(ids, rng.uniform(-scale, scale, len(ids)), strict=True))


def world(name: str) -> World:
    """``four``, ``eight``, ``paper``, ``flipped`` or ``noise`` (module docstring)."""
    if name == "four":
        return World(FOUR_BIT_OPTIMAL, extra_specs(FOUR_BIT_OPTIMAL))
    if name == "eight":
        return World(EIGHT_BIT_OPTIMAL, extra_specs(EIGHT_BIT_OPTIMAL))
    if name == "paper":
        o = FOUR_BIT_OPTIMAL
        return World(
            o,
            extra_specs(o),
            ppl_only=gptq_specs(o[3], blocked=0.06, per_tensor=-0.25),
            collapse={3: CHANCE + 0.02},
        )
    if name == "flipped":
        o = EIGHT_BIT_OPTIMAL
        extras = flipped_extra_specs(o)
        ppl_only = gptq_specs(o[3], blocked=-0.05, per_tensor=0.1)
        specs = [main_spec(b) for b in o] + list(extras) + list(ppl_only)
        return World(
            o,
            extras,
            ppl_only=ppl_only,
            slopes={5: 0.04, 7: -0.04},
            ce_shift=_random_shift(specs, 2.0),
        )
    if name == "noise":
        o = FOUR_BIT_OPTIMAL
        return World(o, extra_specs(o), ppl_only=gptq_specs(o[3], 0.06, -0.25), flat=0.5)
    raise ValueError(f"unknown world {name!r}")


def total_bits(n_params: float, spec: QuantSpec) -> float:
    """Bit accounting of PAPER.md for a model whose linear layers are 90% of its parameters."""
    if spec.is_baseline:
        return 16.0 * n_params
    nq = QUANTIZED_FRACTION * n_params
    k = spec.bits
    per = k + (16.0 / spec.block_size if spec.block_size else 0.0)
    per += spec.outlier_fraction * (16 - k)
    return nq * per + 16.0 * (n_params - nq)


def true_accuracy(n_params: float, spec: QuantSpec, offset: float) -> float:
    """The generating law (module docstring)."""
    x = np.log2(total_bits(n_params, spec)) - XC
    return float(BASE[0] + BASE[1] * x + BASE[2] * x * x + offset)


def true_cross_entropy(acc: float) -> float:
    """WikiText nats per word as a decreasing linear function of accuracy."""
    return 4.0 - 4.0 * (acc - 0.5)


def run_accuracy(w: World, n_params: float, spec: QuantSpec, offset: float) -> float:
    """The true accuracy of one run in world ``w``."""
    if w.flat is not None:
        return float(w.flat)
    precision = 16 if spec.is_baseline else spec.bits
    is_main = spec == main_spec(precision)
    acc = true_accuracy(n_params, spec, offset)
    if is_main and precision in w.slopes:
        acc += w.slopes[precision] * (np.log2(total_bits(n_params, spec)) - XC)
    if is_main and precision in w.collapse and n_params == max(SIZES):
        acc = w.collapse[precision]
    return float(np.clip(acc, 0.02, 0.98))


@dataclass
class SyntheticStudy:
    """A generated study: per-document rows and the truth behind them."""

    docs: pd.DataFrame
    truth: pd.DataFrame  # one row per (model, quant): n_params, total_bits, bits, acc, offset
    offsets: dict[int, float] = field(default_factory=dict)

    def write(self, root: str | Path) -> list[Path]:
        """Write ``{root}/{model}/{quant}/{task}.parquet`` files; returns their paths."""
        paths = []
        for (model, quant, task), g in self.docs.groupby(["model", "quant", "task"]):
            p = Path(root) / model / quant / f"{task}.parquet"
            p.parent.mkdir(parents=True, exist_ok=True)
            g.to_parquet(p, index=False)
            paths.append(p)
        return paths


def make_study(
    offsets: dict[int, float] | None = None,
    n_docs: int = 200,
    seed: int = 0,
    shared: float = 0.9,
    family: str = "synth",
    extras: bool = True,
    tasks: tuple[str, ...] = tuple(TASKS),
    world: World | None = None,
) -> SyntheticStudy:
    """Generate a study; ``shared`` is the fraction of documents whose u is common to all runs.

    Without ``world``: the plain world of ``offsets`` (4-bit optimal by default) with the
    extra configurations when ``extras``.
    """
    if world is None:
        offsets = dict(FOUR_BIT_OPTIMAL if offsets is None else offsets)
        world = World(offsets, extra_specs(offsets) if extras else {})
    offsets = dict(world.offsets)
    rng = np.random.default_rng(seed)
    configs = {main_spec(b): (offsets[b], tasks) for b in sorted(offsets)}
    configs.update({s: (o, tasks) for s, o in world.extras.items()})
    ppl_tasks = tuple(t for t in tasks if t == PERPLEXITY_TASK)
    configs.update({s: (o, ppl_tasks) for s, o in world.ppl_only.items() if ppl_tasks})
    u_shared = {t: rng.random(n_docs) for t in tasks}
    is_shared = {t: rng.random(n_docs) < shared for t in tasks}
    blocks, metas, truth = [], [], []
    for i, n in enumerate(SIZES):
        model = f"{family}-{i}"
        for spec, (off, run_tasks) in configs.items():
            acc = run_accuracy(world, n, spec, off)
            tb = total_bits(n, spec)
            truth.append(
                {
                    "model": model,
                    "family": family,
                    "n_params": n,
                    "quant": spec.id,
                    "bits": spec.bits,
                    "total_bits": tb,
                    "acc": acc,
                    "offset": off,
                }
            )
            meta = {
                "model": model,
                "hf_id": f"synthetic/{model}",
                "revision": "0",
                "family": family,
                "n_params": int(n),
                "n_params_quantized": int(QUANTIZED_FRACTION * n),
                **spec.to_dict(),
                "total_bits": tb,
                "kbit_version": "0.1.0",
                "torch_version": "x",
                "transformers_version": "x",
                "lm_eval_version": "x",
                "eval_dtype": "float32",
                "device": "cpu",
                "batch_size": 8,
            }
            ce = true_cross_entropy(acc) + world.ce_shift.get(spec.id, 0.0)
            for task in run_tasks:
                otype, n_choices = TASKS[task]
                u = np.where(is_shared[task], u_shared[task], rng.random(n_docs))
                correct = u < acc
                block = _task_rows(otype, n_choices, correct, ce, rng)
                block["task"] = np.full(n_docs, task, dtype=object)
                block["output_type"] = np.full(n_docs, otype, dtype=object)
                blocks.append(block)
                metas.append(meta)
    return SyntheticStudy(docs=_assemble(blocks, metas), truth=pd.DataFrame(truth), offsets=offsets)


def _assemble(blocks: list[dict], metas: list[dict]) -> pd.DataFrame:
    """One frame from per-run column blocks: metadata first, as evaluation files have it."""
    sizes = np.array([len(b["doc_id"]) for b in blocks])
    run = np.repeat(np.arange(len(blocks)), sizes)
    meta = pd.DataFrame({k: _column([m[k] for m in metas]) for k in metas[0]})
    meta = meta.iloc[run].reset_index(drop=True)
    cols = list(blocks[0])
    data = {}
    for c in cols:
        parts = [b[c] for b in blocks]
        if parts[0].dtype == object:
            joined = np.empty(int(sizes.sum()), dtype=object)
            joined[:] = [x for p in parts for x in p]
            data[c] = joined
        else:
            data[c] = np.concatenate(parts)
    body = pd.DataFrame(data)
    order = ["task", "output_type", "doc_id", "ll", "is_greedy", "target", "choice_chars"]
    rest = [c for c in cols if c not in order]
    return pd.concat([meta, body[order + rest]], axis=1)


def _column(values: list) -> pd.Series:
    """Text and missing values stay Python objects (as in per-run frames); numbers infer."""
    textual = any(v is None or isinstance(v, str) for v in values)
    return pd.Series(values, dtype=object if textual else None)


def _objects(rows) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    out[:] = list(rows)
    return out


def _task_rows(otype, n_choices, correct, ce, rng) -> dict[str, np.ndarray]:
    n = len(correct)
    if otype == "multiple_choice":
        ll = rng.normal(-10.0, 1.0, size=(n, n_choices))
        target = rng.integers(0, n_choices, size=n)
        others = ll.copy()
        others[np.arange(n), target] = -np.inf
        best_other = others.max(axis=1)
        ll[np.arange(n), target] = np.where(correct, best_other + 0.5, best_other - 0.5)
        lls = _objects([list(r) for r in ll])
        acc_col = correct.astype(float)
        acc_norm = acc_col.copy()
        chars = _objects([[10] * n_choices] * n)
        words = np.zeros(n, dtype=int)
        greedy = _objects([[bool(c)] + [False] * (n_choices - 1) for c in correct])
    elif otype == "loglikelihood":
        lls = _objects([[float(v)] for v in np.where(correct, -0.5, -4.0) + rng.normal(0, 0.1, n)])
        target = np.zeros(n, dtype=int)
        acc_col, acc_norm = correct.astype(float), np.full(n, np.nan)
        chars, words = _objects([[6]] * n), np.zeros(n, dtype=int)
        greedy = _objects([[bool(c)] for c in correct])
    else:
        words = rng.integers(200, 400, size=n)
        per_word = ce + rng.normal(0, 0.05, n)
        lls = _objects([[float(-c * w)] for c, w in zip(per_word, words, strict=True)])
        target = np.zeros(n, dtype=int)
        acc_col, acc_norm = np.full(n, np.nan), np.full(n, np.nan)
        chars, greedy = _objects([[0]] * n), _objects([[False]] * n)
    wall = float(1.0 + rng.random())
    return {
        "doc_id": np.arange(n),
        "ll": lls,
        "is_greedy": greedy,
        "target": target,
        "choice_chars": chars,
        "n_tokens": np.full(n, 50),
        "n_words": words,
        "n_bytes": words * 5,
        "acc": acc_col,
        "acc_norm": acc_norm,
        "wall_time_s": np.full(n, wall),
        "flops": np.full(n, 1e12 * wall),
    }


@dataclass
class Analysed:
    """A study carried through aggregation, curves and the bootstrap."""

    study: SyntheticStudy
    scores: pd.DataFrame
    runs: pd.DataFrame
    laws: dict[str, pd.DataFrame]


@functools.lru_cache(maxsize=8)
def analysed(
    world_name: str = "four",
    n_docs: int = 300,
    n_boot: int = 200,
    seed: int = 0,
    family: str = "pythia",
    extras: bool = True,
    with_wikitext: bool = True,
) -> Analysed:
    """A cached analysed study (test modules share it within one pytest process).

    ``world_name`` names a :func:`world`: ``four`` (4-bit optimal, the paper's picture),
    ``eight`` (8-bit optimal), ``paper``, ``flipped`` or ``noise``; ``extras=False`` keeps
    the main sweep only.
    """
    from kbit.analysis.laws import fit_laws
    from kbit.analysis.tables import aggregate

    w = world(world_name)
    if not extras:
        w = World(w.offsets, slopes=w.slopes, collapse=w.collapse, flat=w.flat)
    tasks = tuple(t for t in TASKS if with_wikitext or t != PERPLEXITY_TASK)
    study = make_study(n_docs=n_docs, seed=seed, shared=0.95, family=family, tasks=tasks, world=w)
    scores, runs = aggregate([study.docs])
    laws = fit_laws(scores, [study.docs], n_boot=n_boot, seed=seed)
    return Analysed(study, scores, runs, laws)
