"""lm-eval's logged samples -> per-document rows -> one Parquet file per (model, quant, task).

The columns are the contract in :mod:`kbit.evaluation.metrics`. Every value is taken from what
lm-eval itself computed (its filtered responses and its per-document metric values), so that
``metrics.task_metrics`` over the rows reproduces lm-eval's reported numbers exactly. The gold
index follows lm-eval's ``process_results`` for multiple-choice tasks (``doc_to_text`` for
multiple-input tasks such as Winogrande, a target string mapped through ``doc_to_choice``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from kbit.io import write_table

DOC_COLUMNS = (
    "doc_id",
    "ll",
    "finite",
    "is_greedy",
    "target",
    "choice_chars",
    "n_tokens",
    "n_words",
    "n_bytes",
    "acc",
    "acc_norm",
)


def _gold_index(task: Any, doc: dict, choices: list[str]) -> int:
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        raise ValueError(
            f"task {task.config.task!r} has several gold answers per document; "
            "only single-target multiple-choice tasks are supported"
        )
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return int(gold) if int(gold) < len(choices) else -100


def _doc_tokens(args: list[tuple], request_tokens: dict[tuple, tuple[int, int]]) -> int:
    """Context tokens once when all choices share them, plus every continuation's tokens."""
    counts = [request_tokens.get(tuple(a)) for a in args]
    if any(c is None for c in counts):
        return 0
    ctx = {c[0] for c in counts}
    if len(ctx) == 1:
        return ctx.pop() + sum(c[1] for c in counts)
    return sum(c[0] + c[1] for c in counts)


def sample_row(
    task: Any,
    sample: dict[str, Any],
    request_tokens: dict[tuple, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """One per-document row from one lm-eval logged sample of ``task``."""
    output_type = task.OUTPUT_TYPE
    resps = sample["filtered_resps"]
    args = [tuple(a) for a in sample["arguments"]]
    request_tokens = request_tokens or {}
    row: dict[str, Any] = {
        "doc_id": int(sample["doc_id"]),
        "n_words": 0,
        "n_bytes": 0,
        "acc": float(sample["acc"]) if "acc" in sample else math.nan,
        "acc_norm": float(sample["acc_norm"]) if "acc_norm" in sample else math.nan,
    }
    if output_type == "multiple_choice":
        choices = task.doc_to_choice(sample["doc"])
        row["ll"] = [float(r[0]) for r in resps]
        row["is_greedy"] = [bool(r[1]) for r in resps]
        row["target"] = _gold_index(task, sample["doc"], choices)
        row["choice_chars"] = [len(c) for c in choices]
        row["n_tokens"] = _doc_tokens(args, request_tokens)
    elif output_type == "loglikelihood":
        ((ll, greedy),) = resps
        row["ll"] = [float(ll)]
        row["is_greedy"] = [bool(greedy)]
        row["target"] = 0
        row["choice_chars"] = [len(args[0][1])]
        row["n_tokens"] = _doc_tokens(args, request_tokens)
    elif output_type == "loglikelihood_rolling":
        (ll,) = resps if isinstance(resps, list | tuple) else (resps,)
        (text,) = args[0]
        row["ll"] = [float(ll)]
        row["is_greedy"] = []  # lm-eval drops greedy flags of rolling windows
        row["target"] = 0
        row["choice_chars"] = [len(text)]
        row["n_tokens"] = request_tokens.get(("", text), (0, 0))[1]
        row["n_words"] = int(sample["word_perplexity"][1])
        row["n_bytes"] = int(sample["byte_perplexity"][1])
    else:
        raise ValueError(
            f"task {task.config.task!r} has output_type {output_type!r}; supported are "
            "multiple_choice, loglikelihood, loglikelihood_rolling"
        )
    row["finite"] = all(math.isfinite(x) for x in row["ll"])
    if not row["finite"]:
        # a NaN or infinite log-likelihood (a diverged quantization) is never a correct answer:
        # lm-eval's argmax over [nan, nan] picks the first choice, which can be the gold one
        row["is_greedy"] = [False] * len(row["is_greedy"])
        for metric in ("acc", "acc_norm"):
            if not math.isnan(row[metric]):
                row[metric] = 0.0
    return row


def samples_frame(
    task: Any,
    samples: list[dict[str, Any]],
    meta: dict[str, Any],
    request_tokens: dict[tuple, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Per-document rows of one task (sorted by doc_id) with the run metadata in columns."""
    rows = [sample_row(task, s, request_tokens) for s in samples]
    ids = [r["doc_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.config.task!r}: duplicate doc_id in logged samples")
    df = pd.DataFrame(rows, columns=list(DOC_COLUMNS)).sort_values("doc_id", kind="stable")
    df = df.reset_index(drop=True)
    meta = dict(meta)
    meta.setdefault("output_type", task.OUTPUT_TYPE)
    for key, value in meta.items():
        if key in DOC_COLUMNS:
            raise ValueError(f"run metadata key {key!r} collides with a per-document column")
        df[key] = [value] * len(df)
    return df


_LIST_TYPES = {
    "ll": pa.list_(pa.float64()),
    "is_greedy": pa.list_(pa.bool_()),
    "choice_chars": pa.list_(pa.int64()),
}


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` atomically with the user's umask (:mod:`kbit.io`), its list
    columns typed explicitly so that an empty or all-null column keeps its schema."""
    fields = []
    for col in df.columns:
        if col in _LIST_TYPES:
            fields.append(pa.field(col, _LIST_TYPES[col]))
        else:
            fields.append(pa.Schema.from_pandas(df[[col]], preserve_index=False).field(col))
    table = pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)
    return write_table(table, path)
