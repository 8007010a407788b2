"""The building blocks of trustworthy results: checked weights, non-finite scores, umask-respecting
atomic writes, job logs that say what to do, and one live run per working directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from models import tiny_model, tiny_model_dir
from synthetic import analysed

from kbit.logs import advice, job
from kbit.analysis.curves import build_curves
from kbit.analysis.tables import aggregate
from kbit.io import atomic_dir, write_json, write_text
from kbit.loading import ModelLoadError, load_model
from kbit.workdir import OWNER_FILE, claim


# ----------------------------------------------------------------------------- weights
def test_nan_weights_are_refused_with_model_tensor_and_count(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[0, :3] = float("nan")
        model.lm_head.weight[2, 5] = float("inf")
    out = tmp_path / "broken"
    model.save_pretrained(out, safe_serialization=True)
    tiny_model_dir("gpt_neox", tmp_path)  # a tokenizer beside it
    (tmp_path / "tiny-gpt_neox-0" / "tokenizer.json").rename(out / "tokenizer.json")
    with pytest.raises(ModelLoadError) as info:
        load_model(out, "float32", "cpu", what="pythia-broken")
    msg = str(info.value)
    assert "pythia-broken has non-finite weights: 4 NaN/Inf values" in msg
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight (3)" in msg
    assert "lm_head.weight (1)" in msg


def test_truncated_and_pickle_only_model_dirs_name_the_fix(tmp_path: Path) -> None:
    good = tiny_model_dir("opt", tmp_path)
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"truncated or corrupt.*download or convert"):
        load_model(good, "float32", "cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match=r"pickle weights: pytorch_model\.bin.*safe_serial"):
        load_model(pickled, "float32", "cpu")


# ----------------------------------------------------------------------------- non-finite scores
def _docs(lls: list[list[float]], acc: list[float], task: str = "piqa") -> pd.DataFrame:
    n = len(lls)
    return pd.DataFrame(
        {
            "model": "m", "quant": "q", "task": task, "family": "f",
            "output_type": "multiple_choice", "doc_id": range(n), "ll": lls,
            "finite": [all(math.isfinite(x) for x in r) for r in lls],
            "acc": acc, "acc_norm": acc, "total_bits": 100, "n_params": 10,
            "dtype": "int", "bits": 4, "block_size": 64,
        }
    )  # fmt: skip


def test_nan_log_likelihoods_are_never_correct_and_mark_the_run_diverged() -> None:
    from kbit.evaluation.records import sample_row

    class Task:
        OUTPUT_TYPE = "multiple_choice"
        multiple_input = False
        config = type("C", (), {"task": "piqa"})()

        def doc_to_choice(self, doc):
            return ["a", "b"]

        def doc_to_target(self, doc):
            return 0

    sample = {
        "doc_id": 0,
        "doc": {},
        "arguments": [("c", " a"), ("c", " b")],
        "filtered_resps": [(float("nan"), True), (float("nan"), False)],
        "acc": 1.0,
        "acc_norm": 1.0,
    }  # fmt: skip  (lm-eval's argmax picks the gold)
    row = sample_row(Task(), sample)
    assert row["finite"] is False and row["acc"] == 0.0 and row["acc_norm"] == 0.0
    assert row["is_greedy"] == [False, False]
    nan = float("nan")
    docs = _docs([[nan, nan], [-1.0, -2.0]], [0.0, 1.0])
    scores, runs = aggregate([docs], {"piqa": "acc"})
    acc = scores[(scores["task"] == "piqa") & (scores["metric"] == "acc")].iloc[0]
    assert acc["value"] == 0.5 and acc["diverged"] and acc["n_nonfinite"] == 1
    assert runs["diverged"].all()
    mean = scores[scores["task"] == "mean_zeroshot"]
    assert mean["diverged"].all()


def test_perplexity_above_the_cap_is_diverged_and_left_out_of_curves() -> None:
    a = analysed(extras=False, n_docs=40, n_boot=10)
    scores = a.scores.copy()
    assert "diverged" in scores and not scores["diverged"].any()
    victim = scores["target"].str.startswith("mean_zeroshot")
    first = scores.loc[victim, ["model", "quant"]].iloc[0]
    hit = (scores["model"] == first["model"]) & (scores["quant"] == first["quant"])
    scores.loc[hit, "diverged"] = True
    curves = build_curves(scores)
    kept = curves[(curves["model"] == first["model"]) & (curves["quant"] == first["quant"])]
    assert kept.empty and len(curves) > 0


# ----------------------------------------------------------------------------- files
def test_atomic_writes_use_the_umask_and_leave_nothing_on_failure(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = write_text("x", tmp_path / "a" / "f.txt")
        assert p.stat().st_mode & 0o777 == 0o640
        with atomic_dir(tmp_path / "d") as d:
            (d / "inner.txt").write_text("y")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
        assert (tmp_path / "d" / "inner.txt").stat().st_mode & 0o777 == 0o640
        with pytest.raises(RuntimeError), atomic_dir(tmp_path / "e"):
            raise RuntimeError
        write_json({"k": 1}, tmp_path / "j.json")
    finally:
        os.umask(old)
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d", "j.json"]
    assert json.loads((tmp_path / "j.json").read_text()) == {"k": 1}


# ----------------------------------------------------------------------------- job logs
class _Smk:
    def __init__(self, log: Path) -> None:
        self.log = [str(log)]


def test_a_failed_job_log_starts_with_what_to_do_and_holds_the_traceback(tmp_path) -> None:
    log = tmp_path / "job.log"
    with pytest.raises(torch.cuda.OutOfMemoryError), job(_Smk(log), watch=False) as lg:
        lg.info("starting")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    lines = log.read_text().splitlines()
    assert lines[0].startswith("FAILED: out of memory") and "eval.batch_size" in lines[0]
    assert any("starting" in ln for ln in lines) and any("Traceback" in ln for ln in lines)
    assert advice(ValueError("bad thing")).startswith("ValueError: bad thing")


# ----------------------------------------------------------------------------- one live run
def test_stale_lock_and_leftovers_are_cleared_live_owner_is_refused(tmp_path: Path) -> None:
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    results = tmp_path / "results" / "evals"
    results.mkdir(parents=True)
    partial = results / ".piqa.parquet.abc123.tmp.parquet"
    partial.write_text("half")
    partial_dir = tmp_path / "results" / ".model.xyz.tmp"
    (partial_dir / "sub").mkdir(parents=True)
    finished = results / "piqa.parquet"
    finished.write_text("done")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (tmp_path / ".snakemake" / OWNER_FILE).write_text(json.dumps({"pid": int(dead), "start": "1"}))
    cleared = claim(tmp_path, [tmp_path / "results"])
    assert any("stale lock" in c for c in cleared)
    assert not locks.exists() and not partial.exists() and not partial_dir.exists()
    assert finished.read_text() == "done"
    owner = json.loads((tmp_path / ".snakemake" / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()
    # a live run that holds the lock stops a second one
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from kbit.workdir import _start_time

        (tmp_path / ".snakemake" / OWNER_FILE).write_text(
            json.dumps({"pid": live.pid, "start": _start_time(live.pid)})
        )
        locks.mkdir()
        (locks / "0.input.lock").write_text("x")
        with pytest.raises(RuntimeError, match=f"pid {live.pid}.*Do not use --unlock"):
            claim(tmp_path, [tmp_path / "results"])
        assert (locks / "0.input.lock").exists()
    finally:
        live.kill()
