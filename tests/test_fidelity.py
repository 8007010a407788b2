"""The in-process runner gives exactly what lm-eval's command line gives on the same model and data.

Tiny random models of two architectures (GPT-NeoX with the NeoX tokenizer, OPT with the GPT-2
tokenizer) are scored on all five tasks from the real data files, 20 documents per task
(WikiText cut to its first two articles, whose windows dominate the CPU time), by
``python -m lm_eval`` in a subprocess and by :func:`kbit.evaluation.runner.evaluate_tasks`.
Equality is exact: metrics with ``==`` and every document's log-likelihoods bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lm_eval_cli import reported_metrics, run_lm_eval_cli
from models import shared_data_dir, tiny_model_dir

from kbit.evaluation.lm import make_lm
from kbit.evaluation.metrics import task_metrics
from kbit.evaluation.runner import evaluate_tasks
from kbit.evaluation.tasks import build_task_dict, prepare_tasks
from kbit.loading import load_model

TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]
LIMIT = 20
BATCH = 4
WIKI = Path("wikitext-2-raw") / "wiki.test.raw"


def _data_dir(tmp: Path) -> Path:
    """The shared originals, with WikiText cut to its first two top-level articles."""
    src = shared_data_dir() / "eval"
    if not src.is_dir():
        pytest.skip(f"shared evaluation data not found at {src} (set KBIT_SHARED_DATA)")
    dst = tmp / "data"
    for task in ("hellaswag", "lambada_openai", "piqa", "winogrande"):
        (dst / task).parent.mkdir(parents=True, exist_ok=True)
        (dst / task).symlink_to(src / task)
    lines = (src / WIKI).read_text(encoding="utf-8").split("\n")
    kept, heads = [], 0
    for line in lines:
        s = line.replace("= = =", "===").replace("= =", "==").strip()
        if s.startswith("= ") and s.endswith(" ="):
            heads += 1
            if heads == 3:
                break
        kept.append(line)
    (dst / WIKI).parent.mkdir(parents=True)
    (dst / WIKI).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return dst


def _cli_lls(sample: dict) -> list[float]:
    resps = sample["filtered_resps"]
    if isinstance(resps[0], list):
        return [float(r[0]) for r in resps]
    return [float(resps[0])]


@pytest.mark.parametrize(
    ("arch", "dtype", "softmax_dtype", "max_length", "fast"),
    [
        ("gpt_neox", "float32", "auto", None, True),
        ("opt", "float32", "auto", None, True),
        ("gpt_neox", "bfloat16", "float32", None, True),
        # a context window below the model's (WikiText's rolling windows change) on both paths
        ("gpt_neox", "float32", "float32", 160, True),
        ("opt", "float32", "float32", 160, False),
    ],
)
def test_runner_equals_lm_eval_cli(
    arch: str,
    dtype: str,
    softmax_dtype: str,
    max_length: int | None,
    fast: bool,
    tmp_path: Path,
) -> None:
    """Also a 16-bit model with the log-softmax in float32 (the workflow's default), a set
    ``max_length`` (lm-eval's model argument), and the plain (HFLM's own) scoring path."""
    data = _data_dir(tmp_path)
    include = prepare_tasks(TASKS, data, tmp_path / "tasks")
    model_dir = tiny_model_dir(arch, tmp_path)
    cli_results, cli_samples = run_lm_eval_cli(
        model_dir, include, tmp_path / "cli", TASKS, LIMIT, BATCH, dtype, softmax_dtype,
        max_length=max_length,
    )  # fmt: skip

    task_dict = build_task_dict(TASKS, data, tmp_path / "tasks")
    model, tok = load_model(model_dir, dtype=dtype, device="cpu")
    lm = make_lm(model, tok, BATCH, softmax_dtype, max_length=max_length, fast=fast)
    assert lm.max_length == (max_length or lm.max_length)
    assert lm.softmax_dtype == (torch.float32 if softmax_dtype == "float32" else None)
    ours = evaluate_tasks(lm, task_dict, limit=LIMIT, together=True)

    for task in TASKS:
        docs = ours[task].docs
        expected_n = 2 if task == "wikitext" else LIMIT
        assert len(docs) == expected_n == docs["doc_id"].nunique()
        # metrics recomputed from our per-document rows == lm-eval's reported metrics, exactly
        reported = reported_metrics(cli_results[task])
        mine = task_metrics(docs, ours[task].output_type)
        assert set(mine) == set(reported), task
        for metric, value in reported.items():
            assert mine[metric] == value, (task, metric, mine[metric], value)
        # per-document log-likelihoods, bit for bit
        by_id = {int(s["doc_id"]): s for s in cli_samples[task]}
        assert sorted(by_id) == docs["doc_id"].tolist()
        for row in docs.itertuples():
            assert list(row.ll) == _cli_lls(by_id[row.doc_id]), (task, row.doc_id)
            for metric in ("acc", "acc_norm"):
                if metric in by_id[row.doc_id]:
                    assert getattr(row, metric) == float(by_id[row.doc_id][metric])
                else:
                    assert math.isnan(getattr(row, metric))
        assert (docs["n_tokens"] > 0).all(), task
