"""Blockwise quantization: an independent numpy reference, properties, bit accounting, storage."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kbit
from kbit.blockwise import (
    QTensor,
    dequantize,
    fake_quantize,
    fake_quantize_blockwise_reference,
    quantize,
    quantize_blockwise_reference,
)
from kbit.codebooks import codebook, element_grid
from kbit.spec import QuantSpec, SpecError

qmod = importlib.import_module("kbit.blockwise")

ABSMAX_SPECS = [
    "int3-b64",
    "int4-b100",
    "int8-bt",
    "float4-e2-b64",
    "float4-b64-sbf16",
    "float5-e3-b128-sfp32",
    "dynamic4-b64",
    "dynamic8-b256",
    "nf4-b64",
    "nf3-bt",
    "quantile4-b64",
    "quantile3-b32-qexact",
    "int4-b64-c",
]
MX_SPECS = ["mxfp4", "mxfp6", "mxfp6-e3-b32", "mxfp8", "mxfp8-e5-b32", "mxint8", "nvfp4"]
ALL_SPECS = ABSMAX_SPECS + MX_SPECS
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _weights(shape: tuple[int, ...], gen: torch.Generator, dtype=torch.float16) -> torch.Tensor:
    w = torch.randn(shape, generator=gen) * 0.05
    w.view(-1)[:: max(1, w.numel() // 7)] *= 8  # a few outliers, like real weight matrices
    return w.to(dtype)


# --------------------------------------------------------------------- numpy reference
def _numpy_absmax_reference(w: torch.Tensor, spec: QuantSpec, cb: torch.Tensor):
    """Steps 1-5 of the kbit.blockwise docstring, written independently with numpy."""
    x = w.reshape(-1).float().numpy()
    if spec.center:
        mean = np.float16(x.astype(np.float64).mean()).astype(np.float32)
        x = (x - mean).astype(np.float32)
    n = x.size
    b = n if spec.block_size is None else spec.block_size
    nb = -(-n // b)
    absmax = np.array([np.abs(x[i * b : (i + 1) * b]).max() for i in range(nb)], np.float32)
    if spec.scale_dtype == "fp16":
        s = np.minimum(absmax, np.float32(65504)).astype(np.float16).astype(np.float32)
    elif spec.scale_dtype == "bf16":
        s = torch.from_numpy(absmax).to(torch.bfloat16).float().numpy()
    else:
        s = absmax
    s_elem = np.repeat(s, b)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        xn = np.where(s_elem != 0, x / s_elem, np.float32(0)).astype(np.float32)
    c = cb.numpy()
    mids = ((c[:-1] + c[1:]) / np.float32(2)).astype(np.float32)
    codes = np.searchsorted(mids, xn, side="left")  # count of mids strictly below xn
    y = (c[codes] * s_elem).astype(np.float32)
    if spec.center:
        y = (y + mean).astype(np.float32)
    return codes, y


@pytest.mark.parametrize("spec_id", ABSMAX_SPECS)
@pytest.mark.parametrize("shape", [(37, 53), (4096,), (3, 5, 7)])
def test_absmax_types_match_numpy_reference(
    spec_id: str, shape: tuple[int, ...], gen: torch.Generator
) -> None:
    spec = QuantSpec.parse(spec_id)
    w = _weights(shape, gen)
    q = quantize(w, spec)
    codes, y = _numpy_absmax_reference(w, spec, q.codebook)
    assert np.array_equal(q.unpacked_codes().numpy(), codes)
    expected = torch.from_numpy(y).to(w.dtype).view(shape)
    assert torch.equal(q.dequantize(), expected)
    if spec.dtype not in ("quantile",):
        assert torch.equal(q.codebook, codebook(spec.dtype, spec.bits, spec.exponent_bits))


def test_ties_go_to_the_lower_code() -> None:
    # int3 codebook {-1, -2/3, ..., 1}; with absmax 1 a value on a midpoint is a tie
    cb = codebook("int", 3)
    mids = (cb[:-1] + cb[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids])
    q = quantize(w, "int3-bt-sfp32")
    assert q.unpacked_codes()[1:].tolist() == list(range(len(mids)))


def test_zero_block_and_saturation() -> None:
    w = torch.zeros(130)
    w[64:128] = torch.linspace(-1, 1, 64)
    q = quantize(w, "int4-b64")
    y = q.dequantize()
    assert torch.equal(y[:64], torch.zeros(64)) and q.scales[0] == 0
    # fp16 rounds 65519 down to 65504 (the max): the value saturates at the top code
    big = torch.tensor([65519.0, 1.0])
    assert quantize(big, "int4-bt").dequantize()[0].item() == 65504.0


# --------------------------------------------------------------------- microscaling
def _nearest_even_reference(xn: np.ndarray, grid: np.ndarray, even: np.ndarray) -> np.ndarray:
    d = np.abs(xn[:, None].astype(np.float64) - grid[None, :].astype(np.float64))
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    pick_even = cand & even[None, :]
    return np.where(pick_even.any(axis=1), pick_even.argmax(axis=1), cand.argmax(axis=1))


@pytest.mark.parametrize("spec_id", [s for s in MX_SPECS if s != "nvfp4"])
def test_mx_shared_scale_and_elements_follow_ocp(spec_id: str, gen: torch.Generator) -> None:
    spec = QuantSpec.parse(spec_id)
    w = _weights((20, 33), gen, torch.float32)
    w[0, :32] = 0  # an all-zero block
    q = quantize(w, spec)
    g = element_grid(spec)
    x = w.reshape(-1).numpy()
    nb = -(-x.size // 32)
    assert q.scales.dtype == torch.uint8 and q.scales.numel() == nb
    for i in range(nb):
        amax = np.abs(x[i * 32 : (i + 1) * 32]).max()
        exp = -127 if amax == 0 else math.floor(math.log2(amax)) - g.emax
        assert int(q.scales[i]) == exp + 127
    scale = np.repeat(np.ldexp(1.0, q.scales.numpy().astype(np.int64) - 127), 32)[: x.size]
    xn = (x / scale).astype(np.float32)
    expected = _nearest_even_reference(xn, g.values.numpy(), g.even.numpy())
    assert np.array_equal(q.unpacked_codes().numpy(), expected)
    assert torch.equal(q.codebook, g.values)


def test_mx_rounds_ties_to_even_and_saturates() -> None:
    # block absmax 4 -> X = 2^(2 - 2) = 1 for E2M1; midpoints resolve to the even mantissa
    w = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -0.25, -2.5, 5.0] + [0.0] * 22)
    y = quantize(w, "mxfp4").dequantize()
    assert y[:10].tolist() == [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, -0.0, -2.0, 4.0]
    # absmax 7.9 -> X = 2^(2-2) = 1, 7.9 > 6 saturates to 6 (OCP clamps to the max normal)
    assert quantize(torch.tensor([7.9] + [0.0] * 31), "mxfp4").dequantize()[0].item() == 6.0


def test_nvfp4_two_level_scales(gen: torch.Generator) -> None:
    w = _weights((8, 48), gen, torch.float32)
    q = quantize(w, "nvfp4")
    g = q.extras["global_scale"]
    assert g.dtype == torch.float32
    assert g.item() == pytest.approx(w.abs().max().item() / (448 * 6), rel=1e-6)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.numel() == w.numel() // 16
    blocks = w.reshape(-1, 16).abs().amax(dim=1)
    assert torch.equal(q.scales, (blocks / (6 * g)).clamp(max=448).to(torch.float8_e4m3fn))
    s = (q.scales.float() * g).repeat_interleave(16)
    xn = (w.reshape(-1) / s).numpy()
    grid = element_grid(QuantSpec.parse("nvfp4"))
    expected = _nearest_even_reference(xn, grid.values.numpy(), grid.even.numpy())
    assert np.array_equal(q.unpacked_codes().numpy(), expected)
    assert q.bits == 4 * w.numel() + 8 * (w.numel() // 16) + 32


# --------------------------------------------------------------------- properties
shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


def _max_normalised_error(cb: torch.Tensor) -> float:
    """Largest |xn - cb[code]| for xn in [-1, 1]: half the widest gap, or an uncovered end."""
    gaps = (cb[1:] - cb[:-1]).max().item() / 2
    return max(gaps, 1 + cb[0].item(), 1 - cb[-1].item())


@given(
    shape=shapes,
    spec_id=st.sampled_from(ABSMAX_SPECS),
    dtype=st.sampled_from(TORCH_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_absmax_error_bound_shape_and_dtype(shape, spec_id, dtype, seed) -> None:
    w = _weights(shape, torch.Generator().manual_seed(seed), dtype)
    spec = QuantSpec.parse(spec_id)
    q = quantize(w, spec)
    y = q.dequantize()
    assert y.shape == w.shape and y.dtype == w.dtype
    n = w.numel()
    b = n if spec.block_size is None else spec.block_size
    x = w.reshape(-1).float()
    if spec.center:
        x = x - q.extras["mean"].float()
    absmax = torch.stack([x[i : i + b].abs().max() for i in range(0, n, b)])
    s = q.scales.float()
    per_block = _max_normalised_error(q.codebook) * s + (absmax - s).abs()
    bound = per_block.repeat_interleave(b)[:n]
    out_rounding = y.float().abs().reshape(-1) * torch.finfo(dtype).eps
    err = (y.float() - w.float()).abs().reshape(-1)
    assert bool((err <= bound * (1 + 1e-6) + out_rounding + 1e-12).all())


@given(
    shape=shapes,
    spec_id=st.sampled_from(ALL_SPECS),
    dtype=st.sampled_from(TORCH_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fake_quantize_is_bitwise_quantize_dequantize(shape, spec_id, dtype, seed) -> None:
    w = _weights(shape, torch.Generator().manual_seed(seed), dtype)
    q = quantize(w, spec_id)
    assert torch.equal(fake_quantize(w, spec_id), q.dequantize())
    assert torch.equal(dequantize(q), q.dequantize())


@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_bits_and_packed_length(spec_id: str, gen: torch.Generator) -> None:
    spec = QuantSpec.parse(spec_id)
    w = _weights((33, 61), gen)
    q = quantize(w, spec)
    n = w.numel()
    nblocks = 1 if spec.block_size is None else math.ceil(n / spec.block_size)
    extra = 16 * 2**spec.bits * (spec.dtype == "quantile") + 16 * spec.center
    extra += 32 * (spec.dtype == "nvfp")
    assert q.bits == spec.bits * n + spec.scale_bits * nblocks + extra
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == math.ceil(n * spec.bits / 8)
    assert q.scales.numel() == nblocks
    assert q.codebook.numel() <= 2**spec.bits


def test_chunking_does_not_change_results(monkeypatch, gen: torch.Generator) -> None:
    w = _weights((1001,), gen, torch.float32)
    specs = ["int4-b24", "nf4-b100", "float3-bt", "mxfp4", "nvfp4", "quantile4-b64-c"]
    before = {s: (quantize(w, s).codes, fake_quantize(w, s)) for s in specs}
    monkeypatch.setattr(qmod, "CHUNK_VALUES", 64)
    for s in specs:
        q = quantize(w, s)
        assert torch.equal(q.codes, before[s][0]), s
        assert torch.equal(q.dequantize(), before[s][1]), s
        assert torch.equal(fake_quantize(w, s), before[s][1]), s


def test_center_stores_the_mean(gen: torch.Generator) -> None:
    w = _weights((64, 64), gen, torch.float32) + 0.3
    q = quantize(w, "int4-b64-c")
    mean = q.extras["mean"]
    assert mean.dtype == torch.float16 and mean.item() == pytest.approx(w.mean().item(), rel=1e-3)
    shifted = quantize(w - mean.float(), "int4-b64")
    assert torch.equal(q.codes, shifted.codes)
    assert torch.equal(q.dequantize(), shifted.dequantize() + mean.float())


def test_reference_functions_match_quantize(gen: torch.Generator) -> None:
    w = _weights((40, 50), gen)
    spec = QuantSpec.parse("nf4-b64")
    cb = codebook("nf", 4)
    codes, scales = quantize_blockwise_reference(w, cb, 64, torch.float16)
    q = quantize(w, spec)
    assert torch.equal(codes, q.unpacked_codes()) and torch.equal(scales, q.scales)
    assert torch.equal(fake_quantize_blockwise_reference(w, cb, 64, "fp16"), q.dequantize())
    with pytest.raises(ValueError, match="strictly increasing"):
        quantize_blockwise_reference(w, cb.flip(0), 64)


# --------------------------------------------------------------------- storage and errors
@pytest.mark.parametrize("spec_id", ALL_SPECS)
def test_state_dict_round_trips_through_safetensors(spec_id: str, tmp_path, gen) -> None:
    import json

    from safetensors.torch import load_file, save_file

    w = _weights((17, 24), gen, torch.bfloat16)
    q = quantize(w, spec_id)
    d = q.state_dict()
    json.dumps(d["meta"])
    path = tmp_path / "q.safetensors"
    save_file(d["tensors"], str(path), metadata={"kbit": json.dumps(d["meta"])})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()["kbit"]
    q2 = QTensor.from_state_dict({"tensors": load_file(str(path)), "meta": meta})
    assert q2.spec == q.spec and q2.shape == q.shape and q2.dtype == q.dtype
    assert q2.bits == q.bits
    assert torch.equal(q2.dequantize(), q.dequantize())


def test_baseline_and_bad_inputs() -> None:
    w = torch.randn(8, 8)
    assert fake_quantize(w, "fp16") is w
    with pytest.raises(SpecError, match="baseline"):
        quantize(w, "fp16")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(torch.tensor([1.0, float("inf")]), "int4-b64")
    with pytest.raises(TypeError, match="floating point"):
        quantize(torch.ones(4, dtype=torch.int32), "int4-b64")
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.ones(0), "int4-b64")


def test_public_api_is_wired() -> None:
    """``kbit.quantize`` is the function (the module is ``kbit.blockwise``), in any import order."""
    w = torch.randn(4, 16)
    assert kbit.quantize is qmod.quantize and not isinstance(kbit.quantize, type(qmod))
    assert torch.equal(kbit.quantize(w, "int4-b16").dequantize(), kbit.fake_quantize(w, "int4-b16"))
    assert kbit.QTensor is QTensor


# --------------------------------------------------------------------- specs
spec_fields = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["int", "float", "dynamic", "quantile", "nf"]),
        "bits": st.integers(2, 8),
        "block_size": st.one_of(st.none(), st.integers(2, 8192)),
        "scale_dtype": st.sampled_from(["fp16", "bf16", "fp32"]),
        "center": st.booleans(),
        "outlier_fraction": st.sampled_from([0.0, 0.02, 0.005]),
    }
)


@given(fields=spec_fields, e=st.integers(1, 7))
def test_spec_id_round_trip(fields: dict, e: int) -> None:
    if fields["dtype"] == "float":
        fields["exponent_bits"] = min(e, fields["bits"] - 1)
    spec = QuantSpec(**fields)
    assert QuantSpec.parse(str(spec)) == spec
    assert QuantSpec.parse(spec.id).id == spec.id


@pytest.mark.parametrize("alias", ["mxfp4", "mxfp6", "mxfp8", "mxint8", "nvfp4", "fp16"])
def test_alias_round_trip(alias: str) -> None:
    spec = QuantSpec.parse(alias)
    assert QuantSpec.parse(str(spec)) == spec


# --------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec_id", ALL_SPECS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_cuda_fake_quantize_matches_cpu_reference(spec_id: str, dtype, gen) -> None:
    w = _weights((300, 257), gen, dtype)
    cpu = quantize(w, spec_id).dequantize()
    assert torch.equal(fake_quantize(w.cuda(), spec_id).cpu(), cpu)
    assert torch.equal(quantize(w.cuda(), spec_id).dequantize().cpu(), cpu)
