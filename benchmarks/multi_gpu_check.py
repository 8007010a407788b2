"""Multi-GPU check: a model spread over two GPUs scores the same bits as on one, and GPU slots.

Run on a machine with two GPUs (about 2-4 minutes on two H200s):

(a) **Same bits.** A GPT-NeoX model with Pythia-1B's shapes (1.01B parameters, random weights,
    seed 0, float16) is saved with the real GPT-NeoX tokenizer and loaded twice through
    ``kbit.loading.load_model``: on one GPU (``gpus=1``) and spread over two
    (``KBIT_FORCE_GPUS=2``: whole decoder blocks per GPU, embeddings and head on the first).
    Compared bit for bit (count of differing values and max |diff|): the weights and buffers as
    loaded; the logits and float32 log-softmax of a fixed token batch; the log-likelihoods and
    greedy flags of a fixed set of lm-eval requests (multiple-choice style pairs, one-token
    continuations sharing a context, rolling windows over long documents) scored through the
    workflow's scoring class ``kbit.evaluation.lm.make_lm`` (fast path, then lm-eval's own
    loop); then, per quantization spec, every weight after ``kbit.model_quant.quantize_model``
    (in place, each weight on its own GPU) and the log-likelihoods of the quantized model, and
    finally the scores after ``WeightSnapshot.restore``. Last, CUDA graphs on the spread model
    (``FastLM(cuda_graphs=True)``): whether capture works across GPUs or switches itself off.
(b) **Load against evaluation time** of both placements: ``load_model`` wall time (page cache warm:
    the checkpoint was just written), tokenization, and the scoring time of the request set.
(c) **GPU slots.** Child processes claim one GPU each through ``kbit.devices.claim_gpus`` (a private
    lock directory; ``CUDA_VISIBLE_DEVICES`` removed from their environment, its value used as the
    pool): two holders must get different devices (different UUIDs, one visible device each); a
    third claim while both are held must time out with its message; after one holder is killed
    with SIGKILL its device must be claimable again, by a child that first imports the workflow's
    modules (showing whether those imports start CUDA, which would make claiming inside
    ``kbit.logs.job`` too late).

Results: ``multi_gpu_check.json`` and ``multi_gpu_check.md`` in ``--out`` (written after each
part, so a run cut short keeps what it measured). ``--cpu-smoke`` runs every code path on the CPU
with a tiny model: "two devices" are two ``cpu`` entries of the device map with accelerate's
per-block hooks attached, the slot pool is two fake ids.

Usage::

    python benchmarks/multi_gpu_check.py --tokenizer .carry/gpt-neox-20b --out DIR
    python benchmarks/multi_gpu_check.py --cpu-smoke --tokenizer TOKENIZER --out /tmp/mgc

``--tokenizer`` is ``20B_tokenizer.json`` or a folder holding it (or a saved tokenizer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: GPTNeoXConfig fields of EleutherAI/pythia-1b, and a tiny shape for --cpu-smoke
SHAPES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 8},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4},
}
EOS = "<|endoftext|>"
MAX_LENGTH = 2048
#: seconds after which the optional parts (lm-eval's own loop, CUDA graphs) are skipped
SOFT_BUDGET_S = float(os.environ.get("KBIT_CHECK_BUDGET_S", "270"))
#: requests of the CUDA-graph check (each batch is captured and checked once: bounded time)
GRAPH_PAIRS = 400


# ----------------------------------------------------------------------------- utilities
def now() -> float:
    return time.perf_counter()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Differing values (NaN equals NaN) and the largest |a - b| over pairs that are finite."""
    if len(a) != len(b):
        return {"n": len(a), "error": f"lengths differ: {len(a)} vs {len(b)}"}
    differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y and not (x != x and y != y)]
    finite = [abs(x - y) for x, y in differ if math.isfinite(x) and math.isfinite(y)]
    nonfinite = sum(not math.isfinite(x) for x in a) + sum(not math.isfinite(y) for y in b)
    return {
        "n": len(a),
        "n_differ": len(differ),
        "max_abs_diff": max(finite, default=0.0),
        "n_nonfinite": nonfinite,
        "identical": not differ,
    }


def compare_tensors(a: Any, b: Any) -> dict[str, Any]:
    """``compare`` for two tensors (moved to the CPU, in float64)."""
    x, y = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    same = (x == y) | (x.isnan() & y.isnan())
    d = (x - y).abs()
    d = d[~same & x.isfinite() & y.isfinite()]
    return {
        "n": int(x.numel()),
        "n_differ": int((~same).sum()),
        "max_abs_diff": float(d.max()) if d.numel() else 0.0,
        "n_nonfinite": int((~x.isfinite()).sum() + (~y.isfinite()).sum()),
        "identical": bool(same.all()),
    }


def compare_models(a: Any, b: Any) -> dict[str, Any]:
    """Every parameter and buffer of two models, by name."""
    pa = dict(a.named_parameters(remove_duplicate=False))
    pb = dict(b.named_parameters(remove_duplicate=False))
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    bad = [n for n in pa if n not in pb or not _equal(pa[n], pb[n])]
    bad += [n for n in ba if n not in bb or not _equal(ba[n], bb[n])]
    return {"n_tensors": len(pa) + len(ba), "n_differ": len(bad), "differ": bad[:10]}


def _equal(x: Any, y: Any) -> bool:
    import torch

    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y.to(x.device))


class Report:
    """The results, written (JSON and markdown) after every part."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out = out
        self.data: dict[str, Any] = {"smoke": smoke, "started": time.strftime("%Y-%m-%d %H:%M")}
        self.t0 = now()

    def elapsed(self) -> float:
        return now() - self.t0

    def write(self) -> None:
        from kbit.io import write_json, write_text

        self.data["elapsed_s"] = round(self.elapsed(), 1)
        write_json(self.data, self.out / "multi_gpu_check.json", indent=2)
        write_text(markdown(self.data), self.out / "multi_gpu_check.md")


# ----------------------------------------------------------------------------- environment
def environment(smoke: bool) -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import lm_eval

        info["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError as err:
        info["lm_eval"] = f"not importable: {err}"
    if not smoke and torch.cuda.is_available():
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_properties(i).name,
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    return info


# ----------------------------------------------------------------------------- (c) GPU slots
def child_main(args: argparse.Namespace) -> None:
    """One claimant: claim a GPU, report what CUDA shows, hold it until told or timed out."""
    from kbit.devices import GpuSlotError, claim_gpus, cuda_driver_initialized

    out: dict[str, Any] = {"mode": args.child, "pid": os.getpid()}
    if args.child == "stack":  # what a workflow script imports before kbit.logs.job runs
        t = now()
        failed = []
        for name in ("kbit.logs", "kbit.study", "kbit.artifact", "kbit.evaluation.batch_size",
                     "kbit.evaluation.jobs", "kbit.evaluation.runner"):  # fmt: skip
            try:
                __import__(name)
            except ImportError as err:
                failed.append(f"{name}: {err}")
        out["import_s"] = round(now() - t, 2)
        out["import_failed"] = failed
    out["driver_initialized_before_claim"] = cuda_driver_initialized()
    try:
        claim = claim_gpus(1, label=f"multi_gpu_check {args.child}", timeout_s=args.child_wait)
    except GpuSlotError as err:
        out["error"] = str(err)
        print(json.dumps(out), flush=True)
        return
    out["claimed"] = list(claim.devices)
    out["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    out["order"] = os.environ.get("CUDA_DEVICE_ORDER")
    if not args.cpu_smoke:
        import torch

        props = torch.cuda.get_device_properties(0)
        torch.ones(1, device="cuda")  # a context on the claimed device
        out["device_count"] = torch.cuda.device_count()
        out["uuid"] = str(getattr(props, "uuid", "")).removeprefix("GPU-")
        out["name"] = props.name
        out["pci_bus_id"] = getattr(props, "pci_bus_id", None)
    print(json.dumps(out), flush=True)
    deadline = time.time() + args.child_hold
    while time.time() < deadline and not Path(args.child_release).exists():
        time.sleep(0.05)


def _spawn(
    args: argparse.Namespace, mode: str, env: dict, release: Path, wait_s: float, hold_s: float
) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
           "--child-release", str(release), "--child-wait", str(wait_s),
           "--child-hold", str(hold_s), "--out", str(args.out)]  # fmt: skip
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _first_line(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        return {"error": f"no report within {timeout_s} s (exit status {proc.poll()})"}
    return json.loads(line)


def smi_uuids() -> list[str]:
    """GPU UUIDs in nvidia-smi's order (index i -> uuid), or [] without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    uuids = []
    for line in out.stdout.splitlines():
        if "UUID: " in line:
            uuids.append(line.split("UUID: ", 1)[1].rstrip(")").removeprefix("GPU-"))
    return uuids


def check_slots(args: argparse.Namespace) -> dict[str, Any]:
    """Two holders, a third that must time out, a killed holder's device claimed again."""
    work = Path(tempfile.mkdtemp(prefix="kbit-slots-"))
    procs: list[subprocess.Popen] = []
    try:
        return _check_slots(args, work, procs)
    finally:
        for p in procs:  # children left behind by an error
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _check_slots(args: argparse.Namespace, work: Path, procs: list) -> dict[str, Any]:
    release = work / "release"
    env = dict(os.environ)
    visible = env.pop("CUDA_VISIBLE_DEVICES", None)
    env["KBIT_GPU_LOCK_DIR"] = str(work / "locks")
    env.pop("KBIT_FORCE_GPUS", None)
    # a pool of exactly two devices: the third claim must find both held
    pool = ["a", "b"] if args.cpu_smoke else (visible.split(",") if visible else ["0", "1"])[:2]
    env["KBIT_GPU_POOL"] = ",".join(pool)
    res: dict[str, Any] = {"pool": env["KBIT_GPU_POOL"]}

    def spawn(mode: str, wait_s: float, hold_s: float) -> subprocess.Popen:
        procs.append(_spawn(args, mode, env, release, wait_s, hold_s))
        return procs[-1]

    a, b = spawn("plain", 30, 120), spawn("plain", 30, 120)
    res["holder_a"], res["holder_b"] = _first_line(a, 120), _first_line(b, 120)
    c = spawn("plain", 2, 0)
    res["third_while_held"] = _first_line(c, 120)
    c.wait(timeout=60)
    os.kill(a.pid, signal.SIGKILL)
    a.wait(timeout=60)
    e = spawn("stack", 30, 0)
    res["after_kill_with_imports"] = _first_line(e, 180)
    release.touch()
    for p in (b, e):
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=60)
    ha, hb, third, after = (
        res["holder_a"], res["holder_b"], res["third_while_held"], res["after_kill_with_imports"]
    )  # fmt: skip
    checks = {
        "holders_got_different_devices": bool(
            ha.get("claimed") and hb.get("claimed") and ha["claimed"] != hb["claimed"]
        ),
        "third_claim_timed_out": "no 1 free GPU(s)" in third.get("error", ""),
        "killed_holders_device_claimed_again": after.get("claimed") == ha.get("claimed"),
        "imports_left_cuda_unstarted": after.get("driver_initialized_before_claim") is False,
    }
    if not args.cpu_smoke:
        checks["holders_see_different_gpus"] = bool(
            ha.get("uuid") and hb.get("uuid") and ha["uuid"] != hb["uuid"]
        )
        checks["one_visible_device_each"] = ha.get("device_count") == hb.get("device_count") == 1
        uuids = smi_uuids()
        if uuids and not visible:  # the claimed ids are nvidia-smi's indices
            checks["claimed_id_is_nvidia_smi_index"] = all(
                h.get("uuid") == uuids[int(h["claimed"][0])] for h in (ha, hb) if h.get("claimed")
            )
    res["checks"] = checks
    res["ok"] = all(checks.values())
    return res


# ----------------------------------------------------------------------------- model and requests
def load_tokenizer_from(path: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path.is_dir() and (path / "20B_tokenizer.json").is_file():
        path = path / "20B_tokenizer.json"
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS)
    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def build_model(size: str, tokenizer: Any, out: Path, smoke: bool) -> dict[str, Any]:
    """A random GPT-NeoX of ``size`` (seed 0) saved with the tokenizer into ``out``."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    shape = SHAPES[size]
    config = GPTNeoXConfig(
        vocab_size=50304,
        intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=MAX_LENGTH,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        **shape,
    )
    t = now()
    torch.manual_seed(0)
    with torch.device("cpu" if smoke else "cuda"):
        model = GPTNeoXForCausalLM(config).to(torch.float32 if smoke else torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    if not smoke:
        torch.cuda.empty_cache()
    return {"n_params": n_params, "build_and_save_s": round(now() - t, 1), **shape}


def make_requests(tokenizer: Any, n_docs: int, n_rolling: int, roll_words: int) -> dict:
    """Fixed lm-eval requests from random vocabulary words (seed 0)."""
    from lm_eval.api.instance import Instance

    rng = random.Random(0)
    words = sorted(
        t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3
    )

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    pairs = []
    for d in range(n_docs):  # multiple choice: one context, four continuations of 1-12 words
        ctx = text(rng.randint(5, 250))
        for c in range(4):
            pairs.append(Instance("loglikelihood", {}, (ctx, " " + text(rng.randint(1, 12))), c,
                                  ("mc", d, 1)))  # fmt: skip
    for d in range(max(1, n_docs // 4)):  # one-token continuations: one forward row (logits cache)
        ctx = text(rng.randint(5, 100))
        for c in range(4):
            pairs.append(Instance("loglikelihood", {}, (ctx, " " + rng.choice(words)), c,
                                  ("one_token", d, 1)))  # fmt: skip
    rolling = [
        Instance(
            "loglikelihood_rolling",
            {},
            (text(rng.randint(roll_words // 2, roll_words)),),
            0,
            ("rolling", d, 1),
        )
        for d in range(n_rolling)
    ]
    return {"pairs": pairs, "rolling": rolling}


def token_batch(vocab: int, smoke: bool) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 64) if smoke else (4, 1024), generator=g)


def direct_outputs(model: Any, tokens: Any) -> tuple[Any, Any]:
    """Logits (as the model returns them, on its first device) and their float32 log-softmax."""
    import torch

    with torch.no_grad():
        logits = model(tokens.to(model.device)).logits
        return logits, torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def score(lm: Any, requests: dict) -> dict[str, Any]:
    """Log-likelihoods, greedy flags and rolling sums of the requests, timed."""
    sync()
    t = now()
    lm.forward_tokens = 0
    pairs = lm.loglikelihood(requests["pairs"])
    rolling = lm.loglikelihood_rolling(requests["rolling"])
    sync()
    return {
        "ll": [x for x, _ in pairs],
        "greedy": [float(g) for _, g in pairs],
        "rolling": list(rolling),
        "seconds": now() - t,
        "tokens": int(lm.forward_tokens),
    }


def compare_scores(a: dict, b: dict) -> dict[str, Any]:
    return {k: compare(a[k], b[k]) for k in ("ll", "greedy", "rolling")}


def identical(cmp: dict) -> bool:
    """All nested comparisons of ``cmp`` found no differing value."""
    if "identical" in cmp:
        return bool(cmp["identical"])
    if "n_differ" in cmp:
        return cmp["n_differ"] == 0
    return all(identical(v) for v in cmp.values() if isinstance(v, dict))


def memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
        for i in range(torch.cuda.device_count())
    }


# ----------------------------------------------------------------------------- (a) + (b)
def load_both(model_dir: Path, smoke: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model on one device and spread over two, with load times and the placement."""
    from kbit.loading import load_across, load_model, model_devices, plan_device_map

    info: dict[str, Any] = {}
    sync()
    t = now()
    if smoke:
        single, tok = load_model(model_dir, "float32", "cpu")
    else:
        single, tok = load_model(model_dir, "auto", "cuda", gpus=1)
    sync()
    info["load_single_s"] = round(now() - t, 2)
    t = now()
    if smoke:
        from accelerate import dispatch_model

        spread = load_across(model_dir, ["cpu", "cpu"], dtype="float32")
        dispatch_model(spread, plan_device_map(spread, ["cpu", "cpu"]), main_device="cpu",
                       force_hooks=True)  # fmt: skip
    else:
        os.environ["KBIT_FORCE_GPUS"] = "2"
        try:
            spread, _ = load_model(model_dir, "auto", "cuda")
        finally:
            os.environ.pop("KBIT_FORCE_GPUS", None)
    sync()
    info["load_spread_s"] = round(now() - t, 2)
    info["single_devices"] = [str(d) for d in model_devices(single)]
    info["spread_devices"] = [str(d) for d in model_devices(spread)]
    hf_map = getattr(spread, "hf_device_map", None) or plan_device_map(spread, ["cpu", "cpu"])
    info["spread_map"] = {k: str(v) for k, v in hf_map.items()}
    info["spread_first_parameter_device"] = str(spread.device)
    info["memory_gib_after_load"] = memory()
    return single, spread, tok, info


def check_scores(args: argparse.Namespace, report: Report) -> None:
    """Parts (a) and (b) on a model written to a temporary folder (removed afterwards)."""
    work = Path(tempfile.mkdtemp(prefix="kbit-mgc-", dir=args.work))
    try:
        _check_scores(args, report, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_scores(args: argparse.Namespace, report: Report, work: Path) -> None:
    import torch

    from kbit.evaluation.lm import make_lm
    from kbit.model_quant import WeightSnapshot, quantize_model

    smoke = args.cpu_smoke
    data = report.data
    tok = load_tokenizer_from(Path(args.tokenizer))
    model_dir = work / "model"
    data["model"] = build_model("tiny" if smoke else args.size, tok, model_dir, smoke)
    report.write()
    single, spread, tok, info = load_both(model_dir, smoke)
    data["placement"] = info
    if not smoke:  # what the loader decides by itself for this model (no forcing)
        from kbit.devices import EVAL_WEIGHT_COPIES
        from kbit.loading import gpus_for_model

        info["auto_gpus"] = gpus_for_model(
            model_dir, torch.float16, weight_copies=EVAL_WEIGHT_COPIES
        )
    data["weights_as_loaded"] = compare_models(single, spread)
    tokens = token_batch(single.config.vocab_size, smoke)
    l1, s1 = direct_outputs(single, tokens)
    l2, s2 = direct_outputs(spread, tokens)
    data["direct"] = {
        "tokens": list(tokens.shape),
        "logits_device_single": str(l1.device),
        "logits_device_spread": str(l2.device),
        "logits": compare_tensors(l1, l2),
        "log_softmax_fp32": compare_tensors(s1, s2),
    }
    del l1, l2, s1, s2
    report.write()

    reqs = make_requests(tok, 4 if smoke else args.docs, 2 if smoke else 8, 150 if smoke else 3000)
    data["requests"] = {"pairs": len(reqs["pairs"]), "rolling": len(reqs["rolling"])}
    bs = 4 if smoke else args.batch_size

    def lm_for(model: Any, fast: bool = True, **kw: Any) -> Any:
        lm = make_lm(model, tok, bs, "float32", max_length=MAX_LENGTH, fast=fast, **kw)
        t = now()
        lm.pretokenize([*reqs["pairs"], *reqs["rolling"]])
        lm.tokenize_s = now() - t
        return lm

    lm1, lm2 = lm_for(single), lm_for(spread)
    data["hflm_device"] = {"single": str(lm1.device), "spread": str(lm2.device)}
    ref = score(lm1, reqs)
    got = score(lm2, reqs)
    data["fast_path"] = compare_scores(ref, got)
    data["timing"] = {
        "load_single_s": info["load_single_s"],
        "load_spread_s": info["load_spread_s"],
        "tokenize_s": round(lm1.tokenize_s, 2),
        "score_single_s": round(ref["seconds"], 2),
        "score_spread_s": round(got["seconds"], 2),
        "scored_tokens": ref["tokens"],
        "tokens_per_s_single": round(ref["tokens"] / ref["seconds"]),
        "tokens_per_s_spread": round(got["tokens"] / got["seconds"]),
        "memory_gib_peak": memory(),
    }
    report.write()

    snaps = (WeightSnapshot(single), WeightSnapshot(spread))
    data["quantized"] = {}
    for spec in args.specs.split(","):
        if report.elapsed() > SOFT_BUDGET_S:
            data["quantized"][spec] = "skipped (time)"
            continue
        for snap, model in zip(snaps, (single, spread), strict=True):
            snap.restore(model)
        t = now()
        quantize_model(single, spec)
        sync()
        t_single = now() - t
        t = now()
        quantize_model(spread, spec)
        sync()
        t_spread = now() - t
        q1, q2 = score(lm1, reqs), score(lm2, reqs)
        data["quantized"][spec] = {
            "weights": compare_models(single, spread),
            "scores": compare_scores(q1, q2),
            "changed_scores": compare(q1["ll"], ref["ll"])["n_differ"] > 0,
            "quantize_single_s": round(t_single, 2),
            "quantize_spread_s": round(t_spread, 2),
        }
        report.write()
    for snap, model in zip(snaps, (single, spread), strict=True):
        snap.restore(model)
    data["restored"] = compare_scores(ref, score(lm2, reqs))
    del snaps
    report.write()

    if report.elapsed() < SOFT_BUDGET_S:
        p1 = score(lm_for(single, fast=False), reqs)
        p2 = score(lm_for(spread, fast=False), reqs)
        data["plain_path"] = compare_scores(p1, p2)
        data["plain_vs_fast_single"] = compare_scores(p1, ref)
        data["timing"]["score_plain_single_s"] = round(p1["seconds"], 2)
        data["timing"]["score_plain_spread_s"] = round(p2["seconds"], 2)
    else:
        data["plain_path"] = "skipped (time)"
    report.write()

    if not smoke and report.elapsed() < SOFT_BUDGET_S - 30:
        sub = {"pairs": reqs["pairs"][:GRAPH_PAIRS], "rolling": reqs["rolling"][:2]}
        eager = score(lm1, sub)
        # on one GPU first: whether graphs stay on at all with this transformers version
        data["cuda_graphs_single"] = check_graphs(single, lm_for, sub, eager)
        data["cuda_graphs_spread"] = check_graphs(spread, lm_for, sub, eager)
    else:
        data["cuda_graphs_spread"] = "skipped (CPU)" if smoke else "skipped (time)"
    report.write()
    del single, spread, lm1, lm2
    if not smoke:
        torch.cuda.empty_cache()


def check_graphs(spread: Any, lm_for: Any, reqs: dict, ref: dict) -> dict[str, Any]:
    """Score twice inside reuse_plans with CUDA graphs: capture (checked) then replay."""
    out: dict[str, Any] = {}
    try:
        lm = lm_for(spread, cuda_graphs=True)
        for name in ("capture", "replay"):
            with lm.reuse_plans("graphs"):
                res = score(lm, reqs)
            out[name] = compare_scores(ref, res)
            out[f"graphs_on_after_{name}"] = bool(lm.cuda_graphs)
    except Exception as err:  # report it: this part only informs the integration
        out["error"] = "".join(traceback.format_exception_only(err)).strip()
    return out


# ----------------------------------------------------------------------------- report
def verdicts(data: dict[str, Any]) -> dict[str, bool | None]:
    def get(key: str) -> Any:
        return data.get(key) if isinstance(data.get(key), dict) else None

    q = data.get("quantized") or {}
    return {
        "weights identical as loaded": (
            data["weights_as_loaded"]["n_differ"] == 0 if get("weights_as_loaded") else None
        ),
        "logits + log-softmax identical": identical(data["direct"]) if get("direct") else None,
        "fast-path scores identical": identical(data["fast_path"]) if get("fast_path") else None,
        "lm-eval loop scores identical": identical(data["plain_path"])
        if get("plain_path")
        else None,
        "quantized weights and scores identical": (
            all(
                v["weights"]["n_differ"] == 0 and identical(v["scores"])
                for v in q.values()
                if isinstance(v, dict)
            )
            if q
            else None
        ),
        "restored scores identical": identical(data["restored"]) if get("restored") else None,
        "GPU slots": data["slots"]["ok"] if get("slots") else None,
    }


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _quantized_line(spec: str, q: dict[str, Any]) -> str:
    w, ll = q["weights"], q["scores"]["ll"]
    return (
        f"- {spec}: weights differing {w['n_differ']} of {w['n_tensors']} tensors; "
        f"log-likelihoods differing {ll['n_differ']} of {ll['n']} (max {ll['max_abs_diff']}); "
        f"quantize_model {q['quantize_single_s']} s on one device, {q['quantize_spread_s']} s "
        "spread"
    )


def _timing_lines(t: dict[str, Any]) -> list[str]:
    lines = [
        "",
        _row("timing", "one device", "spread"),
        "|---|---|---|",
        _row("load_model s", t["load_single_s"], t["load_spread_s"]),
        _row(
            f"scoring s (fast path, {t['scored_tokens']} tokens)",
            t["score_single_s"],
            t["score_spread_s"],
        ),
        _row("tokens/s", t["tokens_per_s_single"], t["tokens_per_s_spread"]),
    ]
    if "score_plain_single_s" in t:
        lines.append(
            _row("scoring s (lm-eval loop)", t["score_plain_single_s"], t["score_plain_spread_s"])
        )
    lines.append(f"\nTokenization {t['tokenize_s']} s; peak memory GiB {t['memory_gib_peak']}.")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The results as a short markdown report (verdicts first)."""
    lines = ["# Multi-GPU check", ""]
    env = data.get("environment", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", []))
    where = "CPU smoke run" if data.get("smoke") else f"GPUs: {gpus or 'none'}"
    lines.append(
        f"{where}; torch {env.get('torch')}, transformers {env.get('transformers')}, accelerate "
        f"{env.get('accelerate')}, lm-eval {env.get('lm_eval')}; {data.get('started')}, "
        f"{data.get('elapsed_s')} s in all."
    )
    lines += ["", _row("check", "result"), "|---|---|"]
    for name, ok in verdicts(data).items():
        lines.append(_row(name, "-" if ok is None else ("yes" if ok else "NO")))
    m = data.get("model")
    if m:
        lines += [
            "",
            f"Model: GPT-NeoX, {m['n_params'] / 1e9:.3f}B parameters (hidden {m['hidden_size']}, "
            f"{m['num_hidden_layers']} blocks), random weights, seed 0.",
        ]
    p = data.get("placement")
    if p:
        lines.append(f"Spread placement: {p['spread_map']}.")
    for key in ("direct", "fast_path", "plain_path", "restored"):
        if isinstance(data.get(key), dict):
            lines += ["", f"{key}:", "", _row("values", "n", "differ", "max abs diff")]
            lines.append("|---|---|---|---|")
            for name, c in data[key].items():
                if isinstance(c, dict) and "n" in c:
                    lines.append(_row(name, c["n"], c.get("n_differ"), c.get("max_abs_diff")))
    quantized = data.get("quantized") or {}
    if quantized:
        lines += ["", "Quantized in place:", ""]
        lines += [
            _quantized_line(spec, q) if isinstance(q, dict) else f"- {spec}: {q}"
            for spec, q in quantized.items()
        ]
    if data.get("timing"):
        lines += _timing_lines(data["timing"])
    for key in ("cuda_graphs_single", "cuda_graphs_spread"):
        if data.get(key) is not None:
            lines.append(f"\n{key}: {json.dumps(data[key])[:800]}")
    s = data.get("slots")
    if s:
        lines += ["", "GPU slots: " + json.dumps(s["checks"])]
        for k in ("holder_a", "holder_b", "third_while_held", "after_kill_with_imports"):
            lines.append(f"- {k}: {json.dumps(s[k])[:400]}")
    if data.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in data["errors"]]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="20B_tokenizer.json or a folder with it")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU, fake GPU ids")
    ap.add_argument("--size", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--docs", type=int, default=1000, help="multiple-choice documents")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--specs", default="int4-b64,nf4-b64-o0.01")
    ap.add_argument("--work", default=None, help="folder for the temporary model (default: tmp)")
    ap.add_argument("--skip", default="", help="parts to skip: scores,slots")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-release", help=argparse.SUPPRESS)
    ap.add_argument("--child-wait", type=float, default=30, help=argparse.SUPPRESS)
    ap.add_argument("--child-hold", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if "scores" not in args.skip and not args.tokenizer:
        ap.error("--tokenizer is required (the GPT-NeoX tokenizer)")
    report = Report(args.out, args.cpu_smoke)
    report.data["environment"] = environment(args.cpu_smoke)
    report.data["errors"] = []
    report.write()
    if "slots" not in args.skip:
        try:
            report.data["slots"] = check_slots(args)
        except Exception:
            report.data["errors"].append("slots: " + traceback.format_exc())
        report.write()
    if "scores" not in args.skip:
        try:
            check_scores(args, report)
        except Exception:
            report.data["errors"].append("scores: " + traceback.format_exc())
    report.write()
    print(markdown(report.data))
    failed = [k for k, v in verdicts(report.data).items() if v is False]
    if failed or report.data["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
