"""Evaluation runner: batched (load once, many specs) == one job per spec; resumable; helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from models import ARCHS, shared_data_dir, tiny_model, tiny_model_dir, tiny_tokenizer

from kbit.evaluation.batch_size import (
    DEFAULT_CPU_BATCH_SIZE,
    cpu_batch_size,
    find_batch_size,
    read_batch_size,
    search_batch_size,
    write_batch_size,
)
from kbit.evaluation.lm import make_lm
from kbit.evaluation.metrics import task_metrics
from kbit.evaluation.progress import Progress
from kbit.evaluation.records import write_parquet
from kbit.evaluation.runner import evaluate_one, evaluate_specs, matmul_params
from kbit.evaluation.tasks import build_task_dict
from kbit.loading import ModelLoadError, load_model, resolve_dtype
from kbit.settings import EvalSettings, QuantizeOptions

TASKS = ["lambada_openai", "piqa", "winogrande"]
SPECS = ["fp16", "int4-b64", "float3-e2-b64"]
LIMIT = 6
META = {"model": "tiny", "hf_id": "local/tiny", "revision": "none", "family": "test"}
#: columns that measure time and so differ between any two runs
TIMED = {"wall_time_s", "forward_time_s", "flop_per_s"}


def _settings(**over: object) -> EvalSettings:
    """CPU float32 evaluation (the schema's defaults for everything else)."""
    return EvalSettings.from_config({"dtype": "float32", "device": "cpu", **over})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = shared_data_dir() / "eval"
    if not data.is_dir():
        pytest.skip(f"shared evaluation data not found at {data} (set KBIT_SHARED_DATA)")
    tmp = tmp_path_factory.mktemp("runner")
    return {"tmp": tmp, "data": data, "model": tiny_model_dir("gpt_neox", tmp)}


def _tasks(setup: dict) -> dict:
    return build_task_dict(TASKS, setup["data"], setup["tmp"] / "tasks")


def _paths(root: Path) -> dict[tuple[str, str], Path]:
    return {(q, t): root / q / f"{t}.parquet" for q in SPECS for t in TASKS}


def test_batched_equals_one_job_per_spec(setup: dict, caplog: pytest.LogCaptureFixture) -> None:
    root = setup["tmp"]
    for q in SPECS:
        evaluate_one(
            setup["model"], q, _tasks(setup), root / "single" / q, META,
            batch_size=4, settings=_settings(limit=LIMIT),
        )  # fmt: skip
    paths = _paths(root / "batched")
    with caplog.at_level(logging.INFO, logger="kbit.evaluation"):
        written = evaluate_specs(
            setup["model"], SPECS, _tasks(setup), paths, META,
            batch_size=4, settings=_settings(limit=LIMIT),
        )  # fmt: skip
    assert set(written) == set(paths)
    assert any("tasks" in r.getMessage() and "rows" in r.getMessage() for r in caplog.records)
    for (q, t), path in paths.items():
        a = pd.read_parquet(root / "single" / q / f"{t}.parquet")
        b = pd.read_parquet(path)
        assert len(a) == LIMIT and a["doc_id"].tolist() == list(range(LIMIT))
        cols = [c for c in a.columns if c not in TIMED]
        assert list(a.columns) == list(b.columns)
        pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
        assert (a["quant"] == q).all() and (a["task"] == t).all()
        assert a["flops"].iloc[0] == 2.0 * a["task_n_tokens"].iloc[0] * _mm(setup)
    # quantization changes the scores, and the bit accounting follows the spec
    fp = pd.read_parquet(paths[("fp16", "piqa")])
    q3 = pd.read_parquet(paths[("float3-e2-b64", "piqa")])
    assert [list(x) for x in fp["ll"]] != [list(x) for x in q3["ll"]]
    assert fp["total_bits"].iloc[0] == 16 * fp["n_params"].iloc[0]
    assert q3["total_bits"].iloc[0] < fp["total_bits"].iloc[0]
    assert q3["n_params_quantized"].iloc[0] > 0 == fp["n_params_quantized"].iloc[0]
    assert set(task_metrics(fp)) == {"acc", "acc_norm"}


def _mm(setup: dict) -> int:
    model, _ = load_model(setup["model"], "float32", "cpu")
    return matmul_params(model)


def test_batched_is_resumable(setup: dict) -> None:
    paths = _paths(setup["tmp"] / "resume")
    kw = {"batch_size": 4, "settings": _settings(limit=2)}
    first = evaluate_specs(setup["model"], SPECS, _tasks(setup), paths, META, **kw)
    assert len(first) == len(paths)
    before = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert evaluate_specs(setup["model"], SPECS, _tasks(setup), paths, META, **kw) == {}
    paths[("int4-b64", "piqa")].unlink()
    again = evaluate_specs(setup["model"], SPECS, _tasks(setup), paths, META, **kw)
    assert list(again) == [("int4-b64", "piqa")]
    for p, t in before.items():
        if p != paths[("int4-b64", "piqa")]:
            assert p.stat().st_mtime_ns == t


def test_graph_policy_decides_by_measurement(tmp_path: Path) -> None:
    """Graphs are captured only when the specs left can repay the capture, kept only while a
    replay is faster than an eager spec, and the measurement is cached for the next job."""
    from kbit.evaluation.speed.graphs import GraphPolicy

    cache = tmp_path / "graphs.json"
    # no cache: spec 0 warms up (never a reference), spec 1 is the eager reference (10 s), spec 2
    # measures the capture (5 specs left incl. itself: 25 - 10 = 15 s), spec 3 the saving (3 s)
    p = GraphPolicy("auto", 7, "gpu|shape", cache)
    assert not p.use(0)
    p.record(0, 40.0, graphs=False)  # warm-up and tokenization: would fake a 33 s saving
    assert not p.use(1)
    p.record(1, 10.0, graphs=False)
    assert p.use(2)
    p.record(2, 25.0, graphs=True)  # eager pass + capture + check: capture costs 15 s
    assert p.use(3)
    p.record(3, 7.0, graphs=True)
    assert (p.eager_s, p.capture_s, p.saving_s) == (10.0, 15.0, 3.0)
    assert p.use(4) and p.use(6)
    assert "against eager spec 1 (10.00 s)" in p.decisions[-1]
    # the next job: at spec 2 with 5 specs left, 4 x 3 s repay less than 15 s; with 7, 6 x 3 do
    q = GraphPolicy("auto", 7, "gpu|shape", cache)
    q.record(0, 40.0, graphs=False)
    q.record(1, 10.0, graphs=False)
    assert not q.use(2) and not q.use(3)
    r = GraphPolicy("auto", 9, "gpu|shape", cache)
    r.record(0, 40.0, graphs=False)
    r.record(1, 10.0, graphs=False)
    assert r.use(2) and "cached capture cost 15.00 s" in r.decisions[0]
    # replays slower than eager (an H200 at its own batch size): off after the measurement
    slow = GraphPolicy("auto", 7, "other", cache)
    slow.record(0, 40.0, graphs=False)
    slow.record(1, 10.0, graphs=False)
    assert slow.use(2)
    slow.record(2, 20.0, graphs=True)
    slow.record(3, 10.2, graphs=True)
    assert not slow.use(4) and "off" in slow.decisions[-1]
    # too few specs to learn on; forced modes; a broken capture stays off
    few = GraphPolicy("auto", 3, "new", cache)
    few.record(0, 40.0, graphs=False)
    few.record(1, 10.0, graphs=False)
    assert not few.use(2)
    assert GraphPolicy(True, 2, "k", cache).use(0)
    assert not GraphPolicy(True, 2, "k", cache).use(1, graphs_ok=False)
    assert not GraphPolicy(False, 9, "k", cache).use(4)


def test_evaluate_specs_needs_every_output_path(setup: dict) -> None:
    paths = _paths(setup["tmp"] / "x")
    del paths[("fp16", "piqa")]
    with pytest.raises(ValueError, match=r"fp16.*piqa"):
        evaluate_specs(
            setup["model"], SPECS, _tasks(setup), paths, META, batch_size=4, settings=_settings()
        )


def test_parquet_schema_and_atomic_write(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "doc_id": [0, 1],
            "ll": [[-1.0, -2.0], [-3.0]],
            "is_greedy": [[True, False], []],
            "choice_chars": [[3, 4], [5]],
            "acc": [1.0, float("nan")],
        }
    )
    path = write_parquet(df, tmp_path / "a" / "t.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]
    schema = pq.read_schema(path)
    assert str(schema.field("ll").type) == "list<element: double>"
    assert str(schema.field("is_greedy").type) == "list<element: bool>"
    back = pd.read_parquet(path)
    assert back["ll"].iloc[0].tolist() == [-1.0, -2.0]


class _Head(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, vocab)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_cpu_batch_size_is_capped_by_host_memory() -> None:
    """8 x 8192-token rows over 49152 logits (SmolLM2): 26 GB with the log-softmax."""
    gib = 2**30
    assert cpu_batch_size(8192, 49152, 8, memory_bytes=24 * gib) == 3
    assert cpu_batch_size(8192, 49152, 8, memory_bytes=256 * gib) == 8
    assert cpu_batch_size(8192, 49152, 8, memory_bytes=gib) == 1  # never below one
    assert cpu_batch_size(2048, 50304, 8, memory_bytes=24 * gib) == 8


@pytest.mark.parametrize(
    ("limit", "cap", "expected"),
    [(37, 512, 32), (50, 512, 48), (64, 512, 64), (1000, 512, 512), (1000, 100, 64), (0, 512, 0)],
)
def test_batch_size_search_steps(limit: int, cap: int, expected: int) -> None:
    """Powers of two, then every quarter step below the first that does not fit, never past the
    cap, and the winner measured a second time."""
    probes: list[int] = []

    def fits(bs: int) -> bool:
        probes.append(bs)
        return bs <= limit

    assert search_batch_size(fits, cap) == expected
    assert max(probes) <= max(cap, 1) and len(probes) <= 14
    if limit == 50:
        assert probes == [1, 2, 4, 8, 16, 32, 64, 40, 48, 56, 48]


def test_batch_size_search_when_memory_is_not_monotonic() -> None:
    """The H200's 1.4B peaks: 128 fits, 160 needs less than 128, 192 does not fit; a size that
    fits only once (allocator state) is not taken."""
    peaks = {1: 1, 2: 2, 4: 4, 8: 8, 16: 16, 32: 30, 64: 60, 128: 115.0, 160: 112.3, 192: 134.2,
             224: 126.0, 256: 150.0}  # fmt: skip

    def fits(bs: int) -> bool:
        return peaks[bs] <= 127.0

    assert search_batch_size(fits, 512) == 224  # probed past the failure at 192
    flaky = {224: [True, False]}

    def fits_once(bs: int) -> bool:
        if bs in flaky:
            return flaky[bs].pop(0)
        return fits(bs)

    assert search_batch_size(fits_once, 512) == 160


def test_batch_size_on_cpu_and_json(tmp_path: Path) -> None:
    model = _Head(4)
    assert find_batch_size(model, 128, "cpu") == DEFAULT_CPU_BATCH_SIZE
    assert find_batch_size(model, 128, "cpu", default=3) == 3
    with pytest.raises(ValueError, match="max_length"):
        find_batch_size(model, 0, "cpu")
    path = tmp_path / "bs.json"
    write_batch_size(path, {"batch_size": 16, "device": "cpu"})
    assert read_batch_size(path) == 16
    assert read_batch_size(None, default=5) == 5
    path.write_text(json.dumps({"batch_size": "auto"}))
    with pytest.raises(ValueError, match="positive integer"):
        read_batch_size(path)
    with pytest.raises(ValueError, match="positive integer"):
        write_batch_size(path, {"batch_size": 0})


def test_eval_dtype_and_bad_inputs(tmp_path: Path) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="allowed are"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path, device="cpu")


def test_progress_logs_tasks_rows_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    p = Progress(n_tasks=2, interval_s=0.0, label="m/q")
    with caplog.at_level(logging.INFO, logger="kbit.evaluation"):
        p.start_task("piqa")
        p.add_rows(10)
        p.tick(5)
        p.end_task()
    msgs = [r.getMessage() for r in caplog.records]
    assert "tasks 0/2, rows 5/10" in msgs[0] and "time left" in msgs[0]
    assert "tasks 1/2, rows 10/10" in msgs[-1] and msgs[-1].endswith("done")


def test_artifact_job_equals_batched(setup: dict) -> None:
    """The one-job path reading a packed artifact writes what the batched job writes."""
    from kbit.artifact import quantize_to_artifact

    spec, task = "int4-b64", "piqa"
    art = setup["tmp"] / "artifact"
    quantize_to_artifact(setup["model"], spec, art, device="cpu")
    kw = {"batch_size": 4, "settings": _settings(limit=4)}
    one = setup["tmp"] / "art-one.parquet"
    tasks = build_task_dict([task], setup["data"], setup["tmp"] / "tasks")
    evaluate_one(setup["model"], spec, tasks, one, META, artifact_dir=art, **kw)
    paths = {(spec, task): setup["tmp"] / "art-batched.parquet"}
    tasks = build_task_dict([task], setup["data"], setup["tmp"] / "tasks")
    evaluate_specs(setup["model"], [spec], tasks, paths, META, **kw)
    a, b = pd.read_parquet(one), pd.read_parquet(paths[(spec, task)])
    cols = [c for c in a.columns if c not in TIMED]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)


class _Named(dict):
    """The attribute-and-get access of Snakemake's input/params/wildcards objects (a missing
    attribute is an AttributeError, as there, so ``getattr(x, name, default)`` works)."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _run_script(name: str, config: dict, **fields: object) -> None:
    import runpy

    smk = _Named(
        config=config,
        wildcards=_Named(fields.get("wildcards", {})),
        input=fields["input"]
        if isinstance(fields.get("input"), list)
        else _Named(fields.get("input", {})),
        params=_Named(fields.get("params", {})),
        output=fields["output"],
        log=list(fields["log"]),
        rule=name.removesuffix(".py"),
        resources=_Named(fields.get("resources", {})),
    )
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "workflow" / "scripts" / name),
                   init_globals={"snakemake": smk})  # fmt: skip


def test_workflow_scripts(setup: dict) -> None:
    """prepare_task.py -> batch_size.py -> evaluate.py (one spec from its artifact, and all
    specs batched) -> publish_eval.py: the same files either way, a restarted job takes finished
    files from the cache, a changed setting is a new cache entry, and a failure is logged with
    what to do on the first line."""
    from kbit.artifact import quantize_to_artifact
    from kbit.study import build_study

    tmp = setup["tmp"] / "scripts"
    config = build_study(
        {
            "models": {"tiny": {"path": str(setup["model"]), "family": "test"}},
            "tasks": TASKS,
            "data_dir": str(setup["data"]),
            "quant": {"specs": ["int4-b64"]},
            "eval": {"dtype": "float32", "device": "cpu", "limit": 3, "batch_size": "auto"},
        }
    ).config
    tasks_dir = tmp / "tasks"
    for t in TASKS:
        _run_script(
            "prepare_task.py", config,
            params={"task": t, "data_dir": str(setup["data"]), "corpus": None},
            output=_Named(yaml=str(tasks_dir / t / f"{t}.yaml")), log=[str(tmp / f"{t}.log")],
        )  # fmt: skip
    bs = tmp / "batch.json"
    _run_script(
        "batch_size.py", config, wildcards={"model": "tiny"},
        input={"model": str(setup["model"])},
        params={"requested": "auto", "trust_remote_code": False},
        output=[str(bs)], log=[str(tmp / "bs.log")],
    )  # fmt: skip
    assert read_batch_size(bs) == DEFAULT_CPU_BATCH_SIZE
    art = tmp / "artifact"
    quantize_to_artifact(setup["model"], "int4-b64", art)
    common = {"model": str(setup["model"]), "batch_size": str(bs)}

    def evaluate(quants: list[str], manifest: Path, artifact: Path | None = None) -> None:
        _run_script(
            "evaluate.py", config, wildcards={"model": "tiny"},
            input={**common, **({"artifact": str(artifact)} if artifact else {})},
            params={"quants": quants, "tasks": TASKS, "tasks_dir": str(tasks_dir),
                    "cache": str(tmp / "cache")},
            output=[str(manifest)], log=[str(manifest.with_suffix(".log"))],
        )  # fmt: skip

    def publish(manifest: Path, quant: str, task: str) -> pd.DataFrame:
        out = tmp / "evals" / manifest.stem / quant / f"{task}.parquet"
        _run_script(
            "publish_eval.py", config, wildcards={"model": "tiny", "quant": quant},
            input=[str(manifest)], output=[str(out)], log=[str(tmp / "publish.log")],
            params={"tasks": [task]},
        )  # fmt: skip
        return pd.read_parquet(out)

    one = tmp / "one.json"
    evaluate(["int4-b64"], one, art)
    batched = tmp / "batched.json"
    evaluate(["fp16", "int4-b64"], batched)
    for t in TASKS:
        a, b = publish(one, "int4-b64", t), publish(batched, "int4-b64", t)
        cols = [c for c in a.columns if c not in TIMED]
        pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
        assert len(a) == 3 and a["batch_size"].iloc[0] == DEFAULT_CPU_BATCH_SIZE
    # a restarted job (Snakemake deleted its manifest) takes the finished files from the cache
    cached = sorted((tmp / "cache").rglob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    batched.unlink()
    evaluate(["fp16", "int4-b64"], batched)
    assert "0 to evaluate" in batched.with_suffix(".log").read_text()
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    # a changed setting is a fresh cache entry for the tasks it concerns only
    config["eval"]["task_limits"] = {"piqa": 1}
    evaluate(["fp16", "int4-b64"], batched)
    assert (
        "4 of 6 (quant, task) files cached, 2 to evaluate"
        in batched.with_suffix(".log").read_text()
    )
    assert len(publish(batched, "fp16", "piqa")) == 1
    # a failing job says what to do on the first line of its log, with the traceback below
    bad = tmp / "bad.json"
    with pytest.raises(Exception, match="does not exist"):
        _run_script(
            "evaluate.py", config, wildcards={"model": "tiny"},
            input={**common, "model": str(tmp / "nowhere")},
            params={"quants": ["fp16"], "tasks": TASKS, "tasks_dir": str(tasks_dir),
                    "cache": str(tmp / "cache-bad")},
            output=[str(bad)], log=[str(tmp / "bad.log")],
        )  # fmt: skip
    lines = (tmp / "bad.log").read_text().splitlines()
    assert lines[0].startswith("FAILED: model directory") and "does not exist" in lines[0]
    assert any("Traceback" in ln for ln in lines[1:])


def test_batched_restores_tied_weights(setup: dict) -> None:
    """A spec that quantizes the LM head of a tied model unties it; the next spec must still
    see the original weights on both sides (the fp16 scores equal those of a fresh load)."""
    model = tiny_model_dir("gpt2", setup["tmp"])
    kw = {"batch_size": 4, "settings": _settings(limit=3)}
    opts = QuantizeOptions(quantize_lm_head=True)
    root = setup["tmp"] / "tied"
    task = build_task_dict(["piqa"], setup["data"], setup["tmp"] / "tasks-tied")
    evaluate_one(model, "fp16", task, root / "fresh.parquet", META, **kw)
    fresh = pd.read_parquet(root / "fresh.parquet")
    paths = {(q, "piqa"): root / q / "piqa.parquet" for q in ("int3-b64", "fp16")}
    evaluate_specs(model, ["int3-b64", "fp16"], task, paths, META, options=opts, **kw)
    after = pd.read_parquet(paths[("fp16", "piqa")])
    cols = [c for c in fresh.columns if c not in TIMED]
    pd.testing.assert_frame_equal(fresh[cols], after[cols], check_exact=True)
    q3 = pd.read_parquet(paths[("int3-b64", "piqa")])
    assert [list(x) for x in q3["ll"]] != [list(x) for x in after["ll"]]


# ---------------------------------------------------------------------- fast scoring
def _lm(setup: dict, batch_size: int = 3, **options: object):
    model, tok = load_model(setup["model"], "float32", "cpu")
    return make_lm(model, tok, batch_size, **options)


def test_fast_scoring_equals_hflm_scoring(setup: dict) -> None:
    """The fast scoring loop == HFLM's own, bit for bit, on every output type
    (odd batch size, so batches mix lengths; WikiText's rolling windows included)."""
    from kbit.evaluation.runner import evaluate_tasks

    names = ["lambada_openai", "piqa", "winogrande", "wikitext"]
    frames = {}
    for fast in (True, False):
        tasks = build_task_dict(names, setup["data"], setup["tmp"] / "tasks-fast")
        lm = _lm(setup, fast=fast)  # plain: HFLM's own loop and model call
        res = evaluate_tasks(lm, tasks, limit={"wikitext": 1, **dict.fromkeys(names[:3], 5)})
        frames[fast] = {n: r.docs for n, r in res.items()}
        assert all(r.forward_tokens > 0 and r.forward_time_s > 0 for r in res.values())
    for n in names:
        pd.testing.assert_frame_equal(frames[True][n], frames[False][n], check_exact=True)


def _kv_cache_devices() -> list:
    gpu = pytest.param("cuda", marks=pytest.mark.gpu)
    return ["cpu", gpu] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _kv_cache_devices())
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_without_kv_cache_gives_the_same_logits(arch: str, device: str) -> None:
    """The fast path's forward pass (``use_cache=False``) == HFLM's (``model(inps)``, which fills
    a key/value cache), bit for bit; on CUDA with real head sizes in fp16, whose attention
    kernels see the keys and values with other strides when no cache copies them."""
    if device == "cuda":
        model = tiny_model(arch, hidden=2048, heads=16).to("cuda", torch.float16)
        shapes = [(64, 300), (8, 1024), (5, 37)]
    else:
        model = tiny_model(arch)
        shapes = [(3, 37), (2, 130)]
    tok = tiny_tokenizer(arch)
    lm_skip = make_lm(model, tok, 4)
    lm_hflm = make_lm(model, tok, 4, kv_cache=True)
    gen = torch.Generator().manual_seed(0)
    for b, n in shapes:
        inps = torch.randint(0, model.config.vocab_size, (b, n), generator=gen).to(device)
        a, ref = lm_skip._model_call(inps), lm_hflm._model_call(inps)
        assert a.dtype == ref.dtype and torch.equal(a, ref), (arch, device, b, n)


def _graph_requests(n_max: int, vocab: int) -> list:
    gen = torch.Generator().manual_seed(1)

    def toks(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi, (1,), generator=gen))
        return torch.randint(10, min(400, vocab), (n,), generator=gen).tolist()

    reqs = [((f"c{i}", f"x{i}"), toks(1, 60), toks(1, 6)) for i in range(40)]
    base = list(range(100, 140))
    reqs += [
        (("a", "1"), base[:30], base[30:35]),
        (("b", "2"), base[:30], [*base[30:34], 7]),  # shares a forward row with "a"
        ((None, None), [1], [t % vocab for t in range(300, 300 + n_max)]),  # a rolling window
    ]
    return reqs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_replay_scores_like_eager(arch: str) -> None:
    """Batches replayed as CUDA graphs (``cuda_graphs=True``) give HFLM's numbers bit for bit,
    at a real head size: on capture, on later replays, after the weights change in place, and
    after a parameter is replaced (graphs are captured again); graphs stay on, so every
    capture matched its eager pass."""
    model = tiny_model(arch, hidden=1024, heads=8).to("cuda", torch.float16)
    tok = tiny_tokenizer(arch)
    graphed = make_lm(model, tok, 7, cuda_graphs=True)
    stock = make_lm(model, tok, 7, fast=False)
    reqs = _graph_requests(graphed.max_length, model.config.vocab_size)
    for step in ("capture", "replay", "in-place", "replaced"):
        if step == "in-place":
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.75)
        elif step == "replaced":
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach() * 1.5)
        with graphed.reuse_plans("task"):
            got = graphed._loglikelihood_tokens(list(reqs))
        want = stock._loglikelihood_tokens(list(reqs))
        assert got == want, (arch, step)
        graphs = [b.graph for p in graphed._plans.values() for b in p.batches]
        assert graphed.cuda_graphs and graphs and all(g is not None for g in graphs), step
    assert graphed.forward_time_s > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_turn_off_when_a_capture_differs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A captured graph whose replay disagrees with the eager pass in any bit turns graphs
    off (one warning, graphs released) and the results stay the eager ones."""
    model = tiny_model("gpt_neox", hidden=1024, heads=8).to("cuda", torch.float16)
    tok = tiny_tokenizer("gpt_neox")
    graphed = make_lm(model, tok, 7, cuda_graphs=True)
    stock = make_lm(model, tok, 7, fast=False)
    capture = graphed._capture

    def off_by_one(batch) -> None:  # the graph's outputs no longer match its eager pass
        capture(batch)
        sums, ok = batch.graph_out
        batch.graph_out = (sums + 1, ok)

    monkeypatch.setattr(graphed, "_capture", off_by_one)
    reqs = _graph_requests(graphed.max_length, model.config.vocab_size)
    want = stock._loglikelihood_tokens(list(reqs))
    for _ in range(2):
        with caplog.at_level(logging.WARNING), graphed.reuse_plans("task"):
            assert graphed._loglikelihood_tokens(list(reqs)) == want
    assert not graphed.cuda_graphs
    assert all(b.graph is None for p in graphed._plans.values() for b in p.batches)
    assert sum("CUDA graphs off" in r.getMessage() for r in caplog.records) == 1


def test_fast_scoring_shared_rows_and_truncation(setup: dict) -> None:
    """Requests sharing one forward row (same context + continuation[:-1], also with another
    split between context and continuation) and over-long requests score as in HFLM."""
    fast, stock = _lm(setup), _lm(setup, fast=False)
    n = fast.max_length
    base = list(range(100, 140))
    reqs = [
        (("a", "1"), base[:30], base[30:35]),
        (("b", "2"), base[:30], [*base[30:34], 7]),  # same row, other last token
        (("c", "3"), base[:34], [9]),  # same row, shorter continuation
        (("d", "4"), base[:20], base[20:22]),
        (("e", "5"), [5] * (n - 3), list(range(200, 210))),  # truncated from the left
        ((None, None), [1], list(range(300, 300 + n))),  # a full rolling window
        (("f", "6"), [11, 12], [13]),
    ]
    a = fast._loglikelihood_tokens(list(reqs))
    b = stock._loglikelihood_tokens(list(reqs))
    assert a == b
    assert all(isinstance(x, float) and isinstance(g, bool) for x, g in a)


def test_reused_plans_score_new_weights_like_a_fresh_plan(setup: dict, monkeypatch) -> None:
    """Inside ``reuse_plans`` the second pass over the same requests plans nothing anew, and
    after a weight change it scores exactly like an LM that plans from scratch; requests that
    no longer match the cached plan are planned again."""
    lm, fresh = _lm(setup), _lm(setup)
    base = list(range(100, 160))
    reqs = [(("k", str(i)), base[: 5 + 3 * i], base[5 + 3 * i : 8 + 3 * i]) for i in range(8)]
    reqs.append((("k", "8"), base[:5], [*base[5:7], 3]))  # shares a row with request 0
    planned = []
    real_plan = lm._plan_batch
    monkeypatch.setattr(lm, "_plan_batch", lambda *a: planned.append(1) or real_plan(*a))
    with lm.reuse_plans("task"):
        first = lm._loglikelihood_tokens(list(reqs))
    n_first, tokens_first = len(planned), lm.forward_tokens
    assert n_first > 1 and first == fresh._loglikelihood_tokens(list(reqs))
    with torch.no_grad():
        for model in (lm.model, fresh.model):
            for p in model.parameters():
                p.mul_(0.5)
    with lm.reuse_plans("task"):
        second = lm._loglikelihood_tokens(list(reqs))
    assert len(planned) == n_first  # nothing planned again
    assert lm.forward_tokens == 2 * tokens_first
    assert second != first and second == fresh._loglikelihood_tokens(list(reqs))
    with lm.reuse_plans("task"):  # other requests under the same scope: a new plan
        third = lm._loglikelihood_tokens(list(reqs[:4]))
    assert len(planned) > n_first and third == second[:4]
    lm.clear_plans()
    assert not lm._plans


def test_pretokenize_equals_lazy_tokenization(setup: dict) -> None:
    tasks = build_task_dict(TASKS, setup["data"], setup["tmp"] / "tasks-tok")
    lm, fresh = _lm(setup), _lm(setup)
    insts = []
    for task in tasks["tasks"].values():
        task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
        insts.extend(task.instances)
    lm.pretokenize(insts)
    assert lm._tok_cache and lm._pair_cache
    for key, toks in lm._tok_cache.items():
        assert toks == fresh.tok_encode(*key), key
    for (ctx, cont), pair in lm._pair_cache.items():
        assert pair == fresh._encode_pair(ctx, cont)


def test_an_in_memory_model_does_not_warn_in_every_log(setup: dict, caplog) -> None:
    """HFLM warns that it was handed a model object, once per model and job; every job here
    does that on purpose, so the line is dropped, and HFLM's other warnings are kept."""
    import logging

    from lm_eval.models.huggingface import HFLM

    with caplog.at_level(logging.INFO, logger=HFLM.__module__):
        _lm(setup, 4)
        logging.getLogger(HFLM.__module__).warning("another HFLM warning")
    texts = [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if "already-initialized model" in t], texts
    assert "another HFLM warning" in texts
