"""Each finding is tested on data built to satisfy it, and flips when the data flips."""

from __future__ import annotations

import pytest
from synthetic import analysed

from kbit.analysis.claims import FAILS, HOLDS, NA, check_claims, render_claims


def _verdicts(a) -> dict[int, str]:
    return {c.number: c.verdict for c in check_claims(a.scores, a.laws, a.laws["bootstrap"])}


@pytest.fixture(scope="module")
def four():
    return _verdicts(analysed())


def test_findings_hold_where_the_data_was_built_to_satisfy_them(four):
    for n in (1, 2, 4, 5, 6, 7, 8, 9, 10):
        assert four[n] == HOLDS, n
    assert four[3] == FAILS  # the synthetic 3-bit curves are stable at every size
    assert four[11] == NA  # no GPTQ runs


def test_flipping_the_data_flips_finding_1():
    eight = _verdicts(analysed("eight"))
    assert eight[1] == FAILS


def test_missing_sweeps_are_not_enough_data():
    a = analysed(extras=False, with_wikitext=False, n_docs=60, n_boot=20)
    # a family that is neither OPT nor Pythia: finding 3 has nothing to test
    laws = {k: df.assign(family="synth") for k, df in a.laws.items()}
    claims = check_claims(a.scores.assign(family="synth"), laws, laws["bootstrap"])
    v = {c.number: c.verdict for c in claims}
    for n in (3, 4, 5, 6, 7, 8, 9, 10, 11):
        assert v[n] == NA, n
    assert v[1] == HOLDS


def test_render_lists_every_finding_with_test_and_numbers():
    a = analysed()
    claims = check_claims(a.scores, a.laws, a.laws["bootstrap"])
    text = render_claims(claims)
    for c in claims:
        assert f"## Finding {c.number}: {c.verdict}" in text
        assert c.test and c.evidence
    assert "[" in text and "*Test.*" in text


def test_without_bootstrap_the_point_estimates_decide():
    a = analysed()
    laws = {k: v for k, v in a.laws.items() if k != "bootstrap"}
    claims = check_claims(a.scores, laws, None)
    assert claims[0].verdict == HOLDS
    assert "no bootstrap table" in claims[0].evidence[-1]


def test_workflow_scripts_chain(tmp_path):
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist
    from synthetic import make_study

    scripts = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
    study = make_study(n_docs=40, extras=False, offsets={3: -0.05, 4: 0.0, 8: -0.02, 16: -0.05})
    evals = [str(p) for p in study.write(tmp_path / "evals")]
    metrics = {"lambada_openai": "acc", "piqa": "acc", "hellaswag": "acc", "winogrande": "acc"}
    t = {n: str(tmp_path / "tables" / f"{n}.parquet") for n in ("scores", "runs")}
    laws = {
        n: str(tmp_path / "laws" / f"{n}.parquet")
        for n in ("curves", "fits", "optimal", "bootstrap")
    }

    def run(name, inputs, outputs, params=None):
        smk = SimpleNamespace(
            input=Namedlist(fromdict=inputs),
            output=Namedlist(fromdict=outputs),
            params=Namedlist(fromdict=params or {}),
            log=[str(tmp_path / "logs" / f"{name}.log")],
        )
        runpy.run_path(str(scripts / f"{name}.py"), init_globals={"snakemake": smk})

    run("aggregate", {"evals": evals}, t, {"accuracy_metrics": metrics})
    run(
        "fit",
        {"scores": t["scores"], "evals": evals},
        laws,
        {"n_boot": 20, "seed": 0, "accuracy_metrics": metrics},
    )
    inputs = {"scores": t["scores"], **laws}
    run("figures", inputs, {"dir": str(tmp_path / "figures"), "index": str(tmp_path / "fig.md")})
    run("claims", inputs, {"out": str(tmp_path / "claims.md")})
    assert (tmp_path / "figures" / "fig1_bit_scaling.pdf").stat().st_size > 1000
    assert "](figures/fig1_bit_scaling.png)" in (tmp_path / "fig.md").read_text()
    assert "## Finding 1: holds" in (tmp_path / "claims.md").read_text()
