"""``kbit plan``: job counts, token counts, FLOPs, calibration, artifact sizes, bad configs.

Token counts are checked against lm-eval's own ``HFLM`` on tiny models: its requests are built
and tokenized by lm-eval, and the rows it would feed are grouped by lm-eval's own ``Collator``.
Tests on the real task files skip when the shared data folder is absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from models import shared_data_dir, tiny_model, tiny_model_dir, tiny_tokenizer

from kbit import plan
from kbit.cli import main
from kbit.study import build_study, load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "config" / "smoke.yaml"
EVAL_DATA = shared_data_dir() / "eval"
needs_data = pytest.mark.skipif(
    not EVAL_DATA.is_dir(), reason=f"shared task data not found at {EVAL_DATA}"
)
TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]


# ---------------------------------------------------------------------------- jobs
def _direct_job_table(config: Path) -> dict[str, int]:
    """Snakemake's job-count table, read straight off its output (independent parser)."""
    args = ["-n", "--quiet", "rules", "--forceall", "--configfile", str(config)]
    out = subprocess.run(
        [*plan.snakemake_executable(ROOT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    text = out.stdout + out.stderr
    block = text.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^(\w+)\s+(\d+)$", block, flags=re.M)
    return {name: int(n) for name, n in rows}


def test_job_counts_of_smoke_equal_a_direct_dry_run_and_are_cached(tmp_path):
    direct = _direct_job_table(SMOKE)
    dry = plan.PendingDryRun(SMOKE, ROOT, cache_dir=tmp_path).result()
    assert dry.error is None and not dry.cached
    assert dry.rules == {k: v for k, v in direct.items() if k != "total"}
    assert dry.total == direct["total"] == sum(dry.rules.values())
    # the quantize jobs' outputs name the (model, spec) artifacts
    study = load_study(SMOKE)
    jobs, source = plan.artifact_jobs(study, dry)
    assert source == "the dry run's jobs"
    specs = [q for per_model in jobs.values() for job in per_model for q in job]
    assert specs and set(jobs) <= set(study.models) and set(specs) <= set(study.quant_ids)
    assert sum(len(v) for v in jobs.values()) <= len(specs)  # a job may write several
    # cached with the sources the dry run imported, and reused while they are unchanged
    deps = json.loads(next(tmp_path.glob("dryrun-*.json")).read_text())["deps"]
    assert str(ROOT / "kbit" / "study.py") in deps  # the Snakefile builds the study
    assert not any("kernels" in d or "site-packages" in d for d in deps)
    again = plan.PendingDryRun(SMOKE, ROOT, cache_dir=tmp_path).result()
    assert again.cached and (again.rules, again.total) == (dry.rules, dry.total)
    assert plan.artifact_jobs(study, again)[0] == jobs


def test_a_cached_dry_run_is_invalid_once_an_imported_source_changes(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("x = 1\n")
    recorded = {"deps": plan._digests([str(source)]), "result": {}}
    assert plan.PendingDryRun.valid(recorded)
    source.write_text("x = 2\n")
    assert not plan.PendingDryRun.valid(recorded)
    source.unlink()
    assert not plan.PendingDryRun.valid(recorded)


def test_dry_run_parser_reads_table_blocks_and_resources():
    text = """Building DAG of jobs...
Job stats:
job          count
---------  -------
download         2
evaluate         3
all              1
total            6

[Mon Nov 30 10:14:29 2026]
rule evaluate:
    input: resources/models/a
    output: results/quantized/a/int4-b64, results/x.json
    wildcards: model=a, quant=int4-b64
    resources: tmpdir=/tmp, gpu=1, mem_mb=5000, runtime=30
Shell command: None

[Mon Nov 30 10:14:29 2026]
localrule download:
    output: resources/models/a
    resources: tmpdir=/tmp

Job stats:
job          count
---------  -------
download         9
total            9
"""
    dr = plan.parse_dry_run(text)
    assert dr.rules == {"download": 2, "evaluate": 3, "all": 1}  # the first table only
    assert dr.total == 6
    assert dr.gpu_jobs == {"evaluate": 1}
    assert dr.runtime_min == {"evaluate": 30.0}
    assert dr.artifact_jobs == [["results/quantized/a/int4-b64"]]
    with pytest.raises(ValueError, match="Job stats"):
        plan.parse_dry_run("no table here")


# ---------------------------------------------------------------------------- FLOPs and time
def test_flops_and_times_scale_linearly_with_parameters_and_tokens():
    assert plan.eval_flops(2e9, 1e6) == 2 * plan.eval_flops(1e9, 1e6) == 4e15
    assert plan.eval_flops(1e9, 3e6) == 3 * plan.eval_flops(1e9, 1e6)
    study = load_study(SMOKE)
    opts = plan.PlanOptions(repo_root=ROOT)
    acc = plan.accelerator("h100")
    spf = 1.0 / (acc.peak_flops * 0.3)  # a fixed rate: time must follow the FLOPs exactly

    def scoring(p: float, t: float) -> float:
        shape = plan.ModelShape(p, p, [(int(p), 1000, 1000, False)], "test", True)
        return plan.model_cost(study, "tiny-opt-s", shape, t, spf, [], acc, opts)[0][
            "scoring_gpu_h"
        ]

    base = scoring(1e9, 1e6)
    assert base == pytest.approx(len(study.quant_ids) * 2e15 * spf / 3600, rel=1e-12)
    assert scoring(2e9, 1e6) == pytest.approx(2 * base, rel=1e-12)
    assert scoring(1e9, 5e6) == pytest.approx(5 * base, rel=1e-12)
    # the uncalibrated default rate grows with size (small models cannot fill a GPU), capped
    u = [plan.default_utilisation(p) for p in (1e7, 1.6e8, 1.4e9, 1.76e11)]
    assert u == sorted(u) and u[0] >= plan.U_MIN and u[-1] == plan.U_MAX
    assert plan.default_utilisation(plan.P_REF) == pytest.approx(plan.U_REF)


def test_layouts_one_load_per_model_is_cheaper_unless_memory_forbids():
    study = load_study(SMOKE)
    opts = plan.PlanOptions(repo_root=ROOT)
    acc = plan.accelerator("h100")
    small = plan.ModelShape(1e9, 1e9, [(10**9, 1000, 1000, False)], "t", True)
    row = plan.model_cost(study, "tiny-opt-s", small, 1e6, 1e-15, [], acc, opts)[0]
    loads = (len(study.quant_ids) - 1) * (plan.JOB_START_S + row["load_s"])
    saved = (row["layout_gpu_h"]["per_spec"] - row["layout_gpu_h"]["per_model"]) * 3600
    assert row["cheaper_layout"] == "per_model" and saved > 0.9 * loads
    # 15B parameters: 60 GB of float32 weights (the smoke study's dtype) fit one H100, two
    # copies do not
    big = plan.ModelShape(1.5e10, 1.5e10, [(15 * 10**9, 1000, 1000, False)], "t", True)
    row = plan.model_cost(study, "tiny-opt-s", big, 1e9, 1e-15, [], acc, opts)[0]
    assert row["weight_bytes"] == 6e10
    assert row["gpus"] == {"per_spec": 1, "per_model": 2}
    assert row["cheaper_layout"] == "per_spec"  # long scoring on twice the GPUs: per spec wins
    row = plan.model_cost(study, "tiny-opt-s", big, 1e3, 1e-15, [], acc, opts)[0]
    assert row["cheaper_layout"] == "per_model"  # loads dominate: one load wins even so


# ---------------------------------------------------------------------------- calibration
def _runs(params, c, b, n=6, noise=0.0, seed=0, device="cuda"):
    rng = np.random.default_rng(seed)
    rows = []
    for p in params:
        for flops in rng.uniform(1e14, 1e16, n):
            wall = flops * c * p**b * math.exp(rng.normal(0, noise) if noise else 0.0)
            rows.append({"model": f"m{p:g}", "n_params": p, "flops": flops, "wall_time_s": wall})
    df = pd.DataFrame(rows)
    df["device"] = device
    return df


def test_calibration_recovers_a_known_seconds_per_flop():
    c, b = 3e-9, -0.4
    runs = _runs([1e8, 4e8, 1.4e9], c, b)
    cal = plan.calibrate(runs, "cuda", path="synthetic")
    assert cal.b == pytest.approx(b, abs=1e-9)
    assert cal.seconds_per_flop(7e8) == pytest.approx(c * 7e8**b, rel=1e-9)
    assert cal.rms_log == pytest.approx(0.0, abs=1e-9)
    assert (cal.n_runs, cal.n_models, cal.n_dropped) == (18, 3, 0)
    assert not cal.extrapolated(7e8) and cal.extrapolated(1e11)
    # size-independent data must give a flat fit, not the previous slope
    flat = plan.calibrate(_runs([1e8, 1.4e9], 2e-15, 0.0), "cuda")
    assert flat.b == pytest.approx(0.0, abs=1e-9)
    assert flat.seconds_per_flop(1e10) == pytest.approx(2e-15, rel=1e-9)


def test_calibration_reports_noise_drops_bad_rows_and_other_devices():
    noisy = _runs([1e8, 4e8, 1.4e9], 1e-14, 0.0, n=200, noise=0.2, seed=1)
    bad = noisy.iloc[:3].copy()
    bad["wall_time_s"] = [np.nan, 0.0, np.inf]
    other = _runs([1e8], 1.0, 0.0, device="cpu")
    cal = plan.calibrate(pd.concat([noisy, bad, other]), "cuda")
    assert cal.n_runs == 600 and cal.n_dropped == 3
    assert cal.rms_log == pytest.approx(0.2, rel=0.15)  # the error is reported, not hidden
    assert abs(cal.b) < 0.05
    one_size = plan.calibrate(_runs([4e8], 5e-15, 0.0), "cuda")
    assert one_size.b == 0.0 and one_size.seconds_per_flop(1e12) == pytest.approx(5e-15)
    assert plan.calibrate(other, "cuda") is None  # nothing recorded on that device
    # model names are looked up when the table has no parameter counts
    named = _runs([2e8], 1e-15, 0.0).drop(columns="n_params")
    assert plan.calibrate(named, "cuda", params={"m2e+08": 2e8}).n_runs == 6


# ---------------------------------------------------------------------------- tokens
class _Captured:
    """lm-eval's HFLM that records the rows it would feed instead of running the model."""

    def __new__(cls, model, tokenizer, max_length=None):
        from lm_eval.models.huggingface import HFLM
        from lm_eval.models.utils import Collator

        class Capturing(HFLM):
            fed = 0

            def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                coll = Collator(
                    requests,
                    sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                    group_by="contexts",
                    group_fn=lambda r: r[-2] + r[-1][:-1],
                )
                for batch in coll.get_batched(n=self.batch_size):
                    for _, ctx, cont in batch:
                        self.fed += len((ctx + cont)[-(self.max_length + 1) :][:-1])
                return [(0.0, False)] * len(requests)

        return Capturing(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=max_length)


def _lm_eval_fed(lm, task, limit):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    lm.fed = 0
    insts = task.instances
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        lm.loglikelihood_rolling(insts, disable_tqdm=True)
    else:
        lm.loglikelihood(insts, disable_tqdm=True)
    return lm.fed


@pytest.fixture(scope="module")
def prepared_tasks(tmp_path_factory):
    from kbit.evaluation.tasks import load_tasks, prepare_tasks

    work = tmp_path_factory.mktemp("tasks")
    prepare_tasks(TASKS, EVAL_DATA, work)
    return work, load_tasks(TASKS, work)["tasks"]


@needs_data
@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
def test_token_counts_equal_lm_eval_requests_on_a_tiny_model(arch, tmp_path, prepared_tasks):
    from transformers import AutoTokenizer

    _, tasks = prepared_tasks
    model_dir = tiny_model_dir(arch, tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    enc = plan.Encoder(plan.TokenizerRef("model", str(model_dir), "model"))
    limits = {"wikitext": 2}
    for max_length in (None, 64):  # the model's window, and one that cuts windows and rows
        lm = _Captured(tiny_model(arch), tok, max_length)
        for name in TASKS:
            limit = limits.get(name, 6)
            want = _lm_eval_fed(lm, tasks[name], limit)
            req = plan.requests_of(tasks[name], name, limit=limit)
            counts = plan.count_tokens(req, enc)
            assert counts.n_docs == limit
            assert counts.fed_tokens(limit, lm.max_length) == want > 0, (name, max_length)
    # the shared family tokenizer file gives the same counts as the model's saved copy
    if arch == "gpt_neox":
        family = plan.choose_tokenizer(
            load_study(SMOKE), "tiny-neox-s", [shared_data_dir() / "tokenizers"], root=ROOT
        )
        fenc = plan.Encoder(family)
        req = plan.requests_of(tasks["piqa"], "piqa", limit=6)
        assert plan.count_tokens(req, fenc).fed_tokens(6, 2048) == plan.count_tokens(
            req, enc
        ).fed_tokens(6, 2048)


@needs_data
def test_bos_emulation_matches_a_tokenizer_that_adds_bos(tmp_path, prepared_tasks):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    _, tasks = prepared_tasks
    gpt2 = shared_data_dir() / "tokenizers" / "gpt2"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(gpt2 / "tokenizer.json"))
    tok.backend_tokenizer.no_truncation()
    eos = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", special_tokens=[(eos, 50256)]
    )
    tok.bos_token = tok.eos_token = eos
    assert tok.encode("a b")[0] == 50256  # this tokenizer adds a BOS, like OPT's
    lm = _Captured(tiny_model("opt"), tok, 128)
    enc = plan.Encoder(plan.TokenizerRef("gpt2", str(gpt2), "family", add_bos=True))
    for name, limit in (("lambada_openai", 5), ("winogrande", 5), ("wikitext", 1)):
        want = _lm_eval_fed(lm, tasks[name], limit)
        counts = plan.count_tokens(plan.requests_of(tasks[name], name, limit=limit), enc)
        assert counts.with_bos().fed_tokens(limit, 128) == want
        # without the emulation: one token fewer per request (windows may round it away)
        assert counts.fed_tokens(limit, 128) < want or counts.rolling


@needs_data
def test_tokens_equal_those_the_runner_fed_on_an_h100(tmp_path):
    # benchmarks/results/eval_h100.json: the workflow's scoring of a Pythia-1.4B-shaped model
    # (GPT-NeoX-20B tokenizer, window 2048) fed 856,131 tokens per spec, first 1500 documents
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["models"] = {"pythia-1.4b": cfg["models"]["pythia-1.4b"]}
    cfg["eval"]["limit"] = 1500
    study = build_study(cfg)
    opts = plan.PlanOptions(data_dir=EVAL_DATA, cache_dir=None, repo_root=ROOT)
    tok = plan.plan_tokens(study, opts, {"pythia-1.4b": None}, None)
    assert tok.refs["pythia-1.4b"].short == "gpt-neox-20b"
    assert tok.lengths["pythia-1.4b"][0] == 2048
    assert sum(tok.tokens.values()) == 856_131


@needs_data
@pytest.mark.parametrize(("arch", "width"), [("gpt2", 1024), ("gpt_neox", 2048)])
def test_window_task_tokens_equal_its_windows(arch, width):
    windows = pytest.importorskip("kbit.evaluation.windows")
    task = windows.window_task(windows.DEFAULT_NAME, EVAL_DATA)
    model = tiny_model(arch)
    want = task.windows(tiny_tokenizer(arch), model).numel()
    folder = "gpt2" if arch == "gpt2" else "gpt-neox-20b"
    enc = plan.Encoder(plan.TokenizerRef(arch, str(shared_data_dir() / "tokenizers" / folder), "x"))
    req = plan.TaskRequests(task.name, plan.WINDOW_OUTPUT, 1, "", 1, [0], [""], [task.text])
    counts = plan.count_tokens(req, enc)
    assert counts.fed_tokens(None, width) == want > 100 * width
    assert counts.fed_tokens(3, width) == 3 * width  # the first three windows


def test_fed_tokens_share_rows_with_the_same_input_and_truncate():
    counts = plan.TokenCounts(
        "t",
        False,
        3,
        doc=np.array([0, 0, 1, 2]),
        length=np.array([10, 10, 7, 50]),
        key=np.array([1, 1, 2, 3]),
        special=np.ones(4, bool),
        total_docs=3,
    )
    assert counts.fed_tokens(None, 100) == 10 + 7 + 50  # rows 0 and 1 are one forward row
    assert counts.fed_tokens(2, 100) == 17
    assert counts.fed_tokens(None, 20) == 10 + 7 + 20
    distinct = plan.TokenCounts(
        "t", False, 3, counts.doc, counts.length, np.arange(4), counts.special, 3
    )
    assert distinct.fed_tokens(None, 100) == 77
    partial = plan.TokenCounts(
        "t", False, 1, counts.doc, counts.length, counts.key, counts.special, 3
    )
    with pytest.raises(ValueError, match="documents counted"):
        partial.fed_tokens(None, 100)
    # rolling windows: a document of n <= L tokens feeds n, each later window feeds L
    assert plan.rolling_fed_tokens(100, 2048) == 100
    assert plan.rolling_fed_tokens(2049, 2048) == 2048 + 2048
    assert plan.rolling_fed_tokens(5000, 1024) == 1024 * 5


def test_byte_estimate_without_any_tokenizer(tmp_path):
    study = load_study(ROOT / "config" / "config.yaml")  # hub models, not downloaded under tmp
    given = plan.choose_tokenizer(study, "pythia-70m", [], {"*": "x"}, tmp_path)
    assert given.kind == "override" and given.exact
    ref = plan.choose_tokenizer(study, "pythia-70m", [], {}, tmp_path)
    assert ref.kind == "bytes" and not ref.exact and "estimate" in ref.short
    req = plan.TaskRequests("t", "multiple_choice", 2, "", 2)
    req.doc_ids = [0, 0, 1]
    req.contexts = ["Question: abcd", "Question: abcd", "Question: wxyz"]
    req.continuations = [" yes", " no!", " yes"]  # the same lengths, different strings
    counts = plan.count_tokens(req, plan.Encoder(ref))
    per_row = math.ceil(len(b"Question: abcd yes") / plan.BYTES_PER_TOKEN) - 1
    assert counts.fed_tokens(None, 2048) == 3 * per_row  # three rows, none merged


# ---------------------------------------------------------------------------- shapes, artifacts
@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_exact_shape_and_artifact_bits_equal_quantize_model(arch):
    from kbit.accounting import summarize
    from kbit.evaluation.runner import matmul_params
    from kbit.model_quant import quantize_model
    from kbit.spec import QuantSpec

    model = tiny_model(arch)
    shape = plan.shape_from_config(model.config, {}, "tiny")
    assert shape.matmul_params == matmul_params(model)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    for spec_id in ("int4-b64", "float3-e2-bt-o0.02", "nf4-b128"):
        spec = QuantSpec.parse(spec_id)
        fresh = tiny_model(arch)
        summary = summarize(quantize_model(fresh, spec))
        assert shape.quantized_params == summary["n_params_quantized"]
        assert plan.artifact_bits(shape, spec) == summary["total_bits"], spec_id
    assert plan.artifact_bits(shape, QuantSpec.parse("fp16")) == 16 * shape.n_params


def test_outlier_columns_equal_the_quantizer_s():
    from kbit.model_quant import n_outlier_columns

    for p in (0.0, 0.005, 0.02, 0.1, 0.5):
        for n in (1, 7, 64, 150, 768, 4096, 5120):
            assert plan.outlier_columns(p, n) == (n_outlier_columns(p, n) if p else 0)


def test_estimated_shape_is_close_for_a_known_model():
    # Pythia-1.4B: 1.41e9 parameters, 24 layers of width 2048 + two 50304 x 2048 embeddings;
    # linear weights 24 * 12 * 2048^2 + 50304 * 2048 = 1.31e9
    shape = plan.estimate_shape(1.41e9, "pythia", {})
    assert not shape.exact
    assert shape.matmul_params == pytest.approx(1.31e9, rel=0.1)
    assert shape.quantized_params / shape.n_params == pytest.approx(1.21e9 / 1.41e9, rel=0.1)


# ---------------------------------------------------------------------------- the command
def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["eval"]["dtype"] = "float8"
    assert main(["plan", str(_write(tmp_path / "bad.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "eval.dtype" in err and "float8" in err
    cfg = yaml.safe_load(SMOKE.read_text())
    del cfg["models"]["tiny-opt-s"]["family"]
    assert main(["plan", str(_write(tmp_path / "bad2.yaml", cfg))]) == 2
    assert "models.tiny-opt-s" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_dry_run_still_plans_and_exits_1(tmp_path, capsys):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data_dir"] = str(tmp_path / "nowhere")  # valid config, but the workflow cannot run
    path = _write(tmp_path / "nodata.yaml", cfg)
    assert main(["plan", str(path), "--no-cache"]) == 1
    cap = capsys.readouterr()
    assert "the dry run failed" in cap.err and "The dry run failed" in cap.out
    assert "## Per model" in cap.out and "no local data" not in cap.out
    assert "not prepared" in cap.out  # the tasks without data are named, not counted


@needs_data
def test_plan_command_json_calibrated_by_a_runs_table(tmp_path, capsys):
    study = load_study(SMOKE)
    runs = _runs([1.7e6, 6.6e6], 2e-10, 0.0, device="cpu")
    runs.to_parquet(tmp_path / "runs.parquet")
    args = ["plan", str(SMOKE), "--no-jobs", "--format", "json", "--runs"]
    args += [str(tmp_path / "runs.parquet"), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"]["n_runs"] == 12 and out["accelerator"]["name"] == "cpu"
    for m, row in out["models"].items():
        assert row["calibrated"] and row["seconds_per_flop"] == pytest.approx(2e-10)
        assert row["tokens_per_spec"] == sum(row["tokens_per_task"].values()) > 0
        assert row["flops"] == pytest.approx(
            len(study.quant_ids) * 2 * row["matmul_params"] * row["tokens_per_spec"]
        )
        assert row["tokenizer_exact"] and row["shape_exact"], m
    assert out["tasks"]["wikitext"]["docs"] == 2 and out["tasks"]["piqa"]["docs"] == 20
    assert out["disk"]["results"]["files"] == 4 * len(study.quant_ids) * 5
    # a second plan reads every token count from the cache
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["tokenized"] == []
