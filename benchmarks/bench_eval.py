"""Evaluation throughput: the workflow's batched evaluation against lm-eval's command line.

For each Pythia-shaped model (random weights, the GPT-NeoX tokenizer, the real task files):

* ``lm_eval`` CLI, one process, all five tasks, fp16, a fixed batch size: the cost of evaluating
  one quantization config the plain way (process start, model load and data loading included);
* the workflow's batched job (``evaluate_specs``), one process, all specs x all tasks: the cost
  per spec is its wall time divided by the number of specs (start-up, load, quantization,
  request building and tokenization amortised);
* the FLOP limit: ``2 * P_matmul * T / peak`` with T the tokens fed through the model and the peak
  measured in the same run with an 8192^3 fp16 torch.matmul;
* the batch size: ``--batch-size auto`` (default) runs the workflow's search
  (``choose_batch_size``, the largest batch lm-eval's own HFLM fits) once per model in a separate
  process, and both sides use that number.

Both processes are timed from outside (wall clock of the subprocess). The fp16 results of the two
paths are compared task by task (they evaluate the same documents; the CLI pools all tasks into
shared batches, so last-bit differences between the two are possible on a GPU).

Fidelity check (``--check``, default on): a third process evaluates the fp16 model in-process the
way the CLI does (all tasks in one ``evaluate`` call, so the same batches) through the workflow's
scoring, fast (``FastLM``) and plain (lm-eval's own HFLM loop), and compares every document's
log-likelihoods and greedy flags with the CLI's logged samples.

Usage::

    python benchmarks/bench_eval.py --data DIR --out DIR [--models 160m,1.4b] [--limit N]
        [--batch-size auto|N] [--specs fp16,int4-b64,...] [--modes graphs,eager] [--no-check]

``--data`` holds ``eval/`` (the original task files) and ``tokenizers/gpt-neox-20b/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]
#: GPTNeoXConfig fields of EleutherAI/pythia-160m and pythia-1.4b (config.json on the hub)
PYTHIA = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "160m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "1.4b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16},
}


def random_pythia(size: str) -> torch.nn.Module:
    """A random-weight fp16 GPT-NeoX with Pythia's shapes (seed 0), on the GPU if there is one."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = PYTHIA[size]
    config = GPTNeoXConfig(
        vocab_size=50304,
        intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return GPTNeoXForCausalLM(config).to(torch.float16)


def build_model(size: str, tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    """``random_pythia(size)`` saved (fp16, safetensors) with the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    model = random_pythia(size)
    model.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "20B_tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return out, n


def peak_flops(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Dense matmul FLOP/s of this device (mean of ``reps`` products after 3 warm-ups)."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()  # leave the memory to the timed processes
    return rate


def run_timed(cmd: list[str], log_file: Path, timeout: int, done: Path | None = None) -> float:
    """Wall seconds of a subprocess; its output goes to ``log_file``.

    A failure after ``done`` exists (lm-eval writes its results before printing its summary
    table, which needs optional packages) is logged and tolerated.
    """
    t0 = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and done is not None and any(done.rglob("results_*.json")):
        print(f"note: {cmd[:4]}... exited {proc.returncode} after writing its results", flush=True)
        return wall
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{cmd[:4]}... failed ({proc.returncode}):\n{tail}")
    return wall


def batched_worker(args: argparse.Namespace) -> None:
    """The workflow's batched job (what workflow/scripts/evaluate.py runs for small models)."""
    from kbit.logs import setup_logging
    from kbit.evaluation.runner import evaluate_specs
    from kbit.evaluation.tasks import load_tasks
    from kbit.settings import EvalSettings

    setup_logging(None)
    specs = args.specs.split(",")
    out = Path(args.out)
    paths = {(q, t): out / q / f"{t}.parquet" for q in specs for t in TASKS}
    evaluate_specs(
        args.model_dir,
        specs,
        load_tasks(TASKS, args.tasks_dir),
        paths,
        {"model": Path(args.model_dir).name, "hf_id": None, "revision": None, "family": "pythia"},
        batch_size=args.batch_size,
        settings=EvalSettings.from_config({"device": args.device, "limit": args.limit}),
        # auto: no option, so the job's GraphPolicy measures and decides (the workflow default)
        lm_options=None if args.graphs == "auto" else {"cuda_graphs": args.graphs == "on"},
    )


def find_batch_worker(args: argparse.Namespace) -> None:
    """The workflow's batch-size search (what workflow/scripts/batch_size.py runs)."""
    from kbit.logs import setup_logging
    from kbit.evaluation.batch_size import choose_batch_size
    from kbit.settings import EvalSettings

    setup_logging(None)
    settings = EvalSettings.from_config({"device": args.device})
    info = choose_batch_size(args.model_dir, "auto", settings)
    Path(args.out).write_text(json.dumps(info))


def _cli_samples(cli_out: Path) -> dict[str, dict[int, tuple[list[float], list[bool]]]]:
    """Per task, doc id -> (log-likelihoods, greedy flags) from the CLI's logged samples."""

    def flag(x: object) -> bool:
        return x is True or x == "True"

    out = {}
    for task in TASKS:
        (f,) = cli_out.rglob(f"samples_{task}_*.jsonl")
        docs = {}
        for line in f.read_text().splitlines():
            s = json.loads(line)
            resps = s["filtered_resps"]
            if isinstance(resps[0], list):
                docs[int(s["doc_id"])] = ([float(r[0]) for r in resps], [flag(r[1]) for r in resps])
            else:
                docs[int(s["doc_id"])] = ([float(resps[0])], [])
        out[task] = docs
    return out


def compare_docs(frames: dict, cli: dict) -> dict:
    """Max |ll difference|, documents with any ll difference, greedy-flag differences."""
    max_abs, ll_docs, greedy, n_docs, n_ll = 0.0, 0, 0, 0, 0
    per_task = {}
    for task in TASKS:
        df, ref = frames[task], cli[task]
        t_max, t_docs = 0.0, 0
        for row in df.itertuples():
            lls, flags = ref[int(row.doc_id)]
            mine = [float(x) for x in row.ll]
            d = max(abs(a - b) for a, b in zip(mine, lls, strict=True))
            t_max = max(t_max, d)
            t_docs += mine != lls
            greedy += [bool(x) for x in row.is_greedy] != flags
            n_ll += len(lls)
        n_docs += len(df)
        ll_docs += t_docs
        max_abs = max(max_abs, t_max)
        per_task[task] = {"max_abs_ll_diff": t_max, "docs_ll_differ": t_docs}
    return {
        "docs": n_docs,
        "loglikelihoods": n_ll,
        "max_abs_ll_diff": max_abs,
        "docs_ll_differ": ll_docs,
        "docs_greedy_differ": greedy,
        "per_task": per_task,
    }


def check_worker(args: argparse.Namespace) -> None:
    """In-process fp16 evaluation, all tasks pooled like the CLI, fast and plain scoring."""
    from kbit.logs import setup_logging
    from kbit.evaluation.lm import make_lm
    from kbit.evaluation.runner import evaluate_tasks
    from kbit.evaluation.tasks import load_tasks
    from kbit.loading import load_model

    setup_logging(None)
    cli = _cli_samples(Path(args.cli_out))
    model, tok = load_model(args.model_dir, "auto", args.device)
    report = {}
    for mode, fast in (("fast", True), ("plain", False)):
        lm = make_lm(model, tok, args.batch_size, "auto", fast=fast)
        tasks = load_tasks(TASKS, args.tasks_dir)
        t0 = time.perf_counter()
        res = evaluate_tasks(lm, tasks, limit=args.limit, together=True)
        wall = time.perf_counter() - t0
        report[mode] = compare_docs({t: r.docs for t, r in res.items()}, cli) | {
            "evaluate_s": wall,
            "forward_s": next(iter(res.values())).forward_time_s,
        }
        del lm
    Path(args.out).write_text(json.dumps(report))


def cli_results(out: Path) -> dict[str, dict[str, float]]:
    (f,) = out.rglob("results_*.json")
    res = json.loads(f.read_text())["results"]
    return {
        t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
        for t, r in res.items()
    }


def bench_model(size: str, args: argparse.Namespace, work: Path, peak: float) -> dict:
    import pandas as pd

    from kbit.evaluation.metrics import task_metrics

    model_dir, n_params = build_model(size, Path(args.data) / "tokenizers" / "gpt-neox-20b",
                                      work / f"pythia-{size}")  # fmt: skip
    specs = args.specs.split(",")
    py = sys.executable
    batch_size, bs_info = args.batch_size, None
    if batch_size == "auto":
        bs_file = work / f"batch-{size}.json"
        bs_cmd = [py, __file__, "--worker", "find-batch", "--model-dir", str(model_dir),
                  "--out", str(bs_file), "--device", args.device]  # fmt: skip
        bs_s = run_timed(bs_cmd, work / f"batch-{size}.log", args.timeout)
        bs_info = json.loads(bs_file.read_text()) | {"search_s": bs_s}
        batch_size = str(bs_info["batch_size"])
    cli_out = work / f"cli-{size}"
    cli_cmd = [
        py, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype={args.dtype}", "--device", args.device,
        "--tasks", ",".join(TASKS), "--include_path", str(work / "tasks"),
        "--batch_size", batch_size, "--log_samples", "--output_path", str(cli_out),
    ] + (["--limit", str(args.limit)] if args.limit else [])  # fmt: skip
    cli_wall = run_timed(cli_cmd, work / f"cli-{size}.log", args.timeout, done=cli_out)
    check = None
    if args.check:
        check_file = work / f"check-{size}.json"
        check_cmd = [
            py, __file__, "--worker", "check", "--model-dir", str(model_dir),
            "--tasks-dir", str(work / "tasks"), "--cli-out", str(cli_out), "--out", str(check_file),
            "--batch-size", batch_size, "--device", args.device,
        ] + (["--limit", str(args.limit)] if args.limit else [])  # fmt: skip
        try:
            run_timed(check_cmd, work / f"check-{size}.log", args.timeout)
            check = json.loads(check_file.read_text())
        except Exception as exc:  # the timing results stand without the check
            check = {"error": str(exc)[-2000:]}
    cli = cli_results(cli_out)
    entries = []
    by_mode = {}
    for mode in args.modes.split(","):
        ours_out = work / f"ours-{size}-{mode}"
        ours_log = work / f"ours-{size}-{mode}.log"
        ours_cmd = [
            py, __file__, "--worker", "batched", "--model-dir", str(model_dir),
            "--tasks-dir", str(work / "tasks"), "--specs", args.specs, "--out", str(ours_out),
            "--batch-size", batch_size, "--device", args.device,
            "--graphs", {"graphs": "on", "eager": "off", "auto": "auto"}[mode],
        ] + (["--limit", str(args.limit)] if args.limit else [])  # fmt: skip
        ours_wall = run_timed(ours_cmd, ours_log, args.timeout)
        frames = {
            (q, t): pd.read_parquet(ours_out / q / f"{t}.parquet") for q in specs for t in TASKS
        }
        by_mode[mode] = frames
        entry = _timings(frames, specs, peak, ours_wall)
        fp = [frames[("fp16", t)] for t in TASKS]
        fidelity = None
        if args.check:
            fidelity = dict(check or {})
            fidelity["batched_fp16_vs_cli"] = compare_docs(
                {t: f for t, f in zip(TASKS, fp, strict=True)}, _cli_samples(cli_out)
            )
        agree = {}
        for t, f in zip(TASKS, fp, strict=True):
            mine = task_metrics(f)
            agree[t] = {m: [mine[m], cli[t].get(m)] for m in mine}
        entries.append(
            {
                "model": f"pythia-{size} (random weights)",
                "mode": mode,
                "graphs_turned_off": "CUDA graphs off" in ours_log.read_text(),
                "graph_policy": _graph_policy(frames, specs, ours_log) if mode == "auto" else None,
                "n_params": n_params,
                "batch_size": int(batch_size),
                "batch_size_search": bs_info,
                "n_docs": {t: len(f) for t, f in zip(TASKS, fp, strict=True)},
                "lm_eval_cli_s": cli_wall,
                "ratio_vs_cli": entry["batched_per_spec_s"] / cli_wall,
                **entry,
                "fp16_metrics_ours_vs_cli": agree,
                "fidelity_vs_cli": fidelity,
            }
        )
    if {"graphs", "eager"} <= set(by_mode):  # replays (the later specs) against eager scoring
        same = _same_docs(by_mode["graphs"], by_mode["eager"])
        for e in entries:
            e["graphs_vs_eager_all_specs"] = same
    return entries


def _graph_policy(frames: dict, specs: list[str], log_file: Path) -> dict:
    """What the job's GraphPolicy did: per spec whether it ran with graphs, the measured capture
    cost and per-spec saving (the runs table's columns), and the decisions it logged."""
    first = {q: frames[(q, TASKS[0])].iloc[0] for q in specs}

    def num(v: object) -> float | None:
        return None if v is None or v != v else float(v)  # NaN -> None

    return {
        "graphs_per_spec": {q: bool(r.get("cuda_graphs", False)) for q, r in first.items()},
        "capture_s": num(first[specs[-1]].get("graph_capture_s")),
        "saving_s_per_spec": num(first[specs[-1]].get("graph_saving_s")),
        "decisions": [
            ln.split("CUDA graphs", 1)[1].strip()
            for ln in log_file.read_text().splitlines()
            if "CUDA graphs" in ln
        ],
    }


def _same_docs(a: dict, b: dict) -> dict:
    """Documents of every (spec, task) whose log-likelihoods or greedy flags differ."""
    n, differ = 0, 0
    for key, fa in a.items():
        fb = b[key]
        for ra, rb in zip(fa.itertuples(), fb.itertuples(), strict=True):
            n += 1
            differ += (list(ra.ll), list(ra.is_greedy)) != (list(rb.ll), list(rb.is_greedy))
    return {"docs": n, "docs_differ": differ}


def _timings(frames: dict, specs: list[str], peak: float, ours_wall: float) -> dict:
    """Per-spec scoring and forward times of one batched run, against the FLOP limit."""
    fp = [frames[("fp16", t)] for t in TASKS]
    spec_scoring = {
        q: sum(float(frames[(q, t)]["wall_time_s"].iloc[0]) for t in TASKS) for q in specs
    }
    spec_forward = {
        q: sum(float(frames[(q, t)]["forward_time_s"].iloc[0]) for t in TASKS) for q in specs
    }
    later = sorted(spec_scoring[q] for q in specs[1:]) or [spec_scoring[specs[0]]]
    steady_s = later[len(later) // 2]
    later_fwd = sorted(spec_forward[q] for q in specs[1:]) or [spec_forward[specs[0]]]
    steady_fwd = later_fwd[len(later_fwd) // 2]
    flops = sum(float(f["flops"].iloc[0]) for f in fp)
    score_s = sum(float(f["wall_time_s"].iloc[0]) for f in fp)
    forward_s = sum(float(f["forward_time_s"].iloc[0]) for f in fp)
    per_spec = ours_wall / len(specs)
    limit_s = flops / peak
    return {
        "tokens_scored": sum(int(f["task_n_tokens"].iloc[0]) for f in fp),
        "flops_per_spec": flops,
        "batched_total_s": ours_wall,
        "n_specs": len(specs),
        "batched_per_spec_s": per_spec,
        "fp16_scoring_s": score_s,
        "fp16_forward_s": forward_s,
        "flop_limit_s": limit_s,
        "peak_fraction_scoring": limit_s / score_s,
        "peak_fraction_forward": limit_s / forward_s if forward_s else None,
        "peak_fraction_per_spec": limit_s / per_spec,
        "scoring_s_per_spec": spec_scoring,
        "forward_s_per_spec": spec_forward,
        "steady_scoring_s": steady_s,
        "steady_forward_s": steady_fwd,
        "peak_fraction_steady_scoring": limit_s / steady_s,
        "peak_fraction_steady_forward": limit_s / steady_fwd if steady_fwd else None,
    }


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; peak fp16 matmul {report['peak_fp16_tflops']:.0f} TFLOP/s, "
        f"bf16 {report['peak_bf16_tflops']:.0f} TFLOP/s; at most {report['limit']} documents per "
        f"task; batch size {report['batch_size']} (per model below); specs {report['specs']} "
        f"(the batched job evaluates all of them, the CLI fp16 only); transformers "
        f"{report.get('transformers')}, torch {report.get('torch')}. Mode: the batched job "
        f"with CUDA graphs (the workflow's default for several specs; every capture checked "
        f"against its eager pass) or eager. Scoring = the specs' "
        f"evaluation time without start-up, loading, request building and writing; 'first' is "
        f"the first spec (fp16: CUDA warm-up included), 'steady' the median of the later specs.",
        "",
        "| model | mode | batch | tokens/spec | lm_eval CLI s | batched s/spec | ratio "
        "| FLOP-limit s | scoring s first / steady | forward s first / steady "
        "| % peak scoring first / steady | % peak forward first / steady |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        mode = r.get("mode", "")
        if r.get("graphs_turned_off"):
            mode += " (turned off)"
        lines.append(
            f"| {r['model']} | {mode} | {r['batch_size']} | {r['tokens_scored']:,} | "
            f"{r['lm_eval_cli_s']:.1f} | {r['batched_per_spec_s']:.1f} | "
            f"{r['ratio_vs_cli']:.2f} | {r['flop_limit_s']:.2f} | "
            f"{r['fp16_scoring_s']:.1f} / {r['steady_scoring_s']:.1f} | "
            f"{r['fp16_forward_s']:.1f} / {r['steady_forward_s']:.1f} | "
            f"{_pct(r['peak_fraction_scoring'])} / {_pct(r['peak_fraction_steady_scoring'])} | "
            f"{_pct(r['peak_fraction_forward'])} / {_pct(r['peak_fraction_steady_forward'])} |"
        )
    lines += [
        "",
        "Per-document fp16 results against the CLI's logged samples (same batch size): "
        "max |log-likelihood difference| (documents whose log-likelihoods differ at all; "
        "documents whose greedy flags differ).",
        "",
        "| model | mode | in-process, pooled like the CLI (fast scoring) | same, plain HFLM "
        "scoring | batched job (per-task batches) | evaluate s fast / plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        c = r.get("fidelity_vs_cli") or {}

        def cell(d: dict | None) -> str:
            if not d or "max_abs_ll_diff" not in d:
                return "not run"
            return (
                f"{d['max_abs_ll_diff']:.3g} ({d['docs_ll_differ']} of {d['docs']}; "
                f"{d['docs_greedy_differ']})"
            )

        ex, po = c.get("fast"), c.get("plain")
        times = f"{ex['evaluate_s']:.1f} / {po['evaluate_s']:.1f}" if ex and po else ""
        lines.append(
            f"| {r['model']} | {r.get('mode', '')} | {cell(ex)} | {cell(po)} "
            f"| {cell(c.get('batched_fp16_vs_cli'))} "
            f"| {times} |"
        )
    same = [
        f"{r['model']}: {d['docs_differ']} of {d['docs']} differ"
        for r in report["models"]
        if r.get("mode") == "graphs" and (d := r.get("graphs_vs_eager_all_specs"))
    ]
    if same:
        lines += ["", "Graphs against eager, every spec and task, per document: "
                  + "; ".join(same) + "."]  # fmt: skip
    auto = [r for r in report["models"] if r.get("graph_policy")]
    if auto:
        lines += ["", "CUDA graphs decided by measurement (mode auto, the workflow's default): "
                  "spec 0 warms up, spec 1 is the eager reference, spec 2 captures, spec 3 "
                  "measures the saving; the job's log lines.",
                  "", "| model | graphs per spec | capture s | saving s/spec | decisions |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in auto:
            g = r["graph_policy"]
            per = ", ".join(
                f"{q} {'on' if on else 'off'}" for q, on in g["graphs_per_spec"].items()
            )
            cap, sav = g["capture_s"], g["saving_s_per_spec"]
            lines.append(
                f"| {r['model']} | {per} | {'' if cap is None else f'{cap:.2f}'} "
                f"| {'' if sav is None else f'{sav:.2f}'} | {'; '.join(g['decisions'])} |"
            )
    searched = {r["model"]: r["batch_size_search"] for r in report["models"]}
    searched = {m: b for m, b in searched.items() if b and b.get("probes")}
    if searched:
        lines += ["", "Batch-size search (full-length sequences; peak = reserved memory; in the "
                  "order measured, the last is the confirmation):", ""]  # fmt: skip
        for m, b in searched.items():
            probes = ", ".join(
                f"{p['batch_size']}: " + ("OOM" if p["peak_gib"] is None else
                                          f"{p['peak_gib']:.1f} GiB{'' if p['fits'] else ' (no)'}")
                for p in b["probes"]
            )  # fmt: skip
            lines.append(f"- {m}: chose {b['batch_size']} in {b['search_s']:.0f} s; {probes}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="folder with eval/ and tokenizers/gpt-neox-20b/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="160m,1.4b")
    ap.add_argument("--specs", default="fp16,int4-b64,float4-e3-b64,nf4-b64")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", default="auto", help="'auto' (search per model) or N")
    ap.add_argument("--no-check", dest="check", action="store_false")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--device", default="cuda", help="cpu: a functional check, not a benchmark")
    ap.add_argument(
        "--modes",
        default="graphs,eager",
        help="batched job runs: graphs (cuda_graphs=True), eager (cuda_graphs=False), auto "
        "(the workflow default: graphs only where the measured saving repays the capture)",
    )
    ap.add_argument("--graphs", choices=["on", "off", "auto"], default="on", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["batched", "find-batch", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--cli-out", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--tasks-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = "float16" if args.device == "cuda" else "float32"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.batch_size != "auto":
        args.batch_size = str(int(args.batch_size))
    if args.worker:
        if args.worker != "find-batch":
            args.batch_size = int(args.batch_size)
        {"batched": batched_worker, "find-batch": find_batch_worker, "check": check_worker}[
            args.worker
        ](args)
        return
    import transformers

    bad = set(args.modes.split(",")) - {"graphs", "eager", "auto"}
    if bad:
        raise SystemExit(f"unknown --modes {sorted(bad)}; allowed are graphs, eager, auto")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device found (use --device cpu for a functional check only)")
    from kbit.evaluation.tasks import prepare_tasks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    prepare_tasks(TASKS, Path(args.data) / "eval", work / "tasks")
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "peak_fp16_tflops": peak_flops(torch.float16) / 1e12,
        "peak_bf16_tflops": peak_flops(torch.bfloat16) / 1e12,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "specs": args.specs,
        "transformers": transformers.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "models": [],
    }
    from bench_quant import slug  # this folder is on sys.path when run as a script

    # the H100 run predates the device slug; every other GPU is named in full
    tag = "h100" if "H100" in report["device"] else slug(report["device"])
    try:
        for size in args.models.split(","):
            entries = bench_model(size, args, work, report["peak_fp16_tflops"] * 1e12)
            report["models"].extend(entries)
            print(json.dumps(entries, indent=1), flush=True)
            # written after every model, so a later failure keeps the earlier results
            (out / f"eval_{tag}.json").write_text(json.dumps(report, indent=1))
            (out / f"eval_{tag}.md").write_text(markdown(report))
    finally:
        for f in work.glob("*.log"):
            (out / f.name).write_text(f.read_text()[-200_000:])
    print(markdown(report))


if __name__ == "__main__":
    main()
