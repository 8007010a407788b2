"""Features for predicting post-quantization quality: layer types, SQNR aggregates checked
against the weights, spec descriptors, calibration loss, radial profile, Hutchinson trace."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from models import ARCHS, tiny_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from kbit.features import (
    calibration_tokens,
    classify_module,
    crossing_radius,
    hessian_trace,
    hutchinson_probes,
    landscape_features,
    landscape_parameters,
    mean_nll,
    measure_quant_features,
    quant_features,
    quant_features_from_meta,
    radial_profile,
    radial_summary,
    spec_features,
    tensor_rows_features,
)
from kbit.model_quant import quantize_model
from kbit.spec import QuantSpec

SMALL = {"hidden": 16, "heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded machine a second thread
    makes every small operation wait for it: run them on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EXPECTED_TYPES = {
    "gpt_neox": {
        "gpt_neox.embed_in": "embedding",
        "gpt_neox.layers.0.attention.query_key_value": "attn_qkv",
        "gpt_neox.layers.0.attention.dense": "attn_o",
        "gpt_neox.layers.0.mlp.dense_h_to_4h": "mlp_up",
        "gpt_neox.layers.0.mlp.dense_4h_to_h": "mlp_down",
        "gpt_neox.layers.0.input_layernorm": "norm",
        "lm_head": "lm_head",
    },
    "opt": {
        "model.decoder.embed_positions": "embedding",
        "model.decoder.layers.0.self_attn.q_proj": "attn_q",
        "model.decoder.layers.0.self_attn.k_proj": "attn_k",
        "model.decoder.layers.0.self_attn.v_proj": "attn_v",
        "model.decoder.layers.0.self_attn.out_proj": "attn_o",
        "model.decoder.layers.0.self_attn_layer_norm": "norm",
        "model.decoder.layers.0.fc1": "mlp_up",
        "model.decoder.layers.0.fc2": "mlp_down",
        "lm_head": "lm_head",
    },
    "gpt2": {
        "transformer.wte": "embedding",
        "transformer.wpe": "embedding",
        "transformer.h.0.attn.c_attn": "attn_qkv",
        "transformer.h.0.attn.c_proj": "attn_o",
        "transformer.h.0.mlp.c_fc": "mlp_up",
        "transformer.h.0.mlp.c_proj": "mlp_down",
        "transformer.h.0.ln_1": "norm",
        "transformer.ln_f": "norm",
    },
    "bloom": {
        "transformer.word_embeddings": "embedding",
        "transformer.word_embeddings_layernorm": "norm",
        "transformer.h.0.self_attention.query_key_value": "attn_qkv",
        "transformer.h.0.self_attention.dense": "attn_o",
        "transformer.h.0.mlp.dense_h_to_4h": "mlp_up",
        "transformer.h.0.mlp.dense_4h_to_h": "mlp_down",
    },
    "llama": {
        "model.embed_tokens": "embedding",
        "model.layers.0.self_attn.q_proj": "attn_q",
        "model.layers.0.self_attn.o_proj": "attn_o",
        "model.layers.0.mlp.gate_proj": "mlp_gate",
        "model.layers.0.mlp.up_proj": "mlp_up",
        "model.layers.0.mlp.down_proj": "mlp_down",
        "model.layers.0.post_attention_layernorm": "norm",
        "model.norm": "norm",
    },
}


def _tokens(model, n_seq=2, seq_len=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n_seq, seq_len), generator=g)


def _state(model) -> dict[str, torch.Tensor]:
    """Every parameter under every name (tied aliases too)."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _same(model, state) -> bool:
    now = dict(model.named_parameters(remove_duplicate=False))
    return now.keys() == state.keys() and all(torch.equal(now[n], state[n]) for n in state)


# ----------------------------------------------------------------------------- layer types
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_types_of_every_architecture(arch):
    model = tiny_model(arch, **SMALL)
    modules = {n for n, _ in model.named_modules()}
    for name, kind in EXPECTED_TYPES[arch].items():
        assert name in modules, name
        assert classify_module(name) == kind, name
    rows = quantize_model(model, "int4-b64")
    block = [r["module"] for r in rows if r["quantized"]]
    assert block and all(classify_module(m).startswith(("attn_", "mlp_")) for m in block)


def test_layer_type_of_other_names():
    assert classify_module("embed_out") == "lm_head"  # GPT-NeoX before transformers 5
    assert classify_module("model.decoder.project_in") == "other"
    assert classify_module("") == "other"
    assert classify_module("foo.attention.rotary_emb") == "other"


# ----------------------------------------------------------------------------- SQNR
def _direct_sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10(float(w.pow(2).sum()) / float((w - w_hat).pow(2).sum()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sqnr_aggregates_equal_a_direct_computation_from_the_weights(arch):
    model = tiny_model(arch, **SMALL)
    before = _state(model)
    rows = quantize_model(model, "int3-b64", quantize_lm_head=True)
    f = quant_features(rows, "int3-b64")
    n, db, kinds = [], [], []
    for r in rows:
        if not r["quantized"] or r["tied_to"]:
            continue
        w_hat = model.get_parameter(r["name"]).detach()
        n.append(r["n_params"])
        db.append(_direct_sqnr(before[r["name"]], w_hat))
        kinds.append(classify_module(r["module"]))
    n, db, kinds = np.array(n, float), np.array(db), np.array(kinds)
    assert f["n_tensors_quantized"] == len(n) and f["n_params_quantized"] == n.sum()
    assert f["sqnr_db_mean"] == pytest.approx((n * db).sum() / n.sum(), abs=1e-9)
    assert f["sqnr_db_min"] == pytest.approx(db.min(), abs=1e-9)
    lin = (n * 10 ** (db / 10)).sum() / n.sum()
    nsr = (n * 10 ** (-db / 10)).sum() / n.sum()
    assert f["sqnr_lin_mean_db"] == pytest.approx(10 * math.log10(lin), abs=1e-9)
    assert f["sqnr_nsr_mean_db"] == pytest.approx(-10 * math.log10(nsr), abs=1e-9)
    assert f["sqnr_lin_mean_db"] > f["sqnr_db_mean"] > f["sqnr_nsr_mean_db"]  # Jensen, unequal dB
    for kind in ("attn_o", "mlp_down", "lm_head"):
        sel = kinds == kind
        assert f[f"sqnr_db_{kind}"] == pytest.approx((n[sel] * db[sel]).sum() / n[sel].sum())
    mlp = np.char.startswith(kinds.astype(str), "mlp_")
    assert f["sqnr_db_mlp"] == pytest.approx((n[mlp] * db[mlp]).sum() / n[mlp].sum())
    assert math.isnan(f["sqnr_db_embedding"])  # not quantized: no value, not zero
    total = sum(p.numel() for p in model.parameters())
    assert f["n_params_total"] == total
    assert f["quantized_fraction"] == pytest.approx(n.sum() / total)


def test_non_finite_and_tied_rows_are_handled_explicitly():
    rows = [
        {
            "name": "a.weight",
            "module": "h.0.attn.c_attn",
            "n_params": 100,
            "quantized": True,
            "sqnr_db": 20.0,
        },
        {
            "name": "b.weight",
            "module": "h.0.mlp.c_fc",
            "n_params": 300,
            "quantized": True,
            "sqnr_db": math.inf,
        },
        {
            "name": "c.weight",
            "module": "h.0.mlp.c_proj",
            "n_params": 100,
            "quantized": True,
            "sqnr_db": 10.0,
        },
        {
            "name": "c2.weight",
            "module": "lm_head",
            "n_params": 100,
            "quantized": True,
            "sqnr_db": 10.0,
            "tied_to": "c.weight",
        },
        {
            "name": "ln.weight",
            "module": "h.0.ln_1",
            "n_params": 500,
            "quantized": False,
            "sqnr_db": None,
        },
    ]
    f = tensor_rows_features(rows)
    assert f["n_params_total"] == 1000 and f["n_params_quantized"] == 500
    assert f["n_tensors_quantized"] == 3 and f["n_tensors_sqnr_nonfinite"] == 1
    assert f["sqnr_db_mean"] == pytest.approx(15.0)  # the exact tensor is left out of the mean
    assert f["sqnr_db_min"] == 10.0
    # noise power: 100 * 0.01 + 300 * 0 + 100 * 0.1 over 500 parameters
    assert f["sqnr_nsr_mean_db"] == pytest.approx(-10 * math.log10(11 / 500))
    assert math.isinf(f["sqnr_db_mlp_up"]) is False and math.isnan(f["sqnr_db_mlp_up"])
    assert math.isnan(f["sqnr_db_lm_head"])  # the tied alias is not a second tensor
    exact = tensor_rows_features([{**rows[1]}])
    assert math.isnan(exact["sqnr_db_mean"]) and exact["sqnr_nsr_mean_db"] == math.inf


# ----------------------------------------------------------------------------- spec features
def test_spec_features_describe_the_format():
    f = spec_features("float4-e2-b64")
    assert (f["dtype"], f["bits"], f["exponent_bits"], f["scale_bits"]) == ("float", 4, 2, 16)
    assert f["log2_block_size"] == 6 and f["bits_per_param_quantized"] == 4.25
    assert f["mixed_ratio"] == 1.0 and not f["is_gptq"]
    t = spec_features("int8-bt")
    assert t["exponent_bits"] == 0 and t["log2_block_size"] == math.inf
    assert math.isnan(t["block_size"]) and t["bits_per_param_quantized"] == 8
    mx = spec_features("mxfp4")
    assert mx["scale_bits"] == 8 and mx["bits_per_param_quantized"] == 4.25
    assert spec_features("int4-b64-gptq")["is_gptq"]
    assert spec_features("fp16")["mixed_ratio"] == 0.0
    o = spec_features(QuantSpec(dtype="int", bits=3, block_size=64, outlier_fraction=0.02))
    assert o["bits_per_param_quantized"] == pytest.approx(3.25 + 0.02 * 13)


def test_spec_features_of_a_mixed_spec():
    spec = QuantSpec(dtype="mxint", bits=8, block_size=32, mixed_ratio=0.5, granularity="layer")
    f = spec_features(spec)
    assert f["mixed_ratio"] == 0.5 and f["mixed_layer_granularity"] == 1.0
    assert f["bits_per_param_quantized"] == pytest.approx(0.5 * 8.25 + 0.5 * 16)
    assert f["mixed_loss_selection"] == 0.0


def test_features_from_artifact_metadata_round_trip_through_json():
    model = tiny_model("gpt2", **SMALL)
    spec = QuantSpec.parse("nf4-b64")
    rows = quantize_model(model, spec)
    meta = json.loads(json.dumps({"spec": spec.to_dict(), "tensors": rows}))
    assert quant_features_from_meta(meta) == quant_features(rows, spec)
    with pytest.raises(ValueError, match="lacks"):
        quant_features_from_meta({"tensors": rows})


def test_measure_quant_features_restores_the_weights():
    model = tiny_model("opt", **SMALL)
    before = _state(model)
    f = measure_quant_features(model, "int4-b128", quantize_lm_head=True)
    assert _same(model, before)
    rows = quantize_model(tiny_model("opt", **SMALL), "int4-b128", quantize_lm_head=True)
    assert f == quant_features(rows, "int4-b128")


# ----------------------------------------------------------------------------- calibration loss
def test_calibration_tokens_are_fixed_chunks():
    t = calibration_tokens(list(range(100)), 3, 10)
    assert t.dtype == torch.int64 and t.shape == (3, 10) and t[1, 0] == 10
    with pytest.raises(ValueError, match="cannot fill"):
        calibration_tokens(list(range(20)), 3, 10)


def test_mean_nll_equals_the_models_own_loss():
    model = tiny_model("gpt_neox", **SMALL)
    tokens = _tokens(model, n_seq=3)
    with torch.no_grad():
        ref = model(input_ids=tokens, labels=tokens).loss.item()
    assert mean_nll(model, tokens, batch_size=2) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="int64"):
        mean_nll(model, tokens.float())


# ----------------------------------------------------------------------------- radial profile
def test_radial_profile_zero_radius_is_the_base_loss_and_weights_are_restored():
    model = tiny_model("llama", **SMALL)
    tokens = _tokens(model)
    before = _state(model)
    base = mean_nll(model, tokens)
    radii, seeds = (0.0, 0.5, 4.0), (0, 1)
    prof = radial_profile(model, tokens, radii, seeds, which="all")
    assert _same(model, before)  # bit for bit
    assert (prof.loc[prof.radius == 0.0, "loss"] == base).all()  # exactly
    assert len(prof) == len(radii) * len(seeds)
    assert prof.loc[prof.radius == 4.0, "delta"].min() > 0.1  # a large push raises the loss
    again = radial_profile(model, tokens, radii, seeds, which="all")
    pd.testing.assert_frame_equal(prof, again)  # seeded: the same numbers
    loss = prof.set_index(["radius", "seed"])["loss"]
    assert loss[(0.5, 0)] != loss[(0.5, 1)]  # each seed its own direction


def test_radial_profile_restores_the_weights_when_a_pass_fails():
    model = tiny_model("gpt2", **SMALL)
    tokens = _tokens(model)
    before = _state(model)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        radial_profile(model, tokens, (0.0, 0.3, 1.0), (0,))
    handle.remove()
    assert _same(model, before)


def test_landscape_parameters_selection():
    model = tiny_model("llama", **SMALL)  # tied embeddings: counted once under "all"
    blocks = landscape_parameters(model, "blocks")
    assert all(n.startswith("model.layers.") and n.endswith(".weight") for n, _ in blocks)
    assert len(landscape_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no parameter"):
        landscape_parameters(model, ["nope.weight"])


def test_crossing_radius_and_summary_on_known_profiles():
    radii = np.array([0.1, 0.2, 0.4, 0.8])
    quad = 2.0 * (1 + radii**2)  # quadratic bowl: rise = r^2
    assert crossing_radius(radii, quad, 2.0, 0.01) == pytest.approx(0.1)
    # 10% is reached between 0.2 (4%) and 0.4 (16%): linear interpolation gives 0.3
    assert crossing_radius(radii, quad, 2.0, 0.1) == pytest.approx(0.3)
    assert crossing_radius(radii, quad, 2.0, 10.0) == math.inf  # never reached
    step = np.array([2.0, 2.0, 3.0, 3.0])  # flat, then a jump of 50%
    s = radial_summary(
        pd.DataFrame({"radius": radii, "seed": 0, "loss": step}), 2.0, rises=(0.01, 0.1)
    )
    # both crossings fall on the jump between 0.2 and 0.4: at 0.204 and 0.24
    assert s["rise_ratio"] == pytest.approx(0.24 / 0.204)  # a step: close to 1
    fine = np.geomspace(0.01, 1, 200)
    q = radial_summary(pd.DataFrame({"radius": fine, "seed": 0, "loss": 1 + fine**2}), 1.0)
    assert q["rise_ratio"] == pytest.approx(math.sqrt(10), rel=0.01)  # quadratic: sqrt(10)
    assert q["radial_radii"] == pytest.approx(list(fine)) and math.isnan(q["radial_seed_sd_max"])


# ----------------------------------------------------------------------------- curvature
def test_hutchinson_matches_the_trace_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T / 30 + torch.diag(torch.linspace(-1, 3, 30, dtype=torch.float64))
    w = torch.randn(30, generator=g, dtype=torch.float64, requires_grad=True)

    def loss_terms():
        yield 0.5 * w @ a @ w

    probes = hutchinson_probes(loss_terms, [w], n_probes=200, seed=1)
    se = probes.std(ddof=1) / math.sqrt(len(probes))
    exact = float(torch.trace(a))
    assert abs(probes.mean() - exact) < 3 * se
    assert abs(probes.mean() - (exact + 10 * se)) > 3 * se  # the check can fail
    # Rademacher probes: v'Av = trace(A) + off-diagonal terms; diagonal A is exact
    d = torch.diag(torch.linspace(1, 2, 10, dtype=torch.float64))
    v = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    exact_d = hutchinson_probes(lambda: iter([0.5 * v @ d @ v]), [v], n_probes=3)
    assert exact_d == pytest.approx([float(torch.trace(d))] * 3)


def _small_vocab_model() -> GPTNeoXForCausalLM:
    """A 2-block GPT-NeoX with a 64-token vocabulary: cheap enough for an exact Hessian."""
    cfg = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPTNeoXForCausalLM(cfg).eval()


def test_hutchinson_matches_the_exact_hessian_trace_of_a_small_model():
    model = _small_vocab_model()
    tokens = _tokens(model)
    name = "gpt_neox.layers.0.attention.dense.weight"
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    est = hessian_trace(model, tokens, n_probes=40, seed=0, which=[name])
    assert _same(model, before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # exact: the diagonal of the Hessian, one second backward per weight
    w = model.get_parameter(name)
    n_tok = tokens.shape[0] * (tokens.shape[1] - 1)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        logits = model(input_ids=tokens).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss / n_tok, w, create_graph=True)
    flat = grad.reshape(-1)
    exact = sum(
        float(torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i])
        for i in range(flat.numel())
    )
    assert est.n_params == w.numel() == 256
    assert abs(est.trace - exact) < 3 * est.se
    assert est.se < abs(exact)  # the estimate is informative, not just wide
    f = est.as_dict()
    assert f["hessian_trace_per_param"] == pytest.approx(est.trace / 256)


def test_landscape_features_record_their_cost_and_are_deterministic():
    model = tiny_model("opt", **SMALL)
    tokens = _tokens(model)
    kw = {"radii": (0.1, 1.0), "seeds": (0, 1, 2), "n_probes": 2, "batch_size": 1}
    a = landscape_features(model, tokens, **kw)
    b = landscape_features(model, tokens, **kw)
    s = a.summary
    assert s["n_forward_passes"] == 1 + 2 * 3 and s["n_hvp"] == 2
    assert s["base_loss"] == mean_nll(model, tokens, batch_size=1)
    assert s["n_calibration_tokens"] == 2 * 15
    assert s["hessian_trace"] == b.summary["hessian_trace"]
    assert s["radial_loss"] == b.summary["radial_loss"] and len(s["radial_radii"]) == 2
    assert s["seconds_radial"] > 0 and s["seconds_hessian"] > 0
    no_curv = landscape_features(model, tokens, radii=(0.1,), seeds=(0,), n_probes=0)
    assert math.isnan(no_curv.summary["hessian_trace"]) and no_curv.summary["n_hvp"] == 0
