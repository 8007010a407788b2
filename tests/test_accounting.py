"""Bit accounting: the formula, its agreement with what kbit.blockwise stores, and summaries."""

from __future__ import annotations

import math

import pytest
import torch

from kbit.accounting import predict_tensor_bits, sqnr_stats, summarize
from kbit.blockwise import quantize
from kbit.spec import QuantSpec

SPECS = [
    "int4-b64",
    "float3-e2-b1024",
    "float4-e3-bt",
    "dynamic5-b256",
    "quantile4-b64",
    "quantile3-b64-c",
    "nf4-b128",
    "int8-b64-sbf16",
    "int4-b64-sfp32",
    "mxfp4",
    "mxint8",
    "nvfp4",
]


def test_paper_formula_by_hand():
    n = 4096 * 1024
    assert predict_tensor_bits("int4-b64", n) == 4 * n + 16 * (n // 64)
    assert predict_tensor_bits("float3-e2-b1024", n) == 3 * n + 16 * (n // 1024)
    assert predict_tensor_bits("int4-bt", n) == 4 * n + 16
    assert predict_tensor_bits("fp16", n) == 16 * n
    # a partial last block still needs its constant
    assert predict_tensor_bits("int4-b64", 65) == 4 * 65 + 16 * 2
    # B=64 costs 0.25 bit per parameter on top of k (PAPER.md)
    assert predict_tensor_bits("int4-b64", n) / n == 4.25
    # MX: 8-bit shared exponents
    assert predict_tensor_bits("mxfp4", n) == 4 * n + 8 * (n // 32)


def test_outlier_columns_cost_16_bits_and_leave_the_blocking_to_the_rest():
    out_f, in_f, cols = 64, 256, 6
    n = out_f * in_f
    n_q = n - cols * out_f
    bits = predict_tensor_bits("int3-b64-o0.02", n, cols, out_f)
    assert bits == 3 * n_q + 16 * math.ceil(n_q / 64) + 16 * cols * out_f
    # overhead of p*(16-k) bits per parameter, up to the block constants (PAPER.md)
    p = cols / in_f
    overhead = bits - predict_tensor_bits("int3-b64", n)
    assert overhead == pytest.approx(n * p * (16 - 3) - 16 * (n // 64 - math.ceil(n_q / 64)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(64, 96), (7, 33), (1000,)])
def test_prediction_matches_stored_bits(spec, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = quantize(w, spec)
    assert predict_tensor_bits(spec, w.numel()) == q.bits


def test_bad_arguments():
    with pytest.raises(ValueError, match="exceed"):
        predict_tensor_bits("int4-b64", 100, outlier_cols=3, out_features=50)
    with pytest.raises(ValueError, match=">= 0"):
        predict_tensor_bits("int4-b64", -1)


def _row(name, n, quantized, bits, sqnr=None, tied_to=None):
    return {
        "name": name,
        "n_params": n,
        "quantized": quantized,
        "bits": bits,
        "sqnr_db": sqnr,
        "tied_to": tied_to,
    }


def test_summary_counts_tied_weights_once():
    rows = [
        _row("emb.weight", 1000, False, 16000),
        _row("h.0.fc.weight", 4096, True, 4 * 4096 + 16 * 64, sqnr=20.0),
        _row("h.0.fc.bias", 64, False, 1024),
        _row("h.1.fc.weight", 4096, True, 4 * 4096 + 16 * 64, sqnr=math.inf),
        _row("lm_head.weight", 1000, False, 16000, tied_to="emb.weight"),
    ]
    s = summarize(rows)
    n = 1000 + 4096 + 64 + 4096
    total = 16000 + 2 * (4 * 4096 + 16 * 64) + 1024
    assert s["n_params"] == n
    assert s["n_params_quantized"] == 2 * 4096
    assert s["total_bits"] == total
    assert s["baseline_bits"] == 16 * n
    assert s["bits_per_param"] == pytest.approx(total / n)
    assert s["fraction_quantized"] == pytest.approx(8192 / n)
    assert s["total_gb"] == pytest.approx(total / 8e9)
    st = sqnr_stats(rows)
    assert st == {"sqnr_db_mean": 20.0, "sqnr_db_min": 20.0}


def test_summary_of_the_baseline_is_16_bits_per_param():
    rows = [_row("a", 10, False, 160), _row("b", 6, False, 96)]
    s = summarize(rows)
    assert s["bits_per_param"] == 16.0 and s["fraction_quantized"] == 0.0
    assert math.isnan(sqnr_stats(rows)["sqnr_db_mean"])


def test_quant_spec_scale_bits_drive_the_constants():
    n = 6400
    spec = QuantSpec.parse("int4-b64-sfp32")
    assert predict_tensor_bits(spec, n) == 4 * n + 32 * 100
