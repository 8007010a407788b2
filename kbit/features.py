r"""Features that predict post-quantization quality (Xu et al. 2024, arXiv 2410.12119).

Two kinds of features, measured at very different costs:

**Per (model, spec)**, from the per-tensor accounting rows of
:func:`kbit.model_quant.quantize_model` (or the ``tensors`` list of an artifact's ``kbit.json``)
and from the spec itself; no forward pass is needed, so they are available for formats that were
never evaluated:

- parameter counts: all, quantized, the realised quantization ratio Q_r, quantized tensors;
- SQNR of the quantized weights, aggregated over tensors (tied aliases once): the
  parameter-weighted mean in dB, the dB value of the parameter-weighted mean linear ratio, the
  dB value of the parameter-weighted mean noise-to-signal ratio (dominated by the worst tensors,
  and the one that adds up like independent noise does), the minimum, and the weighted dB mean
  per layer type (:data:`LAYER_TYPES`, from :func:`classify_module`);
- format descriptors (:func:`spec_features`): data type, method, code bits, exponent bits, block
  size, scale bits, bits per quantized parameter, outlier fraction, centering, and the mixed
  ratio Q_r with its granularity and selection.

**Per model**, from forward passes on a fixed calibration token tensor (int64 ``[n_seq,
seq_len]``, see :func:`calibration_tokens`):

- ``base_loss``: mean token NLL (:func:`mean_nll`);
- a radial loss profile (:func:`radial_profile`): every selected weight tensor is moved to
  ``W + r * ||W|| * eps / ||eps||`` (eps standard normal, one direction per seed, the same
  direction for every radius), the loss is measured and the weights are restored bit for bit.
  A relative radius r is an isotropic perturbation with SQNR ``-20 log10 r`` dB, so the profile
  reads directly as "loss of Gaussian noise at the SQNR of a format"; summaries are the radii at
  which the seed-mean loss rises by 1% and 10% (linear interpolation), their ratio
  (``sqrt(10) = 3.16`` for a quadratic bowl, near 1 for the step-like rise the paper reports);
- curvature (:func:`hessian_trace`): Hutchinson's estimate of the trace of the Hessian of the
  loss w.r.t. the selected weights, ``E[v' H v]`` over Rademacher probes ``v``, each
  Hessian-vector product by double backpropagation, with its standard error over probes.

Cost, in full passes over the calibration tensor: the radial profile takes
``1 + n_radii_nonzero * n_seeds`` forward passes (the zero radius is evaluated once, through the
same perturb-and-restore path); the trace takes ``n_probes`` Hessian-vector products (HVPs), each
a forward pass that keeps its graph, a backward pass that keeps its graph and a second backward
pass, with the activation memory of a training step and then some. Memory beyond that: one copy
of the selected weights (to restore them). Measured on the 2-core shared CPU this was written
on (load average 8 to 11, one torch thread; two threads were 2-3x slower under that load), tiny
2-block models of ``tests/models.py`` (hidden 64, the real 50k-token vocabulary, 3.3M and 6.5M
parameters), 4 x 64 calibration tokens: 0.26-0.33 s per forward pass, 1.7-1.9 s per HVP (about
7 forward passes), so the defaults (8 radii x 3 seeds = 25 passes, 8 probes) took 6-8 s for the
profile and 14-16 s for the trace per model. Per-(model, spec) features cost one quantization of
the weights and no pass (0.08-0.11 s for int4-b64 on the same models). On one H200 (randomly
initialised GPT-NeoX models of Pythia's shapes, 8 x 512 calibration tokens, defaults): 162M
parameters in float32, 0.98 s for the 25 passes and 2.2 s for the 8 HVPs, 15.5 GiB peak memory;
405M in bfloat16, 0.85 s and 2.05 s, 24.9 GiB (then with the whole batch of 8 in one HVP term;
now one sequence per term, ``HVP_BATCH``). Same numbers twice, weights restored bit for bit.

Everything is seeded and deterministic for a given device: the noise of seed ``s`` comes from a
generator seeded with ``s`` on the weight's device, drawn tensor by tensor in model order.

torch is imported inside the functions that need it, so the table-side helpers (spec and
accounting-row features) load without it, as the analysis and the ``advise`` command do.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kbit.spec import QuantSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

#: layer types of :func:`classify_module`; ``attn_qkv`` is a fused query/key/value projection
LAYER_TYPES = (
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "mlp_up",
    "mlp_gate",
    "mlp_down",
    "embedding",
    "lm_head",
    "norm",
    "other",
)
#: groups of layer types that get their own aggregate SQNR column
LAYER_GROUPS = {
    "attn": ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_o"),
    "mlp": ("mlp_up", "mlp_gate", "mlp_down"),
}
#: relative radii of the radial profile; r is an isotropic perturbation of SQNR -20 log10(r) dB,
#: so these span 50 dB (better than 8-bit formats) to 0 dB (noise as large as the weights)
DEFAULT_RADII = (0.0, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PROBES = 8
#: relative loss rises whose radius summarises the profile (1% and 10%)
DEFAULT_RISES = (0.01, 0.1)
DEFAULT_BATCH = 8
#: sequences per Hessian-vector-product term. Double backpropagation keeps several logits-sized
#: tensors of a term alive (8 x 512 tokens over a 50k vocabulary: about 0.8 GB each, 5-6 GB in
#: all), so each sequence is its own term: the HVP of the sum is the sum of the terms' HVPs, only
#: the order of the float additions changes, and memory holds one sequence's graph.
HVP_BATCH = 1

_LEAF_TYPES = {
    "attn_qkv": {"query_key_value", "c_attn", "qkv_proj", "wqkv", "qkv"},
    "attn_q": {"q_proj", "query", "q"},
    "attn_k": {"k_proj", "key", "k"},
    "attn_v": {"v_proj", "value", "v"},
    "attn_o": {"o_proj", "out_proj", "dense", "c_proj", "out", "o"},
    "mlp_up": {"fc1", "c_fc", "up_proj", "dense_h_to_4h", "fc_in"},
    "mlp_gate": {"gate_proj"},
    "mlp_down": {"fc2", "down_proj", "dense_4h_to_h", "fc_out", "c_proj"},
    "embedding": {
        "embed_tokens",
        "embed_in",
        "wte",
        "wpe",
        "word_embeddings",
        "embed_positions",
        "position_embeddings",
        "token_embeddings",
    },
    "lm_head": {"lm_head", "embed_out"},
}
_NORM_RE = re.compile(r"(norm|^ln(_|$)|_ln$)")
_ATTN_RE = re.compile(r"attn|attention")


# ----------------------------------------------------------------------------- layer types
def classify_module(module: str) -> str:
    """The layer type (one of :data:`LAYER_TYPES`) of a module name, for any supported family.

    Works on names alone (GPT-NeoX/Pythia, OPT, GPT-2, BLOOM, Llama): norms first (BLOOM's
    ``word_embeddings_layernorm`` is a norm), then the LM head and embeddings, then attention
    projections inside a module path containing ``attn``/``attention`` (GPT-2's ``attn.c_proj``
    is the output projection, ``mlp.c_proj`` the down projection), then MLP projections.
    """
    parts = [p for p in module.lower().split(".") if p]
    if not parts:
        return "other"
    leaf = parts[-1]
    if _NORM_RE.search(leaf):
        return "norm"
    for kind in ("lm_head", "embedding"):
        if leaf in _LEAF_TYPES[kind]:
            return kind
    in_attention = any(_ATTN_RE.search(p) for p in parts[:-1])
    if in_attention:
        for kind in LAYER_GROUPS["attn"]:
            if leaf in _LEAF_TYPES[kind]:
                return kind
        return "other"
    for kind in LAYER_GROUPS["mlp"]:
        if leaf in _LEAF_TYPES[kind]:
            return kind
    return "other"


# ----------------------------------------------------------------------------- spec features
def spec_features(spec: QuantSpec | str) -> dict[str, Any]:
    """Format descriptors of a spec, as predictor inputs.

    ``exponent_bits`` is 0 for types without an exponent field (int, dynamic, quantile, nf);
    ``log2_block_size`` is ``inf`` for one constant per tensor (a block as large as the tensor),
    which predictors encode as larger than any block seen. ``mixed_ratio`` is Q_r, the fraction
    of the selected weights in the low format: the spec's value for a mixed spec, 1 for a plain
    spec (it quantizes every selected weight), 0 for the baseline, NaN if the spec type has no
    such field; ``mixed_layer_granularity``/``mixed_loss_selection`` are 1 for mixed specs
    assigning whole blocks / choosing units by their loss, else 0. ``bits_per_param_quantized``
    is the mean storage per selected weight: code bits plus block constants plus 16-bit outlier
    columns, averaged with 16 bits over the share a mixed spec keeps in 16 bit (per-tensor
    constants are negligible and count 0).
    """
    spec = QuantSpec.parse(spec)
    block = spec.block_size
    if not hasattr(spec, "mixed_ratio"):
        ratio = math.nan
    elif spec.is_baseline:
        ratio = 0.0
    else:
        ratio = 1.0 if spec.mixed_ratio is None else float(spec.mixed_ratio)
    if spec.is_baseline:
        per_param = 16.0
    else:
        per_param = spec.bits + (spec.scale_bits / block if block else 0.0)
        per_param += spec.outlier_fraction * (16 - spec.bits)
        if math.isfinite(ratio):
            per_param = ratio * per_param + (1.0 - ratio) * 16.0
    return {
        "quant": spec.id,
        "dtype": spec.dtype,
        "method": spec.method,
        "bits": int(spec.bits),
        "exponent_bits": int(spec.exponent_bits or 0),
        "block_size": float(block) if block else math.nan,
        "log2_block_size": math.log2(block) if block else math.inf,
        "scale_bits": int(spec.scale_bits),
        "bits_per_param_quantized": float(per_param),
        "outlier_fraction": float(spec.outlier_fraction),
        "center": bool(spec.center),
        "is_gptq": spec.method == "gptq",
        "mixed_ratio": ratio,
        "mixed_layer_granularity": float(getattr(spec, "granularity", None) == "layer"),
        "mixed_loss_selection": float(getattr(spec, "selection", None) == "loss"),
    }


# ----------------------------------------------------------------------------- SQNR features
def _counted(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Distinct tensors: an alias of a tied tensor (``tied_to`` set) is counted once."""
    return [r for r in rows if not r.get("tied_to")]


def _weighted_db(n: np.ndarray, db: np.ndarray) -> float:
    """Parameter-weighted mean of finite dB values (NaN when there are none)."""
    ok = np.isfinite(db)
    return float(np.average(db[ok], weights=n[ok])) if ok.any() else math.nan


def tensor_rows_features(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and SQNR aggregates of per-parameter accounting rows (see the module docstring).

    Non-finite SQNR values are results, not noise: ``+inf`` (a tensor quantized exactly) is left
    out of the dB and linear means, contributes zero noise to the noise-to-signal mean, and is
    counted in ``n_tensors_sqnr_nonfinite``; the minimum is taken over every quantized tensor.
    """
    counted = _counted(rows)
    n_all = sum(int(r["n_params"]) for r in counted)
    quant = [r for r in counted if r.get("quantized")]
    n = np.array([float(r["n_params"]) for r in quant])
    db = np.array(
        [math.nan if r.get("sqnr_db") is None else float(r["sqnr_db"]) for r in quant], dtype=float
    )
    n_q = float(n.sum())
    out: dict[str, Any] = {
        "n_params_total": n_all,
        "n_params_quantized": int(n_q),
        "quantized_fraction": n_q / n_all if n_all else math.nan,
        "n_tensors_quantized": len(quant),
        "n_tensors_sqnr_nonfinite": int((~np.isfinite(db)).sum()),
        "sqnr_db_mean": _weighted_db(n, db),
        "sqnr_db_min": float(np.min(db)) if len(db) else math.nan,
    }
    finite = np.isfinite(db)
    if finite.any():
        lin = np.average(10.0 ** (db[finite] / 10.0), weights=n[finite])
        out["sqnr_lin_mean_db"] = float(10.0 * np.log10(lin))
    else:
        out["sqnr_lin_mean_db"] = math.nan
    usable = ~np.isnan(db)  # +inf means zero noise; NaN means no measurement
    if usable.any():
        nsr = np.average(10.0 ** (-db[usable] / 10.0), weights=n[usable])
        out["sqnr_nsr_mean_db"] = float(-10.0 * np.log10(nsr)) if nsr > 0 else math.inf
    else:
        out["sqnr_nsr_mean_db"] = math.nan
    kinds = np.array([classify_module(str(r["module"])) for r in quant], dtype=object)
    for kind in LAYER_TYPES:
        sel = kinds == kind
        out[f"sqnr_db_{kind}"] = _weighted_db(n[sel], db[sel]) if sel.any() else math.nan
    for group, members in LAYER_GROUPS.items():
        sel = np.isin(kinds, members)
        out[f"sqnr_db_{group}"] = _weighted_db(n[sel], db[sel]) if sel.any() else math.nan
    return out


def quant_features(rows: Iterable[Mapping[str, Any]], spec: QuantSpec | str) -> dict[str, Any]:
    """All per-(model, spec) features: :func:`spec_features` plus :func:`tensor_rows_features`."""
    return {**spec_features(spec), **tensor_rows_features(list(rows))}


def quant_features_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Per-(model, spec) features from a loaded artifact ``kbit.json`` (``spec`` + ``tensors``)."""
    missing = [k for k in ("spec", "tensors") if k not in meta]
    if missing:
        raise ValueError(
            f"artifact metadata lacks {missing}; expected a kbit.json of kbit.artifact"
        )
    return quant_features(meta["tensors"], QuantSpec.from_dict(dict(meta["spec"])))


def read_quant_features(path: str | Path) -> dict[str, Any]:
    """:func:`quant_features_from_meta` of a ``kbit.json`` file (or its artifact directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "kbit.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} does not exist: expected results/quantized/{{model}}/{{quant}}"
        )
    return quant_features_from_meta(json.loads(p.read_text()))


def measure_quant_features(
    model: nn.Module, spec: QuantSpec | str, **select: Any
) -> dict[str, Any]:
    """Quantize ``model``'s weights with ``spec`` (RTN), take the features, restore the weights.

    No forward pass: the cost is one quantization of the selected weights, which is what makes
    SQNR a cheap predictor for formats never evaluated. ``select`` goes to ``quantize_model``
    (include, exclude, quantize_embeddings, quantize_lm_head).
    """
    from kbit.model_quant import WeightSnapshot, quantize_model

    snapshot = WeightSnapshot(model)
    try:
        rows = quantize_model(model, spec, **select)
    finally:
        snapshot.restore(model)
    return quant_features(rows, spec)


def spec_feature_rows(
    model: nn.Module,
    quants: Sequence[str],
    options: Mapping[str, Any] | None = None,
    *,
    artifacts: Mapping[str, str | Path] | None = None,
    assignments: Mapping[str, str | Path] | None = None,
) -> list[dict[str, Any]]:
    """:func:`quant_features` of every quantized spec of one model, for the workflow.

    A spec with an artifact (GPTQ, or a large model's) is read from its kbit.json; a mixed spec
    applies its assignment; a round-to-nearest spec quantizes the loaded weights; the weights
    are restored after each. The 16-bit baseline has no quantized tensors and no row.
    """
    from kbit.model_quant import WeightSnapshot

    artifacts, assignments = dict(artifacts or {}), dict(assignments or {})
    select = dict(options or {})
    out = []
    snapshot = WeightSnapshot(model)
    for q in quants:
        spec = QuantSpec.parse(q)
        if spec.is_baseline:
            continue
        if q in artifacts:
            row = read_quant_features(artifacts[q])
        elif spec.is_mixed:
            from kbit.mixed import Assignment, apply_assignment

            snapshot.restore(model)
            rows = apply_assignment(model, spec, Assignment.read(assignments[q]), **select)
            row = quant_features(rows, spec)
        else:
            snapshot.restore(model)
            row = measure_quant_features(model, spec, **select)
        out.append({"quant": spec.id, **row})
    snapshot.restore(model)
    return out


# ----------------------------------------------------------------------------- calibration loss
def calibration_tokens(ids: Sequence[int] | torch.Tensor, n_seq: int, seq_len: int) -> torch.Tensor:
    """The first ``n_seq`` consecutive chunks of ``seq_len`` tokens of a token stream (int64)."""
    import torch

    flat = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    need = n_seq * seq_len
    if n_seq < 1 or seq_len < 2:
        raise ValueError(f"n_seq={n_seq}, seq_len={seq_len}: need n_seq >= 1 and seq_len >= 2")
    if flat.numel() < need:
        raise ValueError(
            f"{flat.numel()} tokens cannot fill {n_seq} x {seq_len}: tokenize more text or "
            "ask for fewer/shorter sequences"
        )
    return flat[:need].reshape(n_seq, seq_len).clone()


def _check_tokens(tokens: torch.Tensor) -> None:
    import torch

    if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"calibration tokens must be int64 [n_seq, seq_len >= 2], got {tokens.dtype} "
            f"{list(tokens.shape)}"
        )


def _batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _nll_sum(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch (logits upcast to float32)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) for the duration, restoring the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def mean_nll(model: nn.Module, tokens: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> float:
    """Mean next-token NLL (nats) over all ``n_seq * (seq_len - 1)`` predicted tokens.

    The batches are fixed by ``batch_size`` and summed in float64, so the same weights give the
    same number bit for bit on a given device.
    """
    import torch

    _check_tokens(tokens)
    tokens = tokens.to(_device(model))
    total = 0.0
    with torch.no_grad(), _eval_mode(model):
        for batch in _batches(tokens, batch_size):
            total += float(_nll_sum(model, batch).double())
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


# ----------------------------------------------------------------------------- landscape
def landscape_parameters(
    model: nn.Module, which: str | Sequence[str] = "blocks"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The weights a landscape measurement moves, as (name, parameter), tied ones once.

    ``"blocks"``: the linear weights of the decoder blocks (what is quantized by default);
    ``"all"``: every distinct parameter; a list: exactly those parameter names.
    """
    from kbit.model_quant import block_linear_names

    if isinstance(which, str):
        if which == "blocks":
            names = [f"{m}.weight" for m in block_linear_names(model)]
        elif which == "all":
            names = [n for n, _ in model.named_parameters()]
        else:
            raise ValueError(f"which={which!r}: allowed are 'blocks', 'all' or a list of names")
    else:
        names = list(which)
    out, seen = [], set()
    for name in names:
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no parameter {name!r}") from None
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise ValueError(f"no parameters selected by which={which!r}")
    return out


def _perturb(params: list[torch.nn.Parameter], radius: float, seed: int) -> None:
    """W <- W + radius * ||W|| * eps / ||eps|| for every tensor, eps from seed ``seed``."""
    import torch

    gens: dict[torch.device, torch.Generator] = {}
    for p in params:
        gen = gens.get(p.device)
        if gen is None:
            gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(int(seed))
        eps = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        w = p.detach().float()
        scale = radius * w.norm() / eps.norm()
        p.detach().copy_((w + scale * eps).to(p.dtype))


def radial_profile(
    model: nn.Module,
    tokens: torch.Tensor,
    radii: Sequence[float] = DEFAULT_RADII,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    which: str | Sequence[str] = "blocks",
    batch_size: int = DEFAULT_BATCH,
) -> pd.DataFrame:
    """Loss along random directions at relative radii: one row per (radius, seed).

    Columns: radius, seed, loss, delta (loss - loss at radius 0), rel_delta (delta / that loss).
    A zero radius is evaluated once (through the same perturb-and-restore path) and reported for
    every seed. The weights are restored bit for bit afterwards, also when a pass fails.
    """
    import torch

    radii = sorted({float(r) for r in radii})
    seeds = [int(s) for s in seeds]
    if not seeds or not radii:
        raise ValueError(f"need at least one radius and one seed, got {radii} and {seeds}")
    if any(r < 0 or not math.isfinite(r) for r in radii):
        raise ValueError(f"radii must be finite and >= 0, got {radii}")
    params = [p for _, p in landscape_parameters(model, which)]
    saved = [p.detach().clone() for p in params]
    losses: dict[tuple[float, int], float] = {}
    try:
        for r in radii:
            for i, seed in enumerate(seeds):
                if r == 0.0 and i > 0:
                    losses[(r, seed)] = losses[(r, seeds[0])]
                    continue
                _perturb(params, r, seed)
                try:
                    losses[(r, seed)] = mean_nll(model, tokens, batch_size)
                finally:
                    with torch.no_grad():
                        for p, s in zip(params, saved, strict=True):
                            p.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    df = pd.DataFrame(
        [{"radius": r, "seed": int(s), "loss": v} for (r, s), v in losses.items()]
    ).sort_values(["radius", "seed"], ignore_index=True)
    base = mean_nll(model, tokens, batch_size) if 0.0 not in radii else losses[(0.0, seeds[0])]
    df["delta"] = df["loss"] - base
    df["rel_delta"] = df["delta"] / base
    return df


def _rise_label(rise: float) -> str:
    return f"r_rise_{100 * rise:g}pct"


def crossing_radius(radii: np.ndarray, losses: np.ndarray, base: float, rise: float) -> float:
    """The radius where the loss first reaches ``base * (1 + rise)``, linearly interpolated.

    The profile starts at (0, base); ``inf`` when the largest radius stays below the threshold
    (the landscape is flatter than the range measured).
    """
    order = np.argsort(radii)
    r = np.concatenate([[0.0], np.asarray(radii, float)[order]])
    y = np.concatenate([[base], np.asarray(losses, float)[order]])
    threshold = base * (1.0 + rise)
    above = np.nonzero(y >= threshold)[0]
    above = above[above > 0]
    if len(above) == 0:
        return math.inf
    j = int(above[0])
    r0, r1, y0, y1 = r[j - 1], r[j], y[j - 1], y[j]
    if y1 == y0:
        return float(r1)
    return float(r0 + (threshold - y0) * (r1 - r0) / (y1 - y0))


def radial_summary(
    profile: pd.DataFrame, base_loss: float, rises: Sequence[float] = DEFAULT_RISES
) -> dict[str, Any]:
    """Scalars of a profile: crossing radii, their ratio, the seed spread, the curve itself.

    ``rise_ratio`` is r(largest rise) / r(smallest rise): 3.16 for a quadratic bowl between 1%
    and 10%, close to 1 for a step; ``inf``/NaN when a radius was not reached. The seed-mean
    curve is kept as two lists (``radial_radii``, ``radial_loss``) so the loss at any format's
    SQNR can be interpolated later (:func:`kbit.analysis.predict.iso_sqnr_delta`).
    """
    pos = profile[profile["radius"] > 0]
    mean = pos.groupby("radius")["loss"].mean()
    sd = pos.groupby("radius")["loss"].std(ddof=1)
    out: dict[str, Any] = {"base_loss": float(base_loss)}
    crossings = []
    for rise in rises:
        c = crossing_radius(mean.index.to_numpy(), mean.to_numpy(), base_loss, rise)
        out[_rise_label(rise)] = c
        crossings.append(c)
    if len(crossings) >= 2:
        lo, hi = crossings[0], crossings[-1]
        out["rise_ratio"] = hi / lo if math.isfinite(lo) and lo > 0 else math.nan
    out["radius_max"] = float(mean.index.max()) if len(mean) else math.nan
    out["rel_delta_at_radius_max"] = (
        float(mean.iloc[-1] / base_loss - 1.0) if len(mean) else math.nan
    )
    out["radial_seed_sd_max"] = float(sd.max()) if len(sd) and sd.notna().any() else math.nan
    out["radial_radii"] = [float(r) for r in mean.index]
    out["radial_loss"] = [float(v) for v in mean.to_numpy()]
    return out


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """Scaled-dot-product attention through its math backend: the fused kernels have no
    second derivative, the math backend is plain differentiable tensor operations."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def hutchinson_probes(
    loss_terms: Callable[[], Iterable[torch.Tensor]],
    params: Sequence[torch.Tensor],
    n_probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> np.ndarray:
    """``v' H v`` for ``n_probes`` Rademacher vectors ``v``: H the Hessian of the loss w.r.t.
    ``params``, where the loss is the sum of the tensors ``loss_terms()`` yields (one per batch,
    so that memory holds one batch's graph at a time). Their mean estimates trace(H)."""
    import torch

    gens: dict[torch.device, torch.Generator] = {}
    values = []
    for _ in range(n_probes):
        probe = []
        for p in params:
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(int(seed))
            bits = torch.randint(0, 2, p.shape, generator=gen, device=p.device)
            probe.append((bits * 2 - 1).to(p.dtype))
        total = 0.0
        for loss in loss_terms():
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
            gv = sum((g * v).sum() for g, v in zip(grads, probe, strict=True))
            hv = torch.autograd.grad(gv, params, materialize_grads=True)
            total += float(
                sum((h.double() * v.double()).sum() for h, v in zip(hv, probe, strict=True))
            )
        values.append(total)
    return np.asarray(values, dtype=float)


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of a Hessian trace: the mean of ``probes`` and its standard error."""

    probes: np.ndarray
    n_params: int
    seconds: float = math.nan

    @property
    def trace(self) -> float:
        return float(np.mean(self.probes))

    @property
    def se(self) -> float:
        """Standard error over probes (NaN with a single probe: no spread to measure)."""
        n = len(self.probes)
        return float(np.std(self.probes, ddof=1) / math.sqrt(n)) if n > 1 else math.nan

    def as_dict(self) -> dict[str, float]:
        return {
            "hessian_trace": self.trace,
            "hessian_trace_se": self.se,
            "hessian_trace_per_param": self.trace / self.n_params,
            "hessian_n_probes": len(self.probes),
        }


@contextlib.contextmanager
def _grad_only(model: nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only (less memory), restoring every requires_grad flag."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def hessian_trace(
    model: nn.Module,
    tokens: torch.Tensor,
    n_probes: int = DEFAULT_PROBES,
    seed: int = 0,
    which: str | Sequence[str] = "blocks",
    batch_size: int = HVP_BATCH,
) -> TraceEstimate:
    """Hutchinson trace of the Hessian of :func:`mean_nll` w.r.t. the selected weights.

    Cost: ``n_probes`` Hessian-vector products over the whole calibration tensor (module
    docstring), ``batch_size`` sequences per term (``HVP_BATCH``: memory, not speed, binds).
    Runs in evaluation mode with attention on the math backend (double backward).
    """
    _check_tokens(tokens)
    tokens = tokens.to(_device(model))
    named = landscape_parameters(model, which)
    params = [p for _, p in named]
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)

    def loss_terms() -> Iterator[torch.Tensor]:
        for batch in _batches(tokens, batch_size):
            yield _nll_sum(model, batch) / n_tokens

    start = time.perf_counter()
    with _eval_mode(model), _grad_only(model, params), _double_backward_attention():
        probes = hutchinson_probes(loss_terms, params, n_probes, seed)
    return TraceEstimate(probes, sum(p.numel() for p in params), time.perf_counter() - start)


@dataclass
class Landscape:
    """Per-model features (``summary``, one flat row) and the radial profile they came from."""

    summary: dict[str, Any]
    profile: pd.DataFrame
    trace: TraceEstimate | None = None


def landscape_features(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    radii: Sequence[float] = DEFAULT_RADII,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    n_probes: int = DEFAULT_PROBES,
    which: str | Sequence[str] = "blocks",
    rises: Sequence[float] = DEFAULT_RISES,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
) -> Landscape:
    """All per-model features: calibration loss, radial profile and its summary, Hessian trace.

    ``n_probes=0`` skips the curvature (its columns are NaN). The summary records the cost:
    ``n_forward_passes`` and ``n_hvp`` (full passes over the calibration tensor) and seconds.
    """
    if 0.0 not in [float(r) for r in radii]:
        radii = (0.0, *radii)
    n_params = sum(p.numel() for _, p in landscape_parameters(model, which))
    t0 = time.perf_counter()
    profile = radial_profile(model, tokens, radii, seeds, which, batch_size)
    t_radial = time.perf_counter() - t0
    base = float(profile.loc[profile["radius"] == 0.0, "loss"].iloc[0])
    n_nonzero = len({float(r) for r in radii if float(r) > 0})
    summary: dict[str, Any] = {
        **radial_summary(profile, base, rises),
        "landscape_which": which if isinstance(which, str) else ",".join(which),
        "n_params_landscape": int(n_params),
        "n_calibration_tokens": int(tokens.shape[0] * (tokens.shape[1] - 1)),
        "n_forward_passes": 1 + n_nonzero * len(seeds),
        "seconds_radial": t_radial,
    }
    trace = None
    if n_probes > 0:
        trace = hessian_trace(model, tokens, n_probes, seed, which)
        summary.update(trace.as_dict())
        summary["seconds_hessian"] = trace.seconds
    else:
        summary.update(
            {
                "hessian_trace": math.nan,
                "hessian_trace_se": math.nan,
                "hessian_trace_per_param": math.nan,
                "hessian_n_probes": 0,
                "seconds_hessian": 0.0,
            }
        )
    summary["n_hvp"] = int(n_probes)
    return Landscape(summary, profile, trace)
