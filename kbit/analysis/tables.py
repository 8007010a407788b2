"""Aggregate per-document evaluation files into the score and run tables.

``scores``: one row per (model, quant, task, metric) with every model and spec column, plus per
(model, quant) the mean zero-shot accuracy over the accuracy tasks as task ``mean_zeroshot``.
``runs``: one row per (model, quant, task) with cost and provenance (time, tokens, FLOPs, versions).
Task metrics come from :func:`kbit.evaluation.metrics.task_metrics`, so they equal lm-eval's.

Diverged runs. A quantized model can be numerically unstable: NaN or infinite log-likelihoods, or
a perplexity beyond any use (the paper saw 3-bit runs above 100,000). Such a (model, quant, task)
is marked ``diverged`` (with ``n_nonfinite``, the documents whose log-likelihoods are not finite),
and so is the mean zero-shot accuracy of a (model, quant) with any diverged task: its value is
reported as measured (non-finite documents count as wrong answers, perplexities stay NaN/inf),
never interpolated into a scaling curve (:mod:`kbit.analysis.curves` leaves it out and lists it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from kbit.evaluation.metrics import LOWER_IS_BETTER, task_metrics

#: the paper's four zero-shot tasks and the metric each contributes to the mean
DEFAULT_ACCURACY_METRICS: dict[str, str] = {
    "lambada_openai": "acc",
    "piqa": "acc",
    "hellaswag": "acc",
    "winogrande": "acc",
}
MEAN_TASK = "mean_zeroshot"
#: model and quantization columns carried onto every aggregated row (when present)
META_COLUMNS = (
    "model",
    "hf_id",
    "revision",
    "commit",
    "family",
    "n_params",
    "n_params_quantized",
    "quant",
    "dtype",
    "bits",
    "exponent_bits",
    "block_size",
    "scale_dtype",
    "scale_bits",
    "outlier_fraction",
    "center",
    "quantile_estimator",
    "method",
    "mixed_ratio",
    "mixed_ratio_achieved",
    "granularity",
    "selection",
    "n_trials",
    "seed",
    "low_quant",
    "total_bits",
)
RUN_COLUMNS = (
    "forward_time_s",
    "task_n_tokens",
    "device",
    "batch_size",
    "eval_dtype",
    "softmax_dtype",
    "max_length",
    "cuda_graphs",
    "graph_capture_s",
    "graph_saving_s",
    "kbit_version",
    "torch_version",
    "transformers_version",
    "lm_eval_version",
)
KEY = ("model", "quant", "task")
#: a perplexity above this (or not finite) marks a run as diverged (``analysis.perplexity_cap``)
DEFAULT_PERPLEXITY_CAP = 1.0e5


def target_name(task: str, metric: str) -> str:
    """Name of a y quantity, e.g. ``mean_zeroshot:acc`` or ``wikitext:word_perplexity``."""
    return f"{task}:{metric}"


def lower_is_better(target: str) -> bool:
    """Whether smaller values of ``target`` (``task:metric``) are better."""
    return target.split(":", 1)[-1] in LOWER_IS_BETTER


def read_evals(eval_files: Iterable[str | Path | pd.DataFrame], columns=None) -> pd.DataFrame:
    """Concatenate per-document evaluation files (paths or already loaded frames)."""
    frames = []
    for f in eval_files:
        if isinstance(f, pd.DataFrame):
            frames.append(f if columns is None else f[[c for c in columns if c in f.columns]])
        else:
            path = Path(f)
            if not path.exists():
                raise FileNotFoundError(f"evaluation file {path} does not exist")
            frames.append(pd.read_parquet(path, columns=columns))
    if not frames:
        raise ValueError(
            "no evaluation files given: expected results/evals/{model}/{quant}/{task}.parquet"
        )
    return pd.concat(frames, ignore_index=True)


def chance_accuracy(docs: pd.DataFrame, output_type: str) -> float:
    """Accuracy of guessing: mean 1/n_choices for multiple choice, 0 for generation-like tasks."""
    if output_type == "multiple_choice":
        return float(np.mean([1.0 / len(x) for x in docs["ll"]]))
    if output_type == "loglikelihood":
        return 0.0
    return float("nan")


def _first(docs: pd.DataFrame, cols: Iterable[str]) -> dict:
    row = docs.iloc[0]
    return {c: row[c] for c in cols if c in docs.columns}


def _check_columns(docs: pd.DataFrame) -> None:
    need = {"model", "quant", "task", "output_type", "doc_id", "ll", "total_bits", "family"}
    missing = sorted(need - set(docs.columns))
    if missing:
        raise ValueError(
            f"evaluation rows lack columns {missing}; see kbit.evaluation.metrics for the schema"
        )


def _n_nonfinite(g: pd.DataFrame) -> int:
    if "finite" in g:
        return int((~g["finite"].astype(bool)).sum())
    return int(sum(not np.isfinite(np.asarray(x, dtype=float)).all() for x in g["ll"]))


def task_scores(
    docs: pd.DataFrame, perplexity_cap: float = DEFAULT_PERPLEXITY_CAP
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-(model, quant, task) metric rows and run rows from concatenated per-document rows."""
    _check_columns(docs)
    score_rows, run_rows = [], []
    for (model, quant, task), g in docs.groupby(list(KEY), sort=True):
        dup = g["doc_id"].duplicated()
        if dup.any():
            raise ValueError(
                f"{model}/{quant}/{task}: doc_id {int(g['doc_id'][dup].iloc[0])} appears twice; "
                "each evaluation file must hold one row per document"
            )
        otype = str(g["output_type"].iloc[0])
        meta = _first(g, META_COLUMNS)
        n_docs = len(g)
        chance = chance_accuracy(g, otype)
        metrics = task_metrics(g, otype)
        n_bad = _n_nonfinite(g)
        diverged = n_bad > 0 or any(
            not np.isfinite(v) or v > perplexity_cap
            for m, v in metrics.items()
            if m in LOWER_IS_BETTER and m != "bits_per_byte"
        )
        for metric, value in metrics.items():
            score_rows.append(
                {
                    **meta,
                    "task": task,
                    "output_type": otype,
                    "metric": metric,
                    "target": target_name(task, metric),
                    "value": value,
                    "n_docs": n_docs,
                    "chance": chance if metric.startswith("acc") else float("nan"),
                    "n_nonfinite": n_bad,
                    "diverged": diverged,
                }
            )
        wall = float(g["wall_time_s"].iloc[0]) if "wall_time_s" in g else float("nan")
        flops = float(g["flops"].iloc[0]) if "flops" in g else float("nan")
        run_rows.append(
            {
                **meta,
                "task": task,
                "output_type": otype,
                "n_docs": n_docs,
                "n_nonfinite": n_bad,
                "diverged": diverged,
                "n_tokens": int(g["n_tokens"].sum()) if "n_tokens" in g else 0,
                "wall_time_s": wall,
                "flops": flops,
                "flop_per_s": flops / wall if wall and wall > 0 else float("nan"),
                **_first(g, RUN_COLUMNS),
            }
        )
    return pd.DataFrame(score_rows), pd.DataFrame(run_rows)


def mean_zeroshot(scores: pd.DataFrame, accuracy_metrics: Mapping[str, str]) -> pd.DataFrame:
    """Rows of task ``mean_zeroshot``: per (model, quant) the mean of the configured task metrics.

    Metric ``acc`` uses ``accuracy_metrics`` (task -> metric); metric ``acc_norm`` uses each
    task's acc_norm where it has one and its configured metric otherwise. Only the tasks that
    were evaluated enter the mean; ``tasks`` records which, so a partial mean is never hidden.
    """
    bad = {m for m in accuracy_metrics.values() if m not in ("acc", "acc_norm")}
    if bad:
        raise ValueError(f"accuracy metrics {sorted(bad)} not allowed: use 'acc' or 'acc_norm'")
    sub = scores[scores["task"].isin(list(accuracy_metrics))]
    rows = []
    meta_cols = [c for c in META_COLUMNS if c in scores.columns]
    for (_model, _quant), g in sub.groupby(["model", "quant"], sort=True):
        by_task = {
            t: dict(zip(tg["metric"], tg["value"], strict=True)) for t, tg in g.groupby("task")
        }
        chance = {
            t: float(tg["chance"].dropna().iloc[0]) if tg["chance"].notna().any() else 0.0
            for t, tg in g.groupby("task")
        }
        tasks = sorted(by_task)
        picks = {
            "acc": {t: accuracy_metrics[t] for t in tasks},
            "acc_norm": {
                t: "acc_norm" if "acc_norm" in by_task[t] else accuracy_metrics[t] for t in tasks
            },
        }
        for name, pick in picks.items():
            vals = [by_task[t].get(pick[t], np.nan) for t in tasks]
            if not vals or np.isnan(vals).any():
                continue
            rows.append(
                {
                    **_first(g, meta_cols),
                    "task": MEAN_TASK,
                    "output_type": "mean",
                    "metric": name,
                    "target": target_name(MEAN_TASK, name),
                    "value": float(np.mean(vals)),
                    "n_docs": int(g.groupby("task")["n_docs"].first().sum()),
                    "chance": float(np.mean([chance[t] for t in tasks])),
                    "n_nonfinite": int(g.groupby("task")["n_nonfinite"].first().sum()),
                    "diverged": bool(g["diverged"].any()),
                    "tasks": ",".join(f"{t}:{pick[t]}" for t in tasks),
                }
            )
    return pd.DataFrame(rows)


def sweep_tags(quants: Iterable[str], sweeps: Mapping[str, Iterable[str]] | None) -> dict[str, str]:
    """``{quant: "name1,name2"}``: the study's sweeps each quant id belongs to ("" for none)."""
    members = {name: set(ids) for name, ids in (sweeps or {}).items()}
    return {q: ",".join(sorted(n for n, ids in members.items() if q in ids)) for q in quants}


def _check_one_commit(docs: pd.DataFrame) -> None:
    """A model key whose results come from two commits of its weights is two models: refuse."""
    if "commit" not in docs:
        return
    commits = docs[docs["commit"].fillna("") != ""].groupby("model")["commit"].unique()
    mixed = {m: sorted(c) for m, c in commits.items() if len(c) > 1}
    if mixed:
        raise ValueError(
            f"results of one model key come from different commits of its weights: {mixed}; "
            "a branch such as main moved between downloads. Delete the older results of that "
            "model (or pin the commit with a lock file) and run again"
        )


def aggregate(
    eval_files: Iterable[str | Path | pd.DataFrame],
    accuracy_metrics: Mapping[str, str] | None = None,
    sweeps: Mapping[str, Iterable[str]] | None = None,
    perplexity_cap: float = DEFAULT_PERPLEXITY_CAP,
    features: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build ``(scores, runs)`` from per-document evaluation files; see the module docstring.

    ``perplexity_cap``: a run whose perplexity exceeds it is marked diverged. ``features``
    (rows of :func:`kbit.features.spec_feature_rows` with ``model``: SQNR per layer type,
    quantized counts, format descriptors) are joined onto the runs as ``feat_*`` columns.

    ``sweeps`` (sweep name -> quant ids, as the study config expands them) is recorded in a
    ``sweeps`` column, so the analysis knows which curves the study meant as its precision sweep.
    """
    metrics = dict(DEFAULT_ACCURACY_METRICS if accuracy_metrics is None else accuracy_metrics)
    docs = read_evals(eval_files)
    _check_one_commit(docs)
    scores, runs = task_scores(docs, perplexity_cap)
    means = mean_zeroshot(scores, metrics)
    scores = pd.concat([scores, means], ignore_index=True)
    if "tasks" not in scores:
        scores["tasks"] = None
    scores["lower_is_better"] = scores["metric"].isin(LOWER_IS_BETTER)
    if features is not None and len(features):
        feats = features.drop_duplicates(["model", "quant"]).set_index(["model", "quant"])
        feats = feats.add_prefix("feat_").reset_index()
        runs = runs.merge(feats, on=["model", "quant"], how="left")
    if sweeps:
        tags = sweep_tags(scores["quant"].unique(), sweeps)
        scores["sweeps"] = scores["quant"].map(tags)
        runs["sweeps"] = runs["quant"].map(tags)
    return scores.reset_index(drop=True), runs.reset_index(drop=True)
