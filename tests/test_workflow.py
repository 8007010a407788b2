"""End to end: the real ``snakemake`` runs the smoke study (config/smoke.yaml) offline on the CPU.

Tiny random models of two architectures (GPT-NeoX and OPT, one of them evaluated in one job per
(quant, task), the others in the batched job) with the real tokenizers, the first documents of the
real task files, two quant specs plus fp16. Checks the per-document Parquet files, that the fp16
scores equal lm-eval's own command line on the same model and data, the tables, figures and
claims, that a second run does nothing, and that a lost result is redone alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lm_eval_cli import reported_metrics, run_lm_eval_cli
from models import shared_data_dir

from kbit.evaluation.metrics import task_metrics

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
pytestmark = pytest.mark.slow


def _smoke_config(tmp: Path) -> dict:
    """config/smoke.yaml with absolute paths: the shared data when present, else the samples in
    tests/data and tokenizers trained on the fly."""
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    shared = shared_data_dir()
    data = shared / "eval" if (shared / "eval").is_dir() else REPO / "tests" / "data" / "eval"
    config["data_dir"] = str(data)
    for entry in config["models"].values():
        tok = shared.parent / Path(entry["tiny"]["tokenizer"]).relative_to("../shared")
        entry["tiny"]["tokenizer"] = str(tok) if tok.exists() else None
    config["results"], config["resources"] = str(tmp / "results"), str(tmp / "resources")
    return config


def _snakemake(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml",
           "--cores", "2", "--rerun-incomplete", *args]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("workflow")
    config = _smoke_config(tmp)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _snakemake(tmp)
    return {"tmp": tmp, "config": config, "R": Path(config["results"])}


def _limit(config: dict, task: str) -> int:
    return config["eval"].get("task_limits", {}).get(task, config["eval"]["limit"])


def test_one_parquet_row_per_document(run: dict) -> None:
    config, evals = run["config"], run["R"] / "evals"
    quants = {"fp16", "float4-e3-b64", "float8-e3-b64"}
    for model in config["models"]:
        assert {p.name for p in (evals / model).iterdir()} == quants
        for quant in quants:
            for task in config["tasks"]:
                df = pd.read_parquet(evals / model / quant / f"{task}.parquet")
                assert len(df) == _limit(config, task) == df["doc_id"].nunique(), (model, task)
                assert (df["model"] == model).all() and (df["quant"] == quant).all()
                assert (df["n_tokens"] > 0).all()
                metrics = task_metrics(df, df["output_type"].iloc[0])
                for name, value in metrics.items():
                    if name.startswith("acc"):
                        assert 0.0 <= value <= 1.0, (model, quant, task, name)
                    else:  # perplexities and bits per byte of a random model: large, finite
                        assert 0.0 < value < float("inf"), (model, quant, task, name)


def test_bit_accounting_orders_the_specs(run: dict) -> None:
    runs = pd.read_parquet(run["R"] / "tables" / "runs.parquet")
    for _, g in runs.groupby("model"):
        bits = g.groupby("quant")["total_bits"].first()
        assert bits["float4-e3-b64"] < bits["float8-e3-b64"] < bits["fp16"]
        assert bits["fp16"] == 16 * g["n_params"].iloc[0]


def test_fp16_scores_equal_lm_eval_cli(run: dict) -> None:
    """Both the one-job-per-spec model (tiny-neox-m) and a batched one (tiny-opt-s)."""
    config, tmp = run["config"], run["tmp"]
    resources = Path(config["resources"])
    tasks = config["tasks"]
    for model in ("tiny-neox-m", "tiny-opt-s"):
        for group in ([t for t in tasks if t != "wikitext"], ["wikitext"]):
            results, samples = run_lm_eval_cli(
                resources / "models" / model,
                resources / "tasks",
                tmp / "cli" / model / group[0],
                group,
                limit=_limit(config, group[0]),
                batch_size=config["eval"]["batch_size"],
                dtype=config["eval"]["dtype"],
                softmax_dtype=config["eval"].get("softmax_dtype", "float32"),
            )
            for task in group:
                df = pd.read_parquet(run["R"] / "evals" / model / "fp16" / f"{task}.parquet")
                mine = task_metrics(df, df["output_type"].iloc[0])
                assert mine == reported_metrics(results[task]), (model, task)
                assert sorted(int(s["doc_id"]) for s in samples[task]) == df["doc_id"].tolist()


def test_tables_figures_and_claims(run: dict) -> None:
    R = run["R"]
    scores = pd.read_parquet(R / "tables" / "scores.parquet")
    assert set(scores["model"]) == set(run["config"]["models"])
    figures = R / "figures"
    pngs = {p.stem for p in figures.glob("*.png")}
    assert pngs and pngs == {p.stem for p in figures.glob("*.pdf")}
    assert any("precision" in name or "fig2" in name for name in pngs), pngs
    assert all(p.stat().st_size > 5000 for p in figures.glob("*.png"))
    index = (R / "figures.md").read_text()
    assert "skipped" in index.lower()  # the smoke study has no block-size or proxy sweeps
    claims = (R / "claims.md").read_text()
    assert any(v in claims for v in ("holds", "does not hold", "not enough data"))
    optimal = pd.read_parquet(R / "laws" / "optimal.parquet")
    assert len(optimal) > 0


def test_html_report(run: dict) -> None:
    report = run["tmp"] / "report.html"
    _snakemake(run["tmp"], "--report", str(report))
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    assert "claims.md" in html and "scores.parquet" in html


def test_second_run_does_nothing_and_a_deleted_result_is_redone_alone(run: dict) -> None:
    tmp, R = run["tmp"], run["R"]
    dry = _snakemake(tmp, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    victim = R / "evals" / "tiny-neox-m" / "float4-e3-b64" / "piqa.parquet"
    untouched = R / "evals" / "tiny-neox-m" / "fp16" / "piqa.parquet"
    before, content = untouched.stat().st_mtime_ns, victim.read_bytes()
    victim.unlink()
    # (Snakemake reruns nothing for a missing intermediate file whose consumers are up to date,
    # so the lost file is asked for by name); it is published again from the evaluation cache
    redo = _snakemake(tmp, str(victim))
    assert victim.is_file() and untouched.stat().st_mtime_ns == before
    log = redo.stdout + redo.stderr
    assert log.count("rule publish_eval:") == 1
    assert "rule evaluate:" not in log and "evaluate_batched" not in log
    # the same bytes come back, and Snakemake compares input checksums before mtimes: the
    # analysis that read the file is still up to date
    assert victim.read_bytes() == content
    dry = _snakemake(tmp, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_task_files_with_new_timestamps_redo_nothing_changed_bytes_stop_the_run(
    tmp_path: Path,
) -> None:
    """A copied or re-created data folder (same bytes, new timestamps) must not redo a study;
    changed bytes stop the run before any job, naming the task and what to do."""
    config = _smoke_config(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(config["data_dir"], data)
    config["data_dir"] = str(data)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # hellaswag's file is over Snakemake's checksum size limit: only its timestamp would count
    target = str(Path(config["resources"]) / "tasks" / "hellaswag" / "hellaswag.yaml")
    _snakemake(tmp_path, target)
    later = time.time() + 100
    for f in data.rglob("*"):
        os.utime(f, (later, later))
    dry = _snakemake(tmp_path, "-n", target)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    source = next(p for p in (data / "hellaswag").rglob("*") if p.is_file())
    source.chmod(0o644)
    source.write_bytes(source.read_bytes() + b"\n")
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml",
           "--cores", "1", "-n", target]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "tasks: hellaswag was prepared from other contents of" in out and str(source) in out
