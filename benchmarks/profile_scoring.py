"""Where the batched evaluation's steady-state scoring time goes, with and without host syncs.

Builds a random-weight Pythia-shaped model (bench_eval.build_model), prepares the five tasks from
the original files (first 1500 documents each), scores them once to warm up, then scores every
task four more times alternating transformers' per-forward host sync on position ids off / on /
off / on (``kbit.evaluation.speed.nosync``; "on" is the plain transformers forward), printing per
task the scoring wall time, the time inside lm-eval's loglikelihood call ("ll"), the host
post-processing after it ("post"), the forward time (CUDA events), tokens and padded tokens;
finally one profiled pass per task (torch.profiler, CUDA activity) sums kernel time by kind
(GEMM, attention, concatenation, softmax, other) against the profiled wall time: the gap is
time the GPU waits for the host.

Usage (on a CUDA machine; --data layout as for bench_eval.py)::

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/profile_scoring.py 1.4b 64 [DATA_DIR]
"""

import collections
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_eval import TASKS, build_model  # noqa: E402

import kbit.evaluation.speed.scoring as scoring  # noqa: E402
from kbit.evaluation.lm import make_lm  # noqa: E402
from kbit.evaluation.runner import PreparedTask, configure_like_cli, score_prepared  # noqa: E402
from kbit.evaluation.tasks import load_tasks, prepare_tasks  # noqa: E402
from kbit.loading import load_model  # noqa: E402

work = Path(tempfile.mkdtemp())
size, bs = sys.argv[1], int(sys.argv[2])
data = Path(sys.argv[3] if len(sys.argv) > 3 else ".carry/evaldata")
prepare_tasks(TASKS, data / "eval", work / "tasks")
mdir, n_params = build_model(size, data / "tokenizers" / "gpt-neox-20b", work / "m")
model, tok = load_model(mdir, "auto", "cuda")
print("attn impl", model.config._attn_implementation, model.dtype, "params", n_params)
lm = make_lm(model, tok, bs)
print("lm device", lm.device)
td = load_tasks(TASKS, work / "tasks")
configure_like_cli(td)
prep = {n: PreparedTask(n, td["tasks"][n], 1500, lm) for n in TASKS}
gc.freeze()
ll_time = [0.0]
for name in ("loglikelihood", "loglikelihood_rolling"):
    orig = getattr(lm, name)

    def timed(reqs, disable_tqdm=False, _o=orig):
        t0 = time.perf_counter()
        r = _o(reqs)
        ll_time[0] += time.perf_counter() - t0
        return r

    setattr(lm, name, timed)
for n in TASKS:
    score_prepared(lm, prep[n])
skip_sync = scoring.consecutive_positions
for sync in (False, True, False, True):
    scoring.consecutive_positions = contextlib.nullcontext if sync else skip_sync
    tot = collections.Counter()
    for n in TASKS:
        ll_time[0] = 0.0
        r = score_prepared(lm, prep[n])
        torch.cuda.synchronize()
        plans = [p for k, p in lm._plans.items() if k[0] is prep[n]]
        padded = sum(int(b.tokens.numel()) for p in plans for b in p.batches)
        nb = sum(len(p.batches) for p in plans)
        d = dict(
            wall=r.wall_time_s, ll=ll_time[0], post=r.wall_time_s - ll_time[0], fwd=r.forward_time_s
        )
        tot.update(d)
        print(
            f"sync={sync} {n:15s} "
            + " ".join(f"{k}={v:.3f}" for k, v in d.items())
            + f" tokens={r.forward_tokens} padded={padded} batches={nb}",
            flush=True,
        )
    print(f"sync={sync} TOTAL " + " ".join(f"{k}={v:.3f}" for k, v in tot.items()), flush=True)
print("peak mem GiB", torch.cuda.max_memory_allocated() / 2**30)

scoring.consecutive_positions = skip_sync
for n in TASKS:
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        score_prepared(lm, prep[n])
        w = time.perf_counter() - t0
    cats = collections.Counter()
    tot = 0.0
    for e in p.key_averages():
        t = getattr(e, "device_time_total", 0) / 1e6
        if t <= 0:
            continue
        k = e.key.lower()
        c = (
            "gemm"
            if any(s in k for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas"))
            else "attn"
            if ("flash" in k or "attention" in k or "fmha" in k or "sdpa" in k)
            else "cat"
            if "catarray" in k
            else "softmax"
            if "softmax" in k
            else "other"
        )
        cats[c] += t
        tot += t
    print(
        n,
        f"profiled wall {w:.3f} gpu busy {tot:.3f}",
        {k: round(v, 3) for k, v in cats.items()},
        flush=True,
    )
    if n in ("hellaswag", "winogrande"):
        print(
            p.key_averages().table(
                sort_by="cuda_time_total", row_limit=10, max_name_column_width=60
            )
        )
