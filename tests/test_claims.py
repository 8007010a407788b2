"""Every finding is tested three ways: on data built to satisfy it (holds), on data built to
contradict it (does not hold) and on pure noise, where accuracy and perplexity do not depend on
size or bits (not enough data, never holds). Then: the registry, the GPTQ-convention
perplexity, diverged runs, and the Markdown and HTML renderings.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from synthetic import analysed

import kbit.analysis.claims as claims_mod
from kbit.analysis.claims import (
    FAILS,
    HOLDS,
    NA,
    Claim,
    ClaimData,
    check_claims,
    finding,
    findings,
    load_findings,
    render_claims,
)
from kbit.analysis.curves import GPTQ_PERPLEXITY
from kbit.analysis.report import claims_html, runs_html, scores_html

# The workflow registers every module's findings; so do the tests, so that no test depends on
# which other test module happened to import kbit.analysis.mixed first.
load_findings()

FINDINGS = range(1, 12)
EXPECTED = {"paper": HOLDS, "flipped": FAILS, "noise": NA}


def _check(a, scores=None, laws=None, select=FINDINGS, **kw):
    """The paper's findings (or ``select``) on an analysed synthetic world."""
    laws = a.laws if laws is None else laws
    scores = a.scores if scores is None else scores
    return check_claims(scores, laws, laws.get("bootstrap"), select=select, **kw)


def _verdicts(claims) -> dict:
    return {c.number: c.verdict for c in claims}


@pytest.fixture(scope="module")
def worlds() -> dict[str, dict]:
    return {w: _verdicts(_check(analysed(w))) for w in EXPECTED}


@pytest.mark.parametrize("world", list(EXPECTED))
@pytest.mark.parametrize("number", FINDINGS)
def test_each_finding_follows_the_data(worlds, world, number):
    assert worlds[world][number] == EXPECTED[world], (world, number)


def test_noise_names_the_missing_signal_and_its_slope():
    claims = _check(analysed("noise"))
    for c in claims:
        text = " ".join(c.evidence)
        if c.number == 11:  # a same-model comparison: noise shows as "not significant"
            assert "not significant" in text, text
            continue
        assert "no scaling signal" in text and "slope" in text, c.number
        assert "per doubling of total bits" in text, c.number
    signals = claims.signals
    assert set(signals["target"]) == {"mean_zeroshot:acc", "wikitext:word_perplexity"}
    assert not signals["signal"].any()
    assert signals["slope"].abs().max() < 0.2  # measured, near zero


def _renamed(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """The same rows as another family: ``pythia-0`` becomes ``{family}-0``."""
    out = df.replace({"family": {"pythia": family}})
    if "model" in df:
        out["model"] = df["model"].str.replace("pythia", family)
    return out


def test_a_family_without_signal_is_excluded_while_another_decides():
    """Two families: the paper's (scaling) and a flat one; only the first decides finding 1."""
    good, flat = analysed("paper"), analysed("noise")
    scores = pd.concat([good.scores, _renamed(flat.scores, "flat")], ignore_index=True)
    laws = {
        k: pd.concat([good.laws[k], _renamed(flat.laws[k], "flat")], ignore_index=True)
        for k in good.laws
    }
    (c,) = check_claims(scores, laws, laws["bootstrap"], select=[1])
    assert c.verdict == HOLDS
    assert any(e.startswith("flat excluded, no scaling signal") for e in c.evidence)
    assert any(e.startswith("pythia: 4-bit optimal") for e in c.evidence)


# ----------------------------------------------------------------------------- GPTQ convention
#: WikiText-2 perplexity of the largest model by (method, bits, block): the paper's Table 1
TABLE_1 = {
    ("rtn", 3, 64): 9.99,
    ("rtn", 3, 256): 10.38,
    ("rtn", 3, 1024): 13.26,
    ("rtn", 3, None): 25.0,
    ("gptq", 2, 64): 9.18,
    ("gptq", 2, 256): 10.00,
    ("gptq", 2, 1024): 11.84,
    ("gptq", 2, None): 60.0,
}
#: the contradiction: GPTQ worse with blocks, better per tensor
TABLE_1_FLIPPED = {**TABLE_1, ("gptq", 2, 64): 10.9, ("gptq", 2, 256): 11.5}
TABLE_1_FLIPPED.update({("gptq", 2, 1024): 14.6, ("gptq", 2, None): 18.0})


def _with_gptq_perplexity(a, kind: str) -> pd.DataFrame:
    """Add task wikitext2_gptq (metric perplexity, no bootstrap replicates) for the baseline,
    3-bit float and 2-bit GPTQ runs: the paper's Table 1 at the largest model, higher for
    smaller ones (``table``), contradicting it (``flipped``) or flat noise (``noise``)."""
    rng = np.random.default_rng(7)
    wt = a.scores[a.scores["target"] == "wikitext:word_perplexity"].copy()
    wt = wt[(wt["dtype"] == "fp16") | (wt["bits"].isin([2, 3]) & (wt["outlier_fraction"] == 0))]
    table = TABLE_1_FLIPPED if kind == "flipped" else TABLE_1
    values = []
    for r in wt.itertuples():
        block = None if pd.isna(r.block_size) else int(r.block_size)
        base = 8.0 if r.dtype == "fp16" else table[(r.method, int(r.bits), block)]
        size = (r.n_params / wt["n_params"].max()) ** -0.2
        values.append(10.0 if kind == "noise" else base * size)
    wt["value"] = np.asarray(values) * (1 + rng.normal(0, 0.004, len(wt)))
    wt["task"], wt["metric"], wt["target"] = "wikitext2_gptq", "perplexity", GPTQ_PERPLEXITY
    return pd.concat([a.scores, wt], ignore_index=True)


@pytest.mark.parametrize(("kind", "verdict"), [("table", HOLDS), ("flipped", FAILS), ("noise", NA)])
def test_gptq_claim_prefers_the_gptq_convention(kind, verdict):
    a = analysed("paper")
    (c,) = _check(a, scores=_with_gptq_perplexity(a, kind), select=["gptq_needs_blocking"])
    assert c.number == 11 and c.verdict == verdict
    text = " ".join(c.evidence)
    assert GPTQ_PERPLEXITY in text
    if kind == "noise":  # a same-model comparison: noise gives no significant difference
        assert "not significant" in text and "t interval over 4 models" in text
    else:
        assert "B=64 (wikitext2_gptq:perplexity)" in text and "(paper: 9.18 vs 9.99)" in text
        assert "pythia-3 2-bit GPTQ" in text and "per tensor" in text
        assert "t interval over 4 models" in text  # no bootstrap replicates for this target
    if kind == "table":
        # the largest model carries the paper's numbers (within the 0.4% noise)
        assert re.search(r"pythia-3 2-bit GPTQ 9\.[12]\d vs 3-bit float (9\.9|10\.0)", text)


def _gptq_diverged(scores: pd.DataFrame, which) -> pd.DataFrame:
    """Flag as diverged (perplexity 1e7) the wikitext2_gptq runs that ``which(row)`` selects,
    on every target of the run, as the evaluation step does."""
    gt = scores[scores["target"] == GPTQ_PERPLEXITY]
    runs = {(r["model"], r["quant"]) for r in gt.to_dict("records") if which(r)}
    hit = np.array([k in runs for k in zip(scores["model"], scores["quant"], strict=True)])
    out = scores.assign(diverged=scores.get("diverged", False) | hit)
    out.loc[hit & (out["target"] == GPTQ_PERPLEXITY).to_numpy(), "value"] = 1e7
    return out


def _is(method: str, bits: int, blocked: bool):
    return lambda r: (
        r["method"] == method and r["bits"] == bits and pd.notna(r["block_size"]) == blocked
    )


def test_gptq_claim_counts_a_diverged_gptq_run_against_gptq():
    """2-bit GPTQ broke down at every block size while 3-bit float did not (SmolLM2-135M's
    outcome): GPTQ is worse with blocks, without any interval, so the finding fails."""
    a = analysed("paper")
    scores = _gptq_diverged(_with_gptq_perplexity(a, "table"), _is("gptq", 2, True))
    (c,) = _check(a, scores=scores, select=[11])
    text = " ".join(c.evidence)
    assert c.verdict == FAILS, text
    assert "B=64 (wikitext2_gptq:perplexity)" in text and "GPTQ diverged, float did not" in text
    assert "2-bit GPTQ 1e+07 vs 3-bit float" in text


def test_gptq_claim_diverged_runs_decide_per_tensor_and_both_diverged_decide_nothing():
    a = analysed("paper")
    base = _with_gptq_perplexity(a, "table")
    # per tensor GPTQ broke down, float did not: GPTQ not better per tensor, as the paper says
    (c,) = _check(a, scores=_gptq_diverged(base, _is("gptq", 2, False)), select=[11])
    assert c.verdict == HOLDS, c.evidence
    # per-tensor float broke down and GPTQ did not: GPTQ better without blocks -> fails
    (c,) = _check(a, scores=_gptq_diverged(base, _is("rtn", 3, False)), select=[11])
    assert c.verdict == FAILS, c.evidence
    # both broke down per tensor: nothing is known there, so the finding is undecided
    both = lambda r: _is("gptq", 2, False)(r) or _is("rtn", 3, False)(r)  # noqa: E731
    (c,) = _check(a, scores=_gptq_diverged(base, both), select=[11])
    assert c.verdict == NA and "both diverged: decides nothing" in " ".join(c.evidence)


def test_gptq_claim_models_pointing_both_ways_are_undecided():
    """At B=64 the finite models say GPTQ is better, one model's GPTQ run diverged: undecided."""
    a = analysed("paper")
    base = _with_gptq_perplexity(a, "table")
    one = lambda r: _is("gptq", 2, True)(r) and r["block_size"] == 64 and r["model"] == "pythia-0"  # noqa: E731
    (c,) = _check(a, scores=_gptq_diverged(base, one), select=[11])
    text = " ".join(c.evidence)
    assert c.verdict == NA and "B=64: the models disagree" in text, text


def test_gptq_claim_falls_back_to_word_perplexity():
    (c,) = _check(analysed("paper"), select=[11])
    assert "wikitext:word_perplexity" in " ".join(c.evidence) and c.verdict == HOLDS
    assert "paired bootstrap" in " ".join(c.evidence)


# ----------------------------------------------------------------------------- diverged runs
def _diverge(a, model: str, quant: str, value: float, in_curves: bool = False):
    """Mark one run diverged: its score rows get ``value`` (NaN or inf) and the flag; its curve
    points are dropped, as the fit step does (or kept with ``value`` when ``in_curves``)."""
    scores = a.scores.copy()
    bad = (scores["model"] == model) & (scores["quant"] == quant)
    scores.loc[bad, "value"] = value
    scores["diverged"] = bad
    laws = dict(a.laws)
    c = laws["curves"]
    hit = (c["model"] == model) & (c["quant"] == quant)
    laws["curves"] = c.assign(value=c["value"].mask(hit, value)) if in_curves else c[~hit]
    return scores, laws


@pytest.mark.parametrize("in_curves", [False, True])
def test_a_diverged_largest_3bit_run_is_instability(in_curves):
    a = analysed("flipped")  # 3-bit is stable here: finding 3 does not hold
    scores, laws = _diverge(a, "pythia-3", "float3-e2-b64", np.nan, in_curves)
    claims = _check(a, scores, laws)
    v = _verdicts(claims)
    assert v[3] == HOLDS
    three = next(c for c in claims if c.number == 3)
    assert any("pythia-3 (float3-e2-b64) diverged -> unstable" in e for e in three.evidence)
    for n in set(FINDINGS) - {3}:
        assert v[n] == FAILS, n
    for c in claims:
        assert any("excluded from every curve (diverged): 3-bit pythia-3" in e for e in c.evidence)


def test_a_diverged_run_is_never_averaged():
    a = analysed("paper")
    scores, laws = _diverge(a, "pythia-1", "float7-e3-b64", np.inf)
    claims = _check(a, scores, laws)
    assert _verdicts(claims) == {n: HOLDS for n in FINDINGS}
    d = ClaimData(scores, laws["curves"], laws["bootstrap"])
    seven = d.curve("pythia", "mean_zeroshot:acc", "float7-e3-b64")
    assert list(seven["model"]) == ["pythia-0", "pythia-2", "pythia-3"]
    for c in claims:
        for e in c.evidence:
            if not e.startswith("excluded from every curve"):
                assert "inf" not in e and "nan" not in e, (c.number, e)
    text = render_claims(claims)
    assert "## Diverged runs" in text and "7-bit pythia-1 (float7-e3-b64)" in text
    assert "diverged: hellaswag (values not finite); lambada_openai (perplexity inf)" in text


# ----------------------------------------------------------------------------- registry
def test_registry_numbers_and_names():
    fs = findings()
    assert [f.number for f in fs if isinstance(f.number, int)] == list(FINDINGS)
    assert len({f.name for f in fs if isinstance(f.number, int)}) == 11
    # the mixed-precision findings come after the paper's, in natural order
    assert [f.number for f in fs if not isinstance(f.number, int)] == ["M1", "M2", "M3"]
    assert findings(select=["four_bit_optimal", 11])[1].name == "gptq_needs_blocking"
    with pytest.raises(ValueError, match="no finding named"):
        findings(select=["no_such_finding"])


def test_other_modules_register_findings(monkeypatch):
    monkeypatch.setattr(claims_mod, "REGISTRY", dict(claims_mod.REGISTRY))

    @finding("families_counted", number="X2", statement="Families exist.", test="Count them.")
    def families_counted(d: ClaimData, cl: Claim) -> None:
        fams = d.gate(cl)
        cl.evidence.append(f"{len(fams)} families with a scaling signal")
        cl.verdict = HOLDS if fams else NA

    @finding("first_extra", number="X1", statement="First.", test="None.")
    def first_extra(d: ClaimData, cl: Claim) -> None:
        cl.evidence.append("always undecided")

    assert [f.number for f in findings()][-2:] == ["X1", "X2"]  # after the others, in order
    claims = _check(analysed("paper"), select=["X2", "first_extra"])
    assert [(c.number, c.name, c.verdict) for c in claims] == [
        ("X1", "first_extra", NA),
        ("X2", "families_counted", HOLDS),
    ]
    assert _verdicts(_check(analysed("noise"), select=["X2"])) == {"X2": NA}
    assert "## Finding X2: holds" in render_claims(claims)
    with pytest.raises(ValueError, match="taken by"):
        finding("another", number="X1", statement="", test="")(first_extra)


def test_mixed_findings_without_mixed_runs_are_not_enough_data():
    """A study with no mixed-precision runs must not get a verdict on the mixed findings."""
    claims = _check(analysed("paper"), select=["M1", "M2", "M3"])
    assert _verdicts(claims) == {"M1": NA, "M2": NA, "M3": NA}
    for c in claims:
        assert "no mixed-precision runs" in " ".join(c.evidence), c.evidence


def test_missing_sweeps_are_not_enough_data():
    a = analysed(extras=False, with_wikitext=False, n_docs=60, n_boot=20)
    # a family that is neither OPT nor Pythia: finding 3 has nothing to test
    laws = {k: df.assign(family="synth") for k, df in a.laws.items()}
    claims = check_claims(a.scores.assign(family="synth"), laws, laws["bootstrap"])
    v = _verdicts(claims)
    for n in (3, 4, 5, 6, 7, 8, 9, 10, 11):
        assert v[n] == NA, n
    assert v[1] == HOLDS


def test_without_bootstrap_the_point_estimates_decide():
    a = analysed("paper")
    laws = {k: v for k, v in a.laws.items() if k != "bootstrap"}
    claims = check_claims(a.scores, laws, None, select=[1])
    assert claims[0].verdict == HOLDS
    assert "OLS t interval" in claims.signals["reason"].iloc[0]
    assert "no bootstrap table" in claims[0].evidence[-1]


# ----------------------------------------------------------------------------- renderings
def test_render_lists_every_finding_with_test_and_numbers():
    claims = _check(analysed("paper"))
    text = render_claims(claims)
    for c in claims:
        assert f"## Finding {c.number}: {c.verdict}" in text
        assert f"`{c.name}`" in text
        assert c.test and c.evidence
    assert "## Scaling signal per family" in text and "*Test.*" in text


def test_claims_html_is_a_readable_page():
    claims = _check(analysed("flipped"))
    claims[0].evidence.append("a <b>tag</b> & more")
    page = claims_html(claims)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<script" not in page
    assert page.count("<span class='verdict fails'>does not hold</span>") == 2 * 11
    for c in claims:
        assert f"id='finding-{c.number}'" in page and c.name in page
    assert "a &lt;b&gt;tag&lt;/b&gt; &amp; more" in page  # evidence is escaped
    assert "Scaling signal per family" in page


def test_tables_html_pivot_models_by_configuration():
    a = analysed("paper")
    scores = a.scores.copy()
    bad = (scores["model"] == "pythia-2") & (scores["quant"] == "float3-e2-b64")
    scores.loc[bad, "value"] = np.nan
    scores["diverged"] = bad
    page = scores_html(scores)
    for m in ("pythia-0", "pythia-3"):
        assert f"<th>{m}<br><small>" in page
    assert "<h3>mean zero-shot accuracy" in page and "<h3>perplexity" in page
    assert "<span class='diverged'>diverged</span>" in page
    assert "1e+09" not in page and "GiB" in page  # sizes in bytes
    accuracy = page.split("<h3>mean zero-shot accuracy")[1].split("<h3>")[0]
    assert accuracy.count("class='best'") == 4  # one per model
    best_first = accuracy.split("</tr>")[1:]  # pythia-0's best: the baseline
    assert "<code>fp16</code>" in next(r for r in best_first if "<code>fp16</code>" in r)
    runs = runs_html(a.runs)
    assert "<table>" in runs and "Software versions" in runs and "torch" in runs


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

    tables_html = {f"{n}_html": str(tmp_path / "tables" / f"{n}.html") for n in ("scores", "runs")}
    run(
        "aggregate",
        {"evals": evals},
        {**t, **tables_html},
        {"accuracy_metrics": metrics, "sweeps": {}, "perplexity_cap": 1e5},
    )
    run(
        "fit",
        {"scores": t["scores"], "evals": evals},
        laws,
        {"n_boot": 20, "seed": 0, "accuracy_metrics": metrics},
    )
    inputs = {"scores": t["scores"], **laws}
    run("figures", inputs, {"dir": str(tmp_path / "figures"), "index": str(tmp_path / "fig.md")})
    md, html = tmp_path / "claims.md", tmp_path / "claims.html"
    run("claims", inputs, {"md": str(md), "html": str(html)})
    assert (tmp_path / "figures" / "fig1_bit_scaling.pdf").stat().st_size > 1000
    assert "](figures/fig1_bit_scaling.png)" in (tmp_path / "fig.md").read_text()
    assert "## Finding 1: holds" in md.read_text()
    assert "<table" in (tmp_path / "tables" / "scores.html").read_text()
    assert "Finding 1 <code>four_bit_optimal</code>" in html.read_text()
    # the rule's older form: one unnamed output, Markdown only
    run("claims", inputs, {"out": str(tmp_path / "old.md")}, {"findings": [1, 2]})
    old = (tmp_path / "old.md").read_text()
    assert "## Finding 1: holds" in old and "## Finding 3" not in old
