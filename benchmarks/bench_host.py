"""Host time per quantization spec outside the model: what the GPU waits for between forward passes.

The batched evaluation's scoring wall time is forward passes plus everything the host does
around them: collating and planning batches, lm-eval's per-document ``process_results``, prompt
templates rendered for it, Python's garbage collector, and the per-document rows. This benchmark
measures that host time alone: it runs the real ``PreparedTask`` / ``score_prepared`` path over the
real task files and the GPT-NeoX tokenizer with the forward pass and the on-device scoring of
each batch replaced by zeros of the right shape, so it runs on any CPU in a minute and isolates
exactly the work that does not overlap with the device.

Each configuration runs in its own process (garbage-collector state is per process), as an
ablation of the host-side measures, all in one invocation:

* ``none``: none of them (per-use template compilation, every batch re-planned per spec, no
  ``gc.freeze``, documents re-read from the dataset per spec);
* ``templates``: lm-eval's prompt templates compiled once (``kbit.evaluation.speed.templates``);
* ``+freeze``: also ``gc.freeze()`` after preparing the tasks (as ``evaluate_specs`` does);
* ``+docs``: also documents read once per task;
* ``all``: also batch plans reused across specs (``ReusingHFLM.reuse_plans``), the workflow.

Usage::

    python benchmarks/bench_host.py --data DIR [--limit 1500] [--specs 4] [--out DIR]

``--data`` holds ``eval/`` (the original task files) and ``tokenizers/gpt-neox-20b/``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]
CONFIGS = {
    "none": set(),
    "templates": {"templates"},
    "+freeze": {"templates", "freeze"},
    "+docs": {"templates", "freeze", "docs"},
    "all": {"templates", "freeze", "docs", "plans"},
}


class _Reread:
    """Stands in for ``PreparedTask.docs``: iterates the dataset anew every time."""

    def __init__(self, task, limit):
        self.task, self.limit = task, limit

    def __iter__(self):
        return iter(self.task.doc_iterator(rank=0, limit=self.limit, world_size=1))


def measure(config: str, data: Path, limit: int, n_specs: int) -> dict:
    """Host seconds per task for ``n_specs`` scorings of every task, under ``config``."""
    import torch
    from lm_eval import utils
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from kbit.evaluation.lm import make_lm
    from kbit.evaluation.runner import PreparedTask, configure_like_cli, score_prepared
    from kbit.evaluation.tasks import load_tasks, prepare_tasks

    on = CONFIGS[config]
    original_apply = utils.apply_template
    work = Path(tempfile.mkdtemp())
    prepare_tasks(TASKS, data / "eval", work / "tasks")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(data / "tokenizers" / "gpt-neox-20b" / "20B_tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    cfg = GPTNeoXConfig(
        vocab_size=50304, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=32, max_position_embeddings=2048,
    )  # fmt: skip
    lm = make_lm(GPTNeoXForCausalLM(cfg).eval(), tok, 64)

    def no_model(batch):  # zeros in place of the forward pass and on-device scoring
        n = len(batch.seg_len)
        return torch.zeros(n), torch.ones(n, dtype=torch.bool)

    lm._run_batch = no_model
    task_dict = load_tasks(TASKS, work / "tasks")
    configure_like_cli(task_dict)
    if "templates" not in on:
        utils.apply_template = original_apply
    prepared = {}
    for name in TASKS:
        prepared[name] = PreparedTask(name, task_dict["tasks"][name], limit, lm)
        if "docs" not in on:
            prepared[name].docs = _Reread(prepared[name].task, prepared[name].limit)
    if "freeze" in on:
        gc.freeze()
    per_spec = []
    for _ in range(n_specs):
        times = {}
        for name in TASKS:
            if "plans" not in on:
                lm.clear_plans()
            t0 = time.perf_counter()
            score_prepared(lm, prepared[name])
            times[name] = time.perf_counter() - t0
        per_spec.append(times)
    return {"config": config, "per_spec": per_spec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--specs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one config
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.limit, args.specs)))
        return
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--limit", str(args.limit)]
        cmd += ["--specs", str(args.specs), "--one", config]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        res = json.loads(out.strip().splitlines()[-1])
        totals = [sum(t.values()) for t in res["per_spec"]]
        res["first_s"] = totals[0]
        res["steady_s"] = statistics.median(totals[1:]) if len(totals) > 1 else totals[0]
        rows.append(res)
        print(f"{config:10s} first {res['first_s']:.3f} s  steady {res['steady_s']:.3f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": platform.processor() or platform.machine(), "limit": args.limit}
        (args.out / "host_overhead.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        lines = [
            f"Host seconds per spec outside the model ({args.limit} documents per task, five "
            f"tasks, {args.specs} specs; steady = median of the later specs; "
            f"`python benchmarks/bench_host.py --data DIR --out DIR`).",
            "",
            "| configuration | first spec s | steady s/spec |",
            "|---|---|---|",
        ]
        lines += [f"| {r['config']} | {r['first_s']:.2f} | {r['steady_s']:.2f} |" for r in rows]
        (args.out / "host_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
