"""What a study will cost, before it starts: jobs, disk, GPU hours, and the cheaper job layout.

:func:`make_plan` combines five sources, each named in the plan it returns:

Jobs
    Snakemake's own dry run of the study (``snakemake -n --forceall --configfile <config>`` in
    the repository, the way the Snakefile replaces its default config), parsed for the job-count
    table and, per job, its outputs and resources. Nothing about the rules is assumed here: rules
    added to the workflow show up as they are. ``--forceall`` plans the whole study whatever is
    already on disk. The result is cached under a hash of the config, Snakefile, rules, schema,
    workflow profile and Snakemake's version, together with the digest of every Python source of
    the repository the dry run imported (recorded by running Snakemake's command line in-process
    under ``python -c``), so editing a module the DAG never touches keeps the cache. The dry run
    runs in the background while tokens are counted.

Tokens
    ``T``, the tokens each task feeds through a model, counted the way lm-eval's ``HFLM`` feeds
    them: the study's task files are prepared into a temporary directory
    (:func:`kbit.evaluation.tasks.prepare_tasks`), lm-eval builds its requests from them, and each
    request is tokenized like ``HFLM`` does (``context + continuation`` in one string, the
    tokenizer's default special tokens, a BOS-prefixed string without them; an empty context
    becomes the prefix token). A log-likelihood request feeds ``len(context + continuation) - 1``
    tokens, truncated to ``max_length``, and requests whose ``context + continuation[:-1]`` are
    the same tokens share one forward row (``HFLM``'s ``logits_cache`` grouping). A perplexity
    document feeds lm-eval's own rolling windows (:func:`lm_eval.utils.get_rolling_token_windows`
    made disjoint, context length 1). A window task of :mod:`kbit.evaluation.windows` (GPTQ-style
    WikiText-2) feeds ``numel // W`` windows of ``W = min(2048, max_length)`` tokens of its whole
    text. ``eval.limit`` and ``eval.task_limits`` take the first documents (windows), as lm-eval
    does. The grouping key takes the context's tokens to be a prefix of the
    whole string's, which holds unless byte-level BPE merges across the context/continuation
    boundary (lm-eval moves a context's trailing spaces into the continuation, so this is rare);
    the token count itself does not depend on it.

    The tokenizer: the model's own when its directory exists (or the ``tiny.tokenizer`` of a tiny
    model), else one of the same family from the shared tokenizer folder
    (:data:`FAMILY_TOKENIZERS`), else a reference tokenizer's counts, else UTF-8 bytes /
    :data:`BYTES_PER_TOKEN`; the plan says which, per model. When the config reads the tasks from
    the hub (``data_dir: null``), the local copies of the same releases are used (``--data-dir``,
    else the shared data folder), and the plan says so. Counts are cached on disk per (task
    data, tokenizer files), per request, so context lengths, smaller limits and a stand-in
    tokenizer's BOS never need a second tokenization; only the documents a limit asks for are
    tokenized.

    The count is the one kbit's runner records: for a Pythia-1.4B-shaped model on the first 1500
    documents per task it gives the 856,131 tokens per spec of benchmarks/results/eval_h100.json.

FLOPs and time
    ``flops = 2 * P_matmul * T`` per (model, spec, task) (the runner's convention: every linear
    layer's weights including the LM head; the same for every spec, since quantization is
    simulated in 16 bit). Seconds = flops / (peak of the accelerator x utilisation). Utilisation
    grows with model size (:func:`default_utilisation`, from ``benchmarks/results/eval_h100.md``)
    unless the user fixes it. When a runs table of an earlier run exists (``runs.parquet``:
    ``wall_time_s`` and ``flops`` per (model, quant, task)), seconds per FLOP are fitted to it
    instead: ``log(s / FLOP) = a + b log(n_params)``, over the rows of the same device type, and
    the plan reports the file, the number of runs and models, the fit's RMS error and whether a
    model lies outside the calibrated sizes.

    Around the scoring: each GPU job starts Python, torch, lm-eval and CUDA
    (:data:`JOB_START_S`), loads the model (checkpoint bytes / disk bandwidth + weight bytes /
    :data:`HOST_TO_DEVICE_BYTES_PER_S`), quantizes (memory-bound, :func:`quantize_seconds`) and
    GPTQ specs add their calibration (:data:`GPTQ_CALIBRATION_TOKENS`). These are constants, not
    calibrated (the runs table records scoring time only); the plan lists them.

Disk
    Downloads: parameters x bytes per parameter of the checkpoint dtype (2 for the fp16/bf16 hub
    checkpoints, :data:`CHECKPOINT_BYTES` for exceptions; a local directory is measured).
    Packed artifacts: :func:`kbit.accounting.predict_tensor_bits` per spec over the tensors that
    are quantized (the model's own shapes when its config is local, else
    :func:`estimate_shape`: an estimate) plus 16 bits for the rest; temporary unless
    ``quantize.keep_artifacts``, so the plan gives the peak range and what is kept. Results:
    per-document Parquet, measured bytes per document from the study's existing files if any,
    else :data:`RESULT_BYTES_PER_DOC` + :data:`RESULT_FILE_OVERHEAD_BYTES` per file.

Layout
    Per model, GPU hours of "one job per (model, spec), all tasks" against "all specs of one
    model in one job" (one load; the job keeps a copy of the weights to restore between specs,
    so it needs twice the weight memory), with the GPUs each needs, against the layout the config
    chooses (``eval.batched_max_params``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kbit.study import Study

log = logging.getLogger(__name__)

#: bump when the cached dry-run or token-count format or meaning changes
CACHE_VERSION = 3
#: dry-run results kept in the cache (one per config and state of the workflow sources)
DRY_RUN_CACHE_FILES = 16
REPO_ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ constants
@dataclass(frozen=True)
class Accelerator:
    """A device kind to plan for: dense 16-bit matmul peak, memory, memory bandwidth."""

    name: str
    peak_flops: float
    memory_bytes: float
    memory_bytes_per_s: float
    device: str  # the runs table's device type that calibrates it: "cuda" or "cpu"


#: datasheet dense fp16/bf16 tensor-core peaks (no sparsity), memory and its bandwidth; "cpu" is
#: a nominal figure for a many-core host, only meaningful once calibrated by a runs table
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("h200", 989e12, 141e9, 4.8e12, "cuda"),
        Accelerator("h100", 989e12, 80e9, 3.35e12, "cuda"),
        Accelerator("a100", 312e12, 80e9, 2.0e12, "cuda"),
        Accelerator("l40s", 362e12, 48e9, 0.864e12, "cuda"),
        Accelerator("a10", 125e12, 24e9, 0.6e12, "cuda"),
        Accelerator("v100", 125e12, 32e9, 0.9e12, "cuda"),
        Accelerator("cpu", 0.2e12, 64e9, 50e9, "cpu"),
    )
}
DEFAULT_ACCELERATOR = "h100"

#: utilisation of the peak while scoring, as a function of parameters: U_REF at P_REF with
#: exponent U_EXPONENT, clipped to [U_MIN, U_MAX]. From benchmarks/results/eval_h100.md (steady
#: scoring, mean of eager and CUDA graphs, as a fraction of the H100's 989 TFLOP/s datasheet
#: peak): Pythia-1.4B shape 0.34, Pythia-160M shape 0.14.
U_REF, P_REF, U_EXPONENT, U_MIN, U_MAX = 0.34, 1.4e9, 0.41, 0.02, 0.45

#: seconds each GPU job spends before its model is loaded: Python, torch, lm-eval and CUDA start,
#: request building and tokenization (benchmarks/results/eval_h100.md: 20-33 s outside scoring)
JOB_START_S = 20.0
#: extra seconds of the batch-size search (forward passes of full-length batches)
BATCH_SEARCH_S = 30.0
#: disk read bandwidth for checkpoints and artifacts (override: --disk-gbps)
DISK_BYTES_PER_S = 1.0e9
#: network bandwidth of downloads (override: --net-gbps)
NET_BYTES_PER_S = 1.0e8
#: host to device copy
HOST_TO_DEVICE_BYTES_PER_S = 20e9
#: device memory traffic per parameter of quantize_model (fp32 upcast, codes, dequantized copy,
#: SQNR in float64) and its fixed cost per spec (Python bookkeeping over every tensor)
QUANTIZE_BYTES_PER_PARAM = 64.0
QUANTIZE_FIXED_S = 2.0
#: GPTQ calibration: 128 sequences of 2048 tokens (the reference implementation's defaults)
GPTQ_CALIBRATION_TOKENS = 128 * 2048
#: device memory beyond the weights (activations, logits of one batch): a 20% margin
MEMORY_MARGIN = 1.2

#: bytes per parameter of checkpoints as published, by family (anything else: 2, fp16/bf16)
CHECKPOINT_BYTES: dict[str, float] = {"gpt2": 4.0}
DEFAULT_CHECKPOINT_BYTES = 2.0
#: tiny models are saved in float32 by kbit.sources.build_tiny_model
TINY_CHECKPOINT_BYTES = 4.0

#: per-document Parquet bytes per document and per file, measured on kbit's evaluation files
#: (Pythia-shaped tiny model, 50 and 400 documents per task, fp16 and float4 specs)
RESULT_BYTES_PER_DOC: dict[str, float] = {
    "lambada_openai": 14.4,
    "piqa": 26.6,
    "hellaswag": 42.0,
    "winogrande": 23.7,
    "wikitext": 36.0,
}
DEFAULT_RESULT_BYTES_PER_DOC = 42.0
RESULT_FILE_OVERHEAD_BYTES = 28_600.0

#: family -> (folder of the shared tokenizer directory, whether a BOS token must be added to
#: match the family's own tokenizer): OPT's tokenizer is GPT-2's byte-level BPE with a leading </s>
FAMILY_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "pythia": ("gpt-neox-20b", False),
    "gpt-neox": ("gpt-neox-20b", False),
    "gpt2": ("gpt2", False),
    "opt": ("gpt2", True),
}
#: tokenizer folder whose counts stand in for a family without a local tokenizer
REFERENCE_TOKENIZER = "gpt2"
#: UTF-8 bytes per token when no tokenizer at all is available (English byte-level BPE)
BYTES_PER_TOKEN = 4.0
#: context window by family when no config is local (lm-eval's default otherwise)
FAMILY_MAX_LENGTH: dict[str, int] = {"gpt2": 1024, "smollm2": 8192}
LM_EVAL_DEFAULT_MAX_LENGTH = 2048

#: vocabulary, tied input/output embeddings and learned positions by family, and the width /
#: depth ratio, for :func:`estimate_shape` (no local config)
FAMILY_SHAPES: dict[str, dict[str, Any]] = {
    "pythia": {"vocab": 50304, "tied": False, "positions": 0},
    "gpt-neox": {"vocab": 50432, "tied": False, "positions": 0},
    "opt": {"vocab": 50272, "tied": True, "positions": 2050},
    "gpt2": {"vocab": 50257, "tied": True, "positions": 1024},
    "bloom": {"vocab": 250880, "tied": True, "positions": 0},
    "bloomz": {"vocab": 250880, "tied": True, "positions": 0},
    "smollm2": {"vocab": 49152, "tied": True, "positions": 0},
}
DEFAULT_SHAPE = {"vocab": 50000, "tied": True, "positions": 0}
WIDTH_PER_LAYER = 100.0

_log_quiet = ("lm_eval", "datasets", "transformers", "filelock", "fsspec")


# ============================================================================ small helpers
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kbit/plan`` (``~/.cache/kbit/plan``), beside kbit's other caches."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kbit" / "plan"


def shared_data_dirs(repo_root: Path = REPO_ROOT) -> list[Path]:
    """Candidate shared data folders: ``$KBIT_SHARED_DATA``, then ``<repo>/../shared/data``."""
    out = []
    if os.environ.get("KBIT_SHARED_DATA"):
        out.append(Path(os.environ["KBIT_SHARED_DATA"]).resolve())
    out.append((repo_root.parent / "shared" / "data").resolve())
    return out


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _files_digest(paths: Iterable[Path], full_path: bool = True) -> list[bytes]:
    """Per file: its path (or only its name) and its bytes, in path order."""
    out = []
    for p in sorted(set(paths)):
        if p.is_file():
            name = str(p) if full_path else p.name
            out.append(name.encode() + b"\0" + p.read_bytes())
    return out


def _read_cache(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path | None, obj: Any) -> None:
    """Atomic cache write; a cache that cannot be written only costs time."""
    if path is None:
        return
    from kbit.io import write_bytes, write_json

    try:
        if path.suffix == ".json":
            write_json(obj, path)
        else:
            buf = io.BytesIO()
            np.savez(buf, **obj)
            write_bytes(buf.getvalue(), path)
    except OSError as err:
        log.warning("plan cache %s not written: %s", path, err)


def _resolve(path: str | os.PathLike, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root / p)


# ============================================================================ accelerator
def accelerator(name: str) -> Accelerator:
    """The :class:`Accelerator` called ``name`` (case-insensitive); ValueError names the choices."""
    key = name.lower().strip()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; choose one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[key]


def default_utilisation(n_params: float) -> float:
    """Fraction of the peak reached while scoring a model of ``n_params`` (see U_REF)."""
    if not math.isfinite(n_params) or n_params <= 0:
        raise ValueError(f"n_params={n_params!r}: must be a positive number")
    return float(np.clip(U_REF * (n_params / P_REF) ** U_EXPONENT, U_MIN, U_MAX))


def eval_flops(matmul_params: float, tokens: float) -> float:
    """FLOPs of scoring ``tokens`` through ``matmul_params`` linear weights: ``2 * P * T``."""
    return 2.0 * float(matmul_params) * float(tokens)


# ============================================================================ calibration
@dataclass
class Calibration:
    """Seconds per FLOP fitted to a runs table: ``log(s/FLOP) = a + b * log(n_params)``."""

    path: str
    device: str
    a: float
    b: float
    n_runs: int
    n_models: int
    rms_log: float
    params_range: tuple[float, float]
    n_dropped: int = 0

    def seconds_per_flop(self, n_params: float) -> float:
        """The fitted seconds per FLOP of a model of ``n_params``."""
        return float(math.exp(self.a + self.b * math.log(n_params)))

    def extrapolated(self, n_params: float) -> bool:
        """Whether ``n_params`` lies outside the sizes the fit saw."""
        lo, hi = self.params_range
        return not (lo * 0.999 <= n_params <= hi * 1.001)

    def describe(self) -> str:
        """One sentence: file, runs, models, device, sizes, the fit and its RMS error."""
        lo, hi = self.params_range
        factor = math.exp(self.rms_log)
        return (
            f"calibrated from {self.path}: {self.n_runs} runs of {self.n_models} model(s) on "
            f"{self.device} ({lo:.3g}..{hi:.3g} parameters), s/FLOP = exp({self.a:.4g} "
            f"{self.b:+.4g} ln P), RMS error x/{factor:.3g}"
        )


def calibrate(
    runs: Any, device: str, params: Mapping[str, float] | None = None, path: str = "runs table"
) -> Calibration | None:
    """Fit seconds per FLOP by model size to the rows of ``runs`` recorded on ``device``.

    ``runs`` is a DataFrame with ``wall_time_s``, ``flops``, ``device`` and ``n_params`` (or a
    ``model`` column looked up in ``params``). Rows with a non-finite or non-positive time or
    FLOP count are dropped (counted in ``n_dropped``). One model size fits the intercept only.
    Returns None when no usable row is left.
    """
    import pandas as pd

    df = pd.DataFrame(runs).copy()
    need = {"wall_time_s", "flops"}
    if not need <= set(df.columns):
        raise ValueError(f"runs table lacks columns {sorted(need - set(df.columns))}")
    if "device" in df.columns:
        kind = df["device"].astype(str).str.split(":").str[0]
        df = df[kind == device]
    if df.empty:
        return None
    sizes = df["n_params"] if "n_params" in df.columns else pd.Series(np.nan, index=df.index)
    if sizes.isna().any() and "model" in df.columns and params:
        sizes = sizes.fillna(df["model"].map(params))
    if sizes.isna().all():
        raise ValueError("runs table has neither n_params nor model names to size the runs")
    df = df.assign(n_params=sizes)
    wall = pd.to_numeric(df["wall_time_s"], errors="coerce").to_numpy(float)
    flops = pd.to_numeric(df["flops"], errors="coerce").to_numpy(float)
    n_par = pd.to_numeric(df["n_params"], errors="coerce").to_numpy(float)
    ok = np.isfinite(wall) & np.isfinite(flops) & np.isfinite(n_par)
    ok &= (wall > 0) & (flops > 0) & (n_par > 0)
    if not ok.any():
        return None
    y = np.log(wall[ok] / flops[ok])
    x = np.log(n_par[ok])
    if np.ptp(x) > 1e-9:
        b, a = np.polyfit(x, y, 1)
    else:
        a, b = float(np.mean(y)), 0.0
    resid = y - (a + b * x)
    return Calibration(
        path=path,
        device=device,
        a=float(a),
        b=float(b),
        n_runs=int(ok.sum()),
        n_models=len(np.unique(n_par[ok])),
        rms_log=float(np.sqrt(np.mean(resid**2))),
        params_range=(float(n_par[ok].min()), float(n_par[ok].max())),
        n_dropped=int((~ok).sum()),
    )


# ============================================================================ dry run
@dataclass
class DryRun:
    """Jobs per rule from Snakemake's dry run, and what the jobs write."""

    rules: dict[str, int]
    total: int
    gpu_jobs: dict[str, int] = field(default_factory=dict)
    runtime_min: dict[str, float] = field(default_factory=dict)
    #: per job writing packed artifacts (outputs under ``.../quantized/``): those outputs
    artifact_jobs: list[list[str]] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None


_STATS_ROW = re.compile(r"^(\S+)\s+(\d+)\s*$")
_JOB_HEAD = re.compile(r"^(?:local)?(?:rule|checkpoint) ([A-Za-z_][\w]*):\s*$")
_JOB_KEY = re.compile(r"^\s+(\w+): (.*)$")


def parse_job_stats(text: str) -> dict[str, int]:
    """The first ``Job stats`` table of Snakemake's output as {rule: jobs} (with ``total``)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Job stats:":
            continue
        out: dict[str, int] = {}
        for row in lines[i + 1 :]:
            if not row.strip():
                if out:
                    break
                continue
            if row.startswith(("job ", "---")) or set(row.strip()) <= {"-", " "}:
                continue
            m = _STATS_ROW.match(row.strip())
            if not m:
                break
            out[m.group(1)] = int(m.group(2))
            if m.group(1) == "total":
                break
        if out:
            return out
    raise ValueError("no 'Job stats' table in Snakemake's output")


def parse_jobs(text: str) -> list[dict[str, str]]:
    """Per-job blocks of a dry run (``rule X:`` then indented ``key: value`` lines)."""
    jobs: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        head = _JOB_HEAD.match(line)
        if head:
            current = {"rule": head.group(1)}
            jobs.append(current)
            continue
        if current is None:
            continue
        kv = _JOB_KEY.match(line)
        if kv:
            current.setdefault(kv.group(1), kv.group(2))
        elif line.strip() and not line.startswith(" "):
            current = None
    return jobs


def _resources(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def parse_dry_run(text: str) -> DryRun:
    """A :class:`DryRun` from the text of ``snakemake -n`` (job table, job blocks)."""
    stats = parse_job_stats(text)
    total = stats.pop("total", sum(stats.values()))
    gpu: dict[str, int] = {}
    runtime: dict[str, float] = {}
    artifact_jobs: list[list[str]] = []
    for job in parse_jobs(text):
        rule = job["rule"]
        res = _resources(job.get("resources", ""))
        with contextlib.suppress(ValueError):
            if float(res.get("gpu", 0)) > 0:
                gpu[rule] = gpu.get(rule, 0) + 1
        with contextlib.suppress(ValueError):
            if "runtime" in res:
                runtime[rule] = runtime.get(rule, 0.0) + float(res["runtime"])
        if "output" in job:
            outs = [o.strip() for o in job["output"].split(", ")]
            arts = [o for o in outs if "/quantized/" in o]
            if arts:
                artifact_jobs.append(arts)
    return DryRun(stats, total, gpu, runtime, artifact_jobs)


def snakemake_executable(repo_root: Path = REPO_ROOT) -> list[str]:
    """The repository's ``.venv/bin/snakemake``, else the one on PATH, else ``python -m``."""
    local = repo_root / ".venv" / "bin" / "snakemake"
    if local.is_file():
        return [str(local)]
    found = shutil.which("snakemake")
    return [found] if found else [sys.executable, "-m", "snakemake"]


#: Snakemake's command line, run in-process by ``python -c``, listing at exit the source files
#: of every module it imported (so a cached dry run depends on exactly those files)
_RECORD_IMPORTS = """\
import atexit, json, os, sys
def _dump():
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    with open(os.environ["KBIT_PLAN_IMPORTS"], "w") as fh:
        json.dump(sorted(f for f in files if f), fh)
atexit.register(_dump)
from snakemake.cli import main
sys.argv[0] = "snakemake"
sys.exit(main())
"""


def dry_run_args(config: Path) -> list[str]:
    """``-n --forceall --nolock --configfile <config>``: the whole study, whatever is on disk;
    the config replaces the default one, as the Snakefile does with ``--configfile``."""
    return ["-n", "--forceall", "--nolock", "--configfile", str(Path(config).resolve())]


def dry_run_command(config: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """The dry run as run: the repository's Python (or this one) with the import recorder."""
    local = repo_root / ".venv" / "bin" / "python"
    python = str(local) if local.is_file() else sys.executable
    return [python, "-c", _RECORD_IMPORTS, *dry_run_args(config)]


def dry_run_key(config: Path, repo_root: Path = REPO_ROOT) -> str:
    """Hash of the config, the workflow's own files (Snakefile, rules, schema, profile) and
    Snakemake's version. The Python sources the dry run imported are checked separately
    (:meth:`PendingDryRun.valid`), so editing an unrelated module keeps the cache."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sm_version = version("snakemake")
    except PackageNotFoundError:
        sm_version = "unknown"
    files = [Path(config).resolve(), repo_root / "Snakefile"]
    for sub in ("workflow/rules", "workflow/schemas", "profiles/default"):
        files += [p for p in (repo_root / sub).rglob("*") if p.is_file()]
    meta = json.dumps({"v": CACHE_VERSION, "snakemake": sm_version, "config": str(config)})
    return _sha([meta.encode(), *_files_digest(files)])


def _digests(paths: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in paths:
        try:
            out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        except OSError:
            out[p] = None
    return out


def _own_source(path: Path, repo_root: Path) -> bool:
    """A source file of the repository itself (not of an environment installed inside it)."""
    if not path.is_absolute():
        return False
    try:
        rel = path.resolve().relative_to(repo_root.resolve())
    except ValueError:
        return False
    return not rel.parts[0].startswith(".") and "site-packages" not in rel.parts


class PendingDryRun:
    """A dry run started in the background (or answered from the cache); :meth:`result` waits.

    A cached result is used while the config, the workflow's files and every Python source
    inside the repository that the dry run imported are unchanged.
    """

    def __init__(
        self,
        config: Path,
        repo_root: Path = REPO_ROOT,
        cache_dir: Path | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.repo_root = repo_root
        self.display = " ".join(["snakemake", *dry_run_args(config)])
        self.timeout_s = timeout_s
        self.t0 = time.perf_counter()
        key = dry_run_key(config, repo_root)
        self.cache_path = cache_dir / f"dryrun-{key[:32]}.json" if cache_dir else None
        cached = _read_cache(self.cache_path)
        self.cached = cached["result"] if cached and self.valid(cached) else None
        self.proc: subprocess.Popen | None = None
        if self.cached is None:
            # files, not pipes: nobody reads the output until result(), and a full pipe would
            # stall the dry run meanwhile (both closed in result())
            self.out_file = tempfile.TemporaryFile()  # noqa: SIM115
            self.imports = tempfile.NamedTemporaryFile(suffix=".json", delete=False)  # noqa: SIM115
            self.imports.close()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "KBIT_PLAN_IMPORTS": self.imports.name}
            self.proc = subprocess.Popen(
                dry_run_command(config, repo_root),
                cwd=repo_root,
                stdout=self.out_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    @staticmethod
    def valid(cached: Mapping[str, Any]) -> bool:
        """Whether every source file the cached dry run imported is as it was."""
        deps, result = cached.get("deps"), cached.get("result")
        fields = set(DryRun.__dataclass_fields__)
        if not isinstance(result, dict) or not set(result) <= fields:  # another format
            return False
        return isinstance(deps, dict) and _digests(deps) == deps

    def result(self) -> DryRun:
        """The parsed dry run; ``error`` is set (and no job is counted) when it failed."""
        if self.cached is not None:
            dr = DryRun(**self.cached)
            dr.cached, dr.seconds = True, time.perf_counter() - self.t0
            return dr
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.out_file.seek(0)
        text = self.out_file.read().decode("utf-8", "replace")
        self.out_file.close()
        imported = Path(self.imports.name)
        try:
            modules = json.loads(imported.read_text())
        except (OSError, ValueError):
            modules = None
        imported.unlink(missing_ok=True)
        seconds = time.perf_counter() - self.t0
        error = None
        if rc is None:
            error = f"timed out after {self.timeout_s:g} s"
        elif rc != 0:
            error = _failure(rc, text)
        if error is not None:
            return DryRun({}, 0, command=self.display, seconds=seconds, error=error)
        try:
            dr = parse_dry_run(text)
        except ValueError as err:
            return DryRun({}, 0, command=self.display, seconds=seconds, error=str(err))
        dr.command, dr.seconds = self.display, seconds
        if modules is not None:
            self._store(dr, modules)
        return dr

    def _store(self, dr: DryRun, modules: Sequence[str]) -> None:
        if self.cache_path is None:
            return
        deps = _digests(m for m in modules if _own_source(Path(m), self.repo_root))
        kept = asdict(dr)
        del kept["cached"]
        _write_cache(self.cache_path, {"deps": deps, "result": kept})
        _prune(self.cache_path.parent, "dryrun-*.json", DRY_RUN_CACHE_FILES)


_NOISE = ("Using workflow specific profile", "Assuming unrestricted", "Building DAG", "host:")


def _failure(rc: int, text: str) -> str:
    """What a failed dry run said: its output from the first error on, without start-up noise
    (at most 12 lines)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith(_NOISE)]
    first = next((i for i, ln in enumerate(lines) if "Error" in ln or "error" in ln), 0)
    return f"exit {rc}: " + "\n".join(lines[first : first + 12])


def _prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` newest cache files matching ``pattern``."""
    files = sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)
    for f in files[keep:]:
        with contextlib.suppress(OSError):
            f.unlink()


# ============================================================================ model shapes
@dataclass
class ModelShape:
    """Parameter counts of one model: total, linear (FLOPs), quantized tensors (artifacts)."""

    n_params: float
    matmul_params: float
    #: (n, in_features, out_features, proxy successor) of every tensor quantize_model selects
    tensors: list[tuple[int, int, int, bool]]
    source: str
    exact: bool

    @property
    def quantized_params(self) -> float:
        """Parameters of the tensors quantization selects."""
        return float(sum(t[0] for t in self.tensors))


def estimate_shape(n_params: float, family: str, quantize: Mapping[str, Any]) -> ModelShape:
    """Transformer shape from a parameter count: ``P = 12 L d^2 + embeddings`` with
    ``d / L =`` :data:`WIDTH_PER_LAYER` and the family's vocabulary and tying
    (:data:`FAMILY_SHAPES`). An estimate: widths vary by a factor ~2 around it, which matters for
    small models (embeddings are a third to a half of a 100M model)."""
    fam = FAMILY_SHAPES.get(family.lower(), DEFAULT_SHAPE)
    vocab, tied, pos = fam["vocab"], fam["tied"], fam["positions"]
    n_emb = 1 if tied else 2

    def total(d: float) -> float:
        return 12.0 * d**3 / WIDTH_PER_LAYER + (n_emb * vocab + pos) * d

    lo, hi = 1.0, 1e6
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if total(mid) < n_params else (lo, mid)
    d = max(8, round(lo))
    layers = max(1, round(d / WIDTH_PER_LAYER))
    block = max(0.0, n_params - (n_emb * vocab + pos) * d)
    per_layer = block / layers
    # per layer: QKV (3 d^2), attention output (d^2), FFN up (4 d^2), FFN down (4 d^2)
    parts = [(3, d, 3 * d, False), (1, d, d, True), (4, d, 4 * d, False), (4, 4 * d, d, True)]
    tensors = []
    for _ in range(layers):
        for share, fin, fout, succ in parts:
            tensors.append((int(per_layer * share / 12), fin, fout, succ))
    if quantize.get("quantize_embeddings"):
        tensors.append((vocab * d, vocab, d, False))
    if quantize.get("quantize_lm_head") and not tied:
        tensors.append((vocab * d, d, vocab, False))
    return ModelShape(
        n_params=float(n_params),
        matmul_params=block + vocab * d,
        tensors=tensors,
        source=f"estimate (d={d}, {layers} layers, vocabulary {vocab}, from {n_params:.3g} params)",
        exact=False,
    )


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shape_from_config(config: Any, quantize: Mapping[str, Any], source: str) -> ModelShape:
    """Exact counts from a transformers config, on a model built on the meta device."""
    from torch import nn

    from kbit.model_quant import LINEAR_TYPES, PROXY_PAIRS, select_parameters

    model = _meta_model(config)
    seen: set[int] = set()
    n_total = sum(p.numel() for p in model.parameters())
    matmul = 0
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul += module.weight.numel()
    keys = ("include", "exclude", "quantize_embeddings", "quantize_lm_head")
    selected = select_parameters(model, **{k: quantize[k] for k in keys if k in quantize})
    successors = tuple(s for _, s, _ in PROXY_PAIRS)
    tensors, done = [], set()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in selected:
        p = params[name]
        if id(p) in done:
            continue
        done.add(id(p))
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if p.dim() == 2 and not isinstance(owner, nn.Embedding):
            w = p.t() if not isinstance(owner, nn.Linear) else p  # Conv1D stores [in, out]
            fout, fin = int(w.shape[0]), int(w.shape[1])
        else:
            fout, fin = 1, int(p.numel())
        succ = name.rsplit(".", 1)[0].endswith(successors)
        tensors.append((int(p.numel()), fin, fout, succ))
    return ModelShape(float(n_total), float(matmul), tensors, source, True)


def _local_config(study: Study, model: str, root: Path) -> tuple[Any, str] | None:
    """A transformers config for ``model`` without downloading: its directory, or a tiny one."""
    entry = study.models[model]
    model_dir = _resolve(study.model_dir(model), root)
    if (model_dir / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir), f"config of {model_dir}"
    if "tiny" in entry:
        from kbit.sources import tiny_config

        tiny = dict(entry["tiny"])
        arch = tiny.pop("arch")
        tok = tiny.pop("tokenizer", None)
        tiny.pop("seed", None)
        vocab = _tiny_vocab(tok, root)
        return tiny_config(arch, vocab_size=vocab, **tiny), f"tiny {arch} config (vocab {vocab})"
    return None


def _tiny_vocab(tokenizer: str | None, root: Path) -> int:
    """Vocabulary of a tiny model: its tokenizer's length (without one, kbit.sources trains a
    fallback tokenizer of at most 2000 tokens: 2000 is used)."""
    if tokenizer and _resolve(tokenizer, root).exists():
        return len(hf_tokenizer(str(_resolve(tokenizer, root))))
    return 2000


def local_config(study: Study, model: str, root: Path = REPO_ROOT) -> tuple[Any, str] | None:
    """``(transformers config, where it came from)`` when one is at hand without a download."""
    try:
        return _local_config(study, model, root)
    except Exception as err:  # a broken local config must not stop the plan
        log.warning("%s: config not usable (%s); estimating its shape", model, err)
        return None


_UNSET: Any = object()


def model_shape(
    study: Study, model: str, root: Path = REPO_ROOT, found: Any = _UNSET
) -> ModelShape:
    """Exact shape when a config is at hand (local directory, tiny model), else an estimate.

    ``found``: a :func:`local_config` result already looked up."""
    quantize = dict(study.config.get("quantize", {}))
    if found is _UNSET:
        found = local_config(study, model, root)
    if found is not None:
        try:
            return shape_from_config(found[0], quantize, found[1])
        except Exception as err:  # an architecture transformers cannot build: estimate it
            log.warning("%s: no model from %s (%s); estimating its shape", model, found[1], err)
    return estimate_shape(study.params(model), study.models[model]["family"], quantize)


# ============================================================================ tokenizers
@dataclass(frozen=True)
class TokenizerRef:
    """Which tokenizer counts a model's tokens, and how faithful that is."""

    label: str
    path: str | None  # tokenizer directory or tokenizer.json; None: UTF-8 bytes / BYTES_PER_TOKEN
    kind: str  # model | tiny | family | override | reference | bytes
    add_bos: bool = False

    @property
    def exact(self) -> bool:
        """Whether the counts are those of the model's own tokenizer (or one with equal ids)."""
        return self.kind in ("model", "tiny", "family", "override")

    @property
    def short(self) -> str:
        """A table-sized name: own, given <file>, <family folder>[+BOS], or ~... (estimate)."""
        name = Path(self.path).name if self.path else ""
        return {
            "model": "own",
            "tiny": "own",
            "override": f"given {name}",
            "family": name + ("+BOS" if self.add_bos else ""),
            "reference": f"~{name} (estimate)",
        }.get(self.kind, f"~bytes/{BYTES_PER_TOKEN:g} (estimate)")

    def fingerprint(self) -> str:
        """Identity of the tokenizer's counts: its files' contents (not where they are); the
        BOS emulation is applied to the counts afterwards."""
        return _tokenizer_fingerprint(self.path)


@functools.lru_cache(maxsize=64)
def _tokenizer_fingerprint(path: str | None) -> str:
    if path is None:
        return f"bytes/{BYTES_PER_TOKEN}"
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.iterdir() if _is_tokenizer_file(f)]
    return _sha(_files_digest(files, full_path=False))


@functools.lru_cache(maxsize=16)
def hf_tokenizer(path: str) -> Any:
    """The tokenizer lm-eval's HFLM would use: ``AutoTokenizer`` (fast) for a model directory,
    :func:`kbit.sources.load_tokenizer` (what tiny models are built with) otherwise."""
    p = Path(path)
    with _quiet():
        if p.is_dir() and (p / "config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p), use_fast=True)
        from kbit.sources import load_tokenizer

        return load_tokenizer(p)


def _is_tokenizer_file(p: Path) -> bool:
    name = p.name
    return p.is_file() and (
        name.startswith("tokenizer")
        or name in ("vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
        or name.endswith((".model", "_tokenizer.json"))
    )


def _has_tokenizer(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".json"
    return path.is_dir() and any(_is_tokenizer_file(f) for f in path.iterdir())


def choose_tokenizer(
    study: Study,
    model: str,
    tokenizer_dirs: Sequence[Path],
    overrides: Mapping[str, str] | None = None,
    root: Path = REPO_ROOT,
) -> TokenizerRef:
    """The most faithful tokenizer available for ``model`` (see the module docstring).

    ``overrides`` maps a model name or family to a tokenizer path (a bare ``*`` key: any model
    without its own tokenizer); ``tokenizer_dirs`` are folders holding the family tokenizers.
    """
    overrides = dict(overrides or {})
    entry = study.models[model]
    family = str(entry["family"]).lower()
    for key in (model, family):
        if key in overrides:
            return TokenizerRef(f"{overrides[key]} (given)", str(overrides[key]), "override")
    model_dir = _resolve(study.model_dir(model), root)
    if _has_tokenizer(model_dir):
        return TokenizerRef(f"the model's own ({model_dir})", str(model_dir), "model")
    tiny_tok = (entry.get("tiny") or {}).get("tokenizer")
    if tiny_tok and _has_tokenizer(_resolve(tiny_tok, root)):
        path = _resolve(tiny_tok, root)
        return TokenizerRef(f"the model's own ({tiny_tok})", str(path), "tiny")
    if "*" in overrides:
        return TokenizerRef(f"{overrides['*']} (given)", str(overrides["*"]), "override")
    if family in FAMILY_TOKENIZERS:
        folder, bos = FAMILY_TOKENIZERS[family]
        for base in tokenizer_dirs:
            if _has_tokenizer(base / folder):
                note = " + BOS (OPT's tokenizer is GPT-2's BPE with a leading </s>)" if bos else ""
                return TokenizerRef(
                    f"family tokenizer {folder}{note}", str(base / folder), "family", bos
                )
    for base in tokenizer_dirs:
        if _has_tokenizer(base / REFERENCE_TOKENIZER):
            label = f"estimate: no local tokenizer of the family, {REFERENCE_TOKENIZER}'s counts"
            return TokenizerRef(label, str(base / REFERENCE_TOKENIZER), "reference")
    return TokenizerRef(f"estimate: no tokenizer, UTF-8 bytes / {BYTES_PER_TOKEN}", None, "bytes")


def max_length_for(
    study: Study, model: str, root: Path = REPO_ROOT, found: Any = _UNSET
) -> tuple[int, str]:
    """The context window lm-eval will use for ``model`` and where that number comes from
    (``found``: a :func:`local_config` result already looked up)."""
    entry = study.models[model]
    if entry.get("max_length"):
        return int(entry["max_length"]), f"models.{model}.max_length"
    if study.config.get("eval", {}).get("max_length"):
        return int(study.config["eval"]["max_length"]), "eval.max_length"
    with contextlib.suppress(Exception):
        if found is _UNSET:
            found = local_config(study, model, root)
        if found is not None:
            from lm_eval.models.utils import resolve_max_length

            return int(resolve_max_length(found[0], None, default=LM_EVAL_DEFAULT_MAX_LENGTH)), (
                found[1]
            )
    family = str(entry["family"]).lower()
    if family in FAMILY_MAX_LENGTH:
        return FAMILY_MAX_LENGTH[family], f"{family} family"
    return LM_EVAL_DEFAULT_MAX_LENGTH, "lm-eval default"


class Encoder:
    """Token ids of strings, the way lm-eval's ``HFLM.tok_encode`` produces them.

    Batched through the fast tokenizer's Rust backend (checked against the tokenizer's own
    ``encode`` on the first strings; the slower Python path is used if they ever differ).
    """

    def __init__(self, ref: TokenizerRef) -> None:
        self.ref = ref
        self.tok: Any = None
        self.backend: Any = None
        self.prefix_id = 0
        self.bos_text: str | None = None
        self._checked = False
        if ref.path is None:
            return
        self.tok = hf_tokenizer(str(ref.path))
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.prefix_id = bos if bos is not None else (eos if eos is not None else 0)
        with _quiet():  # decode() warns about clean-up settings of BPE tokenizers
            self.bos_text = self.tok.decode(self.prefix_id)
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
            self.backend = backend

    def _backend_encode(self, strings: list[str], special: bool) -> list[list[int]]:
        fn = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        out: list[list[int]] = []
        for i in range(0, len(strings), 4096):
            out.extend(e.ids for e in fn(strings[i : i + 4096], add_special_tokens=special))
        return out

    def _encode(self, strings: list[str], special: bool) -> list[list[int]]:
        if not strings:
            return []
        if self.backend is not None and not self._checked:
            probe = strings[:8]
            want = [self.tok.encode(s, add_special_tokens=special) for s in probe]
            if self._backend_encode(probe, special) != want:
                log.info(
                    "%s: backend encoding differs from encode(); using the slow path", self.ref
                )
                self.backend = None
            self._checked = True
        if self.backend is not None:
            return self._backend_encode(strings, special)
        return self.tok(strings, add_special_tokens=special)["input_ids"]

    def tok_encode(self, strings: list[str]) -> tuple[list[list[int]], list[bool]]:
        """``HFLM.tok_encode(s)``: default special tokens, none for a BOS-prefixed string.
        Returns the ids and, per string, whether special tokens were added."""
        if self.tok is None:
            return [[0] * self._bytes_tokens(s) for s in strings], [True] * len(strings)
        bos = self.bos_text
        special = [not (bos and s.startswith(bos)) for s in strings]
        out: list[list[int]] = [[] for _ in strings]
        for flag in (True, False):
            idx = [i for i, sp in enumerate(special) if sp is flag]
            for i, ids in zip(idx, self._encode([strings[i] for i in idx], flag), strict=True):
                out[i] = ids
        return out, special

    def encode(self, strings: list[str]) -> list[list[int]]:
        """``tokenizer(s)``: the tokenizer's default special tokens, whatever the string."""
        if self.tok is None:
            return [[0] * self._bytes_tokens(s) for s in strings]
        return self._encode(strings, True)

    def encode_plain(self, strings: list[str]) -> list[list[int]]:
        """``HFLM.tok_encode(s, add_special_tokens=False)``."""
        if self.tok is None:
            return [[0] * self._bytes_tokens(s) for s in strings]
        return self._encode(strings, False)

    @staticmethod
    def _bytes_tokens(s: str) -> int:
        return max(1, math.ceil(len(s.encode("utf-8")) / BYTES_PER_TOKEN))


# ============================================================================ task requests
@dataclass
class TaskRequests:
    """lm-eval's requests of one task's first ``n_docs`` documents (of ``total_docs``)."""

    name: str
    output_type: str
    n_docs: int
    fingerprint: str
    total_docs: int = 0
    doc_ids: list[int] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)  # the text, for rolling requests

    @property
    def rolling(self) -> bool:
        """A perplexity task of lm-eval (rolling windows per document)."""
        return self.output_type == "loglikelihood_rolling"


#: output type of kbit's window tasks (kbit.evaluation.windows.OUTPUT_TYPE)
WINDOW_OUTPUT = "perplexity_windows"


def _install_template_cache() -> None:
    """kbit's compiled-template cache for lm-eval (request building ~10x faster), if present."""
    for name in ("kbit.evaluation.speed.templates", "kbit.evaluation.templates"):
        with contextlib.suppress(ImportError):
            __import__(name, fromlist=["install"]).install()
            return


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence lm-eval's and datasets' logging and progress bars while building requests."""
    loggers = [logging.getLogger(n) for n in _log_quiet]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.suppress(ImportError):
            import datasets

            datasets.disable_progress_bars()
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's per-task progress bars
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def requests_of(
    task: Any, name: str, fingerprint: str = "", limit: int | None = None
) -> TaskRequests:
    """The requests of an lm-eval ``Task`` for its first ``limit`` documents (None: all), as
    lm-eval's ``build_all_requests`` makes them."""
    from lm_eval.evaluator_utils import get_sample_size

    n = get_sample_size(task, limit)
    task.build_all_requests(limit=n, rank=0, world_size=1)
    total = len(task.eval_docs)
    out = TaskRequests(name, task.OUTPUT_TYPE, 0, fingerprint, total)
    doc_ids = set()
    for inst in task.instances:
        doc_ids.add(int(inst.doc_id))
        if inst.request_type == "loglikelihood_rolling":
            (text,) = inst.args
            ctx, cont = "", text
        elif inst.request_type == "loglikelihood":
            ctx, cont = inst.args
        else:
            raise ValueError(
                f"task {name!r} makes {inst.request_type!r} requests; only log-likelihood tasks "
                "can be planned"
            )
        for _ in range(getattr(inst, "repeats", 1) or 1):
            out.doc_ids.append(int(inst.doc_id))
            out.contexts.append(ctx)
            out.continuations.append(cont)
    out.n_docs = len(doc_ids)
    return out


def _task_fingerprint(work_dir: Path, task: str) -> str:
    import lm_eval

    base = str(work_dir.resolve())
    parts = [json.dumps({"v": CACHE_VERSION, "lm_eval": lm_eval.__version__}).encode()]
    for p in sorted(work_dir.rglob(f"{task}.*")):
        data = p.read_bytes()
        if p.suffix in (".yaml", ".yml"):
            data = data.replace(base.encode(), b"<dir>")
        parts.append(p.name.encode() + b"\0" + data)
    return _sha(parts)


@dataclass
class TaskSet:
    """Prepared local task data of a study (fingerprints now, lm-eval requests on demand)."""

    work_dir: Path
    data_dir: Path | None
    data_note: str
    fingerprints: dict[str, str]
    missing: dict[str, str]
    #: tasks that score fixed windows of one text (kbit.evaluation.windows), not lm-eval's
    windows: set[str] = field(default_factory=set)
    _tasks: dict[str, Any] = field(default_factory=dict)
    _requests: dict[tuple[str, int | None], TaskRequests] = field(default_factory=dict)

    def requests(self, task: str, limit: int | None = None) -> TaskRequests:
        """lm-eval's requests of the first ``limit`` documents of ``task`` (None: all), built
        once per (task, limit) whatever the number of tokenizers; a window task's whole text
        (its windows are cut per model, :meth:`TokenCounts.fed_tokens`)."""
        from kbit.evaluation.tasks import load_tasks

        if task in self.windows:
            from kbit.evaluation.windows import window_task

            text = window_task(task, self.data_dir).text
            return TaskRequests(
                task, WINDOW_OUTPUT, 1, self.fingerprints[task], 1, [0], [""], [text]
            )
        if (task, limit) not in self._requests:
            _install_template_cache()
            with _quiet():
                if task not in self._tasks:
                    self._tasks[task] = load_tasks([task], self.work_dir)["tasks"][task]
                self._requests[(task, limit)] = requests_of(
                    self._tasks[task], task, self.fingerprints[task], limit
                )
        return self._requests[(task, limit)]


def prepare_task_set(
    study: Study, work_dir: Path, data_dir: Path | None = None, root: Path = REPO_ROOT
) -> TaskSet:
    """Prepare the study's local task data in ``work_dir`` and fingerprint each task's files.

    ``data_dir`` stands in when the config reads the standard tasks from the hub
    (``data_dir: null``): the local copies of the same releases. Tasks without local data
    (neither standard with a data folder, nor a corpus) are listed in ``missing``.
    """
    from kbit.evaluation.tasks import prepare_tasks

    cfg = study.config
    configured = cfg.get("data_dir")
    corpora = {
        k: {**v, "path": str(_resolve(v["path"], root))} for k, v in cfg.get("corpora", {}).items()
    }
    if configured is not None:
        source = _resolve(configured, root)
        note = f"the study's data_dir {configured}"
    elif data_dir is not None:
        source = Path(data_dir)
        note = f"local copies at {data_dir} (the config reads the hub data sets: same releases)"
    else:
        source, note = None, "no local task data"
    missing: dict[str, str] = {}
    prints: dict[str, str] = {}
    windows: set[str] = set()
    for t in study.tasks:
        files = _window_task_files(t, source)
        if files:  # scored on windows of one text by kbit itself
            prints[t] = _sha([f"{CACHE_VERSION} {t}".encode(), *_files_digest(files, False)])
            windows.add(t)
            continue
        try:
            prepare_tasks([t], source, work_dir, {t: corpora[t]} if t in corpora else None)
        except (OSError, ValueError) as err:
            missing[t] = f"not prepared: {err}"
            continue
        if any(work_dir.rglob(f"{t}.yaml")):
            prints[t] = _task_fingerprint(work_dir, t)
        else:  # left to lm-eval's built-in definition, which reads the hub
            missing[t] = "no local data (a hub task): its tokens are not counted"
    return TaskSet(work_dir, source, note, prints, missing, windows)


def _window_task_files(task: str, source: Path | None) -> list[Path]:
    """The local files of ``task`` if it is one of kbit's window tasks (else [])."""
    from kbit.evaluation.convert import TASK_FILES

    if source is None or task in TASK_FILES:
        return []
    try:
        from kbit.evaluation.windows import WINDOW_TASKS
    except ImportError:  # a kbit without window tasks
        return []
    files = [source / rel for rel in WINDOW_TASKS.get(task, [])]
    return files if files and all(f.is_file() for f in files) else []


# ============================================================================ token counts
@dataclass
class TokenCounts:
    """Per-request token counts of one task under one tokenizer (all documents).

    Log-likelihood tasks: per request its document, ``len(context + continuation) - 1`` and a
    hash of those input tokens (the forward-row key). Rolling tasks: per document its tokens.
    ``special``: whether the row's string was encoded with the tokenizer's special tokens (so a
    BOS token that a stand-in tokenizer lacks is one more token there, :meth:`with_bos`).
    """

    task: str
    rolling: bool
    n_docs: int  # documents counted (the first n_docs)
    doc: np.ndarray
    length: np.ndarray
    key: np.ndarray
    special: np.ndarray
    total_docs: int = 0  # documents in the task
    window: int = 0  # a window task: its requested window length (capped at max_length)

    def with_bos(self) -> TokenCounts:
        """The counts of the same tokenizer with a BOS token added wherever special tokens are:
        one more token on those rows; their keys stay distinct from each other exactly when
        they were (a common prefix changes no equality)."""
        add = self.special.astype(np.int64)
        key = np.where(self.special, self.key * 1_000_003 + 7, self.key)
        return TokenCounts(
            self.task,
            self.rolling,
            self.n_docs,
            self.doc,
            self.length + add,
            key,
            self.special,
            self.total_docs,
            self.window,
        )

    def covers(self, limit: int | None) -> bool:
        """Whether the first ``limit`` documents (None: all) were counted."""
        return self.n_docs >= (self.total_docs if limit is None else min(limit, self.total_docs))

    def fed_tokens(self, limit: int | None, max_length: int) -> int:
        """Tokens fed through the model for the first ``limit`` documents at ``max_length``."""
        if not self.covers(limit):
            raise ValueError(f"{self.task}: {self.n_docs} documents counted, {limit} asked for")
        if self.window:  # numel // W windows of W tokens, the first `limit` of them
            width = min(self.window, max_length)
            n_windows = int(self.length[0]) // width
            return width * (n_windows if limit is None else min(int(limit), n_windows))
        n = self.total_docs if limit is None else min(int(limit), self.total_docs)
        mask = self.doc < n
        if self.rolling:
            return int(sum(rolling_fed_tokens(int(k), max_length) for k in self.length[mask]))
        lengths, keys = self.length[mask], self.key[mask]
        _, first = np.unique(keys, return_index=True)
        return int(np.minimum(lengths[first], max_length).sum())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays the on-disk cache stores (numpy ``.npz``, no pickle)."""
        return {
            "doc": self.doc,
            "length": self.length,
            "key": self.key,
            "special": self.special,
            "meta": np.array(
                [int(self.rolling), self.n_docs, self.total_docs, self.window], dtype=np.int64
            ),
        }

    @classmethod
    def from_arrays(cls, task: str, arrays: Mapping[str, np.ndarray]) -> TokenCounts:
        """The inverse of :meth:`to_arrays`."""
        rolling, n_docs, total, window = (int(x) for x in arrays["meta"])
        doc, length, key, special = (arrays[k] for k in ("doc", "length", "key", "special"))
        return cls(task, bool(rolling), n_docs, doc, length, key, special, total, window)


def rolling_fed_tokens(n_tokens: int, max_length: int) -> int:
    """Tokens lm-eval feeds for one perplexity document of ``n_tokens``: its rolling windows
    (``get_rolling_token_windows`` with context 1, made disjoint), each truncated as ``HFLM``
    truncates a request, ``len(context + continuation) - 1`` tokens per window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if n_tokens <= 0:
        return 0
    total = 0
    for ctx, cont in map(
        make_disjoint_window,
        get_rolling_token_windows(list(range(n_tokens)), -1, max_length, 1),
    ):
        total += min(len(ctx) + len(cont), max_length + 1) - 1
    return total


def count_tokens(req: TaskRequests, enc: Encoder) -> TokenCounts:
    """Token counts of every request of ``req`` under ``enc`` (see :class:`TokenCounts`)."""
    doc = np.asarray(req.doc_ids, dtype=np.int32)
    if req.output_type == WINDOW_OUTPUT:  # the whole text at once, default special tokens
        from kbit.evaluation.windows import DEFAULT_WINDOW

        (text,) = req.continuations
        (ids,) = enc.encode([text])
        length = np.asarray([len(ids)], dtype=np.int64)
        zero, flags = np.zeros(1, np.int64), np.ones(1, bool)
        return TokenCounts(req.name, False, 1, doc, length, zero, flags, 1, DEFAULT_WINDOW)
    if req.rolling:
        ids, special = enc.tok_encode(req.continuations)
        length = np.asarray([len(x) for x in ids], dtype=np.int64)
        key = np.zeros(len(ids), dtype=np.int64)
        flags = np.asarray(special, dtype=bool)
        return TokenCounts(req.name, True, req.n_docs, doc, length, key, flags, req.total_docs)
    wholes: dict[str, int] = {}
    empties: dict[str, int] = {}
    for ctx, cont in zip(req.contexts, req.continuations, strict=True):
        if ctx == "":
            empties.setdefault(cont, len(empties))
        else:
            wholes.setdefault(ctx + cont, len(wholes))
    # the forward-row key: the row's tokens; without a tokenizer (byte estimate), the string
    has_ids = enc.tok is not None
    rows: dict[str, tuple[int, int, bool]] = {}
    whole_ids, whole_special = enc.tok_encode(list(wholes))
    for s, ids, sp in zip(wholes, whole_ids, whole_special, strict=True):
        rows[s] = (len(ids) - 1, hash(tuple(ids[:-1])) if has_ids else hash(s), sp)
    for s, ids in zip(empties, enc.encode_plain(list(empties)), strict=True):
        # HFLM: the prefix token is the context unless the continuation starts with it
        row = ids[:-1] if ids and ids[0] == enc.prefix_id else [enc.prefix_id, *ids[:-1]]
        rows["\0" + s] = (len(row), hash(tuple(row)) if has_ids else hash(s), False)
    n = len(doc)
    length, key, flags = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, bool)
    for i, (ctx, cont) in enumerate(zip(req.contexts, req.continuations, strict=True)):
        length[i], key[i], flags[i] = rows["\0" + cont] if ctx == "" else rows[ctx + cont]
    return TokenCounts(req.name, False, req.n_docs, doc, length, key, flags, req.total_docs)


class TokenCounter:
    """Token counts per (tokenizer contents, task), computed once and cached on disk.

    Only the documents a limit asks for are tokenized; a later, larger request recounts and
    replaces the cached counts. Tokenizers with the same files share their counts.
    """

    def __init__(self, tasks: TaskSet, cache_dir: Path | None = None) -> None:
        self.tasks = tasks
        self.cache_dir = cache_dir
        self.encoders: dict[str, Encoder] = {}
        self.counts: dict[tuple[str, str], TokenCounts] = {}
        self._fed: dict[tuple[str, bool, str, int | None, int], int] = {}
        self.seconds = 0.0
        self.tokenized: list[str] = []
        self.cache_hits = 0

    def counts_for(self, ref: TokenizerRef, task: str, limit: int | None = None) -> TokenCounts:
        """Counts covering the first ``limit`` documents of ``task`` (None: all)."""
        base = self._base_counts(ref, task, limit)
        return base.with_bos() if ref.add_bos else base

    def _base_counts(self, ref: TokenizerRef, task: str, limit: int | None) -> TokenCounts:
        fp = ref.fingerprint()
        have = self.counts.get((fp, task))
        if have is not None and have.covers(limit):
            return have
        t0 = time.perf_counter()
        digest = _sha([self.tasks.fingerprints[task].encode(), fp.encode()])
        path = self.cache_dir / f"tokens-{task}-{digest[:32]}.npz" if self.cache_dir else None
        arrays = _read_cache(path)
        counts = TokenCounts.from_arrays(task, arrays) if arrays is not None else None
        if counts is not None and counts.covers(limit):
            self.cache_hits += 1
        else:
            if fp not in self.encoders:
                self.encoders[fp] = Encoder(ref)
            counts = count_tokens(self.tasks.requests(task, limit), self.encoders[fp])
            _write_cache(path, counts.to_arrays())
            self.tokenized.append(f"{task} ({counts.n_docs} docs, {ref.label})")
        self.counts[(fp, task)] = counts
        self.seconds += time.perf_counter() - t0
        return counts

    def fed_tokens(self, ref: TokenizerRef, task: str, limit: int | None, max_length: int) -> int:
        """:meth:`TokenCounts.fed_tokens`, memoised (rolling windows are walked once)."""
        key = (ref.fingerprint(), ref.add_bos, task, limit, max_length)
        if key not in self._fed:
            counts = self.counts_for(ref, task, limit)
            self._fed[key] = counts.fed_tokens(limit, max_length)
        return self._fed[key]


# ============================================================================ disk
def checkpoint_bytes(
    study: Study, model: str, shape: ModelShape, root: Path = REPO_ROOT
) -> tuple[float, str]:
    """Bytes a model's weights take on disk as downloaded (measured when already local)."""
    model_dir = _resolve(study.model_dir(model), root)
    files = list(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if files:
        return float(sum(f.stat().st_size for f in files)), f"measured ({model_dir})"
    entry = study.models[model]
    if "tiny" in entry:
        return shape.n_params * TINY_CHECKPOINT_BYTES, "float32 tiny model"
    family = str(entry["family"]).lower()
    per = CHECKPOINT_BYTES.get(family, DEFAULT_CHECKPOINT_BYTES)
    return shape.n_params * per, f"{per:g} B/param"


def artifact_bits(shape: ModelShape, spec: Any) -> float:
    """Total bits of a packed artifact of ``spec``: predicted bits of the quantized tensors
    (:func:`kbit.accounting.predict_tensor_bits`; a mixed spec's low share only, the rest 16-bit)
    plus 16 bits for every other parameter."""
    from collections import Counter

    from kbit.accounting import predict_tensor_bits

    if spec.is_baseline:
        return 16.0 * shape.n_params
    low = spec.mixed_ratio if spec.mixed_ratio is not None else 1.0
    bits = 0.0
    for (n, fin, fout, succ), count in Counter(shape.tensors).items():  # layers repeat
        cols = outlier_columns(spec.outlier_fraction, fin) if succ else 0
        q = predict_tensor_bits(spec, n, outlier_cols=cols, out_features=fout if cols else 0)
        bits += count * (low * q + (1 - low) * 16.0 * n)
    return bits + 16.0 * max(0.0, shape.n_params - shape.quantized_params)


def outlier_columns(fraction: float, in_features: int) -> int:
    """Input columns proxy quantization keeps in 16 bit: ``ceil(p * in)``, as
    :func:`kbit.model_quant.n_outlier_columns` computes it (that module imports torch, which a
    plan does not otherwise need; a test keeps the two equal)."""
    if not fraction:
        return 0
    return min(in_features, math.ceil(round(fraction * in_features, 9)))


def result_bytes_per_doc(
    results_dir: Path, tasks: Sequence[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """Bytes per document of each task's per-document Parquet: measured from the study's
    existing evaluation files (file size less the per-file overhead, over their rows), else the
    documented constants."""
    per_doc: dict[str, float] = {}
    source: dict[str, str] = {}
    evals = results_dir / "evals"
    for task in tasks:
        sizes, rows = [], []
        if evals.is_dir():
            import pyarrow.parquet as pq

            for f in list(evals.glob(f"*/*/{task}.parquet"))[:50]:
                with contextlib.suppress(Exception):
                    rows.append(pq.ParquetFile(f).metadata.num_rows)
                    sizes.append(f.stat().st_size)
        if rows and sum(rows) > 0:
            sizes_a, rows_a = np.asarray(sizes, float), np.asarray(rows, float)
            if len(set(rows)) > 1:
                slope, _ = np.polyfit(rows_a, sizes_a, 1)
            else:
                slope = float(np.median((sizes_a - RESULT_FILE_OVERHEAD_BYTES) / rows_a))
            if math.isfinite(slope) and slope > 0:
                per_doc[task] = float(slope)
                source[task] = f"measured on {len(rows)} file(s) in {evals}"
                continue
        per_doc[task] = RESULT_BYTES_PER_DOC.get(task, DEFAULT_RESULT_BYTES_PER_DOC)
        source[task] = "constant"
    return per_doc, source


# ============================================================================ timing
def load_seconds(disk_bytes: float, weight_bytes: float, disk_bytes_per_s: float) -> float:
    """Model load: read the checkpoint from disk, copy the weights to the device."""
    return disk_bytes / disk_bytes_per_s + weight_bytes / HOST_TO_DEVICE_BYTES_PER_S


def quantize_seconds(n_params: float, acc: Accelerator) -> float:
    """Simulated quantization of one spec (memory bound) plus its fixed bookkeeping."""
    return QUANTIZE_FIXED_S + n_params * QUANTIZE_BYTES_PER_PARAM / acc.memory_bytes_per_s


def gpus_needed(weight_bytes: float, acc: Accelerator, copies: int = 1) -> int:
    """GPUs whose memory holds ``copies`` of the weights with the activation margin."""
    return max(1, math.ceil(copies * weight_bytes * MEMORY_MARGIN / acc.memory_bytes))


# ============================================================================ the plan
@dataclass
class PlanOptions:
    """Knobs of :func:`make_plan` (every default is one of the module's constants)."""

    accelerator: str | None = None  # None: "cpu" for an eval.device: cpu study, else h100
    runs: Path | None = None  # None: <results>/tables/runs.parquet when it exists
    utilisation: float | None = None  # fixed fraction of peak (None: default_utilisation)
    disk_bytes_per_s: float = DISK_BYTES_PER_S
    net_bytes_per_s: float = NET_BYTES_PER_S
    data_dir: Path | None = None  # stand-in task data for hub tasks (None: shared data folder)
    tokenizer_dirs: list[Path] | None = None  # None: <shared data>/tokenizers
    tokenizers: dict[str, str] = field(default_factory=dict)  # model|family|* -> path
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None: no cache
    jobs: bool = True  # run (or reuse) the dry run
    repo_root: Path = REPO_ROOT


def _eval_weight_bytes(study: Study, acc: Accelerator) -> float:
    dtype = study.config.get("eval", {}).get("dtype", "auto")
    if dtype == "float32" or (dtype == "auto" and acc.device == "cpu"):
        return 4.0
    return 2.0


def _runs_table(study: Study, opts: PlanOptions) -> tuple[Any, Path | None]:
    path = opts.runs
    if path is None:
        default = _resolve(study.results, opts.repo_root) / "tables" / "runs.parquet"
        path = default if default.is_file() else None
    elif not Path(path).is_file():
        raise FileNotFoundError(f"runs table {path} does not exist")
    if path is None:
        return None, None
    import pandas as pd

    return pd.read_parquet(path), Path(path)


def artifact_jobs(study: Study, dry: DryRun | None) -> tuple[dict[str, list[list[str]]], str]:
    """Per model, the jobs that write packed artifacts and the specs each writes: from the dry
    run's jobs with outputs under ``<results>/quantized/<model>/<spec>``, else (no dry run) one
    job per non-baseline spec of the models evaluated per spec."""
    out: dict[str, list[list[str]]] = {}
    if dry is not None and not dry.error:
        prefix = f"{study.results.rstrip('/')}/quantized/"
        for outputs in dry.artifact_jobs:
            per_model: dict[str, list[str]] = {}
            for o in outputs:
                parts = o[len(prefix) :].split("/") if o.startswith(prefix) else []
                if len(parts) >= 2 and parts[0] in study.models:
                    per_model.setdefault(parts[0], []).append(parts[1])
            for m, specs in per_model.items():
                out.setdefault(m, []).append(specs)
        return out, "the dry run's jobs"
    for m in study.models:
        if not study.batched(m):
            out[m] = [[q] for q in study.quant_ids if q != "fp16"]
    return out, "one job per non-baseline spec of the models evaluated per spec (no dry run)"


def study_limits(study: Study) -> dict[str, int | None]:
    """Documents evaluated per task: ``eval.task_limits`` overrides ``eval.limit`` (None: all)."""
    eval_cfg = study.config.get("eval", {})
    per_task = dict(eval_cfg.get("task_limits") or {})
    return {t: per_task.get(t, eval_cfg.get("limit")) for t in study.tasks}


@dataclass
class TokenPlan:
    """Tokens per (model, task) and what they rest on."""

    tokens: dict[tuple[str, str], float]
    tasks: dict[str, dict[str, Any]]
    refs: dict[str, TokenizerRef]
    lengths: dict[str, tuple[int, str]]
    data_note: str
    missing: dict[str, str]
    seconds: float
    tokenized: list[str]


def plan_tokens(
    study: Study,
    opts: PlanOptions,
    configs: Mapping[str, Any],
    cache_dir: Path | None,
) -> TokenPlan:
    """T of every (model, task): prepare the task data, count each (tokenizer, task) once."""
    root = opts.repo_root
    shared = shared_data_dirs(root)
    data_dir = opts.data_dir
    if data_dir is None:
        data_dir = next((d / "eval" for d in shared if (d / "eval").is_dir()), None)
    tok_dirs = opts.tokenizer_dirs
    if tok_dirs is None:
        tok_dirs = [d / "tokenizers" for d in shared if (d / "tokenizers").is_dir()]
    refs = {m: choose_tokenizer(study, m, tok_dirs, opts.tokenizers, root) for m in study.models}
    lengths = {m: max_length_for(study, m, root, configs[m]) for m in study.models}
    limits = study_limits(study)
    t0 = time.perf_counter()
    tokens: dict[tuple[str, str], float] = {}
    tasks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kbit-plan-") as tmp:
        task_set = prepare_task_set(study, Path(tmp), data_dir, root)
        counter = TokenCounter(task_set, cache_dir)
        for task in study.tasks:
            lim = limits[task]
            info: dict[str, Any] = {"limit": lim, "docs": None, "output_type": None}
            tasks[task] = info
            for model in study.models:
                if task in task_set.missing:
                    tokens[(model, task)] = math.nan
                    continue
                counts = counter.counts_for(refs[model], task, lim)
                fed = counter.fed_tokens(refs[model], task, lim, lengths[model][0])
                tokens[(model, task)] = float(fed)
                if counts.window:  # documents are windows: how many, for this model's width
                    width = min(counts.window, lengths[model][0])
                    total = int(counts.length[0]) // width
                    kind = WINDOW_OUTPUT
                else:
                    total = counts.total_docs
                    kind = "loglikelihood_rolling" if counts.rolling else "loglikelihood"
                info["docs"] = total if lim is None else min(lim, total)
                info["docs_total"] = total
                info["output_type"] = kind
    return TokenPlan(
        tokens,
        tasks,
        refs,
        lengths,
        task_set.data_note,
        task_set.missing,
        time.perf_counter() - t0,
        counter.tokenized,
    )


def model_cost(
    study: Study,
    model: str,
    shape: ModelShape,
    t_spec: float,
    s_per_flop: float,
    artifacts: Sequence[Sequence[str]],
    acc: Accelerator,
    opts: PlanOptions,
) -> tuple[dict[str, Any], dict[str, float], dict[str, int], list[float]]:
    """One model's GPU seconds per stage as configured, GPU hours of both layouts, its artifact
    sizes. ``t_spec``: tokens one spec feeds (all tasks); ``artifacts``: the jobs that write its
    packed artifacts, each as the specs it writes (one load per job). Returns (row, stage
    seconds, stage jobs, artifact bytes).
    """
    specs = {s.id: s for s in study.specs}
    n_specs = len(specs)
    ck_bytes, ck_source = checkpoint_bytes(study, model, shape, opts.repo_root)
    w_bytes = shape.n_params * _eval_weight_bytes(study, acc)
    load_s = load_seconds(ck_bytes, w_bytes, opts.disk_bytes_per_s)
    flops_spec = eval_flops(shape.matmul_params, t_spec)
    scoring = n_specs * flops_spec * s_per_flop
    quant_s = {}
    for q, s in specs.items():
        quant_s[q] = 0.0 if s.is_baseline else quantize_seconds(shape.n_params, acc)
        if s.method == "gptq":
            extra = eval_flops(shape.matmul_params, GPTQ_CALIBRATION_TOKENS)
            extra += 2.0 * sum(n * fin for n, fin, _, _ in shape.tensors)
            quant_s[q] += extra * s_per_flop
    g1, g2 = gpus_needed(w_bytes, acc), gpus_needed(w_bytes, acc, copies=2)
    restore = n_specs * w_bytes / acc.memory_bytes_per_s
    per_spec = sum(JOB_START_S + load_s + quant_s[q] for q in specs) + scoring
    per_model = JOB_START_S + load_s + sum(quant_s.values()) + restore + scoring
    layout_h = {"per_spec": per_spec * g1 / 3600, "per_model": per_model * g2 / 3600}
    # as configured: artifact jobs, then one job per model or per spec
    jobs = [[q for q in job if q in specs] for job in artifacts]
    size = {q: artifact_bits(shape, specs[q]) / 8 for job in jobs for q in job}
    art_bytes = list(size.values())
    art_s = sum(
        JOB_START_S + load_s + sum(quant_s[q] + size[q] / opts.disk_bytes_per_s for q in job)
        for job in jobs
    )
    batched = study.batched(model)
    gpus = g2 if batched else g1
    n_jobs = 1 if batched else n_specs
    start_load = n_jobs * (JOB_START_S + load_s) + sum(art_bytes) / opts.disk_bytes_per_s
    in_place = sum(quant_s[q] for q in specs if q not in size)
    stage_s = {
        "batch_size": (JOB_START_S + load_s + BATCH_SEARCH_S) * g1,
        "quantize": art_s * g1,
        "eval_start_load": start_load * gpus,
        "eval_quantize": in_place * gpus,
        "scoring": scoring * gpus,
    }
    stage_jobs = {"batch_size": 1, "quantize": len(jobs), "eval_start_load": n_jobs}
    row = {
        "params": shape.n_params,
        "matmul_params": shape.matmul_params,
        "quantized_fraction": shape.quantized_params / shape.n_params,
        "shape": shape.source,
        "shape_exact": shape.exact,
        "tokens_per_spec": t_spec,
        "flops": n_specs * flops_spec,
        "seconds_per_flop": s_per_flop,
        "scoring_gpu_h": scoring * gpus / 3600,
        "load_s": load_s,
        "checkpoint_bytes": ck_bytes,
        "checkpoint_source": ck_source,
        "quantize_s_per_spec": max(quant_s.values()),
        "artifacts": len(art_bytes),
        "artifact_bytes": sum(art_bytes),
        "weight_bytes": w_bytes,
        "gpus": {"per_spec": g1, "per_model": g2},
        "layout_configured": "per_model" if batched else "per_spec",
        "configured_gpu_h": sum(v for k, v in stage_s.items() if k != "batch_size") / 3600,
        "layout_gpu_h": layout_h,
        "cheaper_layout": min(layout_h, key=layout_h.__getitem__),
    }
    return row, stage_s, stage_jobs, art_bytes


def plan_disk(
    study: Study,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    art_sizes: Sequence[float],
    pairs_source: str,
    root: Path = REPO_ROOT,
    net_bytes_per_s: float = NET_BYTES_PER_S,
) -> dict[str, Any]:
    """Bytes per stage: downloads (and their hours), packed artifacts (peak range and kept),
    results. ``tasks``/``models``: the plan's task and model rows."""
    from kbit.evaluation.convert import FULL_DOC_COUNTS

    n_specs = len(study.quant_ids)
    downloads = sum(
        r["checkpoint_bytes"] for m, r in models.items() if "path" not in study.models[m]
    )
    per_doc, per_doc_src = result_bytes_per_doc(_resolve(study.results, root), study.tasks)
    results = 0.0
    for t in study.tasks:
        docs = tasks[t].get("docs")
        if docs is None:
            docs = tasks[t]["limit"] or FULL_DOC_COUNTS.get(t)
        if docs is not None:
            results += (
                len(study.models) * n_specs * (RESULT_FILE_OVERHEAD_BYTES + per_doc[t] * docs)
            )
    keep = bool(study.config.get("quantize", {}).get("keep_artifacts"))
    total_art = float(sum(art_sizes))
    return {
        "downloads": {
            "peak": downloads,
            "kept": downloads,
            "hours": downloads / net_bytes_per_s / 3600,
        },
        "artifacts": {
            "peak_min": max(art_sizes) if art_sizes else 0.0,
            "peak_max": total_art,
            "kept": total_art if keep else 0.0,
            "count": len(art_sizes),
            "temporary": not keep,
            "how": "estimate: predict_tensor_bits over the quantized tensors + 16 bits for the "
            f"rest; (model, spec) pairs from {pairs_source}",
        },
        "results": {
            "peak": results,
            "kept": results,
            "bytes_per_doc": per_doc,
            "source": per_doc_src,
            "files": len(study.models) * n_specs * len(study.tasks),
        },
    }


def _choose_accelerator(study: Study, opts: PlanOptions, warnings: list[str]) -> Accelerator:
    device = study.config.get("eval", {}).get("device")
    acc = accelerator(opts.accelerator or ("cpu" if device == "cpu" else DEFAULT_ACCELERATOR))
    if device == "cpu" and acc.device != "cpu":
        warnings.append(
            f"the study evaluates on the CPU (eval.device: cpu); planned for {acc.name}"
        )
    return acc


def _usable_cache(cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache_dir


def make_plan(study: Study, config_path: Path, opts: PlanOptions | None = None) -> dict[str, Any]:
    """The plan of ``study`` (read from ``config_path``) as a JSON-ready dict.

    Keys: ``study``, ``accelerator``, ``jobs`` (per rule, from the dry run), ``disk`` (per
    stage), ``stages`` (GPU hours per stage), ``models`` (per model: tokens, FLOPs, hours, layout),
    ``tasks``, ``calibration``, ``assumptions``, ``warnings``, ``timings``. The dry run runs in
    the background while tokens are counted.
    """
    opts = opts or PlanOptions()
    root = opts.repo_root
    t_start = time.perf_counter()
    warnings: list[str] = []
    acc = _choose_accelerator(study, opts, warnings)
    cache_dir = _usable_cache(opts.cache_dir)
    pending = PendingDryRun(config_path, root, cache_dir) if opts.jobs else None

    t0 = time.perf_counter()
    configs = {m: local_config(study, m, root) for m in study.models}
    shapes = {m: model_shape(study, m, root, configs[m]) for m in study.models}
    t_shapes = time.perf_counter() - t0
    tok = plan_tokens(study, opts, configs, cache_dir)
    warnings += [f"task {t}: {why}" for t, why in tok.missing.items()]

    calib = None
    runs_df, runs_path = _runs_table(study, opts)
    if runs_df is not None:
        params = {m: shapes[m].n_params for m in study.models}
        calib = calibrate(runs_df, acc.device, params, str(runs_path))
        if calib is None:
            warnings.append(
                f"{runs_path}: no usable {acc.device} runs (finite, positive wall time and "
                "FLOPs); times are not calibrated"
            )

    def seconds_per_flop(n_params: float) -> float:
        if calib is not None:
            return calib.seconds_per_flop(n_params)
        util = opts.utilisation if opts.utilisation is not None else default_utilisation(n_params)
        return 1.0 / (acc.peak_flops * util)

    dry = pending.result() if pending is not None else None
    if dry is not None and dry.error:
        warnings.append("the dry run failed, no job is counted (see Jobs per rule)")
    by_model, pairs_source = artifact_jobs(study, dry)

    models: dict[str, dict[str, Any]] = {}
    stage_s: dict[str, float] = {}
    stage_jobs: dict[str, int] = {}
    art_sizes: list[float] = []
    for m, shape in shapes.items():
        t_spec = sum(v for (mm, _), v in tok.tokens.items() if mm == m and math.isfinite(v))
        row, st, jobs, arts = model_cost(
            study,
            m,
            shape,
            t_spec,
            seconds_per_flop(shape.n_params),
            by_model.get(m, []),
            acc,
            opts,
        )
        row |= {
            "tokenizer": tok.refs[m].label,
            "tokenizer_short": tok.refs[m].short,
            "tokenizer_exact": tok.refs[m].exact,
            "max_length": tok.lengths[m][0],
            "max_length_source": tok.lengths[m][1],
            "tokens_per_task": {t: tok.tokens[(m, t)] for t in study.tasks},
            "calibrated": calib is not None,
            "extrapolated": bool(calib.extrapolated(shape.n_params)) if calib else False,
        }
        models[m] = row
        for k, v in st.items():
            stage_s[k] = stage_s.get(k, 0.0) + v
        for k, v in jobs.items():
            stage_jobs[k] = stage_jobs.get(k, 0) + v
        art_sizes += arts
        gpus = row["gpus"][row["layout_configured"]]
        if gpus > 1:
            warnings.append(
                f"{m}: {row['weight_bytes'] / 1e9:.0f} GB of weights need {gpus} {acc.name} "
                f"GPUs per job ({row['layout_configured'].replace('_', ' ')}); the workflow's "
                "rules request one"
            )
    stages = {k: {"gpu_h": v / 3600, "jobs": stage_jobs.get(k)} for k, v in stage_s.items()}
    stages["total"] = {"gpu_h": sum(stage_s.values()) / 3600, "jobs": None}
    timings = {"shapes_s": t_shapes, "tokens_s": tok.seconds}
    if dry is not None:
        timings["dry_run_s"] = dry.seconds
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "study": {
            "config": str(config_path),
            "models": len(study.models),
            "specs": len(study.quant_ids),
            "tasks": list(study.tasks),
            "results": study.results,
            "eval_files": len(study.models) * len(study.quant_ids) * len(study.tasks),
            "existing_evals": existing_evals(study, root),
        },
        "accelerator": asdict(acc) | {"utilisation": opts.utilisation},
        "jobs": None if dry is None else _jobs_section(dry),
        "disk": plan_disk(
            study, tok.tasks, models, art_sizes, pairs_source, root, opts.net_bytes_per_s
        ),
        "stages": stages,
        "models": models,
        "tasks": tok.tasks,
        "task_data": tok.data_note,
        "tokenized": tok.tokenized,
        "total_flops": sum(r["flops"] for r in models.values()),
        "calibration": None if calib is None else asdict(calib) | {"text": calib.describe()},
        "assumptions": assumptions(acc, opts, calib),
        "warnings": warnings,
        "timings": timings,
    }


def existing_evals(study: Study, root: Path = REPO_ROOT) -> int:
    """Per-(model, quant, task) evaluation files already on disk (a resumed study's progress)."""
    evals = _resolve(study.results, root) / "evals"
    if not evals.is_dir():
        return 0
    return sum(
        (evals / m / q / f"{t}.parquet").is_file()
        for m in study.models
        for q in study.quant_ids
        for t in study.tasks
    )


def _jobs_section(dry: DryRun) -> dict[str, Any]:
    return {
        "rules": dry.rules,
        "total": dry.total,
        "gpu_jobs": dry.gpu_jobs,
        "runtime_h": {k: v / 60 for k, v in dry.runtime_min.items()},
        "cached": dry.cached,
        "command": dry.command,
        "error": dry.error,
    }


def assumptions(acc: Accelerator, opts: PlanOptions, calib: Calibration | None) -> list[str]:
    """The constants behind the plan, in words."""
    util = (
        f"fixed utilisation {opts.utilisation:g}"
        if opts.utilisation is not None
        else f"utilisation {U_REF:g} x (P/{P_REF:.2g})^{U_EXPONENT:g} "
        f"clipped to [{U_MIN:g}, {U_MAX:g}]"
    )
    rate = (
        calib.describe() if calib else f"{acc.name} peak {acc.peak_flops / 1e12:g} TFLOP/s x {util}"
    )
    return [
        f"scoring: FLOPs = 2 x P_matmul x T; seconds = FLOPs x s/FLOP, {rate}",
        f"each GPU job: {JOB_START_S:g} s start (imports, CUDA, requests) + load = checkpoint "
        f"bytes / {opts.disk_bytes_per_s / 1e9:g} GB/s + weights / "
        f"{HOST_TO_DEVICE_BYTES_PER_S / 1e9:g} GB/s",
        f"batch-size search: a job with {BATCH_SEARCH_S:g} s of search after the load",
        f"quantization per spec: {QUANTIZE_FIXED_S:g} s + P x {QUANTIZE_BYTES_PER_PARAM:g} B / "
        f"{acc.memory_bytes_per_s / 1e12:g} TB/s; GPTQ adds {GPTQ_CALIBRATION_TOKENS} calibration "
        "tokens and its column updates at the scoring rate",
        f"memory: weights x {MEMORY_MARGIN:g} per GPU of {acc.memory_bytes / 1e9:g} GB; one job "
        "for all specs keeps a second copy of the weights to restore between specs",
        f"downloads at {opts.net_bytes_per_s / 1e6:g} MB/s (network, not GPU time)",
        "not modelled: CPU rules (aggregate, fit, figures, claims, preparation), queueing, retries",
    ]


# ============================================================================ rendering
def _fmt_bytes(b: float | None) -> str:
    if b is None or not math.isfinite(b):
        return "n.a."
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _fmt_h(h: float | None) -> str:
    if h is None or not math.isfinite(h):
        return "n.a."
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h"


def _fmt_n(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n.a."
    return f"{x:.3g}" if abs(x) >= 1e4 or x != int(x) else f"{int(x):,}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    """Markdown table lines; ``align``: one character per column, l or r."""
    seps = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(seps) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _md_jobs(jobs: Mapping[str, Any] | None) -> list[str]:
    out = ["## Jobs per rule", ""]
    if jobs is None:
        return [*out, "(dry run skipped)", ""]
    if jobs["error"]:
        said = "\n".join(f"    {ln}" for ln in jobs["error"].splitlines()[:6])
        return [*out, "The dry run failed, so no job is counted:", "", said, ""]
    rows = [
        [
            rule,
            f"{n:,}",
            f"{jobs['gpu_jobs'].get(rule, 0):,}",
            _fmt_h(jobs["runtime_h"][rule]) if rule in jobs["runtime_h"] else "",
        ]
        for rule, n in jobs["rules"].items()
    ]
    rows.append(["**total**", f"**{jobs['total']:,}**", "", ""])
    header = ["rule", "jobs", "GPU jobs", "runtime limits requested (sum)"]
    cached = " (cached result)" if jobs["cached"] else ""
    return [
        *out,
        *_md_table(header, rows, "lrrr"),
        "",
        f"From Snakemake's dry run of the whole study{cached}: `{jobs['command']}`.",
        "",
    ]


def _md_disk(d: Mapping[str, Any]) -> list[str]:
    art, res = d["artifacts"], d["results"]
    kept_art = _fmt_bytes(art["kept"]) + (" (temporary)" if art["temporary"] else "")
    per_doc = ", ".join(
        f"{t} {v:.3g}" + ("" if res["source"][t] == "constant" else " (measured)")
        for t, v in res["bytes_per_doc"].items()
    )
    rows = [
        [
            "downloads",
            _fmt_bytes(d["downloads"]["peak"]),
            _fmt_bytes(d["downloads"]["kept"]),
            "parameters x checkpoint bytes per parameter (measured when local); "
            f"{_fmt_h(d['downloads']['hours'])} of downloading",
        ],
        [
            f"packed artifacts ({art['count']:,})",
            f"{_fmt_bytes(art['peak_min'])} .. {_fmt_bytes(art['peak_max'])}",
            kept_art,
            art["how"],
        ],
        [
            f"results ({res['files']:,} per-document files)",
            _fmt_bytes(res["peak"]),
            _fmt_bytes(res["kept"]),
            f"{RESULT_FILE_OVERHEAD_BYTES / 1e3:.1f} kB per file + bytes per document: {per_doc}",
        ],
    ]
    note = (
        "Artifact peak: at least the largest one (each is deleted once its evaluations are "
        "done), at most all of them (if every quantize job ran before any evaluation)."
    )
    return ["## Disk", "", *_md_table(["stage", "peak", "kept", "how"], rows, "lrrl"), "", note, ""]


_STAGE_NAMES = {
    "batch_size": "batch-size search (one job per model)",
    "quantize": "packed artifacts (quantize jobs)",
    "eval_start_load": "evaluation jobs: start + model load",
    "eval_quantize": "evaluation jobs: in-place quantization",
    "scoring": "evaluation: scoring (FLOP-based)",
    "total": "**total**",
}


def _md_stages(plan: Mapping[str, Any]) -> list[str]:
    acc = plan["accelerator"]
    unit = "device" if acc["device"] == "cpu" else "GPU"
    rows = [
        [_STAGE_NAMES.get(k, k), "" if v["jobs"] is None else f"{v['jobs']:,}", _fmt_h(v["gpu_h"])]
        for k, v in plan["stages"].items()
    ]
    models = plan["models"].values()
    best = sum(min(r["layout_gpu_h"].values()) for r in models)
    configured = sum(r["configured_gpu_h"] for r in models)
    calib = plan["calibration"]
    how = calib["text"] if calib else "not calibrated (no runs table): the default utilisation"
    return [
        f"## {unit} hours per stage ({acc['name']})",
        "",
        *_md_table(["stage", "jobs", f"{unit} hours"], rows, "lrr"),
        "",
        f"Scoring: {plan['total_flops']:.3g} FLOPs; {how}. Evaluation as configured "
        f"{_fmt_h(configured)}; with the cheaper layout of each model (below) {_fmt_h(best)}.",
        "",
    ]


def _md_models(plan: Mapping[str, Any]) -> list[str]:
    rows = []
    for m, r in plan["models"].items():
        est = "" if r["shape_exact"] else "~"
        gpus = r["gpus"][r["layout_configured"]]
        flag = " (extrapolated)" if r["extrapolated"] else ""
        rows.append(
            [
                m,
                _fmt_n(r["params"]),
                est + _fmt_n(r["matmul_params"]),
                f"{est}{r['quantized_fraction']:.0%}",
                _fmt_n(r["tokens_per_spec"]),
                r["tokenizer_short"],
                str(r["max_length"]),
                _fmt_h(r["scoring_gpu_h"]) + flag,
                f"{_fmt_h(r['configured_gpu_h'])} ({r['layout_configured'].replace('_', ' ')})",
                _fmt_h(r["layout_gpu_h"]["per_spec"]),
                _fmt_h(r["layout_gpu_h"]["per_model"]),
                r["cheaper_layout"].replace("_", " "),
                str(gpus),
            ]
        )
    header = [
        "model",
        "params",
        "P_matmul",
        "quantized",
        "T / spec",
        "tokenizer",
        "max_length",
        "scoring",
        "configured",
        "per spec",
        "per model",
        "cheaper",
        "GPUs/job",
    ]
    return [
        "## Per model (GPU hours)",
        "",
        *_md_table(header, rows, "lrrrrlrrrrrlr"),
        "",
        "T / spec: tokens one spec feeds through the model, all tasks. per spec: one job per "
        "(model, spec) evaluating all tasks; per model: all specs in one job (one load, twice the "
        "weight memory); configured: the layout eval.batched_max_params chooses, with its "
        "artifact jobs (batch-size search not included). ~: estimated shape.",
        "",
    ]


def _md_tokens(plan: Mapping[str, Any]) -> list[str]:
    groups: dict[tuple[str, int], list[str]] = {}
    for m, r in plan["models"].items():
        groups.setdefault((r["tokenizer_short"], r["max_length"]), []).append(m)
    header = ["task", "documents", "limit"] + [f"{tok} @{ml}" for tok, ml in groups]
    rows = []
    for t, info in plan["tasks"].items():
        docs = "n.a." if info.get("docs") is None else f"{info['docs']:,}"
        lim = "all" if info["limit"] is None else str(info["limit"])
        vals = [_fmt_n(plan["models"][ms[0]]["tokens_per_task"][t]) for ms in groups.values()]
        rows.append([t, docs, lim, *vals])
    labels = {r["tokenizer_short"]: r["tokenizer"] for r in plan["models"].values()}
    used = [f"- {tok} @{ml}: {', '.join(ms)}; {labels[tok]}" for (tok, ml), ms in groups.items()]
    return [
        "## Tokens fed per task (per spec)",
        "",
        f"Task data: {plan['task_data']}.",
        "",
        *_md_table(header, rows, "lrr" + "r" * len(groups)),
        "",
        *used,
        "",
    ]


def plan_markdown(plan: Mapping[str, Any]) -> str:
    """The plan as markdown tables, in the order a researcher reads it."""
    st, acc = plan["study"], plan["accelerator"]
    done = st.get("existing_evals")
    out = [
        f"# Plan of {st['config']}",
        "",
        f"{st['models']} models x {st['specs']} specs x {len(st['tasks'])} tasks "
        f"({', '.join(st['tasks'])}) on {acc['name']} ({acc['peak_flops'] / 1e12:g} TFLOP/s "
        f"dense 16-bit peak, {acc['memory_bytes'] / 1e9:g} GB)."
        + (f" Evaluation files already on disk: {done:,} of {st['eval_files']:,}." if done else ""),
        "",
        *_md_jobs(plan.get("jobs")),
        *_md_disk(plan["disk"]),
        *_md_stages(plan),
        *_md_models(plan),
        *_md_tokens(plan),
        "## Assumptions",
        "",
        *[f"- {a}" for a in plan["assumptions"]],
    ]
    if plan["warnings"]:
        out += ["", "## Warnings", "", *[f"- {w}" for w in plan["warnings"]]]
    tm = plan["timings"]
    out += ["", "Planned in " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in tm.items()) + "."]
    return "\n".join(out) + "\n"


def plan_json(plan: Mapping[str, Any]) -> str:
    """The plan as JSON (non-finite numbers as null: never silently a number)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    return json.dumps(clean(plan), indent=1, default=str)
