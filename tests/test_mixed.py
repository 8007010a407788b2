"""Mixed precision: spec fields and ids, MXINT widths, units, assignments, applying, the search."""

from __future__ import annotations

import copy
import functools
import logging
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import ARCHS, LAYERS, tiny_model, tiny_tokenizer

import kbit.mixed as mixed
from kbit.blockwise import fake_quantize, quantize
from kbit.codebooks import codebook, element_grid
from kbit.mixed import (
    Assignment,
    apply_assignment,
    fill_to_ratio,
    make_assignment,
    mean_nll,
    mixed_summary,
    model_units,
    random_orders,
    search_assignment,
    text_tokens,
)
from kbit.model_quant import block_linear_names, find_blocks, quantize_model
from kbit.spec import ACHIEVED_COLUMN, QuantSpec, SpecError

SAFE_ID = re.compile(r"[a-z0-9.\-]+")


@functools.cache
def _built(arch: str):
    return tiny_model(arch)


def _model(arch: str):
    """A fresh copy of ``tiny_model(arch)`` (building one costs ten times more than copying)."""
    return copy.deepcopy(_built(arch))


# --------------------------------------------------------------------------- spec
low_ids = st.sampled_from(
    ["mxint4", "mxint2", "mxint8", "mxfp4", "nvfp4", "float4-e2-b32", "int4-b64", "nf4-bt"]
)
mixed_parts = st.fixed_dictionaries(
    {
        "mixed_ratio": st.floats(0.0, 1.0, allow_nan=False),
        "granularity": st.sampled_from(["layer", "matmul", None]),
        "selection": st.sampled_from(["random", "loss", None]),
        "n_trials": st.one_of(st.none(), st.integers(1, 500)),
        "seed": st.one_of(st.none(), st.integers(0, 2**31)),
    }
)


@given(low=low_ids, parts=mixed_parts)
def test_mixed_id_round_trip(low: str, parts: dict) -> None:
    if parts["selection"] == "loss":
        parts["n_trials"] = parts["seed"] = None
    spec = QuantSpec.parse(low).replace(**parts)
    assert QuantSpec.parse(spec.id) == spec
    assert QuantSpec.parse(str(spec)).id == spec.id
    assert SAFE_ID.fullmatch(spec.id)
    assert spec.low_spec() == QuantSpec.parse(low)
    assert abs(spec.mixed_ratio - parts["mixed_ratio"]) <= 5e-7
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_existing_ids_and_columns_are_unchanged() -> None:
    for text in ("fp16", "float4-e3-b64", "int8-bt", "quantile4-b64-qexact", "mxfp4", "nvfp4"):
        spec = QuantSpec.parse(text)
        assert QuantSpec.parse(spec.id) == spec and not spec.is_mixed
        d = spec.to_dict()
        assert all(d[f] is None for f in ("mixed_ratio", "granularity", "selection", "seed"))
        assert d["low_quant"] == d["quant"] == spec.id
    assert QuantSpec.parse("float4-e3-b64").id == "float4-e3-b64"
    assert QuantSpec().id == "fp16"


def test_mixed_id_grammar_and_defaults() -> None:
    s = QuantSpec.parse("mxint4-r0.9-matmul")
    assert s.id == "mxint4-b32-r0.9-matmul"
    assert (s.granularity, s.selection, s.n_trials, s.seed) == ("matmul", "random", 50, 0)
    assert s.to_dict()["mixed_ratio"] == 0.9 and s.to_dict()["low_quant"] == "mxint4-b32"
    s = QuantSpec(dtype="float", bits=4, exponent_bits=2, block_size=32, mixed_ratio=0.1 + 0.2)
    assert s.mixed_ratio == 0.3 and s.id == "float4-e2-b32-r0.3-matmul"
    loss = QuantSpec.parse("mxfp4-r1-layer-loss")
    assert (loss.mixed_ratio, loss.n_trials, loss.seed) == (1.0, None, None)
    assert QuantSpec.parse("mxfp4").replace(mixed_ratio=0.5, n_trials=7, seed=3).id == (
        "mxfp4-e2-b32-r0.5-matmul-n7-seed3"
    )


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"mixed_ratio": 1.5}, "0 <= Q_r <= 1"),
        ({"mixed_ratio": -0.1}, "0 <= Q_r <= 1"),
        ({"mixed_ratio": float("nan")}, "number"),
        ({"mixed_ratio": True}, "number"),
        ({"mixed_ratio": 0.5, "granularity": "block"}, "granularity"),
        ({"mixed_ratio": 0.5, "selection": "greedy"}, "selection"),
        ({"mixed_ratio": 0.5, "n_trials": 0}, "n_trials"),
        ({"mixed_ratio": 0.5, "seed": -1}, "seed"),
        ({"mixed_ratio": 0.5, "selection": "loss", "n_trials": 5}, "random"),
        ({"granularity": "layer"}, "mixed_ratio"),
        ({"seed": 1}, "mixed_ratio"),
        ({"mixed_ratio": 0.5, "method": "gptq"}, "round"),
    ],
)
def test_mixed_validation(fields: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        QuantSpec(dtype="mxint", bits=4, block_size=32, **fields)


def test_mixed_parse_and_dict_errors() -> None:
    with pytest.raises(SpecError, match="quantized low format"):
        QuantSpec.parse("fp16-r0.5-matmul")
    with pytest.raises(SpecError, match="mixed_ratio"):
        QuantSpec(mixed_ratio=0.5)
    with pytest.raises(SpecError, match="cannot parse"):
        QuantSpec.parse("mxint4-b32-r0.5-block")
    d = QuantSpec.parse("mxint4-r0.5-layer").to_dict()
    with pytest.raises(SpecError, match="quant="):
        QuantSpec.from_dict({**d, "quant": "mxint4-b32"})
    with pytest.raises(SpecError, match="unknown"):
        QuantSpec.from_dict({**d, "ratio": 0.5})


@pytest.mark.parametrize("bits", range(2, 9))
def test_mxint_element_grid_at_every_width(bits: int) -> None:
    g = element_grid(QuantSpec.parse(f"mxint{bits}"))
    top = 2 ** (bits - 1) - 1
    assert torch.equal(g.values, torch.arange(-top, top + 1, dtype=torch.float32) / 2 ** (bits - 2))
    assert g.values.numel() == 2**bits - 1 and g.emax == 0 and g.max == top / 2 ** (bits - 2)
    cb = codebook("mxint", bits)
    assert cb.max() == 1 and torch.equal(cb, -cb.flip(0))


def test_mxint4_quantizes_onto_its_grid(gen: torch.Generator) -> None:
    w = torch.randn(8, 64, generator=gen)
    q = quantize(w, "mxint4")
    grid = element_grid(q.spec).values
    scales = torch.ldexp(torch.ones(q.scales.numel()), q.scales.int() - 127)
    y = q.dequantize().reshape(-1, 32) / scales[:, None]
    assert torch.isin(y, grid).all()
    assert q.bits == 4 * w.numel() + 8 * (w.numel() // 32)
    assert torch.equal(fake_quantize(w, "mxint4"), q.dequantize())
    # each block's absmax sits in [1, 2) after scaling: the error is at most half a step (1/8)
    err = (w.reshape(-1, 32) / scales[:, None] - y).abs().max()
    assert err <= 0.25
    with pytest.raises(SpecError, match="bits"):
        QuantSpec(dtype="mxint", bits=9)


# --------------------------------------------------------------------------- units
@pytest.mark.parametrize("arch", ARCHS)
def test_units_of_every_architecture(arch: str) -> None:
    model = _model(arch)
    linears = [f"{n}.weight" for n in block_linear_names(model)]
    n_linear = sum(model.get_parameter(n).numel() for n in linears)
    layer, matmul = model_units(model, "layer"), model_units(model, "matmul")
    prefix, _ = find_blocks(model)
    assert [u.name for u in layer] == [f"{prefix}.{i}" for i in range(LAYERS)]
    assert [u.params[0] for u in matmul] == linears and all(len(u.params) == 1 for u in matmul)
    assert sum(u.n_params for u in layer) == sum(u.n_params for u in matmul) == n_linear
    for u in layer:
        assert all(p.startswith(u.name + ".") for p in u.params)
    assert sorted(p for u in layer for p in u.params) == sorted(linears)


def test_units_outside_blocks_and_tied_weights() -> None:
    model = _model("llama")  # tied embeddings
    units = model_units(model, "layer", quantize_lm_head=True)
    head = model.get_output_embeddings().weight
    assert units[-1].name == "lm_head.weight" and units[-1].n_params == head.numel()
    assert len(units) == LAYERS + 1
    with pytest.raises(TypeError, match="unknown selection options"):
        model_units(model, "layer", include_bias=True)
    with pytest.raises(SpecError, match="granularity"):
        model_units(model, "block")


@given(
    sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=30),
    target=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_fill_reaches_the_target_within_half_a_unit(sizes, target, seed) -> None:
    order = np.random.default_rng(seed).permutation(len(sizes)).tolist()
    chosen = fill_to_ratio(sizes, order, target)
    total = sum(sizes)
    achieved = sum(sizes[i] for i in chosen) / total
    assert abs(achieved - target) <= max(sizes) / total / 2 + 1e-12
    skipped = set(range(len(sizes))) - set(chosen)
    # no skipped unit would have brought the fraction closer to the target
    for i in skipped:
        assert abs(achieved + sizes[i] / total - target) >= abs(achieved - target) - 1e-12
    assert fill_to_ratio(sizes, order, 0.0) == []
    assert fill_to_ratio(sizes, order, 1.0) == list(range(len(sizes)))


def test_random_orders_follow_the_seed() -> None:
    assert random_orders(8, 5, 3) == random_orders(8, 5, 3)
    assert random_orders(8, 5, 3) != random_orders(8, 5, 4)


# --------------------------------------------------------------------------- assignments
def test_assignment_json_round_trip(tmp_path) -> None:
    model = _model("gpt2")
    units = model_units(model, "matmul")
    a = make_assignment(model, "mxint4-r0.5-matmul", [units[3].name, units[0].name])
    a.trials = [{"trial": 0, "low": [0, 3], "ratio": 0.1, "nll": float("nan")}]
    assert a.low == [units[0].name, units[3].name]  # model order
    b = Assignment.read(a.write(tmp_path / "a.json"))
    assert b.to_dict() == a.to_dict() and b.low == a.low and b.units == a.units
    assert math.isnan(b.trials[0]["nll"]) and b.achieved_ratio == a.achieved_ratio
    assert a.achieved_ratio == (units[0].n_params + units[3].n_params) / a.n_params_total
    d = a.to_dict()
    with pytest.raises(ValueError, match="records Q_r"):
        Assignment.from_dict({**d, ACHIEVED_COLUMN: 0.9})
    with pytest.raises(ValueError, match="not units"):
        Assignment.from_dict({**d, "low": ["nope"]})
    with pytest.raises(SpecError, match="not a mixed"):
        make_assignment(model, "mxint4", [])


def _fresh_equal(model, arch: str) -> bool:
    ref = dict(_model(arch).named_parameters())
    return all(torch.equal(p, ref[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("granularity", ["layer", "matmul"])
def test_ratio_zero_and_one(granularity: str) -> None:
    arch = "opt"
    for low in ("mxint4", "mxfp4", "float4-e2-b32"):
        spec0 = QuantSpec.parse(f"{low}-r0-{granularity}")
        model = _model(arch)
        a0 = make_assignment(model, spec0, [])
        rows = apply_assignment(model, spec0, a0)
        assert _fresh_equal(model, arch) and not any(r["quantized"] for r in rows)
        assert a0.achieved_ratio == 0.0

        spec1 = QuantSpec.parse(f"{low}-r1-{granularity}")
        model = _model(arch)
        units = model_units(model, granularity)
        a1 = make_assignment(model, spec1, [u.name for u in units])
        rows = apply_assignment(model, spec1, a1)
        ref = _model(arch)
        ref_rows = quantize_model(ref, QuantSpec.parse(low))
        ref_params = dict(ref.named_parameters())
        assert all(torch.equal(p, ref_params[n]) for n, p in model.named_parameters())
        assert [r["bits"] for r in rows] == [r["bits"] for r in ref_rows]
        assert a1.achieved_ratio == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_bits_are_the_sum_of_the_rows(arch: str) -> None:
    model = _model(arch)
    spec = QuantSpec.parse("mxint4-r0.5-matmul")
    units = model_units(model, "matmul")
    low = fill_to_ratio([u.n_params for u in units], random_orders(len(units), 1, 0)[0], 0.5)
    a = make_assignment(model, spec, [units[i].name for i in low])
    rows = apply_assignment(model, spec, a)
    s = mixed_summary(rows, a)
    counted = [r for r in rows if not r["tied_to"]]
    assert s["total_bits"] == sum(r["bits"] for r in counted)
    n_low = sum(r["n_params"] for r in counted if r["quantized"])
    assert n_low == a.n_params_low and s[ACHIEVED_COLUMN] == n_low / a.n_params_total
    expected = 16 * (s["n_params"] - n_low) + sum(
        4 * u.n_params + 8 * u.n_params // 32 for u in units if u.name in a.low
    )
    assert s["total_bits"] == expected
    assert {r["unit"] for r in rows if r["quantized"]} == set(a.low)
    assert abs(a.achieved_ratio - 0.5) <= max(u.n_params for u in units) / a.n_params_total / 2


def test_apply_checks_spec_and_units() -> None:
    model = _model("gpt2")
    a = make_assignment(model, "mxint4-r0.5-layer", [])
    with pytest.raises(SpecError, match="does not match"):
        apply_assignment(model, "mxint4-r0.5-matmul", a)
    other = _model("opt")
    with pytest.raises(ValueError, match="other units"):
        apply_assignment(other, "mxint4-r0.5-layer", a)


# --------------------------------------------------------------------------- scoring
def _tokens(n_seq: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n_seq, seq_len), generator=g)


def test_mean_nll_matches_the_model_loss() -> None:
    model = _model("gpt_neox")
    tokens = _tokens(3, 12)
    with torch.no_grad():
        ref = np.mean([float(model(input_ids=t[None], labels=t[None]).loss) for t in tokens])
    assert mean_nll(model, tokens, batch_size=2) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="int64"):
        mean_nll(model, tokens.int())


def test_text_tokens_cuts_windows() -> None:
    tok = tiny_tokenizer("gpt2")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    t = text_tokens(tok, text, n_seq=3, seq_len=10)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert t.dtype == torch.int64 and t.flatten().tolist() == ids[:30]
    with pytest.raises(ValueError, match="cannot fill"):
        text_tokens(tok, "short", n_seq=3, seq_len=10)


# --------------------------------------------------------------------------- the search
def _count_quantize_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = mixed.quantize_model

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed, "quantize_model", counting)
    return calls


def test_random_search_keeps_its_best_trial(monkeypatch) -> None:
    arch, tokens = "gpt_neox", _tokens()
    spec = QuantSpec.parse("mxint4-r0.5-matmul-n6-seed1")
    model = _model(arch)
    calls = _count_quantize_calls(monkeypatch)
    lines: list[str] = []
    a = search_assignment(model, spec, tokens, batch_size=2, log=lines.append)
    assert calls[0] == 1  # every unit quantized once, in one call
    assert _fresh_equal(model, arch)  # the search leaves the model 16-bit
    assert len(a.trials) == 6 and any(ln.startswith("trial 6/6") for ln in lines)
    nlls = [t["nll"] for t in a.trials]
    best = int(np.argmin(nlls))
    assert a.score_nll == min(nlls) and a.low == [a.units[i].name for i in a.trials[best]["low"]]
    assert a.search["scoring_passes"] == 1 + len({tuple(t["low"]) for t in a.trials})
    # the recorded score is what the applied assignment scores
    fresh = _model(arch)
    apply_assignment(fresh, spec, a)
    assert mean_nll(fresh, tokens, batch_size=2) == a.score_nll
    assert mean_nll(_model(arch), tokens, batch_size=2) == a.baseline_nll


def test_random_search_is_reproducible_from_its_seed() -> None:
    tokens = _tokens()

    def run(seed: int) -> Assignment:
        spec = QuantSpec.parse(f"mxint4-r0.5-matmul-n3-seed{seed}")
        return search_assignment(_model("gpt2"), spec, tokens, batch_size=2, log=lambda s: None)

    a, b, c = run(0), run(0), run(5)
    assert a.to_dict()["trials"] == b.to_dict()["trials"] and a.low == b.low
    assert [t["low"] for t in a.trials] != [t["low"] for t in c.trials]
    assert a.low != c.low


def test_loss_selection_orders_units_by_their_own_loss_increase() -> None:
    arch, tokens = "bloom", _tokens()
    spec = QuantSpec.parse("mxint4-r0.4-matmul-loss")
    logger = logging.getLogger("test_mixed")
    a = search_assignment(_model(arch), spec, tokens, batch_size=2, log=logger)
    units = a.units
    assert [t["unit"] for t in a.trials] == [u.name for u in units]
    assert a.search["scoring_passes"] == len(units) + 2
    # a unit's recorded increase is the increase of the model with that unit alone quantized
    one = _model(arch)
    single = Assignment(spec.id, units, [units[2].name])
    apply_assignment(one, spec, single)
    assert mean_nll(one, tokens, batch_size=2) - a.baseline_nll == a.trials[2]["delta_nll"]
    deltas = [t["delta_nll"] for t in a.trials]
    order = sorted(range(len(units)), key=lambda j: (deltas[j], j))
    expected = fill_to_ratio([u.n_params for u in units], order, 0.4)
    assert a.low == [units[i].name for i in expected]
    again = search_assignment(_model(arch), spec, tokens, batch_size=2, log=logger)
    assert again.low == a.low and again.score_nll == a.score_nll
