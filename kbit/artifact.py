"""The packed quantized artifact: what a k-bit model really costs on disk, and how to reload it.

``quantize_to_artifact`` writes a directory with

- ``model.safetensors``: every quantized tensor as the state tensors of its ``QTensor`` under
  ``<name>.__kbit__.<field>`` (packed codes, block constants, stored codebook/extras) plus, for
  proxy quantization, ``<name>.__kbit__.outlier_columns`` (int32 indices) and
  ``<name>.__kbit__.outlier_values`` (the kept columns in 16 bit); every other parameter in the
  model's 16-bit dtype (fp16, or bf16 for a bf16 model). Non-tensor QTensor fields go to the
  safetensors metadata as JSON under ``<name>.__kbit__``. Tied parameters are stored once.
- ``kbit.json``: spec, selection settings, per-tensor rows, the bit summary, library versions and
  the base model directory.

So the file size is the accounting's ``total_bits / 8`` plus the safetensors header, byte
padding of packed codes and the outlier indices (recorded as ``index_bytes``).

``load_artifact`` applies the stored weights to an already loaded base model and gives exactly
(bit for bit) what :func:`kbit.model_quant.quantize_model` gives on that model, because both go
through :meth:`kbit.model_quant.QuantizedWeight.dequantize`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbit.blockwise import QTensor
from kbit.codebooks import codebook_for, element_grid
from kbit.io import atomic_dir, write_json
from kbit.loading import load_causal_lm
from kbit.methods import quantize_with
from kbit.model_quant import (
    QuantizedWeight,
    TensorPlan,
    sixteen_bit_dtype,
    untie_partially_selected,
)
from kbit.settings import QuantizeOptions
from kbit.spec import MICROSCALING_DTYPES, QuantSpec

log = logging.getLogger(__name__)

FORMAT = "kbit-artifact"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "kbit.json"
SEP = ".__kbit__."


class ArtifactError(RuntimeError):
    """An artifact that is missing, malformed or does not fit the model it is applied to."""


def _versions() -> dict[str, str]:
    import transformers

    import kbit

    return {
        "kbit": kbit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def quantize_to_artifact(
    model_dir: Path | str,
    spec: QuantSpec | str,
    out_dir: Path | str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    options: QuantizeOptions | None = None,
    trust_remote_code: bool = False,
    calibration: torch.Tensor | None = None,
    gptq: Mapping[str, Any] | None = None,
    assignment: Any = None,
) -> dict[str, Any]:
    """Quantize the model in ``model_dir`` and write ``out_dir`` atomically; returns kbit.json.

    ``dtype`` is the dtype the model is loaded in (``"auto"``: the checkpoint's). Quantization
    itself runs in float32 on the exact weights, so loading the artifact into a model loaded in
    the same dtype reproduces ``quantize_model`` exactly. The baseline spec writes kbit.json only.
    GPTQ specs need ``calibration`` tokens (and take ``gptq`` settings), mixed specs their
    search's ``assignment`` (:func:`kbit.methods.quantize_with`).
    """
    model = load_causal_lm(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    return write_artifact(
        model,
        model_dir,
        spec,
        out_dir,
        options=options,
        calibration=calibration,
        gptq=gptq,
        assignment=assignment,
        settings={"load_dtype": str(dtype).replace("torch.", ""), "device": device},
    )


def write_artifact(
    model: nn.Module,
    model_dir: Path | str,
    spec: QuantSpec | str,
    out_dir: Path | str,
    *,
    options: QuantizeOptions | None = None,
    calibration: torch.Tensor | None = None,
    gptq: Mapping[str, Any] | None = None,
    assignment: Any = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize an already loaded ``model`` (of ``model_dir``) in place and write the artifact.

    For several specs of one model, restore the weights between calls
    (:class:`kbit.model_quant.WeightSnapshot`); ``settings`` are recorded in kbit.json.
    """
    from safetensors.torch import save_file

    spec = QuantSpec.parse(spec)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options = options or QuantizeOptions()
    stored: dict[str, QuantizedWeight] = {}

    def keep(qw: QuantizedWeight) -> None:
        stored[qw.plan.name] = _to_cpu(qw)

    done = quantize_with(
        model,
        spec,
        options,
        calibration=calibration,
        gptq=gptq,
        assignment=assignment,
        on_tensor=keep,
    )
    rows = done.rows
    model_dtype = next(model.parameters()).dtype
    untied = [r["name"] for r in rows if r["untied"]]
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quant": spec.id,
        "spec": spec.to_dict(),
        "settings": {**options.kwargs(), **dict(settings or {})},
        "base_model": str(model_dir.resolve()),
        "model_type": getattr(model.config, "model_type", None),
        "model_dtype": str(model_dtype).replace("torch.", ""),
        "untied": untied,
        "versions": _versions(),
        "summary": done.summary,
        **done.details,
        "tensors": rows,
    }
    if gptq is not None and spec.method == "gptq":
        meta["gptq_settings"] = dict(gptq)

    def write(tmp: Path) -> None:
        if not spec.is_baseline:
            tensors, st_meta, index_bytes = _pack(model, rows, stored, model_dtype)
            save_file(tensors, str(tmp / WEIGHTS), metadata=st_meta)
            meta["files"] = {WEIGHTS: (tmp / WEIGHTS).stat().st_size}
            meta["index_bytes"] = index_bytes
        write_json(meta, tmp / META)

    with atomic_dir(out_dir) as tmp:
        write(tmp)
    return meta


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    kept = None if qw.outlier_values is None else qw.outlier_values.detach().cpu()
    return QuantizedWeight(qw.plan, qw.qtensor.to("cpu"), kept, qw.shape)


def spec_codebook(spec: QuantSpec) -> torch.Tensor | None:
    """The codebook a data type implies (None for the per-tensor quantile type)."""
    if spec.dtype == "quantile":
        return None
    if spec.dtype in MICROSCALING_DTYPES:
        return element_grid(spec).values.to(torch.float32)
    return codebook_for(spec).to(torch.float32)


def _stored_tensors(q: Any) -> dict[str, torch.Tensor]:
    """The QTensor state worth storing: a codebook the spec implies is dropped (it is part of
    the data type, not of the tensor), the quantile codebook is stored at the 16 bits the
    accounting counts (its values are fp16-rounded, so this is exact)."""
    tensors = dict(q.state_dict()["tensors"])
    cb = tensors["codebook"]
    implied = spec_codebook(q.spec)
    if implied is not None and torch.equal(implied, cb.cpu()):
        del tensors["codebook"]
    elif torch.equal(cb.to(torch.float16).float(), cb):
        tensors["codebook"] = cb.to(torch.float16)
    return tensors


def _pack(
    model: nn.Module, rows: list[dict], stored: dict[str, QuantizedWeight], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    tensors: dict[str, torch.Tensor] = {}
    st_meta: dict[str, str] = {"format": FORMAT}
    index_bytes = 0
    half = sixteen_bit_dtype(dtype)
    for row in rows:
        name = row["name"]
        if row["tied_to"]:
            continue
        if not row["quantized"]:
            tensors[name] = model.get_parameter(name).detach().to(half).cpu().contiguous()
            continue
        qw = stored[name]
        for field, value in _stored_tensors(qw.qtensor).items():
            tensors[f"{name}{SEP}{field}"] = value.contiguous()
        st_meta[f"{name}{SEP[:-1]}"] = json.dumps(qw.qtensor.state_dict()["meta"])
        if qw.outlier_values is not None:
            cols = qw.plan.outlier_columns.to(torch.int32)
            tensors[f"{name}{SEP}outlier_columns"] = cols
            tensors[f"{name}{SEP}outlier_values"] = qw.outlier_values.contiguous()
            index_bytes += cols.numel() * cols.element_size()
    return tensors, st_meta, index_bytes


def read_meta(artifact_dir: Path | str) -> dict[str, Any]:
    """kbit.json of an artifact, checked for the format this module writes."""
    path = Path(artifact_dir) / META
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: not a kbit artifact (run `kbit quantize`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    return meta


def load_artifact(artifact_dir: Path | str, model: nn.Module) -> dict[str, Any]:
    """Apply an artifact's quantized weights to ``model`` in place; returns kbit.json's content.

    The model must be the artifact's base model (same parameter names and shapes); its dtype and
    device are kept. Unquantized parameters are left as loaded, tied weights that the artifact
    untied are untied the same way. The result equals ``quantize_model(model, spec)`` bit for bit
    when the model holds the weights the artifact was made from (same load dtype, or a dtype that
    represents the checkpoint exactly); otherwise the artifact's values are cast to the model's
    dtype, and a warning says so.
    """
    from safetensors import safe_open

    artifact_dir = Path(artifact_dir)
    meta = read_meta(artifact_dir)
    spec = QuantSpec.parse(meta["quant"])
    if spec.is_baseline:
        return meta
    quantized = [r for r in meta["tensors"] if r["quantized"] and not r["tied_to"]]
    params = dict(model.named_parameters(remove_duplicate=False))
    for r in quantized:
        p = params.get(r["name"])
        if p is None or list(p.shape) != list(r["shape"]):
            got = "missing" if p is None else f"shape {list(p.shape)}"
            raise ArtifactError(
                f"artifact {artifact_dir} quantized {r['name']} with shape {r['shape']}, but the "
                f"model has {got}: load the artifact into its base model {meta['base_model']}"
            )
    model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if model_dtype != meta.get("model_dtype"):
        log.warning(
            "artifact %s was quantized from %s weights, the model is %s: the dequantized values "
            "are cast, and may differ from quantizing this model directly",
            artifact_dir,
            meta.get("model_dtype"),
            model_dtype,
        )
    selected = [r["name"] for r in meta["tensors"] if r["quantized"]]
    untie_partially_selected(model, selected)
    path = artifact_dir / WEIGHTS
    with safe_open(str(path), framework="pt", device="cpu") as f:
        st_meta = f.metadata() or {}
        keys = set(f.keys())
        for r in quantized:
            name = r["name"]
            prefix = f"{name}{SEP}"
            meta_key = f"{name}{SEP[:-1]}"
            if meta_key not in st_meta:
                raise ArtifactError(f"{path} has no metadata for quantized tensor {name}")
            qmeta = json.loads(st_meta[meta_key])
            state: dict[str, torch.Tensor] = {}
            cols = kept = None
            for key in keys:
                if not key.startswith(prefix):
                    continue
                field = key[len(prefix) :]
                if field == "outlier_columns":
                    cols = f.get_tensor(key).long()
                elif field == "outlier_values":
                    kept = f.get_tensor(key)
                else:
                    state[field] = f.get_tensor(key)
            if "codebook" not in state:
                state["codebook"] = spec_codebook(QuantSpec.from_dict(qmeta["spec"]))
            state["codebook"] = state["codebook"].float()
            param = model.get_parameter(name)
            # decoding (codebook[code] * scale, one float32 product) is exact on any device
            q = QTensor.from_state_dict({"tensors": state, "meta": qmeta}).to(param.device)
            plan = TensorPlan(name, r["module"], r["transposed"], cols, r["outlier_source"])
            qw = QuantizedWeight(plan, q, kept, tuple(param.shape))
            with torch.no_grad():
                param.copy_(qw.dequantize(param.dtype))
    return meta
