"""The paired document bootstrap: exactness, pairing, coverage, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import analysed, make_study

from kbit.analysis.bootstrap import (
    bootstrap_points,
    paired_gain,
    replicate_curves,
    resample_counts,
)
from kbit.analysis.curves import ACCURACY_TARGET
from kbit.analysis.tables import aggregate

ACC_TASKS = ("lambada_openai", "piqa", "hellaswag", "winogrande")


def test_resample_counts_draw_every_document_set_once_per_replicate():
    c = resample_counts(50, 300, np.random.default_rng(0))
    assert c.shape == (300, 50)
    assert (c.sum(axis=1) == 50).all()
    assert c.mean() == pytest.approx(1.0, abs=0.05)


def test_estimates_equal_the_score_table():
    a = analysed()
    pts = a.laws["bootstrap"]
    pts = pts[pts.kind == "point"].merge(
        a.scores[["model", "quant", "target", "value"]], on=["model", "quant", "target"]
    )
    assert len(pts) > 0
    assert np.allclose(pts.estimate, pts.value, rtol=1e-9, atol=1e-12)
    assert (pts.ci_low <= pts.estimate + 1e-12).all() and (
        pts.estimate <= pts.ci_high + 1e-12
    ).all()
    assert {len(r) for r in pts.replicates} == {200}


def test_pairing_makes_differences_tighter_than_points():
    a = analysed()
    pts, curves = a.laws["bootstrap"], a.laws["curves"]
    rc = replicate_curves(
        pts[pts.kind == "point"],
        curves,
        "pythia",
        ACCURACY_TARGET,
        ["float4-e3-b64", "float5-e3-b64"],
    )
    r4, r5 = rc["float4-e3-b64"][2], rc["float5-e3-b64"][2]
    assert np.corrcoef(r4[:, 0], r5[:, 0])[0, 1] > 0.8
    _, gain = paired_gain(rc, "float4-e3-b64", "float5-e3-b64", np.array([31.0]))
    assert np.nanstd(gain) < 0.5 * np.std(r4[:, 1])


def test_same_seed_same_replicates_other_seed_differs():
    study = make_study(
        n_docs=40, extras=False, tasks=("piqa", "winogrande"), offsets={4: 0.0, 8: 0.0}
    )
    a = bootstrap_points(study.docs, n_boot=20, seed=7)
    b = bootstrap_points(study.docs, n_boot=20, seed=7)
    c = bootstrap_points(study.docs, n_boot=20, seed=8)
    assert a.replicates.tolist() == b.replicates.tolist()
    assert a.replicates.tolist() != c.replicates.tolist()
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_points(study.docs, n_boot=1)


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    hits = total = 0
    for seed in range(4):
        study = make_study(
            n_docs=120,
            seed=seed,
            shared=0.0,
            extras=False,
            tasks=ACC_TASKS,
            offsets={3: -0.05, 4: 0.0, 8: -0.02, 16: -0.05},
        )
        pts = bootstrap_points(study.docs, n_boot=300, seed=seed, targets=[ACCURACY_TARGET])
        m = pts.merge(study.truth, on=["model", "quant"])
        hits += int(((m.ci_low <= m.acc) & (m.acc <= m.ci_high)).sum())
        total += len(m)
    assert total == 64
    assert 0.85 <= hits / total <= 1.0


def test_optimal_frequencies_sum_to_one():
    boot = analysed().laws["bootstrap"]
    opt = boot[(boot.kind == "optimal") & (boot.target == ACCURACY_TARGET)]
    sums = opt.groupby("budget_log2").freq.sum()
    assert np.allclose(sums, 1.0)
    diff = boot[(boot.kind == "diff") & (boot.target == ACCURACY_TARGET)]
    d45 = diff[(diff.precision == 4) & (diff.other_precision == 5)]
    assert len(d45) > 0 and (d45.estimate > 0).mean() > 0.8


def test_missing_documents_are_skipped_not_counted_as_wrong():
    study = make_study(n_docs=30, extras=False, tasks=("piqa",), offsets={4: 0.0, 16: 0.0})
    docs = study.docs[~((study.docs.quant == "fp16") & (study.docs.doc_id < 10))]
    scores, _ = aggregate([docs])
    pts = bootstrap_points(docs, n_boot=10, targets=["piqa:acc"])
    m = pts.merge(scores, on=["model", "quant", "target"])
    assert np.allclose(m.estimate, m.value)
