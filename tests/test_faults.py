"""Faults and bad input on the real workflow: nothing finished is lost, a killed run resumes.

Each test starts from a finished smoke study (the end-to-end fixture's layout, its own folder)
and applies one fault: a misspelt task, a missing data file, a model path that does not exist,
a changed task limit, SIGKILL of a job and of Snakemake itself. The same config run twice gives
the same per-document results.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import REPO, SNAKEMAKE, _smoke_config

pytestmark = pytest.mark.slow
#: columns that measure time and so differ between any two runs
TIMED = {"wall_time_s", "forward_time_s", "flop_per_s"}


def _cmd(*args: str) -> list[str]:
    return [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml",
            "--cores", "2", "--rerun-incomplete", *args]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(tmp: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), cwd=tmp, capture_output=True, text=True, env=_env(),
                          timeout=2400)  # fmt: skip
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _small(tmp: Path) -> dict:
    """The smoke study cut to two models (one batched, one per spec) and three tasks."""
    config = _smoke_config(tmp)
    config["models"] = {m: config["models"][m] for m in ("tiny-neox-m", "tiny-opt-s")}
    config["tasks"] = ["piqa", "winogrande", "wikitext"]
    config["eval"].update(limit=8, task_limits={"wikitext": 1})
    return config


def _write(tmp: Path, config: dict) -> None:
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    config = _small(tmp)
    _write(tmp, config)
    _run(tmp)
    return {"tmp": tmp, "config": config, "R": Path(config["results"])}


def _bad_config_changes_nothing(done: dict, mutate, message: str) -> None:
    tmp = done["tmp"]
    config = copy.deepcopy(done["config"])
    mutate(config)
    _write(tmp, config)
    before = _stamps(tmp / "results") | _stamps(tmp / "resources")
    try:
        proc = _run(tmp, ok=False)
    finally:
        _write(tmp, done["config"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert "Traceback" not in out  # one clear message, not a stack
    assert _stamps(tmp / "results") | _stamps(tmp / "resources") == before


def test_misspelt_task_is_refused_before_any_job(done: dict) -> None:
    _bad_config_changes_nothing(
        done, lambda c: c["tasks"].append("piqaa"), "'piqaa' is neither a local task"
    )


def test_missing_data_file_is_refused_before_any_job(done: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = Path(done["config"]["data_dir"])
    data.mkdir()
    for task in ("winogrande", "wikitext-2-raw"):
        (data / task).symlink_to(src / task)
    _bad_config_changes_nothing(
        done, lambda c: c.update(data_dir=str(data)), "piqa needs piqa/valid.jsonl"
    )


def test_model_path_that_does_not_exist_stops_the_run(done: dict) -> None:
    def add(c: dict) -> None:
        c["models"]["added"] = {"path": "/nowhere/model", "family": "tiny-neox"}

    _bad_config_changes_nothing(done, add, "models.added.path: /nowhere/model does not exist")


def test_changed_task_limit_recomputes_that_task_only(done: dict) -> None:
    tmp, R = done["tmp"], done["R"]
    config = copy.deepcopy(done["config"])
    config["eval"]["task_limits"] = {"wikitext": 1, "piqa": 4}
    _write(tmp, config)
    cache = R / "cache"
    cached = _stamps(cache)
    try:
        _run(tmp)
        logs = "\n".join(p.read_text() for p in (R / "logs" / "evaluate").rglob("*.log"))
        piqa = len(pd.read_parquet(R / "evals" / "tiny-opt-s" / "fp16" / "piqa.parquet"))
    finally:  # back to the fixture's study: the old piqa files come back from the cache
        _write(tmp, done["config"])
        _run(tmp)
    # 2 models x 3 specs: only the piqa files are new
    # the batched job and the three per-spec jobs ran (lm-eval's own log lines also say
    # "to evaluate()", so the count is of kbit's cache line)
    assert logs.count("files cached,") == 4
    assert "6 of 9 (quant, task) files cached, 3 to evaluate" in logs
    assert "2 of 3 (quant, task) files cached, 1 to evaluate" in logs
    assert all(p.stat().st_mtime_ns == t for p, t in cached.items())
    assert piqa == 4
    assert len(pd.read_parquet(R / "evals" / "tiny-opt-s" / "fp16" / "piqa.parquet")) == 8


def _descendants(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out += [int(proc.name), *_descendants(int(proc.name))]
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for(cond, timeout: float = 900.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.5)


def test_kill_a_job_then_snakemake_and_resume(tmp_path: Path) -> None:
    config = _small(tmp_path)
    _write(tmp_path, config)
    R = Path(config["results"])
    # 1. SIGKILL of a job: the run fails, the next plain command finishes it
    main = subprocess.Popen(_cmd(), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    jobs = lambda: [p for p in _descendants(main.pid) if "evaluate.py" in _cmdline(p)]  # noqa: E731
    _wait_for(lambda: jobs() or main.poll() is not None)
    assert main.poll() is None
    os.kill(jobs()[0], signal.SIGKILL)
    assert main.wait(timeout=600) != 0
    # 2. SIGKILL of Snakemake while jobs run: its jobs stop too, the lock goes stale
    n_cached = len(list((R / "cache").rglob("*.parquet")))
    main = subprocess.Popen(_cmd(), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for(
        lambda: (
            (jobs() and len(list((R / "cache").rglob("*.parquet"))) > n_cached)
            or main.poll() is not None
        )
    )
    assert main.poll() is None
    children = _descendants(main.pid)
    os.kill(main.pid, signal.SIGKILL)
    main.wait()
    _wait_for(lambda: not any(_cmdline(p) for p in children), timeout=60)
    finished = _stamps(R / "cache")
    # 3. the plain command again: no lock error, nothing finished redone, no partial file left
    proc = _run(tmp_path)
    assert "stale lock" in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    leftovers = [p for p in tmp_path.rglob(".*.tmp*") if ".snakemake" not in p.parts]
    assert not leftovers
    for model in config["models"]:
        for quant in ("fp16", "float4-e3-b64", "float8-e3-b64"):
            for task in config["tasks"]:
                assert (R / "evals" / model / quant / f"{task}.parquet").is_file()
    dry = _run(tmp_path, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_same_config_twice_gives_identical_results(done: dict, tmp_path: Path) -> None:
    config = copy.deepcopy(done["config"])
    config["results"] = str(tmp_path / "results")
    config["resources"] = str(tmp_path / "resources")
    _write(tmp_path, config)
    _run(tmp_path)
    first = sorted((done["R"] / "evals").rglob("*.parquet"))
    assert first
    for a in first:
        b = tmp_path / "results" / a.relative_to(done["R"])
        x, y = pd.read_parquet(a), pd.read_parquet(b)
        cols = [c for c in x.columns if c not in TIMED]
        pd.testing.assert_frame_equal(x[cols], y[cols], check_exact=True)
    for table in ("scores", "runs"):
        x = pd.read_parquet(done["R"] / "tables" / f"{table}.parquet")
        y = pd.read_parquet(tmp_path / "results" / "tables" / f"{table}.parquet")
        cols = [c for c in x.columns if c not in TIMED]
        pd.testing.assert_frame_equal(x[cols], y[cols], check_exact=True)


def test_files_are_written_with_the_umask(done: dict) -> None:
    """Results are readable by the group (0644 files, 0755 folders under umask 022), not
    private to their owner."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [*done["R"].rglob("*")]:
        mode = path.stat().st_mode & 0o777
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert mode == expected, (path, oct(mode))


def _parent_of(script: Path) -> subprocess.Popen:
    """A stand-in for the workflow process: a python process that starts ``script`` and waits."""
    return subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         f"subprocess.Popen([sys.executable, {str(script)!r}])\n"
         "time.sleep(60)\n"],
        env=_env(),
    )  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_job_stops_when_its_workflow_process_dies(tmp_path: Path) -> None:
    """A job whose parent chain loses its snakemake process exits by itself."""
    script = tmp_path / "job.py"
    script.write_text(
        "import logging, time\n"
        "from kbit.logs import watch_parent\n"
        "watch_parent(logging.getLogger('kbit'), interval_s=0.2)\n"
        "time.sleep(60)\n"
    )
    parent = _parent_of(script)
    _wait_for(lambda: bool(_descendants(parent.pid)), timeout=30)
    (child,) = _descendants(parent.pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _wait_for(lambda: not _cmdline(child), timeout=30)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_job_stops_when_its_workflow_dies_during_its_imports(tmp_path: Path) -> None:
    """The parent dies after the job imported kbit.logs but before its watch started (the heavy
    imports of a workflow script take seconds): the job still stops, within seconds, instead of
    running on as an orphan (the watch would find no parent left if it looked only then)."""
    script, marker = tmp_path / "job.py", tmp_path / "imported"
    script.write_text(
        "import logging, time\n"
        "from kbit.logs import watch_parent\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "time.sleep(3)  # torch, lm-eval, ...\n"
        "watch_parent(logging.getLogger('kbit'), interval_s=0.2)\n"
        "time.sleep(60)\n"
    )
    parent = _parent_of(script)
    _wait_for(marker.is_file, timeout=30)
    (child,) = _descendants(parent.pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    t0 = time.monotonic()
    _wait_for(lambda: not _cmdline(child), timeout=20)
    assert time.monotonic() - t0 < 15


def test_updated_workflow_scripts_redo_nothing(done: dict, tmp_path: Path) -> None:
    """A copy of the workflow whose scripts are all newer than the study's outputs (what
    updating the workflow does) plans nothing: the profile leaves out Snakemake's ``code``
    rerun trigger, which would redo every finished download, quantization and evaluation."""
    wf = tmp_path / "workflow-copy"
    for name in ("Snakefile", "environment.yml"):
        wf.mkdir(exist_ok=True)
        shutil.copy(REPO / name, wf / name)
    for name in ("workflow", "profiles", "config"):
        skip = shutil.ignore_patterns("__pycache__", ".snakemake")
        shutil.copytree(REPO / name, wf / name, copy_function=shutil.copy, ignore=skip)
    newest = max(p.stat().st_mtime for p in done["R"].rglob("*") if p.is_file())
    assert all(p.stat().st_mtime > newest for p in (wf / "workflow" / "scripts").glob("*.py"))
    cmd = [str(SNAKEMAKE), "-s", str(wf / "Snakefile"), "--configfile", "config.yaml",
           "--cores", "2", "-n"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=done["tmp"], capture_output=True, text=True, env=_env(),
                          timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Nothing to be done" in out, out[-4000:]
