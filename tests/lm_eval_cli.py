"""lm-eval's own command line, run in a subprocess: the reference every evaluation must equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_lm_eval_cli(
    model_dir: Path,
    include: Path,
    out: Path,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    dtype: str = "float32",
    softmax_dtype: str = "auto",
    max_length: int | None = None,
) -> tuple[dict, dict[str, list[dict]]]:
    """``python -m lm_eval --model hf ...`` offline on the CPU; (results, samples per task).

    ``softmax_dtype`` as the workflow's ``eval.softmax_dtype``: ``auto`` leaves HFLM's default;
    ``max_length`` as ``eval.max_length`` (None: HFLM's own choice).
    """
    model_args = f"pretrained={model_dir},dtype={dtype}"
    if softmax_dtype != "auto":
        model_args += f",softmax_dtype={softmax_dtype}"
    if max_length is not None:
        model_args += f",max_length={max_length}"
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", model_args,
        "--device", "cpu",
        "--tasks", ",".join(tasks),
        "--include_path", str(include),
        "--batch_size", str(batch_size),
        "--log_samples",
        "--output_path", str(out),
    ] + (["--limit", str(limit)] if limit else [])  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {}
    for task in tasks:
        (f,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    return results, samples


def reported_metrics(task_results: dict) -> dict[str, float]:
    """lm-eval's metrics of one task without filters and standard errors: {"acc": ...}."""
    return {
        k.split(",")[0]: v
        for k, v in task_results.items()
        if k.endswith(",none") and "_stderr" not in k
    }
