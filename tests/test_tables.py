"""Aggregation of per-document files into the score and run tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic import TASKS, make_study

from kbit.analysis.tables import MEAN_TASK, aggregate, mean_zeroshot
from kbit.evaluation.metrics import task_metrics


@pytest.fixture(scope="module")
def small():
    study = make_study(n_docs=60, seed=3, extras=False)
    return study, *aggregate([study.docs])


def test_metrics_equal_task_metrics(small):
    study, scores, _ = small
    for (model, quant, task), g in list(study.docs.groupby(["model", "quant", "task"]))[:15]:
        got = scores[(scores.model == model) & (scores.quant == quant) & (scores.task == task)]
        want = task_metrics(g)
        assert dict(zip(got.metric, got.value, strict=True)) == pytest.approx(want)


def test_mean_zeroshot_is_mean_of_configured_tasks(small):
    _, scores, _ = small
    acc_tasks = ("lambada_openai", "piqa", "hellaswag", "winogrande")
    for _, g in scores.groupby(["model", "quant"]):
        per_task = g[g.task.isin(acc_tasks) & (g.metric == "acc")].value
        mean = g[(g.task == MEAN_TASK) & (g.metric == "acc")]
        assert len(mean) == 1 and len(per_task) == 4
        assert mean.value.iloc[0] == pytest.approx(per_task.mean())
        assert mean.chance.iloc[0] == pytest.approx((0 + 0.5 + 0.25 + 0.5) / 4)


def test_mean_zeroshot_tracks_the_generating_law(small):
    study, scores, _ = small
    m = scores[scores.target == f"{MEAN_TASK}:acc"].merge(study.truth, on=["model", "quant"])
    assert len(m) == len(study.truth)
    # 240 Bernoulli documents per run: the standard error is about 0.03
    assert np.abs(m.value - m.acc).max() < 0.12
    assert np.corrcoef(m.value, m.acc)[0, 1] > 0.95


def test_accuracy_metric_is_a_setting(small):
    _, scores, _ = small
    per_task = scores[scores.task != MEAN_TASK]
    norm = mean_zeroshot(per_task, {"piqa": "acc_norm", "hellaswag": "acc_norm"})
    row = norm[(norm.metric == "acc")].iloc[0]
    assert row.tasks == "hellaswag:acc_norm,piqa:acc_norm"
    with pytest.raises(ValueError, match="acc_norm"):
        mean_zeroshot(per_task, {"piqa": "f1"})


def test_spec_and_model_columns_survive(small):
    _, scores, _ = small
    for col in ("family", "n_params", "dtype", "bits", "block_size", "total_bits", "value"):
        assert col in scores.columns
    assert set(scores.task) == {*TASKS, MEAN_TASK}
    assert scores.loc[scores.metric == "word_perplexity", "lower_is_better"].all()


def test_runs_table(small):
    study, _, runs = small
    assert len(runs) == study.docs.groupby(["model", "quant", "task"]).ngroups
    assert np.allclose(runs.flop_per_s, runs.flops / runs.wall_time_s)
    assert (runs.n_docs == 60).all() and (runs.n_tokens == 60 * 50).all()
    for col in ("device", "batch_size", "torch_version", "lm_eval_version"):
        assert col in runs.columns


def test_reads_files_and_rejects_bad_input(tmp_path):
    study = make_study(n_docs=20, extras=False, tasks=("piqa",), offsets={4: 0.0, 16: 0.0})
    paths = study.write(tmp_path)
    scores, runs = aggregate(paths)
    assert set(scores.task) == {"piqa", "mean_zeroshot"}
    assert len(runs) == len(paths) == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        aggregate([tmp_path / "missing.parquet"])
    with pytest.raises(ValueError, match="no evaluation files"):
        aggregate([])
    dup = pd.concat([study.docs.iloc[:3], study.docs.iloc[:1]])
    with pytest.raises(ValueError, match="appears twice"):
        aggregate([dup])
    with pytest.raises(ValueError, match="lack columns"):
        aggregate([study.docs.drop(columns=["total_bits"])])
