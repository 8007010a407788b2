r"""Simulated k-bit quantization of a whole transformers model, in place.

What gets quantized (the paper quantizes "the linear layers of the transformer blocks"):

- by default the weight of every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) inside the
  decoder blocks, found generically as the model's largest ``nn.ModuleList`` of identical blocks;
- ``quantize_embeddings`` adds every embedding table (token and learned position embeddings),
  ``quantize_lm_head`` adds the output projection; norms and biases stay 16-bit unless chosen;
- ``include``/``exclude`` are regular expressions (``re.search``) on parameter and module
  names. ``include`` replaces the default selection: a pattern matching a linear or embedding
  module selects its weight; biases and norms need a pattern that names the parameter itself
  (``r"\.bias$"``). ``exclude`` removes anything whose parameter or module name matches.

Every weight is quantized in the ``[out, in]`` layout of ``nn.Linear`` (``Conv1D`` stores
``[in, out]``: it is transposed, quantized and transposed back) so blocks of B consecutive values
run along the input dimension for every architecture. Quantization runs in float32 on the exact
(upcast) weights and the dequantized values are cast back to the model's dtype.

Proxy (outlier-dependent) quantization, ``spec.outlier_fraction = p > 0``: for consecutive layers
(i, i+1) of a block, the output units of layer i are ranked by the standard deviation of their
weights and the input columns of layer i+1 fed by the top ``ceil(p * in_features)`` units are kept
in 16 bit; the other columns form a compacted matrix quantized with blocking over the remaining
values only. The pairs are attention value projection -> attention output projection (for fused
QKV layers only the value part feeds the output projection) and FFN up -> down projection (for
gated FFNs the up projection, not the gate, is ranked). Layers that are not the second member of
a pair (query/key projections, fused QKV, FFN up/gate) have no predecessor whose outputs they
consume directly and are quantized without outlier columns; their rows say
``outlier_source = None``. Kept columns are stored in the model's 16-bit dtype (fp16 for a
float32 model, so the accounting's 16 bits per kept value is what is actually used).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, weight stored [in, out]

from kbit.blockwise import QTensor, quantize
from kbit.spec import QuantSpec, SpecError

log = logging.getLogger(__name__)

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

#: (predecessor suffix, successor suffix, how successor inputs map to predecessor outputs)
#: suffixes are relative to a decoder block; the first matching pair in a block wins.
PROXY_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("self_attn.v_proj", "self_attn.out_proj", "value"),  # OPT
    ("self_attn.v_proj", "self_attn.o_proj", "value"),  # Llama, Mistral (GQA aware)
    ("attention.query_key_value", "attention.dense", "qkv_per_head"),  # GPT-NeoX / Pythia
    ("self_attention.query_key_value", "self_attention.dense", "qkv_per_head"),  # BLOOM
    ("attn.c_attn", "attn.c_proj", "qkv_split"),  # GPT-2
    ("fc1", "fc2", "identity"),  # OPT
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "identity"),  # GPT-NeoX, BLOOM
    ("mlp.c_fc", "mlp.c_proj", "identity"),  # GPT-2
    ("mlp.up_proj", "mlp.down_proj", "identity"),  # Llama (ranked by up_proj, not gate_proj)
)


@dataclass(frozen=True)
class TensorPlan:
    """How one selected parameter is quantized."""

    name: str  # parameter name
    module: str  # owning module name
    transpose: bool  # stored [in, out] (Conv1D): quantized transposed
    outlier_columns: torch.Tensor | None  # sorted input columns kept in 16 bit ([out, in] layout)
    outlier_source: str | None  # predecessor module whose output stds chose the columns


@dataclass
class QuantizedWeight:
    """A quantized parameter: the packed QTensor plus the input columns kept in 16 bit.

    ``dequantize`` is the single place where stored state becomes weights, used both for in-place
    simulated quantization and when an artifact is loaded, so the two agree bit for bit.
    """

    plan: TensorPlan
    qtensor: QTensor  # the (compacted) [out, in] matrix
    outlier_values: torch.Tensor | None  # [out, n_kept] in a 16-bit dtype
    shape: tuple[int, ...]  # parameter shape as stored in the model

    @property
    def bits(self) -> int:
        """Storage bits: packed codes, block constants and extras, plus kept columns at 16 bit."""
        extra = 0 if self.outlier_values is None else 16 * self.outlier_values.numel()
        return int(self.qtensor.bits) + extra

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in the parameter's layout and ``dtype``."""
        w = assemble_columns(
            self.qtensor.dequantize().float(), self.plan.outlier_columns, self.outlier_values
        )
        w = w.to(dtype)
        w = w.t() if self.plan.transpose else w.reshape(self.shape)
        return w.contiguous()


# ----------------------------------------------------------------------------- structure
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the largest list whose items share one class.

    Looking for the structure instead of a per-architecture attribute path keeps every causal
    LM in transformers working (``model.decoder.layers``, ``gpt_neox.layers``, ``transformer.h``,
    ``model.layers``...).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no ModuleList of decoder blocks containing linear "
            "layers; kbit supports transformers causal LMs (OPT, GPT-NeoX/Pythia, GPT-2, BLOOM, "
            "Llama and alike)"
        )
    return best[1], best[2]


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear modules inside the decoder blocks, in model order."""
    prefix, _ = find_blocks(model)
    return [
        name
        for name, mod in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(mod, LINEAR_TYPES)
    ]


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A module's weight in the ``[out, in]`` layout (a view; Conv1D is transposed)."""
    w = module.weight
    return w.t() if _is_conv1d(module) else w


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def _head_dim(model: nn.Module, attention: nn.Module) -> int:
    for attr in ("head_dim", "head_size"):
        v = getattr(attention, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not heads or not hidden:
        raise ValueError(f"cannot tell the attention head size of {type(model).__name__}")
    return int(getattr(cfg, "head_dim", None) or hidden // heads)


def _input_to_predecessor_unit(
    kind: str, pred_out: int, succ_in: int, head_dim: int
) -> torch.Tensor:
    """For every input column of the successor, the predecessor output unit that feeds it."""
    j = torch.arange(succ_in)
    if kind == "identity" or (kind == "value" and pred_out == succ_in):
        expected = succ_in
        index = j
    elif kind == "value":  # grouped-query attention: several query heads share a KV head
        if succ_in % pred_out:
            raise ValueError(f"value projection has {pred_out} outputs, o_proj {succ_in} inputs")
        groups = succ_in // pred_out
        expected = pred_out
        index = (j // head_dim // groups) * head_dim + j % head_dim
    elif kind == "qkv_per_head":  # [heads, 3, head_dim]: value is part 2 of each head
        expected = 3 * succ_in
        index = (j // head_dim) * 3 * head_dim + 2 * head_dim + j % head_dim
    elif kind == "qkv_split":  # [q | k | v] along the output dimension
        expected = 3 * succ_in
        index = 2 * succ_in + j
    else:  # pragma: no cover - PROXY_PAIRS is fixed
        raise ValueError(kind)
    if pred_out != expected:
        raise ValueError(
            f"proxy pair layout {kind!r}: predecessor has {pred_out} outputs, "
            f"expected {expected} for a successor with {succ_in} inputs"
        )
    return index


def proxy_pairs(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Successor module name -> (predecessor module name, successor-input -> predecessor-unit).

    Only pairs listed in ``PROXY_PAIRS`` whose two modules both exist in a block are returned.
    """
    prefix, blocks = find_blocks(model)
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[str, torch.Tensor]] = {}
    for i in range(len(blocks)):
        base = f"{prefix}.{i}."
        for pred_suffix, succ_suffix, kind in PROXY_PAIRS:
            pred, succ = base + pred_suffix, base + succ_suffix
            if succ in pairs or pred not in modules or succ not in modules:
                continue
            wp, ws = weight_out_in(modules[pred]), weight_out_in(modules[succ])
            parent = modules[succ.rsplit(".", 1)[0]]
            hd = _head_dim(model, parent) if kind != "identity" else 1
            pairs[succ] = (pred, _input_to_predecessor_unit(kind, wp.shape[0], ws.shape[1], hd))
    return pairs


def n_outlier_columns(fraction: float, in_features: int) -> int:
    """ceil(p * in_features), robust to float noise such as 0.02 * 150 = 3.0000000000000004."""
    return min(in_features, math.ceil(round(fraction * in_features, 9)))


def select_outlier_columns(
    predecessor_out_in: torch.Tensor, unit_index: torch.Tensor, fraction: float
) -> torch.Tensor:
    """Sorted input columns of the successor fed by the top-std predecessor output units.

    Ties are broken towards the lower column index (stable sort), so the choice is reproducible.
    """
    std = predecessor_out_in.detach().float().std(dim=1)
    scores = std[unit_index.to(std.device)]
    k = n_outlier_columns(fraction, scores.numel())
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:k]).values


def assemble_columns(
    rest: torch.Tensor, columns: torch.Tensor | None, kept: torch.Tensor | None
) -> torch.Tensor:
    """Put the kept 16-bit columns back between the dequantized remaining columns (float32)."""
    if columns is None or columns.numel() == 0:
        return rest
    out_f = rest.shape[0]
    n_in = rest.shape[1] + columns.numel()
    w = torch.empty(out_f, n_in, dtype=torch.float32, device=rest.device)
    mask = torch.zeros(n_in, dtype=torch.bool, device=rest.device)
    mask[columns.to(rest.device)] = True
    w[:, ~mask] = rest
    w[:, mask] = kept.to(device=rest.device, dtype=torch.float32)
    return w


def sixteen_bit_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype that stores unquantized values of a model in ``dtype``."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


# ----------------------------------------------------------------------------- selection
def _param_owner(name: str) -> tuple[str, str]:
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(
                f"{what} pattern {p!r} is not a valid regular expression: {err}"
            ) from None
    return out


def _matches(name: str, patterns: list[re.Pattern[str]]) -> bool:
    """Exclusion test: a pattern found in the parameter name or in its module name."""
    module, _ = _param_owner(name)
    return any(p.search(name) or p.search(module) for p in patterns)


def _included(name: str, module: nn.Module, patterns: list[re.Pattern[str]]) -> bool:
    r"""Inclusion test, careful not to sweep biases and norms in by accident.

    A pattern that matches a linear or embedding module (or its weight's name) selects the
    weight; any other parameter (a bias, a norm's scale) is selected only by a pattern that
    names it beyond its module, e.g. ``r"\.bias$"`` or ``r"ln_f\.weight"``.
    """
    module_name, leaf = _param_owner(name)
    for p in patterns:
        in_param, in_module = bool(p.search(name)), bool(p.search(module_name))
        if leaf == "weight" and isinstance(module, (*LINEAR_TYPES, nn.Embedding)):
            if in_param or in_module:
                return True
        elif in_param and not in_module:
            return True
    return False


def module_names(model: nn.Module, module: nn.Module | None) -> set[str]:
    """All names under which ``module`` is registered in ``model`` (shared modules have several)."""
    if module is None:
        return set()
    return {n for n, m in model.named_modules(remove_duplicate=False) if m is module}


def select_parameters(
    model: nn.Module,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = False,
) -> list[str]:
    """Names (aliases included) of the parameters to quantize, in model order."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    if inc:
        chosen = {n for n in names if _included(n, model.get_submodule(_param_owner(n)[0]), inc)}
    else:
        chosen = {f"{m}.weight" for m in block_linear_names(model)}
    if quantize_embeddings:
        chosen |= {
            f"{n}.weight"
            for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Embedding)
        }
    if quantize_lm_head:
        get_out = getattr(model, "get_output_embeddings", None)
        heads = module_names(model, get_out() if get_out else None)
        if not heads:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
        chosen |= {f"{h}.weight" for h in heads}
    return [n for n in names if n in chosen and not _matches(n, exc)]


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """First name of every parameter -> all names it is registered under (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return {names[0]: names for names in by_id.values()}


def untie_partially_selected(model: nn.Module, selected: Iterable[str]) -> list[str]:
    """Give every unselected alias of a selected tied parameter its own copy; returns those names.

    Without this, quantizing the LM head of a tied model would also quantize the input embedding
    (and vice versa). ``config.tie_word_embeddings`` is switched off so that a later
    ``model.tie_weights()`` (lm-eval calls it) does not tie the two again.
    """
    selected = set(selected)
    untied: list[str] = []
    for names in parameter_aliases(model).values():
        chosen = [n for n in names if n in selected]
        if not chosen or len(chosen) == len(names):
            continue
        for n in names:
            if n in selected:
                continue
            module_name, leaf = _param_owner(n)
            module = model.get_submodule(module_name)
            old = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(old.detach().clone(), old.requires_grad))
            untied.append(n)
    if untied:
        _disable_tying(model)
        log.info("untied %s from the quantized weights they shared", ", ".join(untied))
    return untied


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its text config (they differ for multimodal models)."""
    configs = [model.config]
    get_text = getattr(model.config, "get_text_config", None)
    if get_text is not None:
        configs.append(get_text())
    return configs


def _disable_tying(model: nn.Module) -> None:
    # transformers ties through ``_tied_weights_keys`` only while tie_word_embeddings is set, so
    # with it off the precomputed mapping (used by tie_weights(recompute_mapping=False)) is empty
    for cfg in _configs(model):
        cfg.tie_word_embeddings = False
    for mod in model.modules():
        keys = getattr(mod, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            keys.clear()


class WeightSnapshot:
    """The model's weights and weight tying as loaded, to evaluate many specs on one model.

    ``quantize_model`` changes weights in place and may untie a tied pair (and switch tying off
    in the config); :meth:`restore` undoes both, so each spec starts from the loaded model and
    its bit accounting counts a tied tensor once, as for a fresh load.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.data = {id(p): p.detach().clone() for p in self.params.values()}
        self.configs = [(c, c.tie_word_embeddings) for c in _configs(model)]
        self.tied_keys = {
            mod: dict(keys)
            for mod in model.modules()
            if isinstance(keys := getattr(mod, "all_tied_weights_keys", None), dict)
        }

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put every original parameter object back under all its names, with its values."""
        for name, param in self.params.items():
            module_name, leaf = _param_owner(name)
            module = model.get_submodule(module_name)
            if getattr(module, leaf) is not param:
                setattr(module, leaf, param)
        for param in {id(p): p for p in self.params.values()}.values():
            param.copy_(self.data[id(param)])
        for cfg, tied in self.configs:
            cfg.tie_word_embeddings = tied
        for mod, keys in self.tied_keys.items():
            mod.all_tied_weights_keys.clear()
            mod.all_tied_weights_keys.update(keys)


# ----------------------------------------------------------------------------- quantization
def _sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w = w.detach().double()
    err = (w - w_hat.detach().double()).pow(2).sum().item()
    sig = w.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(sig / err) if sig > 0 else -math.inf


def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, plan: TensorPlan, dtype: torch.dtype
) -> QuantizedWeight:
    """Quantize one parameter (any layout) following ``plan``; ``dtype`` is the model's dtype."""
    w = weight.detach()
    w2 = (w.t() if plan.transpose else w).float()
    cols = plan.outlier_columns
    kept = None
    if cols is not None and cols.numel():
        cols = cols.to(w2.device)
        mask = torch.zeros(w2.shape[1], dtype=torch.bool, device=w2.device)
        mask[cols] = True
        kept = w2[:, mask].to(sixteen_bit_dtype(dtype))
        w2 = w2[:, ~mask].contiguous()
    else:
        w2 = w2.contiguous()
    return QuantizedWeight(plan, quantize(w2, spec), kept, tuple(w.shape))


def quantize_model(
    model: nn.Module,
    spec: QuantSpec | str,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = False,
    on_tensor: Callable[[QuantizedWeight], None] | None = None,
) -> list[dict]:
    """Replace the selected weights by their quantized-dequantized values, in place.

    Returns one row per parameter of the model (tied aliases included, with ``tied_to`` naming
    the first name of the shared tensor so it is counted once): name, module, shape, n_params,
    quantized, bits, sqnr_db, outlier_columns, outlier_source, transposed, tied_to, untied.
    ``on_tensor`` receives every ``QuantizedWeight`` (the artifact writer stores them).
    """
    spec = QuantSpec.parse(spec)
    if spec.method != "rtn":
        raise SpecError(
            f"quantize_model rounds to nearest; spec {spec.id} uses method {spec.method!r}, "
            "which needs calibration data and its own quantizer"
        )
    if spec.is_baseline:
        return parameter_rows(model, {})
    selected = select_parameters(
        model,
        include=include,
        exclude=exclude,
        quantize_embeddings=quantize_embeddings,
        quantize_lm_head=quantize_lm_head,
    )
    untied = untie_partially_selected(model, selected)
    plans = make_plans(model, spec, selected)
    results: dict[str, tuple[TensorPlan, int, float]] = {}
    # all outlier columns were chosen from the original weights in make_plans, so quantizing a
    # predecessor before its successor cannot change the choice
    for name, plan in plans.items():
        param = model.get_parameter(name)
        qw = quantize_weight(param, spec, plan, param.dtype)
        w_hat = qw.dequantize(param.dtype).to(param.device)
        sqnr = _sqnr_db(param, w_hat)
        with torch.no_grad():
            param.copy_(w_hat)
        if on_tensor is not None:
            on_tensor(qw)
        results[name] = (plan, qw.bits, sqnr)  # the packed state itself is not kept
    return parameter_rows(model, results, untied)


def make_plans(model: nn.Module, spec: QuantSpec, selected: list[str]) -> dict[str, TensorPlan]:
    """A plan for each selected tensor (first alias only), outlier columns included."""
    firsts = {n for n, _ in model.named_parameters()}
    modules = dict(model.named_modules(remove_duplicate=False))
    pairs = proxy_pairs(model) if spec.outlier_fraction > 0 else {}
    plans: dict[str, TensorPlan] = {}
    for name in selected:
        if name not in firsts:  # another alias of a tensor selected under its first name
            continue
        module_name, leaf = _param_owner(name)
        module = modules[module_name]
        is_weight2d = leaf == "weight" and module.weight.dim() == 2
        transpose = is_weight2d and _is_conv1d(module)
        cols = source = None
        if is_weight2d and module_name in pairs:
            source, unit_index = pairs[module_name]
            pred = weight_out_in(modules[source])
            cols = select_outlier_columns(pred, unit_index, spec.outlier_fraction).cpu()
        plans[name] = TensorPlan(name, module_name, transpose, cols, source)
    if spec.outlier_fraction > 0 and not pairs:
        log.warning(
            "%s: no consecutive layer pairs found; proxy quantization keeps no columns",
            type(model).__name__,
        )
    return plans


def parameter_rows(
    model: nn.Module,
    results: dict[str, tuple[TensorPlan, int, float]],
    untied: Iterable[str] = (),
) -> list[dict]:
    """One accounting row per parameter name; unquantized parameters count 16 bits each.

    ``results`` maps the first name of each quantized tensor to (plan, stored bits, SQNR dB);
    ``untied`` names parameters that shared a tensor with a quantized one and got their own copy.
    """
    untied = set(untied)
    first_of = {}
    for first, names in parameter_aliases(model).items():
        for n in names:
            first_of[n] = first
    rows = []
    for name, p in model.named_parameters(remove_duplicate=False):
        first = first_of[name]
        plan, bits, sqnr = results.get(first, (None, 16 * p.numel(), None))
        cols = plan.outlier_columns if plan else None
        rows.append(
            {
                "name": name,
                "module": _param_owner(name)[0],
                "shape": list(p.shape),
                "n_params": p.numel(),
                "quantized": plan is not None,
                "bits": int(bits),
                "sqnr_db": sqnr,
                "outlier_columns": 0 if cols is None else int(cols.numel()),
                "outlier_source": plan.outlier_source if plan else None,
                "transposed": bool(plan.transpose) if plan else False,
                "tied_to": None if first == name else first,
                "untied": name in untied,
            }
        )
    return rows
