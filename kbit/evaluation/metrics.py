"""Task metrics recomputed from per-document rows, exactly as lm-evaluation-harness aggregates them.

A per-task evaluation Parquet file (``results/evals/{model}/{quant}/{task}.parquet``) has one row
per document. Columns that every row carries:

=====================  ==========================================================================
run metadata           model, hf_id, revision, family, n_params, n_params_quantized, quant and
                       every QuantSpec field (dtype, bits, exponent_bits, block_size, scale_dtype,
                       scale_bits, outlier_fraction, center, quantile_estimator, method),
                       total_bits, task, output_type, kbit_version, torch_version,
                       transformers_version, lm_eval_version, eval_dtype, device, batch_size,
                       wall_time_s (of the whole task), flops (of the whole task)
doc_id                 int, lm-eval's document index (pairs documents across quant configs)
ll                     list<double>: log-likelihood of each choice (one entry for
                       ``loglikelihood`` and ``loglikelihood_rolling`` tasks)
finite                 bool: every log-likelihood is finite; a document with a NaN/inf one (a
                       diverged quantization) counts as not correct (acc 0, no greedy match)
is_greedy              list<bool>: whether greedy decoding gives each continuation
target                 int: index of the gold choice (0 for single-continuation tasks)
choice_chars           list<int>: characters of each continuation (acc_norm divides by these)
n_tokens               int: tokens scored for this document (context + continuations)
n_words, n_bytes       int: words and UTF-8 bytes of the document (rolling tasks; else 0)
acc, acc_norm          double: 0/1 per document (NaN where the task has no such metric)
=====================  ==========================================================================

Output type ``perplexity_windows`` (:mod:`kbit.evaluation.windows`, WikiText-2 as the GPTQ paper
reports it): one row per fixed token window, ``ll`` = [sum of the log-probabilities of its
predicted tokens], ``n_tokens`` = those tokens (the same for every window), ``is_greedy`` = [],
``choice_chars`` = [0], acc/acc_norm NaN, and an extra ``window`` column (tokens per window).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: metrics lm-eval reports per output type (the ones recomputed here)
METRICS_BY_OUTPUT_TYPE = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "perplexity_windows": ("perplexity",),
}
#: metrics where lower is better (everything else is an accuracy)
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def doc_acc(ll: list[float], target: int) -> float:
    """1.0 when the gold choice has the highest log-likelihood (the first maximum wins)."""
    return float(int(np.argmax(ll)) == int(target))


def doc_acc_norm(ll: list[float], choice_chars: list[int], target: int) -> float:
    """1.0 when the gold choice has the highest log-likelihood per character."""
    normed = np.asarray(ll, dtype=np.float64) / np.asarray(choice_chars, dtype=np.float64)
    return float(int(np.argmax(normed)) == int(target))


def task_metrics(docs: pd.DataFrame, output_type: str | None = None) -> dict[str, float]:
    """Aggregate metrics of one task from its per-document rows (lm-eval's aggregations).

    - ``acc``/``acc_norm``: mean over documents;
    - ``perplexity`` (loglikelihood tasks): exp(-mean log-likelihood);
    - ``word_perplexity``/``byte_perplexity``: exp(-sum ll / sum words|bytes);
    - ``bits_per_byte``: -sum ll / sum bytes / ln 2;
    - ``perplexity`` of fixed windows: exp(-sum ll / sum n_tokens) (:func:`window_perplexity`).
    """
    if output_type is None:
        output_type = str(docs["output_type"].iloc[0])
    if output_type not in METRICS_BY_OUTPUT_TYPE:
        raise ValueError(
            f"output_type {output_type!r} is not one of {sorted(METRICS_BY_OUTPUT_TYPE)}"
        )
    out: dict[str, float] = {}
    if output_type == "multiple_choice":
        out["acc"] = float(docs["acc"].mean())
        if docs["acc_norm"].notna().all():
            out["acc_norm"] = float(docs["acc_norm"].mean())
    elif output_type == "loglikelihood":
        lls = np.array([float(x[0]) for x in docs["ll"]])
        out["perplexity"] = math.exp(-float(np.mean(lls)))
        out["acc"] = float(docs["acc"].mean())
    elif output_type == "perplexity_windows":
        out["perplexity"] = window_perplexity(docs)
    else:
        total = float(sum(float(x[0]) for x in docs["ll"]))
        words = float(docs["n_words"].sum())
        nbytes = float(docs["n_bytes"].sum())
        out["word_perplexity"] = math.exp(-total / words)
        out["byte_perplexity"] = math.exp(-total / nbytes)
        out["bits_per_byte"] = -total / nbytes / math.log(2)
    return out


def window_perplexity(docs: pd.DataFrame) -> float:
    """exp(-sum ll / sum n_tokens) over fixed windows: the exp of the mean window loss (the GPTQ
    paper's perplexity), which requires every window to predict the same number of tokens.

    A non-finite window is kept, not skipped: a NaN log-likelihood makes the perplexity NaN and
    a -inf one (a token of probability zero) makes it inf, so the run reads as diverged.
    """
    if docs.empty:
        raise ValueError("no windows: perplexity of fixed windows needs at least one")
    counts = docs["n_tokens"].to_numpy()
    if (counts != counts[0]).any() or counts[0] < 1:
        raise ValueError(
            f"windows predict {sorted(set(counts.tolist()))} tokens: the mean window loss equals "
            "exp(-sum ll / sum n_tokens) only when every window predicts the same number (>= 1)"
        )
    lls = np.array([float(x[0]) for x in docs["ll"]], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.exp(-lls.sum() / float(counts.sum())))
