"""The workflow on a real SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

Runs only where a cluster answers (``sinfo``); tests/slurm/start_cluster.sh starts a one-node
cluster with accounting on a Debian machine. A small study (two tiny models: one evaluated per
job, one batched; two tasks) goes through the whole chain with the GPU rules submitted as SLURM
jobs, and the results must equal those of the same study run locally.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import REPO, _smoke_config

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TIMED = {"wall_time_s", "forward_time_s", "flop_per_s"}


def _cluster_partition() -> str | None:
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True)
    up = [line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" up")]
    return up[0].rstrip("*") if proc.returncode == 0 and up else None


def _account() -> str | None:
    proc = subprocess.run(
        ["sacctmgr", "-n", "-P", "show", "assoc", f"user={os.environ.get('USER', 'root')}",
         "format=account"],
        capture_output=True, text=True,
    )  # fmt: skip
    accounts = [a for a in proc.stdout.split() if a]
    return accounts[0] if accounts else None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_cluster_partition() is None, reason="no SLURM cluster answers sinfo"),
]


def _study(tmp: Path, results: str) -> Path:
    config = _smoke_config(tmp)
    # tiny-neox-m is evaluated one job per spec (grouped with its quantization), tiny-opt-s batched
    config["models"] = {m: config["models"][m] for m in ("tiny-neox-m", "tiny-opt-s")}
    config["tasks"] = ["piqa", "wikitext"]
    config["eval"].update(limit=6, task_limits={"wikitext": 1})
    config["results"] = str(tmp / results)
    path = tmp / f"{results}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(tmp: Path, configfile: Path, *args: str) -> str:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--configfile", str(configfile), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.pathsep.join([str(SNAKEMAKE.parent), env["PATH"]])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_slurm_profile_runs_the_chain_and_equals_a_local_run(tmp_path: Path) -> None:
    partition, account = _cluster_partition(), _account()
    resources = [f"slurm_partition={partition}"] + ([f"slurm_account={account}"] if account else [])
    log = _run(
        tmp_path, _study(tmp_path, "slurm"),
        "--profile", str(REPO / "profiles" / "slurm"),
        "--default-resources", *resources, "mem_mb=2048", "runtime=20", "cpus_per_task=1",
    )  # fmt: skip
    assert "SLURM" in log or "sbatch" in log.lower() or "external jobid" in log.lower()
    # the two (quantize, evaluate) chains of tiny-neox-m's quantized specs go in one group job
    assert "group job" in log.lower() or "rule group" in log.lower(), log[-3000:]
    _run(tmp_path, _study(tmp_path, "local"), "--cores", "2")
    slurm, local = tmp_path / "slurm", tmp_path / "local"
    assert (slurm / "figures.md").is_file() and (slurm / "claims.md").is_file()
    files = sorted(p.relative_to(local) for p in (local / "evals").rglob("*.parquet"))
    assert len(files) == 2 * 3 * 2
    for rel in files:
        a, b = pd.read_parquet(local / rel), pd.read_parquet(slurm / rel)
        cols = [c for c in a.columns if c not in TIMED]
        pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
