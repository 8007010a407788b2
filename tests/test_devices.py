"""GPU slots (kbit.devices) and the placement of models over several GPUs (kbit.loading).

The slot tests use fake device ids ("a", "b", ...) and a private lock directory, so they run
anywhere and never touch a real GPU; several processes contend for them through the same locks
the workflow's jobs use. The placement tests read models on the meta device (sizes only) and load
tiny models across two "cpu" devices, where accelerate's per-block hooks run as they do across
GPUs (the GPU check itself is benchmarks/multi_gpu_check.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kbit import devices
from kbit.devices import (
    Claim,
    GpuSlotError,
    claim_for_job,
    claim_gpus,
    gpus_needed,
    job_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.fixture
def lockdir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


@pytest.fixture(autouse=True)
def _release_claims():
    yield
    for claim in list(devices._HELD):
        claim.release()


def _claim(n: int, lockdir: Path, pool=("a", "b", "c"), **kw) -> tuple[Claim, dict]:
    env: dict[str, str] = {}
    claim = claim_gpus(n, pool=list(pool), directory=lockdir, env=env, poll_s=0.02, **kw)
    return claim, env


# ----------------------------------------------------------------------------- gpus_needed
def test_gpus_needed_arithmetic():
    # 1B float16 values, two copies (4 GB) + 15% of an 80 GB GPU (12 GB) on 64 GB usable: one GPU
    assert gpus_needed(10**9, "float16", 80 * 10**9) == 1
    # 70B float16, two copies: 280 GB + 12 GB over 64 GB usable per GPU -> 5 GPUs
    assert gpus_needed(70 * 10**9, "float16", 80 * 10**9) == 5
    # one copy, bfloat16 given as a torch dtype: 140 GB + 12 GB -> 3
    assert gpus_needed(70 * 10**9, torch.bfloat16, 80 * 10**9, weight_copies=1) == 3
    # float32 doubles the bytes: 280 + 12 -> 5; "auto" is float16 on CUDA
    assert gpus_needed(70 * 10**9, "float32", 80 * 10**9, weight_copies=1) == 5
    assert gpus_needed(70 * 10**9, "auto", 80 * 10**9, weight_copies=1) == 3


def test_gpus_needed_boundary():
    per_gpu = 1000
    # usable 800 per GPU, reserve 150: weights of 650 bytes fit one GPU exactly, 651 do not
    assert gpus_needed(325, "float16", per_gpu, weight_copies=1) == 1
    assert gpus_needed(326, "float16", per_gpu, weight_copies=1) == 2
    assert gpus_needed(0, "float16", per_gpu) == 1
    assert gpus_needed(325, "float16", per_gpu, weight_copies=1, headroom=0.5) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_params": -1},
        {"per_gpu_bytes": 0},
        {"weight_copies": 0},
        {"headroom": 1.0},
        {"output_reserve": 0.9},
        {"dtype": "int4"},
    ],
)
def test_gpus_needed_rejects_bad_input(kwargs):
    args = {"n_params": 10, "dtype": "float16", "per_gpu_bytes": 100} | kwargs
    with pytest.raises(ValueError):
        gpus_needed(**args)


# ----------------------------------------------------------------------------- claims, one process
def test_claims_take_free_devices_and_set_visible(lockdir):
    first, env1 = _claim(2, lockdir, label="evaluate[model=a]")
    assert first.devices == ("a", "b") and first.source == "claimed"
    assert env1 == {devices.VISIBLE_ENV: "a,b", devices.ORDER_ENV: "PCI_BUS_ID"}
    second, env2 = _claim(1, lockdir)
    assert second.devices == ("c",) and env2[devices.VISIBLE_ENV] == "c"
    with pytest.raises(GpuSlotError) as err:
        _claim(1, lockdir, timeout_s=0.2)
    msg = str(err.value)
    assert "no 1 free GPU(s) among a,b,c" in msg
    assert f"pid {os.getpid()} (evaluate[model=a]" in msg and devices.WAIT_ENV in msg
    first.release()
    assert env1 == {}  # restored as it was
    again, _ = _claim(2, lockdir)
    assert again.devices == ("a", "b")


def test_claim_keeps_a_chosen_device_order(lockdir):
    env = {devices.ORDER_ENV: "FASTEST_FIRST"}
    claim = claim_gpus(1, pool=["a"], directory=lockdir, env=env)
    assert env == {devices.ORDER_ENV: "FASTEST_FIRST", devices.VISIBLE_ENV: "a"}
    claim.release()
    assert env == {devices.ORDER_ENV: "FASTEST_FIRST"}


def test_claim_waits_then_times_out_after_the_limit(lockdir):
    _claim(3, lockdir)
    t0 = time.monotonic()
    with pytest.raises(GpuSlotError):
        _claim(1, lockdir, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5


def test_existing_visible_devices_are_respected(lockdir, caplog):
    env = {devices.VISIBLE_ENV: "3,5"}
    with caplog.at_level(logging.INFO, logger="kbit.devices"):
        claim = claim_gpus(2, pool=["a"], directory=lockdir, env=env)
    assert claim.devices == ("3", "5") and claim.source == "environment"
    assert env == {devices.VISIBLE_ENV: "3,5"}
    assert not lockdir.exists() or not list(lockdir.iterdir())  # nothing was locked
    assert "CUDA_VISIBLE_DEVICES=3,5 was set before the job started" in caplog.text


def test_no_gpu_job_claims_nothing(lockdir):
    claim, env = _claim(0, lockdir)
    assert claim.devices == () and claim.source == "none" and env == {}


def test_a_machine_without_gpus_runs_gpu_jobs_on_the_cpu(lockdir):
    """eval.device auto on a CPU machine: a GPU rule's job claims nothing and goes on."""
    claim, env = _claim(1, lockdir, pool=())
    assert claim.devices == () and claim.source == "none" and env == {}


def test_more_gpus_than_the_pool_fails_at_once(lockdir):
    t0 = time.monotonic()
    with pytest.raises(GpuSlotError, match=r"needs 4 GPU.*pool has 3"):
        _claim(4, lockdir, timeout_s=60)
    assert time.monotonic() - t0 < 1


def test_claim_refused_once_cuda_started(lockdir, monkeypatch):
    monkeypatch.setattr(devices, "cuda_driver_initialized", lambda: True)
    with pytest.raises(GpuSlotError, match="CUDA started in this process"):
        _claim(1, lockdir)


def test_cuda_driver_not_started_here():
    # the CPU build never loads the driver; a claim in this process is therefore allowed
    assert devices.cuda_driver_initialized() is False


def test_pool_and_wait_from_environment(monkeypatch):
    assert devices.gpu_pool({devices.POOL_ENV: " 2, 3 ,"}) == ["2", "3"]
    assert devices._wait_limit(None, {devices.WAIT_ENV: "12.5"}) == 12.5
    assert devices._wait_limit(None, {}) == devices.DEFAULT_WAIT_S
    with pytest.raises(GpuSlotError, match="KBIT_GPU_WAIT_S"):
        devices._wait_limit(None, {devices.WAIT_ENV: "soon"})


def test_job_gpus_and_claim_for_job(lockdir, monkeypatch):
    assert job_gpus(SimpleNamespace(resources=SimpleNamespace())) == 0
    assert job_gpus(SimpleNamespace(resources=SimpleNamespace(gpu="2"))) == 2
    with pytest.raises(GpuSlotError, match=r"resources\.gpu"):
        job_gpus(SimpleNamespace(resources=SimpleNamespace(gpu="two")))
    monkeypatch.delenv(devices.VISIBLE_ENV, raising=False)
    monkeypatch.delenv(devices.ORDER_ENV, raising=False)
    monkeypatch.setenv(devices.POOL_ENV, "x,y,z")
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(lockdir))
    smk = SimpleNamespace(
        resources=SimpleNamespace(gpu=2), rule="evaluate", wildcards={"model": "m", "quant": "q"}
    )
    claim = claim_for_job(smk)
    assert claim.devices == ("x", "y") and os.environ[devices.VISIBLE_ENV] == "x,y"
    holder = json.loads((lockdir / "gpu-x.lock").read_text())
    assert holder["job"] == "evaluate[model=m,quant=q]" and holder["pid"] == os.getpid()
    assert claim_for_job(smk) is claim  # once per process
    claim.release()
    assert devices.VISIBLE_ENV not in os.environ and devices.ORDER_ENV not in os.environ


# ----------------------------------------------------------------------------- claims, processes
_HOLDER = """
import json, sys, time
from kbit.devices import claim_gpus
env = {}
claim = claim_gpus(1, pool=sys.argv[1].split(","), directory=sys.argv[2], env=env, poll_s=0.02,
                   timeout_s=30, label="holder")
t0 = time.time()
print(json.dumps({"dev": claim.devices[0], "visible": env["CUDA_VISIBLE_DEVICES"], "t0": t0}),
      flush=True)
time.sleep(float(sys.argv[3]))
print(json.dumps({"t1": time.time()}), flush=True)
"""


def _holder(pool: str, lockdir: Path, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, pool, str(lockdir), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_processes_contending_never_share_a_device(lockdir):
    lockdir.mkdir()
    procs = [_holder("a,b", lockdir, 0.5) for _ in range(4)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        first, last = (json.loads(line) for line in out.splitlines())
        assert first["visible"] == first["dev"]
        spans.append((first["dev"], first["t0"], last["t1"]))
    for dev in ("a", "b"):
        held = sorted((t0, t1) for d, t0, t1 in spans if d == dev)
        assert held, f"device {dev} was never used"
        for (_, end), (start, _) in itertools.pairwise(held):
            assert start >= end, f"device {dev} held twice at once: {held}"
    # two devices, four holders of 0.5 s: the later two waited for the first two
    starts = sorted(t0 for _, t0, _ in spans)
    assert starts[2] - starts[0] >= 0.45


def test_killed_holder_releases_its_device(lockdir):
    lockdir.mkdir()
    proc = _holder("a", lockdir, 600)
    assert json.loads(proc.stdout.readline())["dev"] == "a"
    with pytest.raises(GpuSlotError, match=rf"GPU a: pid {proc.pid} \(holder"):
        _claim(1, lockdir, pool=("a",), timeout_s=0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    claim, env = _claim(1, lockdir, pool=("a",), timeout_s=5)
    assert claim.devices == ("a",) and env[devices.VISIBLE_ENV] == "a"


# ----------------------------------------------------------------------------- placement
def _skeleton(arch: str, layers: int = 8, tie: bool | None = None) -> torch.nn.Module:
    """A model of ``arch`` with ``layers`` blocks on the meta device (sizes only)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=1024, vocab_size=5000, tie_word_embeddings=bool(tie),
        )  # fmt: skip
    else:
        cfg = LlamaConfig(
            hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=512, vocab_size=5000, tie_word_embeddings=tie is not False,
        )  # fmt: skip
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model.tie_weights()
    return model


def _block_devices(plan: dict, prefix: str) -> list:
    keys = sorted(
        (k for k in plan if k.startswith(prefix + ".")), key=lambda k: int(k[len(prefix) + 1 :])
    )
    return [plan[k] for k in keys]


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_plan_places_whole_blocks_and_outer_parts_on_the_first_device(arch):
    from kbit.loading import plan_device_map

    model = _skeleton(arch, layers=8)
    prefix = "gpt_neox.layers" if arch == "gpt_neox" else "model.layers"
    plan = plan_device_map(model, [0, 1, 2])
    blocks = _block_devices(plan, prefix)
    assert len(blocks) == 8 and blocks == sorted(blocks) and set(blocks) == {0, 1, 2}
    # nothing inside a block is placed on its own: the block is the unit
    assert not [
        k for k in plan if k.startswith(prefix + ".") and k.count(".") > prefix.count(".") + 1
    ]
    outer = {k: v for k, v in plan.items() if not k.startswith(prefix + ".")}
    assert outer and set(outer.values()) == {0}
    assert "lm_head" in outer
    # every parameter is covered by exactly one entry
    names = [n for n, _ in model.named_parameters()]
    for n in names:
        assert sum(n == k or n.startswith(k + ".") for k in plan) == 1, n


def test_plan_keeps_a_tied_head_with_its_embedding():
    from kbit.loading import plan_device_map

    model = _skeleton("llama", layers=4, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = plan_device_map(model, ["cuda:0", "cuda:1"])
    assert plan["lm_head"] == plan["model.embed_tokens"] == "cuda:0"


def _max_load(sizes: list[int], fixed: list[int], bounds: list[int]) -> int:
    """The largest device load when device d holds blocks bounds[d]..bounds[d+1]-1."""
    spans = zip(fixed, bounds[:-1], bounds[1:], strict=True)
    return max(f + sum(sizes[a:b]) for f, a, b in spans)


def _brute_force(sizes: list[int], fixed: list[int]) -> int:
    cuts = itertools.combinations(range(1, len(sizes)), len(fixed) - 1)
    return min(_max_load(sizes, fixed, [0, *c, len(sizes)]) for c in cuts)


@pytest.mark.parametrize(
    ("sizes", "fixed"),
    [
        ([5] * 8, [0, 0, 0]),
        ([5] * 8, [17, 0, 0]),
        ([3, 9, 1, 7, 2, 8, 4], [0, 6]),
        ([1, 1, 1, 20, 1, 1], [0, 0, 0, 0]),
        ([2] * 5, [0, 0, 40]),
    ],
)
def test_partition_minimises_the_largest_device_load(sizes, fixed):
    from kbit.loading import _partition

    counts = _partition(sizes, fixed)
    assert sum(counts) == len(sizes) and min(counts) >= 1
    assert _max_load(sizes, fixed, [0, *itertools.accumulate(counts)]) == _brute_force(sizes, fixed)


def test_reserve_moves_blocks_off_the_device_that_holds_it():
    from kbit.loading import plan_device_map

    model = _skeleton("gpt_neox", layers=8)
    block = sum(p.numel() * 2 for p in model.gpt_neox.layers[0].parameters())
    even = _block_devices(plan_device_map(model, [0, 1]), "gpt_neox.layers")
    first = _block_devices(
        plan_device_map(model, [0, 1], reserve=[20 * block, 0]), "gpt_neox.layers"
    )
    last = _block_devices(
        plan_device_map(model, [0, 1], reserve=[0, 20 * block]), "gpt_neox.layers"
    )
    assert first.count(0) == 1  # the reserve alone outweighs all blocks: one block is the minimum
    assert last.count(1) == 1
    # without a reserve the embeddings and head on device 0 leave it fewer blocks than device 1
    assert 1 <= even.count(0) <= even.count(1)


def test_plan_checks_capacity_and_block_count():
    from kbit.loading import ModelLoadError, plan_device_map

    model = _skeleton("gpt_neox", layers=4)
    total = sum(p.numel() * 2 for p in model.parameters())
    assert plan_device_map(model, [0, 1], capacity=[total, total])
    with pytest.raises(ModelLoadError, match="does not fit on 2 device"):
        plan_device_map(model, [0, 1], weight_copies=2, capacity=[total // 2, total // 2])
    with pytest.raises(ValueError, match="4 decoder blocks cannot be spread over 5"):
        plan_device_map(model, [0, 1, 2, 3, 4])
    # a weight shared by two blocks (or a block and the embeddings) cannot live on two devices
    layers = model.gpt_neox.layers
    layers[3].mlp.dense_h_to_4h.weight = layers[0].mlp.dense_h_to_4h.weight
    with pytest.raises(ModelLoadError, match=r"layers\.3 shares weights"):
        plan_device_map(model, [0, 1])


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from models import tiny_model_dir

    root = tmp_path_factory.mktemp("models")
    return {arch: tiny_model_dir(arch, root) for arch in ("gpt_neox", "llama")}


def test_checkpoint_size_from_headers(tiny_dirs):
    from models import tiny_model

    from kbit.loading import checkpoint_size

    n, dtype = checkpoint_size(tiny_dirs["gpt_neox"])
    assert n == sum(t.numel() for t in tiny_model("gpt_neox").state_dict().values())
    assert dtype == torch.float32


def test_gpus_for_model_decides_from_size_and_visible(tiny_dirs, monkeypatch, caplog):
    from kbit.loading import FORCE_GPUS_ENV, checkpoint_size, gpus_for_model

    d = tiny_dirs["gpt_neox"]
    monkeypatch.delenv(FORCE_GPUS_ENV, raising=False)
    n_bytes = checkpoint_size(d)[0] * 4
    assert gpus_for_model(d, visible=4, per_gpu_bytes=100 * n_bytes, weight_copies=2) == 1
    # a GPU that holds a third of the weights: float32, one copy -> 4 needed (headroom, reserve)
    small = n_bytes // 3
    assert (
        gpus_for_model(d, visible=8, per_gpu_bytes=small)
        == gpus_needed(checkpoint_size(d)[0], torch.float32, small, weight_copies=1)
        > 1
    )
    # float16 halves the bytes, so fewer GPUs
    assert gpus_for_model(d, torch.float16, visible=8, per_gpu_bytes=small) < gpus_for_model(
        d, visible=8, per_gpu_bytes=small
    )
    with caplog.at_level(logging.WARNING, logger="kbit.loading"):
        assert gpus_for_model(d, visible=2, per_gpu_bytes=small) == 2
    assert "2 are visible" in caplog.text
    assert gpus_for_model(d, visible=1, per_gpu_bytes=small) == 1
    assert gpus_for_model(d, gpus=3, visible=4, per_gpu_bytes=100 * n_bytes) == 3
    monkeypatch.setenv(FORCE_GPUS_ENV, "2")
    assert gpus_for_model(d, visible=4, per_gpu_bytes=100 * n_bytes) == 2
    with pytest.raises(ValueError, match="3 GPUs requested but 2"):
        gpus_for_model(d, gpus=3, visible=2)
    monkeypatch.setenv(FORCE_GPUS_ENV, "two")
    with pytest.raises(ValueError, match=FORCE_GPUS_ENV):
        gpus_for_model(d, visible=4)


def _requests():
    from lm_eval.api.instance import Instance

    texts = ["The quick brown fox", "A k-bit data type maps each weight", "Four bits are"]
    reqs = []
    for i, ctx in enumerate(texts):
        for j, cont in enumerate([" jumps over", " to one of", " often optimal."]):
            reqs.append(Instance("loglikelihood", {}, (ctx * (i + 1), cont), 3 * i + j))
    return reqs


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_model_across_devices_scores_and_quantizes_like_one(tiny_dirs, arch):
    """Loaded across two devices (accelerate's device map and per-block hooks), a model has the
    same weights, log-likelihoods and quantized weights as loaded on one."""
    from accelerate import dispatch_model

    from kbit.evaluation.lm import make_lm
    from kbit.loading import load_across, load_model, plan_device_map
    from kbit.model_quant import WeightSnapshot, quantize_model

    d = tiny_dirs[arch]
    one, tok = load_model(d, "float32", "cpu")
    spread = load_across(d, ["cpu", "cpu"], dtype="float32")
    a, b = dict(one.named_parameters()), dict(spread.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if arch == "llama":  # tied as loaded
        assert spread.lm_head.weight is spread.model.embed_tokens.weight
    # the per-block hooks that move activations between GPUs, attached on the CPU
    dispatch_model(spread, plan_device_map(spread, ["cpu", "cpu"]), main_device="cpu",
                   force_hooks=True)  # fmt: skip
    assert hasattr(spread, "_hf_hook")
    reqs = _requests()
    for fast in (True, False):
        ref = make_lm(one, tok, 4, "float32", fast=fast).loglikelihood(reqs)
        got = make_lm(spread, tok, 4, "float32", fast=fast).loglikelihood(reqs)
        assert got == ref
    snap = WeightSnapshot(spread)
    quantize_model(one, "int4-b64")
    quantize_model(spread, "int4-b64")
    assert all(
        torch.equal(x, y)
        for (_, x), (_, y) in zip(one.named_parameters(), spread.named_parameters(), strict=True)
    )
    q_ref = make_lm(one, tok, 4, "float32").loglikelihood(reqs)
    assert make_lm(spread, tok, 4, "float32").loglikelihood(reqs) == q_ref != ref
    snap.restore(spread)
    assert make_lm(spread, tok, 4, "float32").loglikelihood(reqs) == ref


def test_model_devices_lists_each_device_once(tiny_dirs):
    from kbit.loading import load_causal_lm, model_devices

    model = load_causal_lm(tiny_dirs["gpt_neox"], dtype="float32")
    assert model_devices(model) == [torch.device("cpu")]


def test_single_device_loading_is_unchanged(tiny_dirs, monkeypatch):
    """On the CPU (and on an indexed CUDA device) the placement logic is never consulted."""
    import kbit.loading as loading

    def boom(*a, **k):
        raise AssertionError("placement consulted")

    monkeypatch.setattr(loading, "gpus_for_model", boom)
    model, _ = loading.load_model(tiny_dirs["gpt_neox"], "float32", "cpu")
    assert loading.model_devices(model) == [torch.device("cpu")]


def test_bare_cuda_asks_for_a_placement_an_indexed_device_does_not(tiny_dirs, monkeypatch):
    import kbit.loading as loading

    calls = []
    monkeypatch.setattr(loading, "gpus_for_model", lambda *a, **k: calls.append(k) or 2)
    monkeypatch.setattr(loading, "_load_on_gpus", lambda model_dir, n, *a: ("spread", n))
    assert loading.load_causal_lm(tiny_dirs["gpt_neox"], device="cuda") == ("spread", 2)
    assert calls[-1]["weight_copies"] == 1
    loading.load_model(tiny_dirs["gpt_neox"], "float16", "cpu")  # CPU: not consulted
    assert len(calls) == 1

    class Consulted(Exception):
        pass

    def boom(*a, **k):
        raise Consulted

    monkeypatch.setattr(loading, "gpus_for_model", boom)
    with pytest.raises((RuntimeError, AssertionError)):  # no CUDA here, but never Consulted
        loading.load_causal_lm(tiny_dirs["gpt_neox"], device="cuda:1")


@pytest.fixture(scope="module")
def four_block_dir(tmp_path_factory) -> Path:
    """Four blocks that outweigh the embeddings, so that another GPU can relieve the others."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        vocab_size=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("four") / "m"
    GPTNeoXForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def test_gpus_are_added_when_whole_blocks_do_not_fit(four_block_dir, monkeypatch):
    """_load_on_gpus starts from the estimate and adds a GPU while the plan exceeds capacity;
    with KBIT_FORCE_GPUS it keeps the forced number."""
    import kbit.loading as loading

    skeleton = loading.empty_model(four_block_dir, torch.float32)

    def fits(n: int, total: int) -> bool:
        reserve = [int(devices.OUTPUT_RESERVE_FRACTION * total)] + [0] * (n - 1)
        cap = [int((1 - devices.HEADROOM_FRACTION) * total)] * n
        try:
            loading.plan_device_map(skeleton, list(range(n)), reserve=reserve, capacity=cap)
        except loading.ModelLoadError:
            return False
        return True

    weights = sum(p.numel() * 4 for p in skeleton.parameters())
    candidates = range(weights // 4, 2 * weights, weights // 200)
    total = next(t for t in candidates if fits(3, t) and not fits(2, t))
    monkeypatch.setattr(loading.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(
        loading.torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=total)
    )
    monkeypatch.setattr(loading, "_load_with_plan", lambda model_dir, plan, *a: plan)
    monkeypatch.delenv(loading.FORCE_GPUS_ENV, raising=False)
    plan = loading._load_on_gpus(four_block_dir, 2, torch.float32, False, 1, None)
    assert sorted(set(plan.values())) == [0, 1, 2]
    monkeypatch.setenv(loading.FORCE_GPUS_ENV, "2")
    plan = loading._load_on_gpus(four_block_dir, 2, torch.float32, False, 1, None)
    assert sorted(set(plan.values())) == [0, 1]
